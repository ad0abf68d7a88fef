"""The fast backend's sampling path: sort-free top-p and one prefill per prompt give the reference's
tokens for the same random stream, and the draws follow the nucleus distribution."""
import pytest
import torch

from privcode.synth.fast import FastHFBackend
from privcode.synth.sampling import sort_top_p_sample, top_p_sample


def _logits(rows, vocab, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])       # near-uniform .. peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95])
def test_sort_free_top_p_draws_the_references_tokens(scale, top_p):
    z = _logits(2000, 700, scale, seed=int(scale * 10))
    torch.manual_seed(1)
    ref = sort_top_p_sample(z, 0.8, top_p)
    torch.manual_seed(1)
    got = top_p_sample(z, 0.8, top_p)
    torch.manual_seed(1)
    unrestricted = (z / 0.8).softmax(-1).div(torch.empty(z.shape).exponential_()).argmax(-1)
    assert (unrestricted != ref).sum() > 20  # the nucleus matters for these rows: a sampler ignoring it fails
    assert (got == ref).float().mean() >= 0.999


def test_a_tiny_nucleus_is_the_most_probable_token_only():
    z = _logits(500, 300, 1.0, seed=3)
    torch.manual_seed(0)
    assert torch.equal(top_p_sample(z, 1.0, 1e-6, candidates=1), z.argmax(-1))
    torch.manual_seed(0)
    assert torch.equal(top_p_sample(z, 1.0, 1e-6), z.argmax(-1))


def test_draws_follow_the_renormalized_nucleus():
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # top_p 0.75: nucleus = first 3 (0.4+0.25 < 0.75)
    want = torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    z = p.log().expand(200_000, -1).contiguous()
    torch.manual_seed(5)
    counts = torch.bincount(top_p_sample(z, 1.0, 0.75), minlength=6).float()
    freq = counts / counts.sum()
    assert counts[3:].sum() == 0
    assert torch.allclose(freq, want, atol=0.005)  # 5 sigma of 200k draws is ~0.0055 at p = 0.5


def test_one_prefill_per_prompt_and_the_sort_free_sampler_keep_the_backends_tokens(tiny_model):
    from privcode.models import load_model, load_tokenizer
    from privcode.synth.base import SamplingParams

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_model(str(tiny_model))
    prompts = ["def add(a", "Question: Write a function.", "x", "Answer: Sure. def add(a, b):", "return a"]
    p = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, n=2, seed=2)
    # batch 4 = 2 prompts x 2 samples: both paths draw the same [rows, vocab] random stream
    reference = FastHFBackend(model=model, tokenizer=tok, batch_size=4, share_prefix=False,
                              sampler=sort_top_p_sample).generate(prompts, p)
    fast = FastHFBackend(model=model, tokenizer=tok, batch_size=4).generate(prompts, p)
    assert fast == reference
    assert len({x for per in fast for x in per}) > 5  # really sampled: the n samples differ


def test_stop_strings_end_a_completion_where_the_full_text_first_holds_one(tiny_model):
    """hf stops early (transformers' stop criteria), fast cuts afterwards: both return their text up to the
    first stop string, which evaluation relies on (it keeps only what precedes the closing fence)."""
    from privcode.models import load_model, load_tokenizer
    from privcode.synth.base import SamplingParams, cut_at_stop
    from privcode.synth.hf import HFBackend

    prompts = ["def add(a", "Question: Write a function.", "x", "return a"]
    fast = FastHFBackend(model=load_model(str(tiny_model)),
                         tokenizer=load_tokenizer(str(tiny_model), padding_side="left"), batch_size=4)
    for backend in (HFBackend(str(tiny_model), batch_size=4), fast):
        sampled = SamplingParams(max_new_tokens=24, temperature=1.0, seed=3)
        full = [o[0] for o in backend.generate(prompts, sampled)]
        stops = tuple({t[k:k + 2] for t in full for k in (len(t) // 2,) if t[k:k + 2].strip() and t.find(t[k:k + 2]) > 0})
        want = [cut_at_stop(t, stops) for t in full]
        assert sum(bool(w != t and w) for w, t in zip(want, full)) >= 2  # stops cut real, non-empty text
        got = [o[0] for o in backend.generate(prompts, SamplingParams(**{**sampled.__dict__, "stop": stops}))]
        assert got == want
        assert not any(s in g for g in got for s in stops)


def test_compiled_decode_layers_give_the_eager_tokens_with_one_graph_for_all_layers(tiny_model):
    """compile_layers: torch.compile of the two halves of a decode layer around its attention (and of the
    merge with the shared prompt's attention), reused by every layer (regional compilation): the tokens
    are the eager decoder's, greedy and sampled (shared prompt cache), and the layers share compiled
    graphs (fewer graphs than layers x shapes)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from privcode.models import load_model, load_tokenizer
    from privcode.synth.base import SamplingParams

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_model(str(tiny_model))
    prompts = ["def add(a", "Question: Write a function.", "x", "return a"]
    torch._dynamo.reset()
    counters.clear()
    assert len(model.get_decoder().layers) == 2
    for p, graphs in ((SamplingParams(max_new_tokens=8), 2),  # one batch of 4 rows
                      (SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, n=2, seed=4), 3)):
        eager = FastHFBackend(model=model, tokenizer=tok, batch_size=4).generate(prompts, p)
        compiled = FastHFBackend(model=model, tokenizer=tok, batch_size=4, compile_layers=True).generate(prompts, p)
        assert compiled == eager
        # two graphs (the halves around the attention), shared by both layers and by both runs (4 rows
        # each: the halves do not see the cache length or the shared prompt cache), not one per layer;
        # sampling with a shared prompt cache adds the merge of the two attentions (one graph)
        assert counters["stats"]["unique_graphs"] == graphs


def test_rows_for_memory_fill_the_free_memory_and_keep_a_prompts_samples_together():
    from privcode.synth.fast import MEM_FRACTION, rows_for_memory

    shape = dict(layers=32, kv=8, head_dim=128, dtype_bytes=2, vocab=128256, hidden=4096)  # Llama-3.1-8B
    per_prompt_rows = rows_for_memory(60 << 30, prompt_len=400, new_tokens=200, reps=1, **shape)
    shared = rows_for_memory(60 << 30, prompt_len=400, new_tokens=200, reps=20, **shape)
    assert shared > per_prompt_rows          # a shared prompt cache leaves room for more rows
    assert shared % 20 == 0 and per_prompt_rows & (per_prompt_rows - 1) == 0
    kv_row = 2 * 32 * 8 * 128 * 2
    assert per_prompt_rows * kv_row * 640 <= MEM_FRACTION * (60 << 30)  # its K/V fit
    assert 2 * per_prompt_rows * kv_row * 640 > MEM_FRACTION * (60 << 30)  # and twice as many would not
    assert rows_for_memory(120 << 30, prompt_len=400, new_tokens=200, **shape) == 2 * per_prompt_rows
    assert rows_for_memory(1 << 20, prompt_len=400, new_tokens=200, reps=20, **shape) == 20  # at least one prompt
    # two prompt caches per group of 5 rows: each row's share of them (2 x 448 slots / 5) counts
    one, two = (rows_for_memory(34 << 30, prompt_len=400, new_tokens=200, reps=5, caches=c, **shape) for c in (1, 2))
    fixed = 4 * 4 * 128256 + 16 * 4096 * 2
    assert two * (kv_row * (256 + 2 * 448 / 5) + fixed) <= MEM_FRACTION * (34 << 30) < \
        2 * two * (kv_row * (256 + 2 * 448 / 5) + fixed)
    assert two < one


def test_reading_only_the_written_cache_slots_gives_the_full_length_tokens(tiny_model, monkeypatch):
    """Each decode step attends to the slots written so far (rounded up to SLOT_BUCKET), not the whole
    cache: the same tokens as attending to every slot, over a run that crosses bucket boundaries."""
    from privcode.models import load_model, load_tokenizer
    from privcode.synth import runner
    from privcode.synth.base import SamplingParams

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_model(str(tiny_model))
    prompts = ["def add(a", "Question: Write a function.", "x"]
    lens = []
    real = runner.Runner.att_len
    monkeypatch.setattr(runner.Runner, "att_len", lambda self, slot: lens.append(real(self, slot)) or lens[-1])
    for p in (SamplingParams(max_new_tokens=150, temperature=0.9, seed=1),  # own cache: prompt + 150 slots
              SamplingParams(max_new_tokens=150, temperature=0.9, n=2, seed=1)):  # shared prompt cache
        short = FastHFBackend(model=model, tokenizer=tok, batch_size=4).generate_ids(
            [tok(x)["input_ids"] for x in prompts], p, ignore_eos=True)
        assert {64, 128, 192} <= set(lens)  # three attention lengths were used
        lens.clear()
        monkeypatch.setattr(runner.Runner, "att_len", lambda self, slot: self.S)  # the reference: every slot
        full = FastHFBackend(model=model, tokenizer=tok, batch_size=4).generate_ids(
            [tok(x)["input_ids"] for x in prompts], p, ignore_eos=True)
        assert short == full
        monkeypatch.setattr(runner.Runner, "att_len", lambda self, slot: lens.append(real(self, slot)) or lens[-1])
