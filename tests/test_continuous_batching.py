"""Continuous batching in the fast backend: finished rows take waiting prompts and samples, and every row
still gets exactly the tokens of an independent reference (the model's full forward over the whole
sequence at every step, the sort-based sampler, the row's own random stream), greedy and sampled,
with more prompts than rows and rows that end anywhere from their first token to max_new_tokens."""
import pytest
import torch

from privcode.synth import runner
from privcode.synth.base import SamplingParams
from privcode.synth.fast import FastHFBackend
from privcode.synth.sampling import row_exponential, row_keys, seed_key, sort_top_p_sample

NEW = 24
LENS = [17, 1, 5, 12, 3, 9, 2, 20, 7]  # 9 prompts, at most 4-6 rows at a time below


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                      initializer_range=0.1)  # peaked enough that some token ends rows at every length
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in LENS]


@torch.inference_mode()
def reference(model, prompts, p: SamplingParams, eos=None):
    """Sample j of prompt i, token by token: the whole sequence through the model, then argmax or the sort
    sampler with the noise of (seed, identity i * n + j, token index)."""
    k = p.n if p.temperature > 0 else 1
    out = []
    for i, x in enumerate(prompts):
        per = []
        for j in range(k):
            seq, toks = list(x), []
            base = row_keys(torch.tensor([i * k + j]), p.max_new_tokens)
            for t in range(p.max_new_tokens):
                z = model(input_ids=torch.tensor([seq])).logits[:, -1]
                if p.temperature > 0:
                    nxt = int(sort_top_p_sample(z, p.temperature, p.top_p,
                                                noise=row_exponential(base + t, seed_key(p.seed), z.shape[-1]))[0])
                else:
                    nxt = int(z.argmax(-1)[0])
                toks.append(nxt)
                seq.append(nxt)
                if nxt == eos:
                    break
            per.append(toks)
        out.append(per)
    return out


def _varied_eos(rows):
    """The token that, as EOS, ends these rows at the most distinct lengths (first token .. never)."""
    def lengths(e):
        return [r.index(e) + 1 if e in r else NEW for r in rows]
    e = max(range(1, 64), key=lambda e: (1 in lengths(e), NEW in lengths(e), len(set(lengths(e)))))
    L = lengths(e)
    assert 1 in L and NEW in L and len(set(L)) >= 5, L  # rows end at step 1, at max_new and in between
    return e


@pytest.fixture(scope="module")
def cases(model, prompts):
    """(params, eos, reference tokens) for greedy and for n = 3 samples."""
    out = {}
    for name, p in (("greedy", SamplingParams(max_new_tokens=NEW)),
                    ("sampled", SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, n=3, seed=5))):
        eos = _varied_eos([r for per in reference(model, prompts, p) for r in per])
        out[name] = (p, eos, reference(model, prompts, p, eos))
    return out


def _fast(model, eos, **kw):
    return FastHFBackend(model=model, tokenizer=None, eos_token_id=eos, pad_token_id=0, **kw)


@pytest.mark.parametrize("kw", [dict(batch_size=4), dict(batch_size=2), dict(batch_size=4, continuous=False),
                                dict(batch_size=64)])
def test_greedy_rows_are_the_references_with_and_without_refill(model, prompts, cases, kw):
    p, eos, want = cases["greedy"]
    assert _fast(model, eos, **kw).generate_ids(prompts, p) == want


def test_prompt_caches_default_to_four_where_rows_end_at_different_steps(model):
    """prompt_caches 0 (the default): AUTO_CACHES holders per group where a group's rows can end at different
    steps (continuous batching, EOS or drawn lengths), one where every row runs to max_new_tokens or to the one
    length all given lengths share (EOS ignored), or batches run one after another; a value set is what it says."""
    from privcode.synth.fast import AUTO_CACHES

    fb = _fast(model, None, batch_size=4)
    assert AUTO_CACHES == 4
    assert fb.caches(20, False, None) == 4 and fb.caches(20, True, [[3, 5]]) == 4
    assert fb.caches(20, True, None) == 1  # fixed lengths
    assert fb.caches(20, True, [[7, 7], [7, 7]]) == 1 and fb.caches(20, False, [[7, 7]]) == 4  # one given length
    assert fb.caches(20, True, [[7, 7], [7, 6]]) == 4
    assert _fast(model, None, batch_size=4, continuous=False).caches(20, False, None) == 1
    assert _fast(model, None, batch_size=4, prompt_caches=2).caches(20, False, None) == 2


@pytest.mark.parametrize("kw", [
    dict(batch_size=4),                                    # one row per prompt at a time (n=3 / 4 rounded up)
    dict(batch_size=4, prompt_rows=2),                     # groups of 2 rows: a freed row takes the next sample
    dict(batch_size=4, prompt_rows=2, prompt_caches=1),    # ... the next prompt once both rows are free
    dict(batch_size=6, prompt_rows=3, prompt_caches=2),    # freed rows start the next prompt in the 2nd cache
    dict(batch_size=6, prompt_rows=3, prompt_caches=3),    # ... or in whichever of 3 no live row reads
    dict(batch_size=6, prompt_rows=3),                     # a prompt's 3 samples start together
    dict(batch_size=6, prompt_rows=3, continuous=False),   # batch after batch, the schedule before refills
    dict(batch_size=5, share_prefix=False, sampler=sort_top_p_sample),  # n prefills, sort sampler: per-row refill
    dict(batch_size=64),                                   # everything at once
])
def test_sampled_rows_are_the_references_whatever_the_schedule(model, prompts, cases, kw):
    p, eos, want = cases["sampled"]
    got = _fast(model, eos, **kw).generate_ids(prompts, p)
    assert got == want
    assert len({tuple(r) for per in got for r in per}) > 20  # 27 rows, really sampled


def test_refilling_keeps_the_batch_full(model, prompts, cases, monkeypatch):
    """With refills the same 4 rows (one per prompt at a time) take fewer decode steps than batch after
    batch, and prompts are prefilled into rows freed mid-run (more load calls than batches)."""
    p, eos, want = cases["sampled"]
    counts = {}
    for cont in (True, False):
        calls = {"steps": 0, "loads": 0}
        real_replay, real_load = runner.Runner.replay, runner.Runner.load
        monkeypatch.setattr(runner.Runner, "replay", lambda self, att: calls.__setitem__("steps", calls["steps"] + 1)
                            or real_replay(self, att))
        monkeypatch.setattr(runner.Runner, "load", lambda self, h, x: calls.__setitem__("loads", calls["loads"] + 1)
                            or real_load(self, h, x))
        assert _fast(model, eos, batch_size=4, prompt_rows=1, continuous=cont).generate_ids(prompts, p) == want
        monkeypatch.undo()
        counts[cont] = calls
    assert counts[True]["steps"] < counts[False]["steps"]
    assert counts[True]["loads"] > counts[False]["loads"] >= 1


def test_two_prompt_caches_start_the_next_prompt_while_a_group_finishes(model, prompts, cases, monkeypatch):
    """prompt_caches=2: a group's freed rows load the next prompt into its second cache while other rows still
    decode the last one (steps where one group's live rows read both caches), so the same groups take fewer
    decode steps than with one cache, and every row is still the reference's."""
    p, eos, want = cases["sampled"]
    seen = {}
    for c in (1, 2):
        seen[c] = {"steps": 0, "mixed": 0}
        real_replay = runner.Runner.replay

        def replay(self, att, c=c, real_replay=real_replay):
            real_replay(self, att)
            seen[c]["steps"] += 1
            if self.prefix[4] is not None:
                live, slot = (~self.fin).view(-1, self.reps), self.prefix[4].view(-1, self.reps)
                both = ((live & (slot == 0)).any(1) & (live & (slot == 1)).any(1)).any()
                seen[c]["mixed"] += int(both)

        monkeypatch.setattr(runner.Runner, "replay", replay)
        assert _fast(model, eos, batch_size=6, prompt_rows=3, prompt_caches=c).generate_ids(prompts, p) == want
        monkeypatch.undo()
    assert seen[1]["mixed"] == 0 and seen[2]["mixed"] > 0
    assert seen[2]["steps"] < seen[1]["steps"]


def test_a_refill_that_kept_the_previous_prompts_kv_is_caught(model, prompts, cases, monkeypatch):
    """The comparison has teeth: if a refill prefilled the new prompt's hidden state but left the freed rows'
    cache with the previous prompt's K/V, the refilled rows' tokens differ from the reference."""
    p, eos, want = cases["sampled"]
    real_load = runner.Runner.load
    calls = []

    def stale_load(self, holders, xs):
        shared = self.prefix is not None
        Kc, Vc = (self.prefix[0], self.prefix[1]) if shared else (self.K, self.V)
        before = [(K[holders].clone(), V[holders].clone()) for K, V in zip(Kc, Vc)]
        real_load(self, holders, xs)
        if calls:  # refills only: put the previous occupant's K/V back
            with torch.inference_mode():
                for (k, v), K, V in zip(before, Kc, Vc):
                    K[holders], V[holders] = k, v
        calls.append(holders)

    monkeypatch.setattr(runner.Runner, "load", stale_load)
    got = _fast(model, eos, batch_size=4, prompt_rows=2).generate_ids(prompts, p)
    assert len(calls) > 1
    first = {0, 7}  # the two longest prompts fill the 2 groups first: their K/V were not tampered with
    assert all(got[i] == want[i] for i in first)
    assert any(got[i] != want[i] for i in range(len(prompts)) if i not in first)


def test_rows_stop_at_given_lengths_with_the_same_tokens(model, prompts, cases):
    """lengths[i][j] (benchmarks on random weights): the row stops there as if it drew EOS; its tokens are
    the start of the unconstrained row (its random stream does not depend on the other rows)."""
    p, _, _ = cases["sampled"]
    full = _fast(model, None, batch_size=6).generate_ids(prompts, p, ignore_eos=True)
    lengths = [[(3 * i + 7 * j) % (NEW + 5) for j in range(3)] for i in range(len(prompts))]  # 0 .. NEW + 4
    for cont in (True, False):
        got = _fast(model, None, batch_size=6, continuous=cont).generate_ids(prompts, p, ignore_eos=True,
                                                                             lengths=lengths)
        for i, per in enumerate(got):
            for j, row in enumerate(per):
                assert row == full[i][j][:max(1, min(NEW, lengths[i][j]))]


def test_free_groups_take_unstarted_samples_of_others_once_nothing_waits(model, prompts, monkeypatch):
    """One prompt, n = 8, four groups of 2 rows: without stealing one group decodes the 8 samples 2 at a time
    (4 * NEW steps at fixed lengths) while three groups idle; with it the prompt is prefilled into every group,
    each group starts 2 distinct samples, the run takes NEW steps, and every row is still the
    reference's (a stolen sample started twice, or one never started, changes the rows)."""
    p = SamplingParams(max_new_tokens=NEW, temperature=1.0, top_p=0.9, n=8, seed=2)
    one = [prompts[0]]
    calls = {"steps": 0, "loads": 0}
    real_replay, real_load = runner.Runner.replay, runner.Runner.load
    monkeypatch.setattr(runner.Runner, "replay", lambda self, att: calls.__setitem__("steps", calls["steps"] + 1)
                        or real_replay(self, att))
    monkeypatch.setattr(runner.Runner, "load", lambda self, h, x: calls.__setitem__("loads", calls["loads"] + len(h))
                        or real_load(self, h, x))
    got = _fast(model, None, batch_size=8, prompt_rows=2).generate_ids(one, p, ignore_eos=True)
    monkeypatch.undo()
    assert calls["loads"] == 4 and calls["steps"] <= NEW
    assert got == reference(model, one, p)


def test_prompts_of_very_different_lengths_run_in_segments_with_the_references_tokens(model):
    """A prompt cache is as long as the longest prompt it holds: a call is cut where that length could halve,
    each segment on its own runner, and the rows are still the reference's."""
    from privcode.synth.fast import length_segments

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (150, 3, 70, 20, 130, 66)]
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=1)
    order = sorted(range(6), key=lambda i: -len(prompts[i]))
    assert length_segments(order, prompts) == [[0, 4, 2, 5], [3, 1]]  # 192 slots, then 64 (20 and 3 tokens)
    fb = _fast(model, None, batch_size=4, prompt_rows=1)
    assert fb.generate_ids(prompts, p) == reference(model, prompts, p)
    # the prompt cache of each segment (key: ..., prefix, caches)
    assert sorted(key[-2] for key in fb._runners) == [64, 192]


def test_row_noise_is_uniform_and_independent_across_identities_and_tokens():
    E = row_exponential(row_keys(torch.arange(400), 50) + 3, seed_key(7), 4096)
    assert E.min() > 0 and torch.isfinite(E).all()
    u = torch.exp(-E)  # Exp(1) -> U(0, 1)
    counts = torch.histc(u, 50, 0, 1)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 49 + 5 * (2 * 49) ** 0.5  # 49 degrees of freedom, 5 sigma
    c = u - 0.5
    for a, b in ((c[1:], c[:-1]), (c[:, 1:], c[:, :-1])):  # neighbouring identities, neighbouring tokens
        assert abs(float((a * b).mean() / c.var())) < 5 / a.numel() ** 0.5
    again = row_exponential(row_keys(torch.arange(400), 50) + 3, seed_key(7), 4096)
    assert torch.equal(E, again)
    for other in (8, 7 + (1 << 32)):  # another seed, also one that differs above bit 32 (the round trip's rounds)
        assert not torch.equal(E, row_exponential(row_keys(torch.arange(400), 50) + 3, seed_key(other), 4096))
    assert not torch.equal(E[1:], E[:-1])


def test_the_compiled_sampler_draws_the_references_tokens(model, prompts, cases, monkeypatch):
    """On CUDA the runner compiles noise, softmax and the race into fused kernels (`fused_sampler`), padding
    the first tokens of started rows to its one shape: forced on here (CPU compiler), the rows are still
    the reference's, refills included."""
    import functools

    from privcode.synth import fast

    monkeypatch.setattr(fast, "Runner", functools.partial(runner.Runner, fused_sampler=True))
    p, eos, ref = cases["sampled"]
    fb = _fast(model, eos, batch_size=4)
    assert fb.generate_ids(prompts, p) == ref
    assert all(r.fused and r.draw != r._draw for r in fb._runners.values())  # the compiled sampler ran


def test_flex_attention_decodes_the_references_rows(model, prompts, cases):
    """attention="flex" (own caches through flex_attention and its block mask, eager on CPU; the prompt
    cache through the same path as "auto"), refills and shared prompts: the reference's rows."""
    p, eos, want = cases["sampled"]
    fb = _fast(model, eos, batch_size=4, prompt_rows=2, attention="flex")
    assert fb.dec.attention == "flex"
    assert fb.generate_ids(prompts, p) == want


def test_triton_attention_decodes_the_references_rows(model, prompts, cases):
    """attention="triton" (own caches through privcode's Triton kernel: on CPU through Triton's interpreter,
    in a subprocess; the prompt caches through "auto"'s path), refills and shared prompts: the reference's
    rows."""
    pytest.importorskip("triton")
    from conftest import INTERPRETED, in_triton_interpreter

    if not INTERPRETED:
        return in_triton_interpreter("tests/test_continuous_batching.py::"
                                     "test_triton_attention_decodes_the_references_rows")
    p, eos, want = cases["sampled"]
    fb = _fast(model, eos, batch_size=4, prompt_rows=2, attention="triton")
    assert fb.dec.attention == "triton"
    assert fb.generate_ids(prompts, p) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("attention", ["efficient", "flash", "flex", "triton"])
@pytest.mark.parametrize("name", ["greedy", "sampled"])
def test_the_cuda_path_gives_the_references_tokens(model, prompts, cases, name, attention):
    """CUDA graphs, compiled layers and sampler, the memory-efficient attention kernel (or compiled
    flex_attention) reading each row's own key count, refills, two prompt caches per group of 2 rows (each
    row reading its own through the kernel: `attend_held`): in fp32 the rows are still the (CPU) reference's."""
    import copy

    p, eos, ref = cases[name]
    fb = _fast(copy.deepcopy(model).cuda(), eos, batch_size=4, prompt_rows=2, attention=attention, compile_layers=True)
    # compiled flex_attention needs a head dim >= 16 (this model's is 8), FlashAttention fp16/bf16 (this test
    # runs fp32): their probes fall back to auto (their own CUDA checks: tests/test_attention.py, bf16)
    assert fb.dec.attention == ("auto" if attention in ("flex", "flash") else attention)
    assert fb.generate_ids(prompts, p) == ref
    assert all(r.graphs for r in fb._runners.values())


def test_a_failed_capture_retries_with_the_eager_sampler_then_decodes_eagerly(model, monkeypatch, caplog):
    """If the CUDA graphs cannot be captured with the compiled sampler, the runner captures them with the eager
    one (same tokens) before it gives up graphs altogether (decoding eagerly, slower, still right)."""
    from privcode.synth.decoder import Decoder

    r = runner.Runner(Decoder(model), 4, 64, temperature=0.8, top_p=0.9, eos=None, pad=0, ignore_eos=True,
                      use_graph=False, fused_sampler=True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def capture(fail_first_only):
        calls.append(r.fused)
        if len(calls) == 1 or not fail_first_only:
            raise RuntimeError("operation not permitted when stream is capturing")
        r.graphs = {64: "graph"}

    monkeypatch.setattr(r, "_capture", lambda: capture(True))
    r._capture_or_fall_back()
    assert calls == [True, False] and r.graphs and r.draw == r._draw  # captured with the eager sampler
    assert "sampling eagerly" in caplog.text
    r.fused, calls[:] = True, []
    monkeypatch.setattr(r, "_capture", lambda: capture(False))
    r._capture_or_fall_back()
    assert len(calls) == 2 and r.graphs == {} and "decoding eagerly" in caplog.text


def test_smaller_groups_per_prompt_take_fewer_steps_when_rows_end_early():
    """scripts/schedule_steps.py (the `prompt_rows` and `prompt_caches` defaults): with rows ending at EOS-like
    lengths, groups of n/4 rows per prompt refill sooner than groups of n and take fewer decode steps for the
    same work, and a second prompt cache per group takes fewer still; at fixed lengths the step counts are
    equal."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "schedule_steps.py"), "--n", "8", "--rows", "16",
                          "--prompts", "8", "--new-tokens", "40", "--lengths", "uniform:4,max", "--prompt-rows", "2,8"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    steps = {(m[0], int(m[1]), int(m[2])): int(m[3])
             for m in re.findall(r"(\S+)\s+prompt_rows\s+(\d+), caches (\d):\s+(\d+) steps", out)}
    assert len(steps) == 8, out
    assert steps[("uniform:4", 2, 1)] < steps[("uniform:4", 8, 1)]
    assert steps[("uniform:4", 8, 2)] < steps[("uniform:4", 8, 1)]
    assert len({v for (spec, _, _), v in steps.items() if spec == "max"}) == 1
