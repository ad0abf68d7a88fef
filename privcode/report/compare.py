"""results/compare.csv: PrivCode against DPFT and PreCode, paired over the same problems.

    privcode compare --out results/compare.csv results/eval/*/*/*/*

Arguments as for table3: evaluation directories `<model>/<method>/<tag>/<benchmark>/` (scores.json,
privacy.json and the evaluator's per-task results). For every premium model, score column and
PrivCode row, PrivCode is paired with DPFT at the same tag (the same target ε) and with PreCode,
over the problems both were scored on (privcode.report.stats.paired). Columns: model, column (as in
table3), tag (PrivCode's), baseline, baseline_tag, epsilon (PrivCode's, from privacy.json), n_tasks,
privcode and baseline_score (pass@1, %), diff (percentage points) with diff_lo/diff_hi (paired
percentile bootstrap over problems, 95%), only_privcode / only_baseline (problems one solves and the
other does not), p_mcnemar (exact McNemar test; NaN with several samples per task). A p-value
above 0.05 — every row at demo scale, with 16 problems — means the data do not show a difference.
"""
from __future__ import annotations

from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.report import table_main

BASELINES = ("DPFT", "PreCode")


def build(eval_dirs: list[str]):
    import pandas as pd

    from privcode import ledger
    from privcode.report import stats
    from privcode.report.table3 import columns

    found: dict = {}  # (model, method, tag, bench) -> eval dir
    for d in map(Path, eval_dirs):
        if len(d.parts) < 4:
            raise PrivcodeError("expected an evaluation directory <model>/<method>/<tag>/<benchmark>", path=d)
        found[tuple(d.parts[-4:])] = d
    rows = []
    for (model, method, tag, bench), d in sorted(found.items()):
        if method != "PrivCode":
            continue
        mine = stats.outcomes(d)
        for base in BASELINES:
            other = found.get((model, base, "base" if base == "PreCode" else tag, bench))
            if other is None:
                continue
            theirs = stats.outcomes(other)
            for col, (_, okey) in columns(bench).items():
                if not (mine.get(okey) and theirs.get(okey)):
                    raise PrivcodeError(f"no per-task results for '{col}'", path=d if not mine.get(okey) else other)
                r = stats.paired(mine[okey], theirs[okey])
                rows.append({"model": model, "column": col, "tag": tag, "baseline": base,
                             "baseline_tag": other.parts[-2], "epsilon": ledger.read(d)["epsilon"],
                             "n_tasks": r["n_tasks"], "privcode": r["a"], "baseline_score": r["b"], "diff": r["diff"],
                             "diff_lo": r["diff_lo"], "diff_hi": r["diff_hi"], "only_privcode": r["only_a"],
                             "only_baseline": r["only_b"], "p_mcnemar": r["p_mcnemar"]})
    if not rows:
        raise PrivcodeError(f"no PrivCode evaluation with a {' or '.join(BASELINES)} evaluation of the same "
                            "model and benchmark among the directories given")
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    table_main(argv, prog="privcode compare", doc=__doc__, dirs="eval_dirs", build=build)
