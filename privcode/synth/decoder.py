"""The fast backend's model driver: the model's own layers run with an explicit static KV cache
(`Decoder`): prefill of prompts into chosen cache rows, one decode step with a per-row write slot.
privcode.synth.runner holds one batch shape's buffers and captured steps, privcode.synth.batching
decides what each row decodes; privcode.synth.fast explains the design and is the interface."""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "qwen2", "qwen3", "mistral"}
SLOT_BUCKET = 64        # cache length rounded up to this, so graphs are reused across batches


def bucket(n: int) -> int:
    """`n` cache slots rounded up to SLOT_BUCKET."""
    return -(-n // SLOT_BUCKET) * SLOT_BUCKET


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


ATTENTION = ("auto", "efficient", "flash", "flex", "math", "triton")
FLEX_BLOCK = 128        # flex_attention's key block (its default)
_UNMARKED = contextlib.nullcontext()


def unmarked(name: str):
    """The default `Decoder.mark`: no section marks (a profiler sets torch.profiler.record_function)."""
    return _UNMARKED


def additive(mask, dtype):
    """A bool mask (True: attend) as an additive bias in `dtype`: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def prefix_keys(mask, dtype):
    """What `attend` needs of a decode mask [b, 1, 1, n] (True: attend) whose true slots are a prefix of
    each row (the fast backend's caches: slots are written in order from 0): (the mask as an additive
    bias in `dtype`, for the math path; the prefix lengths int32 [b], for the kernel)."""
    return additive(mask, dtype), mask.reshape(mask.shape[0], -1).sum(-1, dtype=torch.int32)


def uses_kernel(q, kernel: str) -> bool:
    """Whether `attend(q, ..., kernel)` runs the memory-efficient kernel."""
    return kernel == "efficient" or (kernel == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16))


def attend(q, K, V, keys, scale: float, kernel: str = "auto"):
    """softmax(q K^T * scale + mask) V and its log-sum-exp, where row i of the batch attends to its
    first keys[1][i] keys: q [b, h, m, d], K/V [b, h, n, d] (any strides with the last one 1),
    keys = prefix_keys(mask) (every row attends to at least one key). Returns (o [b, h, m, d] in q's
    dtype, lse [b, h, m] fp32).
    kernel "efficient": PyTorch's memory-efficient attention kernel (CUDA; `packed` layout), per-row key counts: it
    reads only a row's first keys[1][i] keys (rounded up to its key block) and keeps scores on chip;
    "math": matmul, fp32 softmax, matmul with the additive mask; "auto": efficient on CUDA for fp16/bf16."""
    if uses_kernel(q, kernel):
        b, h, m, d = q.shape
        if K.stride() != V.stride():  # one start per row for both (strides only: no sync in a graph capture)
            K, V = K.contiguous(), V.contiguous()
        (Kp, starts), (Vp, _) = packed(K), packed(V)
        qp = q.transpose(1, 2).reshape(1, b * m, h, d)  # [1, queries, heads, d]: the kernel's varlen layout
        cq = offsets(b, m, q.device)
        o, lse = torch.ops.aten._efficient_attention_forward(
            qp, Kp, Vp, None, cq, starts, m, K.shape[2], 0.0, 0, True, scale=scale, seqlen_k=keys[1])[:2]
        return o.view(b, m, h, d).transpose(1, 2), lse[..., :m].float()
    s = torch.matmul(q, K.transpose(-1, -2)).float() * scale + keys[0]
    lse = torch.logsumexp(s, -1)
    return torch.matmul((s - lse[..., None]).exp().to(q.dtype), V), lse


def held_layout(held, H: int, G: int):
    """The variable-length layout `attend_held` gives the kernel for rows reading holders held [B] (int64)
    of H, G queries each: (row order sorted by holder, int32 [H + 1] where each holder's queries start,
    the holder and the index within its sequence of each sorted query). The same for every layer of a
    decode step, so made once per step; tensor ops only (runs inside a graph capture)."""
    B = held.shape[0]
    perm = torch.argsort(held, stable=True)
    hs = held[perm]
    cq = torch.zeros(H + 1, dtype=torch.int32, device=held.device)
    cq[1:] = torch.cumsum(torch.zeros(H, dtype=torch.int32, device=held.device).scatter_add_(
        0, hs, torch.full_like(hs, G, dtype=torch.int32)), 0, dtype=torch.int32)
    e = hs[:, None].expand(B, G).reshape(-1)                      # holder of each query, sorted
    return perm, cq, e, torch.arange(B * G, device=held.device) - cq[e]  # ... its index in the holder's sequence


def attend_held(q, Kp, Vp, pkeys, scale: float, layout, most: int):
    """The memory-efficient kernel's attention of each row's queries q [B, kv, G, d] over one prompt cache,
    the row's holder among Kp/Vp [H, kv, P, d], each cache read once for the rows that hold it: rows sorted
    by holder, each holder's queries one sequence of the kernel's variable-length layout (`held_layout`;
    none for a holder no row reads; at most `most` rows hold one). pkeys = prefix_keys of the caches'
    masks. Returns (o [B, kv, G, d], lse [B, kv, G] fp32). Tensor ops only (runs inside a graph capture)."""
    B, kv, G, d = q.shape
    perm, cq, e, pos = layout
    qp = q[perm].permute(0, 2, 1, 3).reshape(1, B * G, kv, d)
    (Kq, starts), (Vq, _) = packed(Kp), packed(Vp)
    o, lse = torch.ops.aten._efficient_attention_forward(
        qp, Kq, Vq, None, cq, starts, most * G, Kp.shape[2], 0.0, 0, True, scale=scale, seqlen_k=pkeys[1])[:2]
    ls = lse[e, :, pos].view(B, G, kv).permute(0, 2, 1).float()
    os = o.view(B, G, kv, d).permute(0, 2, 1, 3)
    return (torch.empty_like(os).index_copy_(0, perm, os.contiguous()),
            torch.empty_like(ls).index_copy_(0, perm, ls.contiguous()))


def packed(K):
    """K [b, h, n, d] (a slice of a cache: any strides with the last one 1 and the batch stride a multiple
    of the slot stride) as the memory-efficient kernel's variable-length layout, without a copy: (a view
    [1, M, h, d] of the same memory, int32 [b + 1] where row i's keys start on its slot axis). The kernel
    honours per-row key counts (`seqlen_k`) only in this layout: in the batched one it reads all n keys."""
    b, h, n, d = K.shape
    sb, sh, sn, sd = K.stride()
    if sd != 1 or sb % sn or (b > 1 and sb < sn * n):
        K = K.contiguous()
        sb, sh, sn, sd = K.stride()
    step = sb // sn
    view = K.as_strided((1, (b - 1) * step + n, h, d), (0, sn, sh, 1))
    return view, offsets(b, step, K.device)


_OFFSETS: dict = {}


def offsets(b: int, step: int, device):
    """int32 [0, step, ..., b * step]: where each of b sequences starts in the kernel's variable-length
    layout. The same for every layer and step of a shape, so made once (not inside a graph capture, where
    a new tensor is only filled on replay)."""
    key = (b, step, str(device))
    if key not in _OFFSETS:
        t = torch.arange(0, (b + 1) * step, step, device=device, dtype=torch.int32)
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return t
        _OFFSETS[key] = t
    return _OFFSETS[key]


def _matches_math(p, m: int, n: int, counts, run, what: str, instead: str, d: int = 64) -> bool:
    """Whether run(q, K, V, keys) -> (o, lse) works on p's device and dtype and gives the math path's
    attention on a tiny case (2 rows, 2 heads, m queries, n keys of head dim d; row i sees its first
    counts[i] keys, the others poisoned); logs `what` failed, decoding with `instead`, if not."""
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn((2, 2, m, d), generator=g).to(p.device, p.dtype)
        K, V = (torch.randn((2, 2, n, d), generator=g).to(p.device, p.dtype) for _ in range(2))
        mask = (torch.arange(n)[None, :] < torch.tensor(counts)[:, None])[:, None, None, :].to(p.device)
        K, V = (t.masked_fill(~mask.view(2, 1, n, 1), 100.0) for t in (K, V))
        o, lse = run(q, K, V, prefix_keys(mask, p.dtype))
        ro, rl = attend(q.float(), K.float(), V.float(), prefix_keys(mask, torch.float32), 0.125, "math")
        if o.shape != ro.shape or lse.shape != rl.shape:  # (allclose would broadcast)
            raise RuntimeError(f"its output shapes {tuple(o.shape)}, {tuple(lse.shape)} are not the math path's")
        if not (torch.allclose(o.float(), ro, atol=5e-2) and torch.allclose(lse, rl, atol=5e-2)):
            raise RuntimeError("its output is not the math path's (keys past a row's count read?)")
        return True
    except Exception as e:  # noqa: BLE001 - any failure: a path that runs
        log.warning("%s failed (%s); decoding with %s", what, e, instead)
        return False


def kernel_runs(p) -> bool:
    """Whether `attend`'s kernel runs on p's device and dtype and reads only each row's keys (rows seeing 1
    and 3 of 4 keys; logs why not)."""
    return _matches_math(p, 3, 4, (1, 3), lambda q, K, V, keys: attend(q, K, V, keys, 0.125, "efficient"),
                         "the memory-efficient attention kernel", "the math attention")


def flex_mask(lengths, att: int):
    """flex_attention's BlockMask for one query per row attending to its first lengths[b] (int32 [B]) of
    `att` keys: each row's key blocks up to its count, the last one masked inside; tensor ops only (no host
    sync, so it is built inside a captured decode step)."""
    from torch.nn.attention.flex_attention import BlockMask

    B, nb = lengths.shape[0], -(-att // FLEX_BLOCK)
    count = ((lengths + FLEX_BLOCK - 1) // FLEX_BLOCK).to(torch.int32).view(B, 1, 1)
    index = torch.arange(nb, dtype=torch.int32, device=lengths.device).expand(B, 1, 1, nb).contiguous()
    kw = dict(BLOCK_SIZE=FLEX_BLOCK, seq_lengths=(1, att), mask_mod=lambda b, h, q, k: k < lengths[b])
    try:  # the q-side blocks serve the backward only (torch < 2.7 computes them always)
        return BlockMask.from_kv_blocks(count, index, compute_q_blocks=False, **kw)
    except TypeError:
        return BlockMask.from_kv_blocks(count, index, **kw)


_FLEX = {}


def flex_attend(q, K, V, block_mask, scale: float):
    """Own-cache decode attention with flex_attention (torch.compile'd on CUDA: its decoding kernel packs a
    KV head's G query heads into one tile and splits the keys over the SMs): q [B, kv, G, d], K/V
    [B, kv, n, d], `block_mask` = flex_mask(key counts, n). Returns (o [B, kv, G, d], lse [B, kv, G] fp32)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type not in _FLEX:
        if q.is_cuda:  # one specialization per (rows, attention length): a job's few dozen of them
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        _FLEX[q.device.type] = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
    B, kv, G, d = q.shape
    o, lse = _FLEX[q.device.type](q.reshape(B, kv * G, 1, d), K, V, block_mask=block_mask, scale=scale,
                                  enable_gqa=True, return_lse=True)
    return o.view(B, kv, G, d), lse.view(B, kv, G).float()


def flash_attend(q, K, V, counts, scale: float):
    """Own-cache decode attention with PyTorch's FlashAttention-2 kernel (CUDA, fp16/bf16; one query per row):
    q [B, kv, G, d], K/V [B, kv, n, d] (the `packed` layout: a view, no copy), row b reading its first
    counts[b] (int32 [B]) keys (`seqused_k`). For one query per row the kernel takes a KV head's G query
    heads as G queries of one sequence (no K/V repeated) and splits each row's keys over the SMs (its
    split-KV decoding kernel). Returns (o [B, kv, G, d], lse [B, kv, G] fp32). Tensor ops only (runs inside
    a graph capture)."""
    B, kv, G, d = q.shape
    if K.stride() != V.stride():  # one start per row for both
        K, V = K.contiguous(), V.contiguous()
    (Kp, starts), (Vp, _) = packed(K), packed(V)
    o, lse = torch.ops.aten._flash_attention_forward(
        q.reshape(B, kv * G, d), Kp[0], Vp[0], offsets(B, 1, q.device), starts, 1, K.shape[2], 0.0, False, False,
        scale=scale, seqused_k=counts)[:2]
    return o.view(B, kv, G, d), lse.view(kv * G, B).t().reshape(B, kv, G).float()  # its lse: [heads, rows]


def triton_attend(q, K, V, counts, scale: float, config: tuple | None = None):
    """Own-cache decode attention through privcode's Triton kernel (privcode.synth.own_attention: one program
    per row and KV head, its G query heads one tile, reading only the row's first counts[b] keys): q [B, kv, G,
    d], K/V [B, kv, n, d] cache slices; config (keys per step, warps, stages), default own_attention.CONFIG.
    Returns (o [B, kv, G, d], lse [B, kv, G] fp32)."""
    from privcode.synth import own_attention  # imports triton: only where asked for

    return own_attention.own_attend(q, K, V, counts, scale, config or own_attention.CONFIG)


# paths for the own caches only (the prompt caches take "auto"'s), with their names for the probe's log
OWN_ONLY = {"flash": "FlashAttention", "flex": "flex_attention", "triton": "the Triton own-cache kernel"}


def step_keys(keys, n: int, attention: str):
    """What `own_attend` needs of a decode step's own-cache keys, made once for all layers: keys =
    prefix_keys(mask) of the step's mask over n slots, and for flex its block mask (flex_mask)."""
    return (*keys, flex_mask(keys[1], n)) if attention == "flex" else keys


def own_attend(q, K, V, keys, scale: float, attention: str):
    """A decode step's attention over the rows' own caches through the Decoder's `attention`: q [B, kv, G, d],
    K/V [B, kv, n, d] cache slices, keys = step_keys(...). Returns (o [B, kv, G, d], lse [B, kv, G] fp32)."""
    if attention == "flex":
        return flex_attend(q, K, V, keys[2], scale)
    if attention == "flash":
        return flash_attend(q, K, V, keys[1], scale)
    if attention == "triton":
        return triton_attend(q, K, V, keys[1], scale)
    return attend(q, K, V, keys, scale, attention)


def own_path_runs(p, attention: str, head_dim: int = 64) -> bool:
    """Whether the own-cache path `attention` (one of OWN_ONLY) runs on p's device and dtype at the model's
    head dim (compiled flex needs >= 16, flash fp16/bf16 on CUDA, triton a GPU or Triton's interpreter) and
    gives the math path's attention (rows seeing 1 and 130 of 200 keys: partial and whole key blocks; logs
    why not)."""
    return _matches_math(p, 4, 200, (1, 130),
                         lambda q, K, V, keys: own_attend(q, K, V, step_keys(keys, K.shape[2], attention), 0.125,
                                                          attention),
                         OWN_ONLY[attention], "the memory-efficient kernel" if uses_kernel(p, "auto") else
                         "the math attention", head_dim)


def resolve_attention(p, attention: str, head_dim: int) -> str:
    """The attention path a Decoder runs for `attention` on p's device and dtype, each path probed against the
    math path at the model's head dim: "auto" is the Triton own-cache kernel where it runs (CUDA, fp16/bf16: the
    fastest path measured, docs/performance.md), with the memory-efficient kernel for the prompt caches; an
    own-cache path that fails falls back to "auto" without it, and auto's memory-efficient kernel that fails to
    "math" (each logs why)."""
    if attention == "auto" and uses_kernel(p, "auto") and importlib.util.find_spec("triton") is not None:
        attention = "triton"
    if attention in OWN_ONLY and not own_path_runs(p, attention, head_dim):
        attention = "auto"
    if prompt_path(attention) == "auto" and uses_kernel(p, "auto") and not kernel_runs(p):
        attention = "math"
    return attention


def prompt_path(attention: str) -> str:
    """The attention path of the prompt caches for a Decoder's `attention` (flash, flex and triton serve own
    caches only: the memory-efficient kernel reads a prompt cache once for all the queries of the rows that
    hold it)."""
    return "auto" if attention in OWN_ONLY else attention


def merge_attention(o1, l1, o2, l2):
    """Attention over two disjoint key sets from each one's output and log-sum-exp (the softmax over
    their union): o_i [..., d], l_i [...] fp32; in o1's dtype."""
    l = torch.logaddexp(l1, l2)
    return (o1.float() * (l1 - l).exp()[..., None] + o2.float() * (l2 - l).exp()[..., None]).to(o1.dtype)


class Decoder:
    """The model's own modules, driven with an explicit static cache."""

    def __init__(self, model, compile_layers: bool = False, attention: str = "auto"):
        self.model = model
        # compile_layers: the two halves of a decode layer around its attention -- norm, q/k/v and rotary
        # before it; o_proj, residuals and MLP after it -- and the merge of the shared-prompt attention, as
        # functions of the layer's module and tensors: every layer and every attention length has the same
        # shapes there, so torch.compile makes one graph for each (regional compilation) and fuses the
        # element-wise work between the GEMMs. The attention itself is one kernel call (`attend`).
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
        self.attention = attention
        self.mark = unmarked  # sections of a decode step, for profiles (privcode.bench.decode_profile)
        self.qkv, self.finish_layer, self.merge = self._qkv, self._finish_layer, merge_attention
        if compile_layers:
            import torch._dynamo as dynamo  # (not `import torch._dynamo`: that makes `torch` local here)

            # one specialization per (batch, prefill length) shape: room for a job's few of them
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
            self.qkv = torch.compile(self._qkv, dynamic=False)
            self.finish_layer = torch.compile(self._finish_layer, dynamic=False)
            self.merge = torch.compile(merge_attention, dynamic=False)
        m = model.get_decoder()
        self.embed, self.layers, self.norm, self.rotary = m.embed_tokens, m.layers, m.norm, m.rotary_emb
        self.head = model.get_output_embeddings()
        cfg = model.config
        a0 = self.layers[0].self_attn
        self.nh = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = getattr(a0, "head_dim", None) or cfg.hidden_size // self.nh
        self.scaling = getattr(a0, "scaling", self.hd ** -0.5)
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        lt = getattr(cfg, "layer_types", None)
        if lt is not None and all(t == "full_attention" for t in lt):
            self.window = None
        self.attention = resolve_attention(next(model.parameters()), attention, self.hd)

    @staticmethod
    def supports(model) -> bool:
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
            return False
        try:
            m = model.get_decoder()
            L = m.layers[0]
            return all(hasattr(L, n) for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")) \
                and all(hasattr(L.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(m, "rotary_emb") and model.get_output_embeddings() is not None
        except (AttributeError, IndexError, TypeError):
            return False

    def forward(self, ids, pos, slots, K, V, mask, rows=None, prefix=None, att=None, last=None):
        """ids, pos [b, L]; K/V per layer [B, kv, S, d]; mask [b, 1, L, S_att] bool (True: attend).
        Decode (rows None, L == 1, b == B): each row writes its new K/V at its own slot `slots` [B] and its query
        attends to the first `att` slots of its cache (the mask is [B, 1, 1, att]: slots past the
        last written one are never read); prefix: (Kp, Vp, pvalid, reps, pslot), prompt caches
        [B / reps * c, kv, P, d] per layer: c of them (`_prompt_attention`) for each group of `reps`
        consecutive rows, a row attending to its group's cache `pslot` [B] (None: c = 1) first
        (through the kernel: `held_layout`, made once for all layers).
        Prefill (rows [b] given): the L tokens' K/V go to slots [0, L) of cache rows `rows` [b] and the
        queries attend to the L new tokens only (`slots` is unused).
        Returns final-norm hidden states [b, H] of the last position (`last` [b]: of these positions)."""
        b, L = ids.shape
        decode = rows is None
        with self.mark("embed, rotary, masks"):
            h = self.embed(ids)
            cos, sin = self.rotary(h, pos)
            cos, sin = cos[:, None], sin[:, None]
            if decode:  # what attend needs of the masks, once for all layers
                idx = slots.view(b, 1, 1, 1).expand(b, self.kv, 1, self.hd)
                keys = step_keys(prefix_keys(mask, h.dtype), mask.shape[-1], self.attention)
                pre = None if prefix is None else (prefix[0], prefix[1],
                                                   prefix_keys(prefix[2][:, None, None, :], h.dtype), *prefix[3:])
                if pre is not None and pre[4] is not None and uses_kernel(h, prompt_path(self.attention)):
                    c = prefix[2].shape[0] // (b // pre[3])  # each row's holder, sorted once for all layers
                    held = torch.arange(b, device=h.device) // pre[3] * c + pre[4]
                    pre = (*pre, held_layout(held, prefix[2].shape[0], self.nh // self.kv))
        if decode:
            for i, layer in enumerate(self.layers):
                h = self.decode_layer(layer, h, cos, sin, idx, K[i], V[i], keys,
                                      None if pre is None else (pre[0][i], pre[1][i], *pre[2:]),
                                      att or K[i].shape[2])
            with self.mark("final norm"):
                return self.norm(h[:, -1])
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, cos, sin, b, L)
            K[i][rows, :, :L] = k.to(K[i].dtype)
            V[i][rows, :, :L] = v.to(V[i].dtype)
            G = self.nh // self.kv
            kk = k.repeat_interleave(G, dim=1) if G > 1 else k
            vv = v.repeat_interleave(G, dim=1) if G > 1 else v
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=self.scaling)
            h = self._finish_layer(layer, h, o.transpose(1, 2).reshape(b, L, self.nh * self.hd))
        return self.norm(h[:, -1] if last is None else h[torch.arange(b, device=h.device), last])

    def _qkv(self, layer, h, cos, sin, b, L):
        """The layer's rotated queries [b, nh, L, d] and keys, values [b, kv, L, d]."""
        at = layer.self_attn
        x = layer.input_layernorm(h)
        q = at.q_proj(x).view(b, L, self.nh, self.hd)
        k = at.k_proj(x).view(b, L, self.kv, self.hd)
        v = at.v_proj(x).view(b, L, self.kv, self.hd)
        if hasattr(at, "q_norm"):
            q, k = at.q_norm(q), at.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return q * cos + _rot(q) * sin, k * cos + _rot(k) * sin, v

    @staticmethod
    def _finish_layer(layer, h, o):
        h = h + layer.self_attn.o_proj(o)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def decode_layer(self, layer, h, cos, sin, idx, Ki, Vi, keys, pre, att: int):
        """One layer for one new token per row: writes its K/V into the row caches Ki/Vi at the
        row's slot (`idx`: the slots expanded to [B, kv, 1, d]), attends to their first `att` slots
        (`keys`: prefix_keys of their mask) and, when given, to the shared prompt cache
        `pre` = (Kp, Vp, its prefix_keys, reps, pslot[, held_layout]), and returns the layer's output hidden
        states. Grouped-query heads are folded into the query axis ([B, kv, G, d] queries), so no K/V is
        repeated."""
        b = h.shape[0]
        G = self.nh // self.kv
        with self.mark("norm, q/k/v, rotary"):
            q, k, v = self.qkv(layer, h, cos, sin, b, 1)
        with self.mark("cache write"):
            Ki.scatter_(2, idx, k.to(Ki.dtype))
            Vi.scatter_(2, idx, v.to(Vi.dtype))
        with self.mark("attention"):
            q = q.reshape(b, self.kv, G, self.hd)
            o, lse = own_attend(q, Ki[:, :, :att], Vi[:, :, :att], keys, self.scaling, self.attention)
            if pre is not None:
                o = self.merge(*self._prompt_attention(q, *pre), o, lse)
        with self.mark("o_proj, MLP"):
            return self.finish_layer(layer, h, o.reshape(b, 1, self.nh * self.hd))

    def _prompt_attention(self, q, Kp, Vp, pkeys, reps: int, pslot=None, layout=None):
        """Attention of q [B, kv, G, d] over the prompt caches Kp/Vp [B / reps * c, kv, P, d]: c per group
        of `reps` consecutive rows (group u's are u * c .. u * c + c - 1), each read once for all the
        group's rows (their queries stacked on the query axis); row b takes its group's cache pslot[b]
        (c > 1: a group decodes the last samples of one prompt while its freed rows start the next's;
        through the kernel with `layout` = held_layout of the rows' holders).
        (o [B, kv, G, d], lse [B, kv, G]), merged with the row's own attention by `merge_attention`."""
        B, kv, G, d = q.shape
        U = B // reps
        c = Kp.shape[0] // U
        qf = q.view(U, reps, kv, G, d).transpose(1, 2).reshape(U, kv, reps * G, d)
        path = prompt_path(self.attention)
        if c > 1 and uses_kernel(q, path):  # each cache with the queries of the rows that read it
            if layout is None:
                layout = held_layout(torch.arange(B, device=q.device) // reps * c + pslot, Kp.shape[0], G)
            return attend_held(q, Kp, Vp, pkeys, self.scaling, layout, reps)
        if c > 1:  # (math) every cache of a group with all its rows' queries; each row keeps its own cache's
            qf = qf.repeat_interleave(c, 0)
        o, lse = attend(qf, Kp, Vp, pkeys, self.scaling, path)
        o = o.view(U, c, kv, reps, G, d).permute(0, 3, 1, 2, 4, 5).reshape(B, c, kv, G, d)
        lse = lse.view(U, c, kv, reps, G).permute(0, 3, 1, 2, 4).reshape(B, c, kv, G)
        if c == 1:
            return o[:, 0], lse[:, 0]
        i = pslot.view(B, 1, 1, 1)
        return (o.gather(1, i[..., None].expand(B, 1, kv, G, d))[:, 0],
                lse.gather(1, i.expand(B, 1, kv, G))[:, 0])
