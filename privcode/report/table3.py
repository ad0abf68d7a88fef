"""Stage 8: results/table3.csv — utility of each (premium model, method, ε) with ε/δ from the ledger.

    privcode table3 --out results/table3.csv results/eval/*/*/*/*

Each argument is an evaluation directory `results/eval/<model>/<method>/<tag>/<benchmark>/`
holding scores.json and privacy.json. ε and δ are read from privacy.json only (never from the
config): `inf` means the model read private data without DP; 0 means it never saw private data.
`prompt` is how the model was prompted (privcode.evaluate.run: base = EvalPlus's --force-base-prompt,
chat = the chat template with EvalPlus's prefixes, qa = privcode's Question/Answer format).
`note` carries privacy.json's caveats (selective DP only; not a DP release: reproducible seed; ...).
Scores are pass@1 in percent (greedy decoding); each score column `C` is followed by `C_lo` and
`C_hi`, its 95% interval over problems (privcode.report.stats: Wilson for one sample per task, a
bootstrap over problems otherwise) from the evaluator's per-task results.
"""
from __future__ import annotations

import math
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import read_json

from privcode.report import note_of, sort_rows, table_main

EVALPLUS_COLUMNS = {"humaneval": ("HumanEval", "HumanEval+"), "mbpp": ("MBPP", "MBPP+")}
OPENAI_COLUMN = "HumanEval (OpenAI)"


def columns(benchmark: str) -> dict[str, tuple[str, str]]:
    """{table column: (scores.json key, outcome key of privcode.report.stats.outcomes)} of a benchmark."""
    if benchmark in EVALPLUS_COLUMNS:
        base, plus = EVALPLUS_COLUMNS[benchmark]
        return {base: ("base_pass@1", "base"), plus: ("plus_pass@1", "plus")}
    if benchmark == "openai-humaneval":
        return {OPENAI_COLUMN: ("base_pass@1", "base")}
    if benchmark.startswith("bigcodebench"):
        _, split, subset = benchmark.split("-")
        return {f"BCB-{split.capitalize()}-{subset.capitalize()}": ("pass@1", "pass")}
    raise PrivcodeError(f"unknown benchmark '{benchmark}'")


def columns_for(benchmark: str, scores: dict) -> dict:
    return {col: scores[key] for col, (key, _) in columns(benchmark).items()}


def score_columns(eval_dir, benchmark: str, scores: dict) -> dict:
    """Each score column and its 95% interval over problems (`<column>_lo`, `<column>_hi`, percent;
    privcode.report.stats.interval) from the evaluator's per-task outcomes (NaN where it kept none)."""
    from privcode.report import stats

    per = stats.outcomes(eval_dir)
    row = {}
    for col, (key, okey) in columns(benchmark).items():
        lo = hi = math.nan
        if per.get(okey):
            _, lo, hi, _ = stats.interval(per[okey].values())
        row.update({col: scores[key], f"{col}_lo": lo, f"{col}_hi": hi})
    return row


def prompt_of(scores: dict) -> str | None:
    """The evaluation's prompt format (base | chat | qa; privcode.evaluate.generation.PROMPT_STYLES)."""
    return scores.get("prompt_format") or (scores.get("config") or {}).get("prompt_format")


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
                                    "delta": priv["delta"], "prompt": prompt_of(scores), "note": note_of(priv)})
        if not (row["epsilon"] == priv["epsilon"] or (math.isinf(row["epsilon"]) and math.isinf(priv["epsilon"]))):
            raise PrivcodeError(f"one model, two ε ({row['epsilon']} vs {priv['epsilon']})", path=d)
        if prompt_of(scores) != row["prompt"]:
            raise PrivcodeError(f"one model, two prompt formats ({row['prompt']} vs {prompt_of(scores)})", path=d)
        row.update(score_columns(d, bench, scores))
    if not rows:
        raise PrivcodeError("no evaluation directories given")
    df = pd.DataFrame(list(rows.values()))
    df = sort_rows(df)
    return df[[c for c in df.columns if c != "note"] + ["note"]]  # the caveat last


def main(argv=None) -> None:
    table_main(argv, prog="privcode table3", doc=__doc__, dirs="eval_dirs", build=build)
