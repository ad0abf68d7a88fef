#!/usr/bin/env bash
# Issue #7: DP stage 1 (Qwen2.5-Coder-1.5B shape), the DPFT baseline (DP-SGD on the 7B shape) and
# non-DP utility boosting (7B shape, DeepSpeed ZeRO-2) on 1, 2 and 4 GPUs, random weights, with
# the same commands the Snakemake GPU rules use (torchrun ... -m privcode.cli ...).
#   bash scripts/scale_gpus.sh dp      # stage 1, 1.5B: 1/2/4 GPUs (docs/scaling.md)
#   bash scripts/scale_gpus.sh dpft    # DPFT, 7B: DP-SGD, micro-batches of 64 rows / 8192 tokens
#   bash scripts/scale_gpus.sh ft      # stage 6, 7B, DeepSpeed ZeRO-2 when > 1 GPU
# Environment: OUT (logs, scaling.txt; /tmp/out), FAST (1: fast path, default; 0: reference path
# + the noise-once check on real GPUs), PRIVSA=1 (add the PrivSA KL term, paper.yaml's λ schedule),
# COMPILE=1 (privsa_compile: torch.compile the PrivSA teacher; off by default),
# STEPS (optimizer steps per run, the first untimed; 12), MB / MBT (DP micro_batch_size /
# micro_batch_tokens), NG (GPUs to use; all), RECORDS (generated records), WORK (model + runs dir),
# WHEELS (wheel folder to install first; .whl), SHAPE (override the model shape, e.g. `tiny` for a
# CPU check of this script: tests/test_scale_script.py).
set -euo pipefail
MODE=${1:?usage: scale_gpus.sh dp|dpft|ft}
case $MODE in dp|dpft|ft) ;; *) echo "unknown mode '$MODE' (dp, dpft, ft)" >&2; exit 2 ;; esac
WHEELS=${WHEELS-.whl}  # wheels the device image lacks (device README); WHEELS= to use the environment as is
if [ -n "$WHEELS" ] && [ -d "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRIVCODE_ALLOW_RETRAIN=1  # benchmark runs on random weights and generated records: no budget to protect
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
  NG=${NG:-$(nvidia-smi -L | wc -l)}
else
  echo "no GPU (CPU check of the script)" | tee "$OUT/gpus.txt"; NG=${NG:-1}
fi
FAST=${FAST:-1}; STEPS=${STEPS:-12}
case $MODE in
  dp)   SHAPE=${SHAPE:-qwen2.5-coder-1.5b}; RECORDS=${RECORDS:-2048}; MB=${MB:-256}; MBT=${MBT:-24576}; LABEL=DP ;;  # paper.yaml's junior
  dpft) SHAPE=${SHAPE:-qwen2.5-coder-7b}; RECORDS=${RECORDS:-1024}; MB=${MB:-64}; MBT=${MBT:-8192}; LABEL=DPFT ;;  # paper.yaml's section
  ft)   SHAPE=${SHAPE:-qwen2.5-coder-7b}; RECORDS=${RECORDS:-1024}; LABEL=FT ;;
esac
case $SHAPE in qwen2.5-coder-1.5b) LABEL="$LABEL 1.5B" ;; qwen2.5-coder-7b) LABEL="$LABEL 7B" ;; *) LABEL="$LABEL $SHAPE" ;; esac
W=${WORK:-/tmp/scale_$SHAPE}  # prepared once per shape (model + records), reused across modes
export PRIVCODE_ZONE=$W/private PRIVCODE_BUDGET_DIR=$W/budget  # train stats in $W/private/<run>
EXTRA=$([ "$FAST" = 1 ] && echo '"fast": true, ' || true)
EXTRA=$EXTRA$([ "${PRIVSA:-0}" = 1 ] && echo '"privsa_lambda_max": 1000.0, "privsa_lambda_min": 0.1, "privsa_alpha": 0.01, ' || true)
EXTRA=$EXTRA$([ "${COMPILE:-0}" = 1 ] && echo '"privsa_compile": true, ' || true)
LORA=$EXTRA'"lora_r": 16, "lora_alpha": 32, "lora_targets": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], "dtype": "bfloat16", "max_length": 1024'
TAG=$([ "$FAST" = 1 ] && echo ' (fast path)' || true)$([ "${PRIVSA:-0}" = 1 ] && echo ' + PrivSA' || true)$([ "${COMPILE:-0}" = 1 ] && echo ' (compiled teacher)' || true)

report() { python3 - "$@" <<'PY' | tee -a "$OUT/scaling.txt"
import json, sys
name, d, priv = sys.argv[1], sys.argv[2], sys.argv[3]
s = json.load(open(priv + "/train_stats.json")); p = json.load(open(d + "/privacy.json"))
print(f"{name}: tokens/s {s['tokens_per_s']:.0f}  peak GiB/rank {s['peak_mem_gib_max_rank']:.1f}  "
      f"eps {p['epsilon']}  steps s {[round(x, 2) for x in s['step_seconds']]}  losses {[round(x, 3) for x in s['losses']]}")
PY
}
speedup() { python3 - "$@" <<'PY' | tee -a "$OUT/scaling.txt"
import json, os, sys
label, base, ng = sys.argv[1], sys.argv[2], int(sys.argv[3])  # runs of this call only (n <= NG)
tps = {n: json.load(open(f"{base}{n}/train_stats.json"))["tokens_per_s"] for n in (1, 2, 4)
       if n <= ng and os.path.exists(f"{base}{n}/train_stats.json")}  # base: under the private zone
print(f"{label} speed-up vs 1 GPU:", {n: round(t / tps[1], 2) for n, t in tps.items()} if 1 in tps else "no 1-GPU run")
PY
}

[ -d "$W/model" ] || python3 scripts/gpu_smoke.py prepare --out "$W" --shape "$SHAPE" --records $RECORDS > "$OUT/prepare.log" 2>&1 \
  || { tail -20 "$OUT/prepare.log"; exit 1; }
for n in 1 2 4; do
  [ $n -le "$NG" ] || continue
  if [ "$MODE" = ft ]; then
    torchrun --standalone --nproc_per_node $n -m privcode.cli finetune --model "$W/model" \
      --data "$W/private/data/records.jsonl" --out "$W/ft$n" --private-dir "$W/private/ft$n" \
      --params "{\"steps\": $STEPS, \"batch_size\": 64, \"micro_batch_size\": 4, $LORA}" > "$OUT/ft$n.log" 2>&1 || tail -20 "$OUT/ft$n.log"
    report "$LABEL x$n GPU (DeepSpeed ZeRO-2 when >1)" "$W/ft$n" "$W/private/ft$n"
  else
    torchrun --standalone --nproc_per_node $n -m privcode.cli dp-finetune --model "$W/model" \
      --data "$W/private/data/records.jsonl" --out "$W/$MODE$n" --private-dir "$W/private/$MODE$n" \
      --params "{\"epsilon\": 4, \"delta\": 1e-5, \"dataset_size\": \"public\", \"steps\": $STEPS, \"batch_size\": 256, \"micro_batch_size\": $MB, \"micro_batch_tokens\": $MBT, $LORA}" \
      > "$OUT/$MODE$n.log" 2>&1 || tail -20 "$OUT/$MODE$n.log"
    report "$LABEL x$n GPU$TAG" "$W/$MODE$n" "$W/private/$MODE$n"
  fi
done
speedup "$LABEL" "$W/private/$MODE" "$NG"

if [ "$MODE" = dp ] && [ "$FAST" != 1 ]; then  # noise added once per step, across real processes
  python3 -c "
from privcode.io import read_jsonl, write_jsonl
write_jsonl('$W/noise.jsonl', read_jsonl('$W/private/data/records.jsonl')[:64])"
  for n in 1 2 4; do
    [ $n -le "$NG" ] || continue
    torchrun --standalone --nproc_per_node $n tests/dist_worker.py "$W/model" "$W/noise$n.pt" "$W/noise.jsonl" > "$OUT/noise$n.log" 2>&1 || tail -20 "$OUT/noise$n.log"
    python3 -c "
import torch; u = torch.load('$W/noise$n.pt')['update'].double()
print('noise x$n GPU: update std', float(u.std()), 'expected', 2.0 * 0.5 / (0.5 * 64), 'n', u.numel())" | tee -a "$OUT/scaling.txt"
  done
fi
