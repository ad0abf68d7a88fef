#!/usr/bin/env bash
# Snakemake (--sdm conda) runs this inside envs/privcode.yaml's environment right after building
# it, from a copy outside the repository and with the workflow's working directory as cwd.
# 1. privcode from the workflow's own source: $PRIVCODE_SRC, else the nearest directory at or above
#    the working directory whose pyproject.toml is privcode's (snakemake -d runs/x inside the repo).
# 2. BigCodeBench without dependencies (its requirements pin vllm); the light packages its local
#    evaluator imports are in the yaml (the Makefile does the same for the venv).
# PRIVCODE_POST_DEPLOY_DRYRUN=1 prints the commands instead of running them (tests).
set -euo pipefail
src=${PRIVCODE_SRC:-}
if [ -z "$src" ]; then
  d=$PWD
  while [ "$d" != / ]; do
    if [ -f "$d/pyproject.toml" ] && grep -q '^name = "privcode"' "$d/pyproject.toml"; then src=$d; break; fi
    d=$(dirname "$d")
  done
fi
[ -n "$src" ] || { echo "privcode post-deploy: cannot find privcode's source above $PWD; set PRIVCODE_SRC" >&2; exit 1; }
run() { if [ "${PRIVCODE_POST_DEPLOY_DRYRUN:-0}" = 1 ]; then echo "$*"; else "$@"; fi; }
run python -m pip install "$src"
run python -m pip install --no-deps bigcodebench==0.2.5
