#!/usr/bin/env bash
# Device run: DP fine-tuning on one GPU, DeepSpeed fine-tuning on 1 and 2 GPUs, with the same
# commands the Snakemake GPU rules use. Needs the wheels in .whl (deepspeed, opacus, ...).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD DS_BUILD_OPS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; S=/tmp/smoke; SHAPE=${SHAPE:-qwen2.5-coder-1.5b}
export PRIVCODE_ZONE=$S/private PRIVCODE_BUDGET_DIR=$S/budget  # train stats: $S/private/<run>
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
python3 scripts/gpu_smoke.py prepare --out $S --shape $SHAPE --records 1024 2>&1 | tail -2
P='"max_length": 512, "micro_batch_size": 8, "dtype": "bfloat16", "lora_r": 16, "lora_alpha": 32, "lora_targets": ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'
t() { local name=$1; shift; local s=$SECONDS; "$@" > $OUT/$name.log 2>&1 || { echo "$name FAILED"; tail -30 $OUT/$name.log; }; echo "$name wall $((SECONDS - s)) s" | tee -a $OUT/times.txt; }
t dp1 python3 -m privcode.cli dp-finetune --model $S/model --data $S/private/data/records.jsonl --out $S/dp1 --private-dir $S/private/dp1 --params "{\"epsilon\": 4, \"delta\": 1e-5, \"dataset_size\": \"public\", \"steps\": 4, \"batch_size\": 64, $P}"
t dp2 torchrun --standalone --nproc_per_node 2 -m privcode.cli dp-finetune --model $S/model --data $S/private/data/records.jsonl --out $S/dp2 --private-dir $S/private/dp2 --params "{\"epsilon\": 4, \"delta\": 1e-5, \"dataset_size\": \"public\", \"steps\": 4, \"batch_size\": 64, $P}"
t ft1 python3 -m privcode.cli finetune --model $S/model --data $S/private/data/records.jsonl --out $S/ft1 --private-dir $S/private/ft1 --params "{\"steps\": 4, \"batch_size\": 64, $P}"
t ft2 torchrun --standalone --nproc_per_node 2 -m privcode.cli finetune --model $S/model --data $S/private/data/records.jsonl --out $S/ft2 --private-dir $S/private/ft2 --params "{\"steps\": 4, \"batch_size\": 64, $P}"
for d in dp1 dp2 ft1 ft2; do python3 - $S/$d $S/private/$d <<'PY' | tee -a $OUT/times.txt
import json, sys
s = json.load(open(sys.argv[2] + "/train_stats.json")); p = json.load(open(sys.argv[1] + "/privacy.json"))
print(sys.argv[1], "batch_sizes", s.get("batch_sizes"), "seconds", round(s["seconds"], 1), "losses", [round(x, 3) for x in s["losses"]], "delta", s["lora_max_abs_delta"], "eps", p["epsilon"], "world", s.get("world_size", 1))
PY
done
