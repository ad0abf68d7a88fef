#!/usr/bin/env bash
# Issue #7: DP stage 1 (Qwen2.5-Coder-1.5B shape, torchrun) and non-DP utility boosting
# (Qwen2.5-Coder-7B shape, DeepSpeed ZeRO-2) on 1, 2 and 4 GPUs, random weights, with the same
# commands the Snakemake GPU rules use. Usage on a 4-GPU host:  bash scripts/scale_gpus.sh dp|ft
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRIVCODE_ALLOW_RETRAIN=1  # benchmark runs on random weights and generated records: no budget to protect
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; NG=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpus.txt
# FAST=1 (default): the privcode.dp.fastloss path (dp_finetune.fast in the config); FAST=0 the
# reference path. STEPS: optimizer steps per run (the first is warm-up and not timed)
FAST=${FAST:-1}; STEPS=${STEPS:-12}
# MB / MBT: micro_batch_size / micro_batch_tokens of the DP runs (config/paper.yaml: 256 / 24576,
# one micro-batch per rank on 4 GPUs; 66.6 GiB peak on one GPU, so it fits 80 GB cards)
MB=${MB:-256}; MBT=${MBT:-24576}
EXTRA=$([ "$FAST" = 1 ] && echo '"fast": true, ' || true)
# PRIVSA=1: PrivCode's stage 1 proper, DP-SGD + the PrivSA KL term (config/paper.yaml's λ schedule)
EXTRA=$EXTRA$([ "${PRIVSA:-0}" = 1 ] && echo '"privsa_lambda_max": 1000.0, "privsa_lambda_min": 0.1, "privsa_alpha": 0.01, ' || true)
LORA=$EXTRA'"lora_r": 16, "lora_alpha": 32, "lora_targets": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"], "dtype": "bfloat16", "max_length": 1024'
report() { python3 - "$@" <<'PY' | tee -a $OUT/scaling.txt
import json, sys
name, d = sys.argv[1], sys.argv[2]
s = json.load(open(d + "/train_stats.json")); p = json.load(open(d + "/privacy.json"))
print(f"{name}: tokens/s {s['tokens_per_s']:.0f}  peak GiB/rank {s['peak_mem_gib_max_rank']:.1f}  "
      f"eps {p['epsilon']}  steps s {[round(x, 2) for x in s['step_seconds']]}  losses {[round(x, 3) for x in s['losses']]}")
PY
}
if [ "$1" = dp ]; then
  [ -d /tmp/m15/model ] || python3 scripts/gpu_smoke.py prepare --out /tmp/m15 --shape qwen2.5-coder-1.5b --records 2048 > /dev/null 2>&1
  for n in 1 2 4; do
    [ $n -le $NG ] || continue
    torchrun --standalone --nproc_per_node $n -m privcode.cli dp-finetune --model /tmp/m15/model \
      --data /tmp/m15/private/records.jsonl --out /tmp/m15/dp$n \
      --params "{\"epsilon\": 4, \"delta\": 1e-5, \"steps\": $STEPS, \"batch_size\": 256, \"micro_batch_size\": $MB, \"micro_batch_tokens\": $MBT, $LORA}" > $OUT/dp$n.log 2>&1 || tail -20 $OUT/dp$n.log
    report "DP 1.5B x$n GPU$([ "$FAST" = 1 ] && echo ' (fast path)')$([ "${PRIVSA:-0}" = 1 ] && echo ' + PrivSA')" /tmp/m15/dp$n
  done
  python3 - <<'PY' | tee -a $OUT/scaling.txt
import json, os
tps = {n: json.load(open(f"/tmp/m15/dp{n}/train_stats.json"))["tokens_per_s"] for n in (1, 2, 4)
       if os.path.exists(f"/tmp/m15/dp{n}/train_stats.json")}
print("DP speed-up vs 1 GPU:", {n: round(t / tps[1], 2) for n, t in tps.items()} if 1 in tps else "no 1-GPU run")
PY
  python3 - <<'PY' | tee -a $OUT/scaling.txt
import json, sys
from privcode.io import read_jsonl, write_jsonl
rows = read_jsonl("/tmp/m15/private/records.jsonl")[:64]
write_jsonl("/tmp/m15/noise.jsonl", rows)
PY
  for n in $([ "$FAST" = 1 ] || echo 1 2 4); do
    [ $n -le $NG ] || continue
    torchrun --standalone --nproc_per_node $n tests/dist_worker.py /tmp/m15/model /tmp/m15/noise$n.pt /tmp/m15/noise.jsonl > $OUT/noise$n.log 2>&1 || tail -20 $OUT/noise$n.log
    python3 -c "
import torch; u = torch.load('/tmp/m15/noise$n.pt')['update'].double()
print('noise x$n GPU: update std', float(u.std()), 'expected', 2.0 * 0.5 / (0.5 * 64), 'n', u.numel())" | tee -a $OUT/scaling.txt
  done
else
  [ -d /tmp/m7/model ] || python3 scripts/gpu_smoke.py prepare --out /tmp/m7 --shape qwen2.5-coder-7b --records 1024 > /dev/null 2>&1
  for n in 1 2 4; do
    [ $n -le $NG ] || continue
    torchrun --standalone --nproc_per_node $n -m privcode.cli finetune --model /tmp/m7/model \
      --data /tmp/m7/private/records.jsonl --out /tmp/m7/ft$n \
      --params "{\"steps\": $STEPS, \"batch_size\": 64, \"micro_batch_size\": 4, $LORA}" > $OUT/ft$n.log 2>&1 || tail -20 $OUT/ft$n.log
    report "FT 7B x$n GPU (DeepSpeed ZeRO-2 when >1)" /tmp/m7/ft$n
  done
fi
