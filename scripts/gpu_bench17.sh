#!/usr/bin/env bash
# #17 on one GPU, in one device call: the non-DP vs DP step (mm and bmm LoRA gradients), sampled and greedy
# generation with compiled layers at fixed lengths and (refill) with continuous batching on and off at drawn
# lengths, and the paper-column projection (pipeline).
#   bash scripts/gpu_bench17.sh [train,sample,greedy,refill,pipeline]   # OUT=/tmp/out by default; wheels in .whl
# Needs .whl/ with the wheels the device image lacks: opacus, bert-score, tree-sitter, tree-sitter-python.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHAT=${1:-train,sample,greedy,pipeline}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "$card"
pc() { python3 -m privcode.cli "$@" 2>&1 | grep -v -i warn; }
case ",$WHAT," in *,train,*)
  pc bench train --shape 1.5b --variants hf-peft,privcode-nondp,privcode-nondp-bmm,privcode-dp --steps 8 --warmup 3 \
    --accum 0 --out "$OUT/train_1.5b_nondp_bmm.json" | tail -25 ;; esac
case ",$WHAT," in *,sample,*)
  pc bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 --new-tokens 200 \
    --batches 1280 --compile --peers "" ${SAMPLE_ARGS:-} --out "$OUT/generate_8b_sampling.json" | tail -15 ;; esac
case ",$WHAT," in *,greedy,*)
  pc bench generate --shape 1.5b --prompt-len 128 --new-tokens 512 --batches 512 --compile --peers "" \
    ${GREEDY_ARGS:-} --out "$OUT/generate_1.5b_greedy.json" | tail -15 ;; esac
case ",$WHAT," in *,refill,*)  # continuous batching vs batch after batch, rows ending at drawn lengths
  pc bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 --new-tokens 200 \
    --batches 1280 --compile --lengths uniform:20 --waves 4 --no-refill --peers "" --out "$OUT/generate_8b_refill.json" | tail -15
  pc bench generate --shape 1.5b --prompt-len 128 --new-tokens 512 --batches 512 --compile --lengths geometric:200 \
    --waves 4 --no-refill --peers "" --out "$OUT/generate_1.5b_refill.json" | tail -15 ;; esac
case ",$WHAT," in *,pipeline,*)
  pc bench pipeline --compile --out "$OUT/bench_pipeline.json" | tail -40 ;; esac
ls -la "$OUT"
