"""`privcode bench exec` runs and reports every row (its figures are not asserted: speed targets
belong in the benchmark and docs/sandbox.md, never in timed unit tests)."""
from __future__ import annotations

import json

from privcode.bench import exec_bench
import privcode.sandbox as sb


def test_bench_exec_small(tmp_path, capsys):
    name = sb.get_backend("auto").name
    out = tmp_path / "bench.json"
    exec_bench.main(["--backends", name, "--workers", "1", "--n-trivial", "4", "--n-real", "2", "--no-peer",
                     "--modes", "fork-server", "--out", str(out)])
    res = json.loads(out.read_text())
    rows = {(r["backend"], r["mode"], r["workload"]): r for r in res["rows"]}
    assert set(rows) == {(name, "fork-server", "trivial"), (name, "fork-server", "realistic")}
    assert all(r["ok"] == r["n"] and r["snippets_per_s"] > 0 for r in rows.values()), rows
    assert f"| {name} | fork-server | trivial | 4 |" in capsys.readouterr().out


def test_exec_ab_script_runs_both_revisions_alternately():
    """scripts/exec_ab.sh: the older revision's sandbox code (a git worktree) and this checkout's, one
    line each per round, every snippet ok (it exits non-zero on a failed snippet)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(root), "cat-file", "-e", "7d587dd^{commit}"], capture_output=True).returncode:
        import pytest
        pytest.skip("a shallow clone without commit 7d587dd")
    # the strongest backend both revisions drive: 7d587dd's container code cannot start today's image (it
    # looks for python where the image has none), so where auto is the container, the next one that works
    name = next(n for n in sb.BACKENDS if n != "container" and sb._registry()[n]().available())
    env = {**os.environ, "PY": sys.executable, "N_TRIVIAL": "6", "N_REAL": "3", "WORKERS": "1", "BACKEND": name}
    r = subprocess.run(["bash", str(root / "scripts/exec_ab.sh"), "7d587dd", "1"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["7d587dd", "HEAD"]
    assert all(re.search(r"trivial=\d+\.\d realistic=\d+\.\d load=", ln) for ln in lines), lines
    assert not subprocess.run(["git", "-C", str(root), "worktree", "list"], capture_output=True,
                              text=True).stdout.count("privcode-ab")  # its worktree is removed
