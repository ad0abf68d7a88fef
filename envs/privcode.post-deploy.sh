#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside envs/privcode.yaml's environment right after building
# it. BigCodeBench's own requirements pin vllm, so it goes in without dependencies; the light
# packages its local evaluator imports are in the yaml (the Makefile does the same for the venv).
set -euo pipefail
python -m pip install --no-deps bigcodebench==0.2.5
