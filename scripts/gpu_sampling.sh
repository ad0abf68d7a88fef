#!/usr/bin/env bash
# Issue #17 on one GPU, in one device call (about 6 minutes on an H200): the sampler check and the
# decode-step profile (scripts/gpu_sampling.py), then `privcode bench generate` for the round trip's
# sampling (8B shape, n=20, T 0.8, top-p 0.95, 400-token prompts, 200 new) against the reference
# sampler in the same run, and greedy 1.5B at batch 256/512 with 512 new tokens.
#   OUT=/tmp/out bash scripts/gpu_sampling.sh
set -euo pipefail
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/gpu_sampling.py --out "$OUT/sampling.json" 2>&1 | grep -v -i warn | tee "$OUT/sampling.txt"
python3 -m privcode.cli bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 \
  --new-tokens 200 --batches 320,640,1280 --peer-batches 640 --peers reference \
  --out "$OUT/bench_generate_8b_sampling.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_8b.txt"
python3 -m privcode.cli bench generate --shape 1.5b --prompt-len 128 --new-tokens 512 --batches 256,512 \
  --peers "" --out "$OUT/bench_generate_1.5b_greedy.json" 2>&1 | grep -v -i warn | tee "$OUT/bench_1.5b.txt"
