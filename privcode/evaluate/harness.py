"""What the evaluator backends (EvalPlus, BigCodeBench, OpenAI HumanEval) share: reading a task file,
validating a samples JSONL, and running the evaluator in a scratch copy of it, with its output kept as a log."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_file, iter_jsonl


def read_tasks(path, fields, what: str = "dataset file") -> dict[str, dict]:
    """{task_id: task} of a task JSONL file (.jsonl or .jsonl.gz) in file order, every field of `fields`
    checked and no task id twice (a bad line: one error naming line and field)."""
    tasks: dict[str, dict] = {}
    for lineno, rec in iter_jsonl(path, required=fields):
        if rec["task_id"] in tasks:
            raise PrivcodeError(f"duplicate task '{rec['task_id']}'", path=path, line=lineno, field="task_id")
        tasks[rec["task_id"]] = rec
    if not tasks:
        raise PrivcodeError(f"{what} has no tasks", path=path)
    return tasks


def check_samples(samples_path, task_ids: set[str] | None = None, tool: str = "the evaluator") -> dict[str, int]:
    """Validate {"task_id", "solution" | "completion"} lines; return the number of samples per task.
    With `task_ids`, every task must have a sample and no sample may name another task (EvalPlus
    and BigCodeBench assert on a missing task and silently drop unknown ones)."""
    path = Path(samples_path)
    if path.is_dir() or not path.exists():
        raise PrivcodeError("samples file does not exist", path=path)
    counts: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path, required=("task_id",)):
        code = rec.get("solution", rec.get("completion"))
        if not isinstance(code, str):
            raise PrivcodeError("needs a string 'solution' (or 'completion')", path=path, line=lineno,
                                field="solution")
        if task_ids is not None and rec["task_id"] not in task_ids:
            raise PrivcodeError(f"task '{rec['task_id']}' is not among the tasks evaluated", path=path,
                                line=lineno, field="task_id")
        counts[rec["task_id"]] = counts.get(rec["task_id"], 0) + 1
    if not counts:
        raise PrivcodeError("samples file has no samples", path=path)
    missing = sorted((task_ids or set()) - counts.keys())
    if missing:
        raise PrivcodeError(f"no sample for {len(missing)} task(s), e.g. {missing[:3]} ({tool} needs every task)",
                            path=path)
    return counts


@contextmanager
def scratch_run(out_dir: Path, samples_path: Path, tool: str, timeout: float | None):
    """A fresh folder under `out_dir` with a copy of the samples — evaluators write their results
    beside the samples file, and reuse or ask (on stdin) about results already there — removed
    afterwards. Yields (scratch, samples_copy, run): `run(argv, env)` runs the evaluator in the
    scratch folder with stdin closed, keeps its output as out_dir/<tool>.log and returns the
    CompletedProcess; a timeout becomes one PrivcodeError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{tool.lower()}.", dir=out_dir))
    samples_copy = scratch / "samples.jsonl"

    def run(argv, env):
        try:
            proc = subprocess.run(argv, check=False, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise PrivcodeError(f"{tool} did not finish within {timeout} s", path=samples_path) from None
        with atomic_file(out_dir / f"{tool.lower()}.log") as fh:
            fh.write(proc.stdout)
        return proc

    try:
        shutil.copyfile(samples_path, samples_copy)
        yield scratch, samples_copy, run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
