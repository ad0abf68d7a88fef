"""BigCodeBench's real evaluator (bigcodebench 0.2.5, local execution) scores a tiny BigCodeBench-format
data set: privcode's score() on mixed samples, and privcode's evaluate stage end to end for every
bigcodebench-<complete|instruct>-<full|hard> benchmark with a scripted generation backend."""
import json

import pytest

from privcode.errors import PrivcodeError
from privcode.evaluate import bigcodebench_eval as bcb
from privcode.evaluate.run import EvalConfig
from privcode.evaluate.run import run as evaluate_run
from privcode.io import read_jsonl

# (task number, libs, code_prompt, docstring, canonical body, test methods, a wrong body)
_TASKS = [
    (0, ["math"], "import math\ndef task_func(n):\n",
     "Return the square root of n, rounded to 2 decimals.",
     "    return round(math.sqrt(n), 2)\n",
     ["self.assertEqual(task_func(4), 2.0)", "self.assertEqual(task_func(2), 1.41)"],
     "    return n / 2\n"),
    (1, ["collections"], "from collections import Counter\ndef task_func(text):\n",
     "Count the words of a text and return the most common word.",
     "    return Counter(text.split()).most_common(1)[0][0]\n",
     ["self.assertEqual(task_func('a b a'), 'a')", "self.assertEqual(task_func('x y y z'), 'y')"],
     "    return text.split()[0]\n"),
    (2, ["numpy"], "import numpy as np\ndef task_func(values):\n",
     "Return the mean of a list of numbers as a Python float.",
     "    return float(np.mean(values))\n",
     ["self.assertAlmostEqual(task_func([1, 2, 3, 6]), 3.0)", "self.assertIsInstance(task_func([1.5]), float)"],
     "    return float(np.median(values))\n"),
    (3, [], "def task_func(sentence):\n",
     "Reverse the order of the words of a sentence.",
     "    return ' '.join(reversed(sentence.split()))\n",
     ["self.assertEqual(task_func('a b c'), 'c b a')", "self.assertEqual(task_func('one'), 'one')"],
     "    return sentence[::-1]\n"),
]
HARD = (1, 3)  # the hard subset keeps the full set's task ids


def _task(num, libs, code_prompt, doc, canon, checks, wrong, hard=False):
    head, sig = code_prompt.rsplit("def ", 1)
    complete = (f'{head}\ndef {sig}    """\n    {doc}\n\n    Requirements:\n'
                + "".join(f"    - {lib}\n" for lib in libs) + '    """\n')
    instruct = (f"{doc}\nThe function should output with:\n    the result.\nYou should write self-contained "
                f"code starting with:\n```\n{code_prompt}```")
    test = "import unittest\n\nclass TestCases(unittest.TestCase):\n" + "".join(
        f"    def test_case_{i}(self):\n        {c}\n" for i, c in enumerate(checks))
    row = {"task_id": f"BigCodeBench/{num}", "complete_prompt": complete, "instruct_prompt": instruct,
           "canonical_solution": canon, "code_prompt": code_prompt, "test": test, "entry_point": "task_func",
           "doc_struct": json.dumps({"description": [doc], "notes": [], "params": [], "returns": [],
                                     "reqs": libs, "raises": [], "examples": []}),
           "libs": str(libs)}
    if hard:  # the extra columns of bigcode/bigcodebench-hard
        row.update({"q_idx": num, "question": instruct, "score": 0.5, "_id": f"BigCodeBench/{num}"})
    return row


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bigcodebench")
    rows = {t[0]: _task(*t) for t in _TASKS}
    full, hard = d / "BigCodeBench.jsonl", d / "BigCodeBench-Hard.jsonl"
    full.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    hard.write_text("".join(json.dumps(_task(*_TASKS[i], hard=True)) + "\n" for i in HARD))
    return {"full": full, "hard": hard, "rows": rows, "wrong": {t[0]: t[6] for t in _TASKS}}


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_score_mixed_samples(data, tmp_path):
    rows, wrong = data["rows"], data["wrong"]
    samples = [
        {"task_id": "BigCodeBench/0", "solution": rows[0]["complete_prompt"] + rows[0]["canonical_solution"]},
        {"task_id": "BigCodeBench/1", "completion": rows[1]["canonical_solution"]},  # BigCodeBench adds the prompt
        {"task_id": "BigCodeBench/1", "solution": rows[1]["code_prompt"] + wrong[1]},
        {"task_id": "BigCodeBench/2", "solution": rows[2]["code_prompt"] + wrong[2]},
        {"task_id": "BigCodeBench/3", "solution": "def task_func(sentence):\n    return undefined_name\n"},
    ]
    out = tmp_path / "out"
    s = bcb.score(_write(tmp_path / "mixed.jsonl", samples), "complete", "full", str(data["full"]), out, parallel=2)
    # per task: 1, 1/2, 0, 0 -> 37.5
    assert s["pass@1"] == pytest.approx(37.5)
    assert (s["n_tasks"], s["n_samples"], s["gt_pass_rate"], s["gt_failed_tasks"]) == (4, 5, 1.0, [])
    assert json.loads((out / "scores.json").read_text()) == s
    raw = json.loads((out / bcb.RAW_NAME).read_text())["eval"]
    assert {k: [r["status"] for r in v] for k, v in raw.items()} == {
        "BigCodeBench/0": ["pass"], "BigCodeBench/1": ["pass", "fail"], "BigCodeBench/2": ["fail"],
        "BigCodeBench/3": ["fail"]}
    assert "undefined_name" in json.dumps(raw["BigCodeBench/3"][0]["details"])
    assert json.loads((out / bcb.PASS_AT_K_NAME).read_text())["pass@1"] == pytest.approx(0.375)
    assert "BigCodeBench-Complete (Full)" in (out / "bigcodebench.log").read_text()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # scratch removed


class ScriptedBackend:
    """Answers each prompt with a canned completion, as a model would after the "```python" prefix."""

    def __init__(self, answers):
        self.answers = answers  # prompt marker -> completion

    def generate(self, prompts, params, progress=None):
        outs = []
        for p in prompts:
            (answer,) = [a for marker, a in self.answers.items() if marker in p]
            outs.append([answer + "\n```\nThat is the solution."])
            if progress:
                progress(1)
        return outs


# benchmark -> (limit, {task number: correct?}, pass@1)
CASES = {
    "bigcodebench-complete-full": (None, {0: True, 1: True, 2: False, 3: False}, 50.0),
    "bigcodebench-instruct-full": (3, {0: True, 1: False, 2: True}, 100 * 2 / 3),
    "bigcodebench-complete-hard": (None, {1: True, 3: False}, 50.0),
    "bigcodebench-instruct-hard": (None, {1: False, 3: True}, 50.0),
}


@pytest.mark.parametrize("benchmark", list(CASES))
def test_evaluate_stage(benchmark, data, tmp_path, monkeypatch):
    import privcode.synth

    split, subset = bcb.parse_name(benchmark)
    limit, correct, expected = CASES[benchmark]
    rows, wrong = data["rows"], data["wrong"]
    answers = {}
    for num, ok in correct.items():
        body = rows[num]["canonical_solution"] if ok else wrong[num]
        if split == "instruct" or num == 1:  # a whole program (for complete: kept as is)
            answer = rows[num]["code_prompt"] + body
        else:                                 # a function body: privcode prepends the complete prompt
            answer = body
        answers[json.loads(rows[num]["doc_struct"])["description"][0]] = answer  # in both prompts
    monkeypatch.setattr(privcode.synth, "get_backend", lambda *a, **k: ScriptedBackend(answers))
    out = tmp_path / "eval"
    cfg = EvalConfig(override=str(data[subset]), limit=limit, parallel=2)
    r = evaluate_run("org/public-model", benchmark, out, cfg)
    assert r["pass@1"] == pytest.approx(expected)
    assert (r["n_tasks"], r["n_samples"], r["gt_pass_rate"]) == (len(correct), len(correct), 1.0)
    assert (r["split"], r["subset"], r["benchmark"]) == (split, subset, benchmark)
    saved = json.loads((out / "scores.json").read_text())
    assert saved["pass@1"] == r["pass@1"] and json.loads((out / "privacy.json").read_text())["epsilon"] == 0.0
    sols = {x["task_id"]: x["solution"] for x in read_jsonl(out / "samples.jsonl")}
    assert sorted(sols) == [f"BigCodeBench/{n}" for n in correct]
    for num in correct:
        sol = sols[f"BigCodeBench/{num}"]
        assert "```" not in sol and sol.count("def task_func") == 1
        if split == "complete" and num != 1:
            assert sol.startswith(rows[num]["complete_prompt"])
    from privcode.report.table3 import columns_for
    assert columns_for(benchmark, r) == {f"BCB-{split.capitalize()}-{subset.capitalize()}": r["pass@1"]}


def test_bad_inputs(data, tmp_path, monkeypatch):
    rows = data["rows"]
    ok = _write(tmp_path / "ok.jsonl", [{"task_id": f"BigCodeBench/{n}", "solution": "pass"} for n in rows])
    with pytest.raises(PrivcodeError, match="nothing.jsonl: BigCodeBench data file does not exist"):
        bcb.score(ok, "complete", "full", str(tmp_path / "nothing.jsonl"), tmp_path / "out")
    broken = _write(tmp_path / "broken.jsonl", [{k: v for k, v in rows[0].items() if k != "code_prompt"}])
    with pytest.raises(PrivcodeError, match="broken.jsonl, line 1, field 'code_prompt': missing required field"):
        bcb.score(ok, "complete", "full", str(broken), tmp_path / "out")
    partial = _write(tmp_path / "partial.jsonl", [{"task_id": "BigCodeBench/0", "solution": "pass"}])
    with pytest.raises(PrivcodeError, match=r"no sample for 3 task\(s\)"):
        bcb.score(partial, "complete", "full", str(data["full"]), tmp_path / "out")
    with pytest.raises(PrivcodeError, match="line 1, field 'task_id': task 'BigCodeBench/0' is not among"):
        bcb.score(partial, "complete", "hard", str(data["hard"]), tmp_path / "out")
    with pytest.raises(PrivcodeError, match="must be bigcodebench-<complete|instruct>-<full|hard>"):
        bcb.parse_name("bigcodebench-instruct-medium")

    # no data: without an override BigCodeBench downloads from the hub, which fails offline
    monkeypatch.delenv(bcb.OVERRIDE_VAR, raising=False)
    import bigcodebench.data.bigcodebench as bcb_data

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(bcb_data, "load_dataset", offline)
    with pytest.raises(PrivcodeError, match="BigCodeBench-hard data could not be loaded.*'override' parameter"):
        bcb.load_tasks("hard", None)


def test_missing_package_is_one_clear_error(data, tmp_path, monkeypatch):
    rows = data["rows"]
    ok = _write(tmp_path / "ok.jsonl", [{"task_id": f"BigCodeBench/{n}", "solution": "pass"} for n in rows])
    monkeypatch.setitem(__import__("sys").modules, "bigcodebench", None)  # as if not installed
    with pytest.raises(PrivcodeError, match=r"not installed: pip install --no-deps bigcodebench==0\.2\.5"):
        bcb.score(ok, "complete", "full", str(data["full"]), tmp_path / "out")
    with pytest.raises(PrivcodeError, match="BigCodeBench is not installed"):
        bcb.load_tasks("full", None)
    monkeypatch.undo()
    # installed, but one of the evaluator's light dependencies is missing (the evaluator subprocess)
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "pqdm.py").write_text("raise ImportError(\"No module named 'pqdm'\")\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    with pytest.raises(PrivcodeError, match=r"BigCodeBench is not usable \(cannot import bigcodebench.evaluate: "
                                            r"No module named 'pqdm'\): pip install"):
        bcb.score(ok, "complete", "full", str(data["full"]), tmp_path / "out")


def test_evaluate_over_two_devices_equals_one_process_and_resumes(tiny_model, data, tmp_path, monkeypatch):
    """shards: one generation process per device of CUDA_VISIBLE_DEVICES (fake ids on CPU, the real
    tiny model in each child), completions merged in task order, scored once."""
    bench = "bigcodebench-complete-full"
    cfg = dict(override=str(data["full"]), max_new_tokens=6, batch_size=2, parallel=2)
    one = evaluate_run(str(tiny_model), bench, tmp_path / "one", EvalConfig(**cfg, shards=1))
    assert one["processes"] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "fake0,fake1")
    # shard 1 of 2 (tasks 1, 3) was killed after task 1: its completion is reused, not redone
    gen = {"model": str(tiny_model), "max_new_tokens": 6, "prompt_format": "qa", "stop": ["```"]}
    reused = "    return 'reused'\n```"
    progress = tmp_path / ".two.progress.1of2.jsonl"
    progress.write_text(json.dumps({"id": "BigCodeBench/1", "gen": gen, "raw": reused}) + "\n")
    two = evaluate_run(str(tiny_model), bench, tmp_path / "two", EvalConfig(**cfg))
    assert two["processes"] == 2 and two["n_tasks"] == 4
    a, b = read_jsonl(tmp_path / "one" / "raw.jsonl"), read_jsonl(tmp_path / "two" / "raw.jsonl")
    assert [r["task_id"] for r in b] == [f"BigCodeBench/{n}" for n in range(4)]
    assert [r["raw"] for r in b] == [r["raw"] if r["task_id"] != "BigCodeBench/1" else reused for r in a]
    assert not list(tmp_path.glob(".two.progress*"))
    progress.write_text(json.dumps({"id": "BigCodeBench/1", "gen": {**gen, "max_new_tokens": 9}, "raw": ""}) + "\n")
    with pytest.raises(PrivcodeError, match="other settings"):
        evaluate_run(str(tiny_model), bench, tmp_path / "two", EvalConfig(**cfg))
    with pytest.raises(PrivcodeError, match="'shards': must be an integer >= 0"):
        EvalConfig(shards=-1)
