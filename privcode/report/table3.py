"""Stage 8: results/table3.csv — utility of each (premium model, method, ε) with ε/δ from the ledger.

    privcode table3 --out results/table3.csv results/eval/*/*/*/*

Each argument is an evaluation directory `results/eval/<model>/<method>/<tag>/<benchmark>/`
holding scores.json and privacy.json. ε and δ are read from privacy.json only (never from the
config): `inf` means the model read private data without DP; 0 means it never saw private data.
`note` carries privacy.json's caveats (selective DP only; not a DP release: reproducible seed; ...).
Scores are pass@1 in percent (greedy decoding).
"""
from __future__ import annotations

import math
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import read_json

from privcode.report import note_of, sort_rows, table_main

EVALPLUS_COLUMNS = {"humaneval": ("HumanEval", "HumanEval+"), "mbpp": ("MBPP", "MBPP+")}


def columns_for(benchmark: str, scores: dict) -> dict:
    if benchmark in EVALPLUS_COLUMNS:
        base, plus = EVALPLUS_COLUMNS[benchmark]
        return {base: scores["base_pass@1"], plus: scores["plus_pass@1"]}
    if benchmark.startswith("bigcodebench"):
        _, split, subset = benchmark.split("-")
        return {f"BCB-{split.capitalize()}-{subset.capitalize()}": scores["pass@1"]}
    raise PrivcodeError(f"unknown benchmark '{benchmark}'")


def build(eval_dirs: list[str]):
    import pandas as pd

    from privcode import ledger

    rows: dict = {}
    for d in map(Path, eval_dirs):
        model, method, tag, bench = d.parts[-4:]
        priv = ledger.read(d)
        scores = read_json(d / "scores.json")
        key = (model, method, tag)
        row = rows.setdefault(key, {"model": model, "method": method, "epsilon": priv["epsilon"],
                                    "delta": priv["delta"], "note": note_of(priv)})
        if not (row["epsilon"] == priv["epsilon"] or (math.isinf(row["epsilon"]) and math.isinf(priv["epsilon"]))):
            raise PrivcodeError(f"one model, two ε ({row['epsilon']} vs {priv['epsilon']})", path=d)
        row.update(columns_for(bench, scores))
    if not rows:
        raise PrivcodeError("no evaluation directories given")
    df = pd.DataFrame(list(rows.values()))
    df = sort_rows(df)
    return df[[c for c in df.columns if c != "note"] + ["note"]]  # the caveat last


def main(argv=None) -> None:
    table_main(argv, prog="privcode table3", doc=__doc__, dirs="eval_dirs", build=build)
