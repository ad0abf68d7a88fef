"""EvalPlus's real evaluator scores the taskgen HumanEval+ format (runs evalplus in a subprocess)."""
import json

import pytest

from privcode.data.taskgen import generate_tasks, run_reference, to_humaneval
from privcode.errors import PrivcodeError
from privcode.evaluate.evalplus_eval import score


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    tasks = generate_tasks(11, 6, salt="benchmark")
    rows = [to_humaneval(t, i) for i, t in enumerate(tasks)]
    path = d / "humaneval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, tasks, rows


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _base_only(task, row):
    """A solution that memorises the base outputs: passes base, fails plus."""
    table = {json.dumps(a): o for a, o in zip(task.base_inputs, run_reference(task, task.base_inputs))}
    return (f"import json\n_T = {{{', '.join(f'{k!r}: {v!r}' for k, v in table.items())}}}\n\n"
            f"def {row['entry_point']}(*args):\n    return _T[json.dumps(list(args))]\n")


def test_canonical_solutions_score_100(bench, tmp_path):
    path, tasks, rows = bench
    samples = _write(tmp_path / "canon.jsonl",
                     [{"task_id": r["task_id"], "solution": r["prompt"] + r["canonical_solution"]} for r in rows])
    s = score(samples, "humaneval", str(path), tmp_path / "out", parallel=2)
    assert s["base_pass@1"] == 100.0 and s["plus_pass@1"] == 100.0 and s["n_tasks"] == 6
    saved = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert saved == s
    raw = json.loads((tmp_path / "out" / "evalplus_eval_results.json").read_text())
    assert set(raw["eval"]) == {r["task_id"] for r in rows}


def test_wrong_solutions_lower_the_scores(bench, tmp_path):
    path, tasks, rows = bench
    samples = []
    for i, (t, r) in enumerate(zip(tasks, rows)):
        canon = r["prompt"] + r["canonical_solution"]
        if i < 2:    # correct
            code = [canon, canon]
        elif i < 4:  # wrong everywhere
            code = [f"def {r['entry_point']}(*args):\n    return 'wrong'\n"] * 2
        else:        # passes base only, or one correct and one base-only sample
            code = [_base_only(t, r), canon if i == 5 else _base_only(t, r)]
        samples += [{"task_id": r["task_id"], "solution": c} for c in code]
    s = score(_write(tmp_path / "mixed.jsonl", samples), "humaneval", str(path), tmp_path / "out", parallel=2)
    # base: tasks 0,1,4,5 fully pass -> 4/6; plus: tasks 0,1 full + task 5 half -> 2.5/6
    assert s["base_pass@1"] == pytest.approx(100 * 4 / 6)
    assert s["plus_pass@1"] == pytest.approx(100 * 2.5 / 6)
    assert s["n_samples"] == 12


def test_bad_samples_files(bench, tmp_path):
    path, tasks, rows = bench
    with pytest.raises(PrivcodeError, match="missing.jsonl.*does not exist"):
        score(tmp_path / "missing.jsonl", "humaneval", str(path), tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "solution": "x"}\n{oops\n')
    with pytest.raises(PrivcodeError, match="bad.jsonl, line 2"):
        score(bad, "humaneval", str(path), tmp_path / "out")
    partial = _write(tmp_path / "partial.jsonl", [{"task_id": "HumanEval/0", "solution": "pass"}])
    with pytest.raises(PrivcodeError, match="no sample for 5 task"):
        score(partial, "humaneval", str(path), tmp_path / "out")
    nosol = _write(tmp_path / "nosol.jsonl", [{"task_id": "HumanEval/0", "solution": None}])
    with pytest.raises(PrivcodeError, match="field 'solution'"):
        score(nosol, "humaneval", str(path), tmp_path / "out")
    with pytest.raises(PrivcodeError, match="unknown dataset"):
        score(nosol, "apps", None, tmp_path / "out")
