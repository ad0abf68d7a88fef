import copy
import doctest
import json
import random
import re
import time

import pytest

from privcode.data import taskgen
from privcode.data.taskgen import (Task, generate_tasks, load_function, render, run_reference, to_humaneval,
                                   to_record)
from privcode.data.taskgen_families import FAMILIES
from privcode.errors import PrivcodeError
from privcode.io import read_jsonl

HE_KEYS = {"task_id", "prompt", "entry_point", "canonical_solution", "test", "contract", "base_input",
           "plus_input", "atol"}
FENCE = re.compile(r"```python\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def tasks() -> list[Task]:
    return generate_tasks(5, 4 * len(FAMILIES))


def test_family_count():
    assert len(FAMILIES) >= 22


def test_deterministic_and_seeded():
    a = [t.__dict__ for t in generate_tasks(0, 40)]
    b = [t.__dict__ for t in generate_tasks(0, 40)]
    assert a == b
    c = [t.problem for t in generate_tasks(1, 40)]
    assert c != [t["problem"] for t in a]


def test_unique_and_cycles_families():
    ts = generate_tasks(2, 400)
    assert len({t.problem for t in ts}) == len(ts) == 400
    assert len({t.task_id for t in ts}) == 400
    assert {t.family for t in ts[:len(FAMILIES)]} == set(FAMILIES)


def test_family_filter_and_errors():
    ts = generate_tasks(0, 10, families=["fizzbuzz", "caesar_shift"])
    assert {t.family for t in ts} == {"fizzbuzz", "caesar_shift"}
    with pytest.raises(PrivcodeError, match="unknown task families"):
        generate_tasks(0, 3, families=["nope"])
    with pytest.raises(PrivcodeError, match="distinct tasks"):
        generate_tasks(0, 100000, families=["prime_count"])


def test_reference_solutions(tasks):
    for t in tasks:
        assert 3 <= len(t.base_inputs) <= 6, t.task_id
        assert 5 <= len(t.plus_inputs) <= 15, t.task_id
        ns: dict = {}
        exec(t.solution + "\n" + "\n".join(t.tests), ns)  # the reference passes its own asserts
        assert len(t.tests) >= 3
        # inputs survive a JSON round trip unchanged, and the reference is quick and deterministic
        inputs = t.base_inputs + t.plus_inputs
        assert json.loads(json.dumps(inputs)) == inputs
        start = time.perf_counter()
        out1 = run_reference(t, inputs)
        assert time.perf_counter() - start < 0.5, t.task_id
        assert run_reference(t, json.loads(json.dumps(inputs))) == out1
        fn = load_function(t.solution, t.entry_point)
        for args in inputs:  # never mutates its arguments
            before = copy.deepcopy(args)
            fn(*args)
            assert args == before, t.task_id
        # HumanEval prompt + body is the same program, and its docstring examples hold
        ns = {}
        exec(t.signature_prompt + t.body, ns)
        assert [ns[t.entry_point](*copy.deepcopy(a)) for a in inputs] == out1
        test = doctest.DocTestParser().get_doctest(ns[t.entry_point].__doc__, ns, t.entry_point, None, 0)
        assert len(test.examples) >= 1
        runner = doctest.DocTestRunner()
        runner.run(test, out=lambda s: None)
        assert runner.summarize(verbose=False).failed == 0, t.task_id
        assert t.problem.startswith(("Write", "Implement", "Create", "Your task")) and f"`{t.entry_point}(" in t.problem


def test_outputs_do_not_depend_on_names():
    """A family's semantics must not change with the argument names (locals never shadow them)."""
    for fam, make in FAMILIES.items():
        for seed in range(3):
            spec = make(random.Random(seed))
            inputs = taskgen._draw_inputs(spec, random.Random(seed))
            outs = set()
            for i in range(max(len(p) for p in spec.args)):
                argnames = [pool[(i + j) % len(pool)] for j, pool in enumerate(spec.args)]
                for fname in spec.names[:2]:
                    t = render(fam, spec, fname, argnames, 0, 0, 0, inputs)
                    outs.add(repr(run_reference(t, inputs[0] + inputs[1])))
            assert len(outs) == 1, fam


def test_record_format(tasks):
    for t in tasks:
        rec = to_record(t)
        assert set(rec) == {"id", "problem", "solution", "lang", "family"} and rec["lang"] == "python"
        blocks = FENCE.findall(rec["solution"])
        assert len(blocks) == 1 and not rec["solution"].startswith("```")
        ns: dict = {}
        exec(blocks[0], ns)  # function + its usage asserts
        assert t.entry_point in ns


def test_humaneval_format(tasks):
    for i, t in enumerate(tasks[:40]):
        he = to_humaneval(t, i)
        assert set(he) == HE_KEYS and he["task_id"] == f"HumanEval/{i}" and he["atol"] == 0
        ns: dict = {}
        exec(he["prompt"] + he["canonical_solution"] + he["test"], ns)
        ns["check"](ns[he["entry_point"]])
        json.dumps(he)


def test_cli_records_and_benchmark_disjoint(tmp_path):
    assert taskgen.main(["--out", str(tmp_path), "--params", '{"seed": 3, "records": 300, "benchmark": 40}']) == 0
    recs = read_jsonl(tmp_path / "records.jsonl", required=("id", "problem", "solution", "lang"))
    bench = read_jsonl(tmp_path / "humaneval.jsonl", required=("task_id", "prompt", "entry_point"))
    assert len(recs) == 300 and len(bench) == 40
    assert [b["task_id"] for b in bench] == [f"HumanEval/{i}" for i in range(40)]
    assert all(set(b) == HE_KEYS for b in bench)
    bench_names = {b["entry_point"] for b in bench}
    rec_names = {re.search(r"def (\w+)\(", r["solution"]).group(1) for r in recs}
    assert not bench_names & rec_names
    assert len({re.search(r"`(\w+)\(", r["problem"]).group(1) for r in recs} & bench_names) == 0
    assert len({r["family"] for r in recs}) == len(FAMILIES)
    # the benchmark spreads over all families (40 >= number of families)
    bt = generate_tasks(3, 40, salt="benchmark")
    assert [t.entry_point for t in bt] == [b["entry_point"] for b in bench]
    assert {t.family for t in bt} == set(FAMILIES)
    # and the records avoid its parameter instances
    rt = generate_tasks(3, 300, exclude=bt, salt="records")
    assert [to_record(t) for t in rt] == recs
    assert not {t.key for t in bt} & {t.key for t in rt}
