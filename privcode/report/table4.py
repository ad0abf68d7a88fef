"""Table 4: PII leakage per (model, method, ε), and the vulnerability (safe-rate) table.

    privcode table4 --out results/table4.csv results/leakage/*/*/*
    privcode vulntable --out results/vuln.csv results/vuln/*/*/*

Each table4 argument is a leakage directory `results/leakage/<model>/<method>/<tag>/` (leakage.json +
privacy.json, from `privcode leakage`); each vulntable argument a directory
`results/vuln/<model>/<method>/<tag>/` (vuln.json + privacy.json, from `privcode vuln`). ε and δ come
from privacy.json only: in table4 they are the evaluated model's guarantee — the leakage measurement
itself reads the private canaries, so table4 is an audit table, not a DP release (its note says so).

table4 columns: model, method, epsilon, delta, leak@k<k> (share of the canaries put into the data k
times whose secret a completion reproduced verbatim; leak@k0: canaries never put in, the chance
baseline), leak (all inserted canaries), exposure (mean exposure of inserted canaries, bits),
exp@k<k>, pii (PII detections in all completions), pii_other (those that are not a canary secret).
vulntable columns: model, method, epsilon, delta, safe_rate (1 − share of analyzed programs that
Bandit flags at the run's severity), safe_rate_relevant, flagged, analyzed, no_code, syntax_error,
codeql (its status).
"""
from __future__ import annotations

from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import read_json
from privcode.report import note_of, sort_rows, table_main


def _ident(d: Path) -> tuple[str, str, str]:
    if len(d.parts) < 3:
        raise PrivcodeError("expected a directory <model>/<method>/<tag>", path=d)
    model, method, tag = d.parts[-3:]
    return model, method, tag


def leakage_row(d) -> dict:
    from privcode import ledger

    d = Path(d)
    model, method, _ = _ident(d)
    priv = ledger.read(d)
    r = read_json(d / "leakage.json")
    # the evaluated model's guarantee (the table itself reads the private canaries: an audit table)
    row = {"model": model, "method": method, "epsilon": ledger.eps_in(priv.get("model_epsilon", priv["epsilon"])),
           "delta": priv.get("model_delta", priv["delta"]), "note": note_of(priv)}
    groups = sorted(r.get("by_copies", {}).items(), key=lambda kv: int(kv[0]))
    for k, g in groups:
        row[f"leak@k{k}"] = g["rate"]
    row["leak"] = r.get("rate")
    row["exposure"] = r.get("exposure_mean")
    for k, g in groups:
        row[f"exp@k{k}"] = g.get("exposure_mean")
    row["pii"] = r.get("pii", {}).get("total")
    row["pii_other"] = r.get("pii", {}).get("other")
    return row


def build(dirs: list[str]):
    import pandas as pd

    if not dirs:
        raise PrivcodeError("no leakage directories given")
    rows = [leakage_row(d) for d in dirs]
    cols = list(dict.fromkeys(c for r in rows for c in r))  # union, first-seen order
    leak = sorted((c for c in cols if c.startswith("leak@k")), key=lambda c: int(c[6:]))
    exp = sorted((c for c in cols if c.startswith("exp@k")), key=lambda c: int(c[5:]))
    order = ["model", "method", "epsilon", "delta", *leak, "leak", "exposure", *exp, "pii", "pii_other", "note"]
    return sort_rows(pd.DataFrame(rows, columns=order))


def vuln_row(d) -> dict:
    from privcode import ledger

    d = Path(d)
    model, method, _ = _ident(d)
    priv = ledger.read(d)
    r = read_json(d / "vuln.json")
    return {"model": model, "method": method, "epsilon": priv["epsilon"], "delta": priv["delta"],
            "note": note_of(priv), "safe_rate": r.get("safe_rate"), "safe_rate_relevant": r.get("safe_rate_relevant"),
            "flagged": r.get("flagged"), "analyzed": r.get("analyzed"), "no_code": r.get("no_code"),
            "syntax_error": r.get("syntax_error"), "severity": r.get("severity"),
            "codeql": (r.get("codeql") or {}).get("status")}


def build_vuln(dirs: list[str]):
    import pandas as pd

    if not dirs:
        raise PrivcodeError("no vuln directories given")
    return sort_rows(pd.DataFrame([vuln_row(d) for d in dirs]))


def main(argv=None) -> None:
    table_main(argv, prog="privcode table4", doc=__doc__, dirs="leakage_dirs", build=build)


def vuln_main(argv=None) -> None:
    table_main(argv, prog="privcode vulntable", doc=__doc__, dirs="vuln_dirs", build=build_vuln)
