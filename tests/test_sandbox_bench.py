"""`privcode bench exec` runs and reports every row (its figures are not asserted: speed targets
belong in the benchmark and docs/sandbox.md, never in timed unit tests)."""
from __future__ import annotations

import json

from privcode.bench import exec_bench
from privcode.sandbox import base as sb


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
