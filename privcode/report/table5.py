"""Table 5: sensitivity sweeps.

    privcode table5 --out results/table5.csv \
        epsilon=1:results/eval/smollm2/PrivCode/eps1/humaneval epsilon=4:results/eval/smollm2/PrivCode/eps4/humaneval \
        tau=0.8:results/eval/smollm2/PrivCode/eps4-tau0.8/humaneval lambda_max=1000:results/eval/...

table5: each ROW is `<swept parameter>=<value>:<evaluation directory>`, the directory as for table3
(`.../<model>/<method>/<tag>/<benchmark>/` with scores.json and privacy.json). Rows with the same
parameter, value, model, method and tag are merged (one column per benchmark). Columns: sweep, value,
model, method, tag, epsilon, delta (from privacy.json, never from the sweep value), then the scores
as in table3 (pass@1, %, each with its 95% interval `<column>_lo`, `<column>_hi`). The sweep
`ablation` has the values of `sweeps.ablations` (none = PrivCode as configured; no_privsa,
constant_lambda, no_exec_filter, no_roundtrip, no_filters: workflow/rules/common.smk ABLATIONS).

The τ sweep's round-trip runs come from `privcode rethreshold` (privcode.filters.threshold).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.report import note_of, write_csv
from privcode.io import read_json


def _value(s: str):
    if s.lower() in ("inf", "infinity"):
        return math.inf
    try:
        f = float(s)
    except ValueError:
        return s
    return int(f) if f.is_integer() and "." not in s and "e" not in s.lower() else f


def parse_row(spec: str) -> tuple[str, object, Path]:
    """'name=value:path' → (name, value, path); value as int/float/inf when numeric, else the string."""
    head, sep, path = spec.partition(":")
    name, eq, value = head.partition("=")
    if not (sep and eq and name.strip() and value.strip() and path.strip()):
        raise PrivcodeError(f"expected <parameter>=<value>:<evaluation dir>, got '{spec}'")
    return name.strip(), _value(value.strip()), Path(path.strip())


def build(specs: list[str]):
    import pandas as pd

    from privcode import ledger
    from privcode.report.table3 import score_columns

    if not specs:
        raise PrivcodeError("no rows given")
    rows: dict = {}
    for spec in specs:
        name, value, d = parse_row(spec)
        if len(d.parts) < 4:
            raise PrivcodeError("expected an evaluation directory <model>/<method>/<tag>/<benchmark>", path=d)
        model, method, tag, bench = d.parts[-4:]
        priv = ledger.read(d)
        scores = read_json(d / "scores.json")
        key = (name, str(value), model, method, tag)
        row = rows.setdefault(key, {"sweep": name, "value": value, "model": model, "method": method, "tag": tag,
                                    "epsilon": priv["epsilon"], "delta": priv["delta"], "note": note_of(priv)})
        if row["epsilon"] != priv["epsilon"] and not (math.isinf(row["epsilon"]) and math.isinf(priv["epsilon"])):
            raise PrivcodeError(f"one row, two ε ({row['epsilon']} vs {priv['epsilon']})", path=d)
        row.update(score_columns(d, bench, scores))
    df = pd.DataFrame(list(rows.values()))
    df["_num"] = [v if isinstance(v, (int, float)) else math.nan for v in df["value"]]
    df["_str"] = [str(v) for v in df["value"]]
    df = df.sort_values(["sweep", "_num", "_str", "model", "method"], kind="stable") \
        .drop(columns=["_num", "_str"]).reset_index(drop=True)
    return df[[c for c in df.columns if c != "note"] + ["note"]]  # the caveat last, as in table3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode table5", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("rows", nargs="+", metavar="PARAM=VALUE:EVAL_DIR")
    a = ap.parse_args(argv)
    write_csv(build(a.rows), a.out)
