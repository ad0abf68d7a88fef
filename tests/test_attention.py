"""The fast backend's decode attention (privcode.synth.decoder.attend, merge_attention): the math path is
softmax attention with its log-sum-exp; two key sets merged by their log-sum-exps are the attention over
their union; on CUDA the memory-efficient kernel gives the math path's output on the decoder's real
layouts (strided cache slices, expanded biases).

    pytest tests/test_attention.py           # on a GPU machine: runs the cuda cases too
"""
import pytest
import torch
import torch.nn.functional as F

from privcode.synth.decoder import (attend, flash_attend, flex_attend, flex_mask, merge_attention, packed,
                                   prefix_keys)

CUDA = torch.cuda.is_available()


def _case(b=6, h=2, m=4, n=40, S=64, d=16, dtype=torch.float32, device="cpu", seed=0):
    """Queries, a cache [b, h, S, d] read through its first n slots (a strided slice, as the decoder
    reads it) and a per-row validity mask [b, 1, 1, n]: a prefix of each row (the decoder's caches), from
    one slot (row 1) to all n (row 0)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, m, d, generator=g)
    K, V = torch.randn(b, h, S, d, generator=g), torch.randn(b, h, S, d, generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0], lengths[1] = n, 1
    valid = torch.arange(n)[None, :] < lengths[:, None]
    put = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return put(q), put(K)[:, :, :n], put(V)[:, :, :n], valid.to(device)[:, None, None, :]


def test_math_attention_is_softmax_attention_with_its_log_sum_exp():
    q, K, V, mask = _case()
    o, lse = attend(q, K, V, prefix_keys(mask, q.dtype), 0.25, "math")
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=0.25))
    s = (q @ K.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert lse.dtype == torch.float32 and o.shape == q.shape


def test_two_key_sets_merged_by_log_sum_exp_are_attention_over_both():
    """What the shared prompt cache relies on: prompt part and own part, each with its own mask."""
    q, K1, V1, m1 = _case(seed=1)
    _, K2, V2, m2 = _case(n=24, seed=2)
    o1, l1 = attend(q, K1, V1, prefix_keys(m1, q.dtype), 0.3, "math")
    o2, l2 = attend(q, K2, V2, prefix_keys(m2, q.dtype), 0.3, "math")
    want = F.scaled_dot_product_attention(q, torch.cat([K1, K2], 2), torch.cat([V1, V2], 2),
                                          attn_mask=torch.cat([m1, m2], -1), scale=0.3)
    torch.testing.assert_close(merge_attention(o1, l1, o2, l2), want)
    # a merge that ignored either part's weight, or either part, would not be the union's attention
    assert not torch.allclose((o1 + o2) / 2, want, atol=1e-3)
    assert not torch.allclose(o1, want, atol=1e-3) and not torch.allclose(o2, want, atol=1e-3)


def test_prefix_keys_count_each_rows_keys():
    _, _, _, mask = _case()
    bias, lengths = prefix_keys(mask, torch.float32)
    assert lengths.dtype == torch.int32 and lengths.tolist() == mask.sum((1, 2, 3)).tolist()
    assert lengths[0] == 40 and lengths[1] == 1 and bool((bias == 0).eq(mask).all())


@pytest.mark.parametrize("contiguous", [False, True])
def test_packed_layout_addresses_each_rows_keys_without_a_copy(contiguous):
    """The kernel honours per-row key counts only in its variable-length layout ([1, M, h, d] and where each
    row's keys start): key t of head j of row i must be at view[0, start[i] + t, j], in the cache's memory."""
    _, K, _, _ = _case(b=5, h=3, n=40, S=64, d=16)
    K = K.contiguous() if contiguous else K  # the decoder's slices [:, :, :att] of [b, h, S, d], or whole
    view, starts = packed(K)
    assert starts.dtype == torch.int32 and starts.shape == (6,) and view.shape[0] == 1
    assert view.data_ptr() == K.data_ptr()  # a view, no copy
    for i in range(5):
        torch.testing.assert_close(view[0, starts[i]:starts[i] + 40].transpose(0, 1), K[i], rtol=0, atol=0)
    assert (starts[1:] - starts[:-1] >= 40).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_flex_attention_with_its_block_mask_is_the_math_path(device):
    """attention="flex" for the own caches: flex_attention over a strided cache slice with the block mask of
    each row's key count (one key to all 300: partial and whole 128-key blocks) is the math path, keys past
    a row's count poisoned; on CUDA compiled, in bf16."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, K, V, mask = _case(b=5, h=2, m=4, n=300, S=320, d=64, dtype=dtype, device=device)
    K.masked_fill_(~mask.view(5, 1, 300, 1), 1e3)
    V.masked_fill_(~mask.view(5, 1, 300, 1), 1e3)
    keys = prefix_keys(mask, q.dtype)
    o, lse = flex_attend(q, K, V, flex_mask(keys[1], 300), 0.125)
    ro, rl = attend(q.float(), K.float(), V.float(), prefix_keys(mask, torch.float32), 0.125, "math")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert o.shape == ro.shape and lse.shape == rl.shape and lse.dtype == torch.float32
    torch.testing.assert_close(lse, rl, rtol=0, atol=tol)
    torch.testing.assert_close(o.float(), ro, rtol=tol, atol=tol)


@pytest.mark.skipif(not CUDA, reason="FlashAttention runs on CUDA only")
@pytest.mark.parametrize("G,d,n", [(4, 128, 300), (6, 128, 192), (4, 64, 64), (8, 8, 40)])
def test_flash_attention_is_the_math_path_on_the_own_caches(G, d, n):
    """attention="flash" for the own caches: FlashAttention-2's decoding path (G query heads of a KV head as
    one sequence, keys split over the SMs) over strided cache slices, in bf16, rows from one key to all n:
    the math path, keys past a row's count poisoned (a kernel that read them would be far off)."""
    q, K, V, mask = _case(b=16, h=8, m=G, n=n, S=n + 64, d=d, dtype=torch.bfloat16, device="cuda")
    K.masked_fill_(~mask.view(16, 1, n, 1), 1e3)
    V.masked_fill_(~mask.view(16, 1, n, 1), 1e3)
    o, lse = flash_attend(q, K, V, prefix_keys(mask, q.dtype)[1], d ** -0.5)
    ro, rl = attend(q.float(), K.float(), V.float(), prefix_keys(mask, torch.float32), d ** -0.5, "math")
    assert o.shape == ro.shape and lse.shape == rl.shape and lse.dtype == torch.float32
    torch.testing.assert_close(lse, rl, rtol=0, atol=2e-2)
    torch.testing.assert_close(o.float(), ro, rtol=2e-2, atol=2e-2)


def test_flash_that_cannot_run_falls_back_to_auto(caplog):
    """Decoder(attention="flash") probes FlashAttention at the model's head dim; where it cannot run (the CPU,
    fp32) it decodes with "auto" and says so."""
    from privcode.synth.decoder import own_path_runs

    assert not own_path_runs(torch.zeros(1, dtype=torch.float32), "flash", 64)
    assert "FlashAttention failed" in caplog.text and "decoding with the math attention" in caplog.text
    if CUDA:
        assert own_path_runs(torch.zeros(1, dtype=torch.bfloat16, device="cuda"), "flash", 128)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_triton_own_cache_kernel_is_the_math_path(device):
    """attention="triton": privcode's own-cache kernel (a row and KV head per program, its G query heads one
    tile, the row's keys in blocks of 64) over strided cache slices, rows from one key to all n, keys past a
    row's count poisoned: the math path (CPU: fp32 through Triton's interpreter, in a subprocess; CUDA:
    compiled, bf16)."""
    pytest.importorskip("triton")
    from conftest import INTERPRETED, in_triton_interpreter

    if device == "cpu" and not INTERPRETED:
        return in_triton_interpreter("tests/test_attention.py::test_triton_own_cache_kernel_is_the_math_path[cpu]")
    from privcode.synth.own_attention import CONFIG, own_attend

    dtype, tol = (torch.bfloat16, 2e-2) if device == "cuda" else (torch.float32, 1e-5)
    cases = [(4, 128, 300, CONFIG), (6, 128, 192, CONFIG), (4, 64, 64, CONFIG), (8, 8, 40, CONFIG),
             (1, 16, 5, CONFIG), (4, 128, 300, (16, 1, 1)), (6, 64, 192, (128, 4, 2))]  # other key blocks
    for G, d, n, config in cases:
        q, K, V, mask = _case(b=7, h=3, m=G, n=n, S=n + 64, d=d, dtype=dtype, device=device)
        K.masked_fill_(~mask.view(7, 1, n, 1), 1e3)
        V.masked_fill_(~mask.view(7, 1, n, 1), 1e3)
        o, lse = own_attend(q, K, V, prefix_keys(mask, q.dtype)[1], d ** -0.5, config)
        ro, rl = attend(q.float(), K.float(), V.float(), prefix_keys(mask, torch.float32), d ** -0.5, "math")
        assert o.shape == ro.shape and o.dtype == dtype and lse.shape == rl.shape and lse.dtype == torch.float32
        torch.testing.assert_close(lse, rl, rtol=0, atol=tol)
        torch.testing.assert_close(o.float(), ro, rtol=tol, atol=tol)


@pytest.mark.parametrize("G", [4, 6, 7])  # the describer (Llama-3.1-8B), junior (1.5B) and premium (7B)
def test_triton_kernel_lowers_to_hopper_code_at_the_models_shapes(G):
    """The interpreter runs the kernel's Python, not its lowering: tl.dot's tile limits, layouts and shared
    memory are checked only when Triton compiles it for a GPU. Compile it (no GPU needed: Triton carries
    ptxas) for sm_90 (H100/H200) in bf16 at head dim 128 with the default config and the widest one
    `bench attention` tries; a kernel Hopper cannot run fails here instead of in the decoder's probe."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no ASTSource/GPUTarget")
    from privcode.synth.own_attention import CONFIG, _own_attention

    kinds = {**dict.fromkeys("QKVO", "*bf16"), "L": "*fp32", "C": "*i32", "scale": "fp32", "KV": "i32"}
    const = {"G": G, "D": 128, "GP": 16, "DP": 128, "PREC": None}
    names = _own_attention.arg_names
    for block, warps, stages in [CONFIG, (128, 8, 3)]:
        value = {**const, "BN": block}
        sig = {a: "constexpr" if a in value else kinds.get(a, "i64") for a in names}  # s*: strides
        src = ASTSource(fn=_own_attention, signature=sig, constexprs={(names.index(a),): v for a, v in value.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024  # Hopper's shared memory per block


def test_auto_is_the_triton_kernel_where_it_runs(caplog):
    """attention="auto" resolves (Decoder) to the Triton own-cache kernel on CUDA in bf16, probed at the
    model's head dim (the prompt caches keep the memory-efficient kernel: prompt_path); on the CPU to "auto"
    (the math path) without trying Triton; an explicit path that cannot run to "auto"."""
    import importlib.util

    from conftest import INTERPRETED
    from privcode.synth.decoder import prompt_path, resolve_attention

    assert resolve_attention(torch.zeros(1), "auto", 64) == "auto" and "failed" not in caplog.text
    assert resolve_attention(torch.zeros(1), "flash", 64) == "auto" and "FlashAttention failed" in caplog.text
    assert resolve_attention(torch.zeros(1), "math", 64) == "math"
    if CUDA:
        bf16 = torch.zeros(1, dtype=torch.bfloat16, device="cuda")
        got = resolve_attention(bf16, "auto", 128)
        assert got == ("triton" if importlib.util.find_spec("triton") else "auto") and prompt_path(got) == "auto"
        assert resolve_attention(bf16.float(), "auto", 128) == "auto"  # fp32: the math path, as before
    elif not INTERPRETED and importlib.util.find_spec("triton"):
        assert resolve_attention(torch.zeros(1, dtype=torch.bfloat16), "triton", 64) == "auto"


def test_triton_that_cannot_run_falls_back_to_auto(caplog):
    """Decoder(attention="triton") probes the kernel; on the CPU without Triton's interpreter it cannot run:
    "auto", and the log says why."""
    from conftest import INTERPRETED
    from privcode.synth.decoder import own_path_runs

    if INTERPRETED:
        pytest.skip("Triton's interpreter runs the kernel on the CPU")
    assert not own_path_runs(torch.zeros(1, dtype=torch.float32), "triton", 64)
    assert "the Triton own-cache kernel failed" in caplog.text


@pytest.mark.skipif(not CUDA, reason="the memory-efficient kernel runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,n", [(4, 64), (80, 448), (6, 192)])
def test_efficient_kernel_is_the_math_path_on_the_decoders_layouts(m, n, dtype):
    """The decoder's shapes: own caches (m = G query heads per KV head) and stacked queries of a group
    over a prompt cache (m = reps * G); strided cache slices; rows from one key to all n. Keys past a
    row's count are filled with huge values: a kernel that read them would be far off."""
    q, K, V, mask = _case(b=16, h=8, m=m, n=n, S=n + 64, d=128, dtype=dtype, device="cuda")
    K.masked_fill_(~mask.view(16, 1, n, 1), 1e3)
    V.masked_fill_(~mask.view(16, 1, n, 1), 1e3)
    keys = prefix_keys(mask, q.dtype)
    o, lse = attend(q, K, V, keys, 128 ** -0.5, "efficient")
    ro, rl = attend(q.float(), K.float(), V.float(), prefix_keys(mask, torch.float32), 128 ** -0.5, "math")
    assert o.dtype == dtype and lse.shape == rl.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(lse, rl, rtol=0, atol=tol)
    torch.testing.assert_close(o.float(), ro, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        assert attend(q, K, V, keys, 128 ** -0.5, "auto")[0].equal(o)  # auto takes the kernel on CUDA


def test_a_kernel_that_does_not_run_is_found_before_decoding(caplog):
    """Decoder(attention="auto") probes the kernel on CUDA and decodes with the math path if it fails; the
    probe reports a device where it cannot run (here: the CPU) instead of raising."""
    from privcode.synth.decoder import kernel_runs

    assert not kernel_runs(torch.zeros(1, dtype=torch.bfloat16))
    assert "math attention" in caplog.text
    if CUDA:
        assert kernel_runs(torch.zeros(1, dtype=torch.bfloat16, device="cuda"))


def test_the_probe_refuses_a_kernel_that_reads_past_each_rows_keys(monkeypatch, caplog):
    """A kernel that ran but ignored the key counts would give wrong tokens silently: the probe compares it
    with the math path on poisoned keys (here the "kernel" is the math path without the mask)."""
    from privcode.synth import decoder

    math = decoder.attend

    def kernel(q, K, V, keys, scale, kernel="auto", reads_all=True):
        if kernel == "efficient":
            keys = (keys[0] * 0 if reads_all else keys[0], keys[1])
        return math(q, K, V, keys, scale, "math")

    monkeypatch.setattr(decoder, "attend", kernel)
    assert not decoder.kernel_runs(torch.zeros(1))
    assert "not the math path's" in caplog.text
    monkeypatch.setattr(decoder, "attend", lambda *a, **k: kernel(*a, **k, reads_all=False))
    assert decoder.kernel_runs(torch.zeros(1))


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("device,kernel", [("cpu", "math")] + ([("cuda", "math"), ("cuda", "auto")] if CUDA else []))
def test_each_row_reads_its_own_prompt_cache_of_its_group(device, kernel, c):
    """c prompt caches per group (FastHFBackend prompt_caches): a group's rows attend, each, to the cache its
    `pslot` names -- one key to all of it, the others holding other prompts -- and get what they would from
    that cache alone; a path that read another one, or the group's first, would be far off. On CUDA (auto)
    the kernel reads each cache once for the rows that hold it (`attend_held`)."""
    from types import SimpleNamespace

    from privcode.synth.decoder import Decoder

    B, reps, kv, G, P, d = 12, 4, 2, 3, 48, 64
    dtype = torch.bfloat16 if kernel == "auto" else torch.float32
    g = torch.Generator().manual_seed(4)
    put = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    q = put(torch.randn(B, kv, G, d, generator=g))
    Kp, Vp = (put(torch.randn(B // reps * c, kv, P, d, generator=g) * 3) for _ in range(2))
    counts = torch.tensor([P, 1, 17, 30, 5, 9, 40, 2, 11])[:B // reps * c]  # holders c·u .. c·u + c - 1 of group u
    pvalid = (torch.arange(P)[None, :] < counts[:, None]).to(device)
    pslot = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1], device=device) * (c - 1)  # group 2: one cache only
    dec = SimpleNamespace(scaling=d ** -0.5, attention=kernel)
    o, lse = Decoder._prompt_attention(dec, q, Kp, Vp, prefix_keys(pvalid[:, None, None, :], dtype), reps, pslot)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for b in range(B):
        for s in range(c):
            h = b // reps * c + s
            ro, rl = attend(q[b:b + 1].float(), Kp[h:h + 1].float(), Vp[h:h + 1].float(),
                            prefix_keys(pvalid[h:h + 1, None, None, :], torch.float32), d ** -0.5, "math")
            same = torch.allclose(o[b:b + 1].float(), ro, atol=tol, rtol=tol) and \
                torch.allclose(lse[b:b + 1], rl, atol=tol)
            assert same == (s == int(pslot[b])), (b, s)
