"""Uncertainty of pass@1: a 95% interval over problems, and a paired comparison of two models.

    python -c "from privcode.report import stats; print(stats.interval([[1], [0], [1], [1]]))"
    python -c "from privcode.report import stats; print(stats.paired({'a': [1], 'b': [1], 'c': [0]}, {'a': [0], 'b': [1], 'c': [0]}))"

Per-task outcomes (`outcomes`) come from the evaluators' own result files in `<eval dir>/evaluator/`:
EvalPlus's `evalplus_eval_results.json` (base: base_status pass; plus: base and plus pass),
BigCodeBench's `bigcodebench_eval_results.json` (status pass) and openai-humaneval's
`humaneval_eval_results.json` (base_status pass); one list of 0/1 per task, one entry per sample.

- `interval`: pass@1 in percent and its 95% interval over problems. One sample per task (greedy
  decoding, 0/1 outcomes): the Wilson score interval of k passes in n tasks
  (scipy.stats.binomtest(k, n).proportion_ci(method="wilson")). Several samples per task: a
  percentile bootstrap over problems of the mean per-task pass rate (scipy.stats.bootstrap).
- `paired`: over the problems both models were scored on, the difference of pass@1 (percentage
  points) with a paired percentile bootstrap over problems, the discordant counts (only_a: a passes
  and b fails; only_b) and, for 0/1 outcomes, the exact McNemar p-value: the two-sided binomial test
  of only_a in only_a + only_b trials at 1/2 (p = 1 when there are none).
Bootstraps draw N_RESAMPLES resamples from a fixed seed, so a table is the same on every run.
"""
from __future__ import annotations

import json
from pathlib import Path

from privcode.errors import PrivcodeError

LEVEL = 0.95
N_RESAMPLES = 10_000
SEED = 0
RESULT_FILES = {  # evaluator output file -> {outcome key: does this per-sample row pass?}
    "evalplus_eval_results.json": {
        "base": lambda r: r["base_status"] == "pass",
        "plus": lambda r: r["base_status"] == "pass" and r["plus_status"] == "pass"},
    "bigcodebench_eval_results.json": {"pass": lambda r: r["status"] == "pass"},
    "humaneval_eval_results.json": {"base": lambda r: r["base_status"] == "pass"},
}
WILSON = "Wilson 95% (one sample per task)"
BOOTSTRAP = "percentile bootstrap 95% over problems"


def outcomes(eval_dir) -> dict[str, dict[str, list[int]]]:
    """{outcome key: {task_id: [0/1 per sample]}} from the evaluator's result file; {} when it has none."""
    d = Path(eval_dir) / "evaluator"
    for name, keys in RESULT_FILES.items():
        p = d / name
        if p.exists():
            try:
                evals = json.loads(p.read_text(encoding="utf-8"))["eval"]
                return {k: {tid: [int(ok(r)) for r in rows] for tid, rows in evals.items()} for k, ok in keys.items()}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PrivcodeError(f"not an evaluator result file ({type(e).__name__}: {e})", path=p) from None
    return {}


def _rates(per_task):
    import numpy as np

    if not per_task or any(not s for s in per_task):
        raise PrivcodeError("every task needs at least one scored sample")
    return np.array([sum(s) / len(s) for s in per_task], dtype=float)


def _bootstrap(data: tuple, statistic, paired: bool = False) -> tuple[float, float]:
    import numpy as np
    from scipy.stats import bootstrap

    if len(data[0]) < 2:
        return float("nan"), float("nan")
    res = bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=LEVEL,
                    n_resamples=N_RESAMPLES, method="percentile", rng=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def interval(per_task) -> tuple[float, float, float, str]:
    """(pass@1, low, high) in percent and the interval's name, from one list of 0/1 outcomes per task."""
    from scipy.stats import binomtest

    per_task = list(per_task)
    rates = _rates(per_task)
    if all(len(s) == 1 for s in per_task):
        k, n = int(rates.sum()), len(rates)
        ci = binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="wilson")
        return 100.0 * k / n, 100.0 * ci.low, 100.0 * ci.high, WILSON
    lo, hi = _bootstrap((rates,), lambda x, axis=-1: x.mean(axis=axis))
    return 100.0 * rates.mean(), 100.0 * lo, 100.0 * hi, BOOTSTRAP


def paired(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict:
    """Model a against model b over their common tasks (see the module docstring); percentages."""
    from scipy.stats import binomtest

    common = sorted(set(a) & set(b))
    if not common:
        raise PrivcodeError("the two evaluations share no task")
    x, y = _rates([a[t] for t in common]), _rates([b[t] for t in common])
    lo, hi = _bootstrap((x, y), lambda u, v, axis=-1: u.mean(axis=axis) - v.mean(axis=axis), paired=True)
    binary = all(len(a[t]) == 1 and len(b[t]) == 1 for t in common)
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    p = (binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0) if binary else float("nan")
    return {"n_tasks": len(common), "a": 100.0 * x.mean(), "b": 100.0 * y.mean(), "diff": 100.0 * (x.mean() - y.mean()),
            "diff_lo": 100.0 * lo, "diff_hi": 100.0 * hi, "only_a": only_a, "only_b": only_b,
            "p_mcnemar": float(p)}
