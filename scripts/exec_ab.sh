#!/usr/bin/env bash
# Fork-server throughput of this checkout's sandbox against an earlier revision's, run alternately
# in one session on one machine (the figures of docs/sandbox.md "Speed"; they drift by 10-20 %
# between runs, so only alternated runs are compared).
#   bash scripts/exec_ab.sh 7d587dd 6        # REV (the code before #14), ROUNDS
# Environment: WORKERS (2), N_TRIVIAL (3000), N_REAL (400), BACKEND (bwrap).
# Prints one line per run: which code, trivial and realistic snippets/s per core, load average.
set -euo pipefail
REV=${1:?usage: exec_ab.sh REV [ROUNDS]}
ROUNDS=${2:-4}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
OLD=$(mktemp -d /tmp/privcode-ab.XXXXXX)
trap 'git -C "$HERE" worktree remove --force "$OLD" >/dev/null 2>&1 || rm -rf "$OLD"' EXIT
git -C "$HERE" worktree add --detach "$OLD" "$REV" >/dev/null 2>&1
RUN='
import os, sys
import privcode
from privcode import sandbox
from privcode.bench import exec_bench as eb
from privcode.sandbox import base as sb
root, workers = sys.argv[1], int(os.environ.get("WORKERS", 2))
assert privcode.__file__.startswith(root), privcode.__file__  # the code under test, not the installed one
limits = sb.Limits(wall_s=10, cpu_s=10)
registry = getattr(sandbox, "_registry", None) or sb._registry  # the registry left base.py after #19
be = registry()[os.environ.get("BACKEND", "bwrap")]()
loads = {"trivial": ["x = 1\n"] * int(os.environ.get("N_TRIVIAL", 3000)),
         "realistic": eb.realistic_snippets(int(os.environ.get("N_REAL", 400)))}
out = []
for name, snippets in loads.items():
    with be.pool(workers, limits) as pool:
        eb._timed(lambda c: pool.run(c, "python", limits), ["pass\n"] * workers, workers)  # start the workers
        dt, ok, bad = eb._timed(lambda c: pool.run(c, "python", limits), snippets, workers)
    if ok != len(snippets):
        sys.exit(f"{len(snippets) - ok} snippets failed: {bad[:1]}")
    out.append(f"{name}={len(snippets) / dt / min(workers, os.cpu_count() or 1):.1f}")
print(" ".join(out))
'
for i in $(seq 1 "$ROUNDS"); do
  for side in "$REV" HEAD; do
    root=$([ "$side" = HEAD ] && echo "$HERE" || echo "$OLD")
    got=$(cd /tmp && PYTHONPATH=$root "$PY" -c "$RUN" "$root")  # set -e: a failed run stops the script
    echo "$side $got load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
