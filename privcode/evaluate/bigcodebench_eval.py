"""BigCodeBench pass@1 (greedy) with BigCodeBench's own evaluator (bigcodebench 0.2.5), local execution.

    privcode evaluate --model Qwen/Qwen2.5-Coder-7B --benchmark bigcodebench-instruct-hard --out DIR
    python -m privcode.evaluate.bigcodebench_eval out/samples.jsonl --split instruct --subset hard \
        --override data/BigCodeBench-Hard.jsonl --out out/eval

Install (`make install` does this): `pip install --no-deps bigcodebench==0.2.5` — its own requirements
pin vllm and several API clients — plus the few packages its evaluator imports that privcode does
not already pull in (pqdm, bounded-pool-executor, httpx, httpcore; see the Makefile).

Data: BigCodeBench reads one JSONL file named by BIGCODEBENCH_OVERRIDE_PATH (privcode passes the
`override` parameter, or that variable when it is set); otherwise it downloads bigcode/bigcodebench
(or -hard) from the Hugging Face hub. With an override the file is used as is, whatever the subset,
so the hard subset needs a file of its own (the `evaluate.overrides` config maps each benchmark to
one). Every task needs task_id, complete_prompt, instruct_prompt, canonical_solution, code_prompt,
test (source defining a unittest `TestCases` class) and entry_point.

How BigCodeBench is driven, and why:
* It runs in a subprocess (`python -c <_RUNNER>`) because `bigcodebench.data` reads
  BIGCODEBENCH_OVERRIDE_PATH once, at import time. The subprocess calls
  `bigcodebench.evaluate.evaluate(execution="local", pass_k="1", ...)` and then `os._exit(0)`.
* `bigcodebench.evaluate` imports the clients of its two remote backends (gradio_client, e2b) at
  module level but never calls them with local execution; where they are not installed the runner
  registers inert placeholder modules, so neither SDK (nor e2b's dependency tree) is installed.
* BigCodeBench writes `<samples>_eval_results.json` and `<samples>_pass_at_k.json` beside the
  samples file, reuses an existing results file and asks on stdin before overwriting: the samples
  are copied into a fresh scratch folder first, and stdin is closed.
* It first runs every canonical solution to time it (the ground truth; a task's time limit derives
  from it) and caches the times in `<cache>/bigcodebench/<md5 of the data file>.pkl`; for an
  override the cache is redirected (XDG_CACHE_HOME) to the scratch folder.
* It asserts that every task has a sample; a `limit`ed run evaluates its tasks only
  (`selective_evaluate`).
Execution is BigCodeBench's `--execution local`: rlimits and patched os functions only, no
namespace isolation, so run it on a machine that holds no private data.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.evaluate import harness
from privcode.io import atomic_file, write_json

SPLITS = ("complete", "instruct")
SUBSETS = ("full", "hard")
OVERRIDE_VAR = "BIGCODEBENCH_OVERRIDE_PATH"
FIELDS = ("task_id", "complete_prompt", "instruct_prompt", "canonical_solution", "code_prompt", "test",
          "entry_point")  # what bigcodebench.data.utils.completeness_check requires
INSTALL = ("pip install --no-deps bigcodebench==0.2.5 && pip install pqdm==0.2.0 bounded-pool-executor==0.0.3 "
           "httpx==0.28.1 httpcore==1.0.9 (`make install` does this)")
RAW_NAME = "bigcodebench_eval_results.json"
PASS_AT_K_NAME = "bigcodebench_pass_at_k.json"
_IMPORT_FAILED = 3

_RUNNER = """\
import json, os, sys, types

def _placeholder(name, *attrs):  # a remote-execution client that execution="local" never calls
    try:
        __import__(name)
    except ImportError:
        def unavailable(*a, **k):
            raise RuntimeError(name + " is not installed; privcode runs BigCodeBench with execution='local'")
        mod = types.ModuleType(name)
        for attr in attrs:
            setattr(mod, attr, unavailable)
        sys.modules[name] = mod

_placeholder("gradio_client", "Client", "handle_file")
_placeholder("e2b", "Sandbox")
try:
    from bigcodebench.evaluate import evaluate
except ImportError as e:
    print("cannot import bigcodebench.evaluate: " + str(e), flush=True)
    os._exit(IMPORT_FAILED)
evaluate(**json.loads(sys.argv[1]))
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # do not wait for the evaluator's process pools and watchdog thread to wind down
""".replace("IMPORT_FAILED", str(_IMPORT_FAILED))


def parse_name(benchmark: str) -> tuple[str, str]:
    parts = benchmark.split("-")
    if len(parts) != 3 or parts[0] != "bigcodebench" or parts[1] not in SPLITS or parts[2] not in SUBSETS:
        raise PrivcodeError(f"benchmark '{benchmark}' must be bigcodebench-<complete|instruct>-<full|hard>")
    return parts[1], parts[2]


def _require_package() -> None:
    if importlib.util.find_spec("bigcodebench") is None:
        raise PrivcodeError(f"BigCodeBench is not installed: {INSTALL}")


def _override(override: str | None) -> Path | None:
    """The data file in use: `override`, else $BIGCODEBENCH_OVERRIDE_PATH, else None (the hub)."""
    override = override or os.environ.get(OVERRIDE_VAR) or None
    if override is None:
        return None
    path = Path(override).resolve()
    if not path.is_file():
        raise PrivcodeError("BigCodeBench data file does not exist", path=path)
    return path


def read_tasks(path) -> dict[str, dict]:
    """{task_id: task} of a BigCodeBench-format JSONL file, every required field checked."""
    return harness.read_tasks(path, FIELDS, "BigCodeBench data file")


def load_tasks(subset: str, override: str | None) -> dict[str, dict]:
    """The tasks of one subset: the override file (checked here), else BigCodeBench's own data."""
    path = _override(override)
    if path is not None:
        return read_tasks(path)
    _require_package()
    try:
        from bigcodebench.data import get_bigcodebench

        return get_bigcodebench(subset=subset)
    except Exception as e:  # noqa: BLE001 - offline, no hub cache, a hub error: one message
        raise PrivcodeError(f"BigCodeBench-{subset} data could not be loaded from the hub ({type(e).__name__}: "
                            f"{str(e)[:200]}); offline, give a local BigCodeBench-format JSONL as the "
                            f"'override' parameter (or {OVERRIDE_VAR})") from None


def _check_samples(samples_path: Path, expected: set[str] | None) -> int:
    """Validate the samples (privcode.evaluate.harness.check_samples); returns how many there are."""
    return sum(harness.check_samples(samples_path, expected, tool="BigCodeBench").values())


def score(samples_path, split: str, subset: str, override_path: str | None, out_dir, *,
          task_ids=None, parallel: int | None = None, timeout: float | None = None) -> dict:
    """Evaluate all samples of one model with BigCodeBench's evaluator (local execution) and return
    {"pass@1" (percent, 0-100), "n_tasks", "n_samples", "gt_pass_rate", "gt_failed_tasks", "split",
    "subset"}. pass@1 is BigCodeBench's: the mean over tasks of the unbiased estimator (k = 1), i.e.
    correct samples / samples; `gt_pass_rate` is the fraction of canonical solutions that passed.
    `task_ids` restricts the evaluation to those tasks (a `limit`ed run).

    Writes into `out_dir`: `bigcodebench_eval_results.json` (per-sample status and failure
    details), `bigcodebench_pass_at_k.json`, `bigcodebench.log` (console output) and `scores.json`
    (the returned dict)."""
    if split not in SPLITS or subset not in SUBSETS:
        raise PrivcodeError(f"split must be one of {SPLITS} and subset one of {SUBSETS}")
    samples_path = Path(samples_path).resolve()
    out_dir = Path(out_dir).resolve()  # the evaluator runs with cwd=scratch
    override = _override(override_path)
    expected = set(read_tasks(override)) if override is not None else None
    if task_ids is not None:
        task_ids = sorted(set(task_ids))
        unknown = sorted(set(task_ids) - expected) if expected is not None else []
        if unknown:
            raise PrivcodeError(f"task(s) {unknown[:3]} are not in the data file", path=override)
        expected = set(task_ids)
    n_samples = _check_samples(samples_path, expected)
    _require_package()

    env = dict(os.environ)
    env.pop(OVERRIDE_VAR, None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    with harness.scratch_run(out_dir, Path(samples_path), "BigCodeBench", timeout) as (scratch, samples_copy, run):
        if override is not None:
            env[OVERRIDE_VAR] = str(override)
            env["XDG_CACHE_HOME"] = str(scratch / "cache")
        kwargs = {"split": split, "subset": subset, "samples": str(samples_copy), "execution": "local",
                  "pass_k": "1", "parallel": parallel or -1}
        if task_ids is not None:
            kwargs["selective_evaluate"] = task_ids
        proc = run([sys.executable, "-c", _RUNNER, json.dumps(kwargs)], env)
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        if proc.returncode == _IMPORT_FAILED:
            raise PrivcodeError(f"BigCodeBench is not usable ({tail.strip()}): {INSTALL}")
        raw_path, pk_path = scratch / "samples_eval_results.json", scratch / "samples_pass_at_k.json"
        if proc.returncode != 0 or not raw_path.exists() or not pk_path.exists():
            raise PrivcodeError(f"BigCodeBench's evaluator failed (exit {proc.returncode}); log tail:\n{tail}",
                                path=samples_path)
        raw_text, pk_text = raw_path.read_text(encoding="utf-8"), pk_path.read_text(encoding="utf-8")
        with atomic_file(out_dir / RAW_NAME) as fh:
            fh.write(raw_text)
        with atomic_file(out_dir / PASS_AT_K_NAME) as fh:
            fh.write(pk_text)

    evals, pass_at_k = json.loads(raw_text)["eval"], json.loads(pk_text)
    scored = sum(len(rows) for rows in evals.values())
    if scored != n_samples:
        raise PrivcodeError(f"BigCodeBench scored {scored} samples of {n_samples}", path=samples_path)
    scores = {"pass@1": 100.0 * float(pass_at_k["pass@1"]), "n_tasks": len(evals), "n_samples": scored,
              "gt_pass_rate": float(pass_at_k["gt_pass_rate"]), "gt_failed_tasks": pass_at_k["failed_tasks"],
              "split": split, "subset": subset}
    write_json(out_dir / "scores.json", scores)
    return scores


def to_solution(completion: str, task: dict, split: str, fmt: str | None = None) -> str:
    if fmt == "base":  # bigcodebench.generate for a direct completion: sanitize(prompt + completion)
        from bigcodebench.sanitize import sanitize

        from privcode.evaluate.generation import base_prompt

        return sanitize(base_prompt(task["complete_prompt"]) + completion.replace("\t", "    "), task["entry_point"])
    code = completion.split("```")[0]
    if split == "complete" and f"def {task['entry_point']}" not in code:  # a body: append it to the prompt
        code = task["complete_prompt"] + code
    return code


def run(model_ref: str, benchmark: str, out: Path, cfg, shard_spec: str | None = None) -> dict | None:
    from privcode.evaluate.generation import completions, write_results

    split, subset = parse_name(benchmark)
    if cfg.prompt_format == "base" and split == "instruct":  # as bigcodebench.generate refuses it
        raise PrivcodeError(f"{benchmark} needs an instruct model: BigCodeBench does not prompt base models "
                            "(direct completion) with instruct tasks; use bigcodebench-complete-* for this model",
                            path="--params", field="prompt_format")
    tasks = list(load_tasks(subset, cfg.override).values())[: cfg.limit or None]
    t0 = time.time()
    outs = completions(model_ref, benchmark, tasks, f"{split}_prompt", out, cfg, shard_spec)
    if outs is None:
        return None
    ids = [t["task_id"] for t in tasks] if cfg.limit else None
    return write_results(out, model_ref, benchmark, cfg, tasks, outs,
                         [to_solution(o, t, split, cfg.prompt_format) for t, o in zip(tasks, outs)],
                         lambda samples, d: score(samples, split, subset, cfg.override, d, task_ids=ids,
                                                  parallel=cfg.parallel),
                         t0, time.time() - t0)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m privcode.evaluate.bigcodebench_eval",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("samples")
    ap.add_argument("--split", default="complete", choices=SPLITS)
    ap.add_argument("--subset", default="full", choices=SUBSETS)
    ap.add_argument("--override", default=None, help=f"BigCodeBench-format JSONL ({OVERRIDE_VAR})")
    ap.add_argument("--out", required=True)
    ap.add_argument("--parallel", type=int, default=None)
    a = ap.parse_args(argv)
    print(json.dumps(score(a.samples, a.split, a.subset, a.override, a.out, parallel=a.parallel), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
