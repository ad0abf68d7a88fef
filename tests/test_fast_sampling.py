"""The fast backend's sampling path: sort-free top-p and one prefill per prompt give the reference's
tokens for the same random stream, and the draws follow the nucleus distribution."""
import pytest
import torch

from privcode.synth.fast import FastHFBackend, sort_top_p_sample, top_p_sample


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

