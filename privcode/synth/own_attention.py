"""Own-cache decode attention as one Triton kernel (the decoder's "auto" on CUDA in fp16/bf16, and
`attention="triton"`): one query per row, each program one (row, KV head) reading only that row's first keys,
with the KV head's G query heads as the rows of one tile (padded to 16 for the tensor cores) -- what the
decoder's own caches need and no library kernel gave at the memory bound (docs/performance.md, #17:
memory-efficient, flex and FlashAttention-2 measured).

    TRITON_INTERPRET=1 pytest tests/test_attention.py -k triton   # on CPU, through Triton's interpreter

Safe to call only where Triton runs (CUDA; or the interpreter on CPU tensors); `decoder.own_path_runs` probes it
against the math path at start-up and the decoder falls back to the memory-efficient kernel where it does not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (keys per loop step, warps, pipeline stages): 64 x head-dim tiles of K and V (16 KB each at d 128, bf16),
# two loads in flight; 32 to 128 keys with 2-4 warps measured level, 8 warps slower (`privcode bench attention
# --triton-configs`, docs/performance.md)
CONFIG = (64, 4, 2)


@triton.jit
def _own_attention(Q, K, V, O, L, C, sqb, sqh, sqg, skb, skh, skn, svb, svh, svn, sob, soh, sog, scale, KV,
                   G: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // KV).to(tl.int64)
    h = (pid % KV).to(tl.int64)
    n = tl.load(C + b)                                   # this row's keys: slots 0 .. n - 1
    g, d = tl.arange(0, GP), tl.arange(0, DP)
    gm, dm = g < G, d < D
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)          # running max, sum and output (online softmax)
    s = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    kb, vb = K + b * skb + h * skh, V + b * svb + h * svh
    for start in range(0, n, BN):
        j = start + tl.arange(0, BN)
        jm = j < n
        k = tl.load(kb + j[:, None] * skn + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        x = tl.where(jm[None, :], x, float("-inf"))
        mn = tl.maximum(m, tl.max(x, 1))                  # finite: key `start` < n is in every block
        p = tl.exp(x - mn[:, None])
        a = tl.exp(m - mn)
        s = s * a + tl.sum(p, 1)
        v = tl.load(vb + j[:, None] * svn + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
        acc = acc * a[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = mn
    out = acc / s[:, None]
    tl.store(O + b * sob + h * soh + g[:, None] * sog + d[None, :], out.to(O.dtype.element_ty),
             mask=gm[:, None] & dm[None, :])
    tl.store(L + (b * KV + h) * G + g, m + tl.log(s), mask=gm)


def own_attend(q, K, V, counts, scale: float, config: tuple = CONFIG):
    """softmax(q K^T * scale) V over each row's first counts[b] keys, and its log-sum-exp: q [B, kv, G, d],
    K/V [B, kv, n, d] (any strides with the last one 1: the decoder's cache slices, no copy), counts int32 [B]
    (each >= 1); config = (keys per loop step, warps, stages). Returns (o [B, kv, G, d] in q's dtype, lse
    [B, kv, G] fp32). One kernel launch, no host sync (runs inside a graph capture once compiled by a first
    call)."""
    block, warps, stages = config
    B, kv, G, d = q.shape
    if q.stride(-1) != 1 or K.stride(-1) != 1 or V.stride(-1) != 1:
        raise ValueError("own_attend needs the head dim contiguous in q, K and V")
    o = torch.empty((B, kv, G, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, kv, G), dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32  # fp32 (tests): exact products, not TF32
    _own_attention[(B * kv,)](
        q, K, V, o, lse, counts, *q.stride()[:3], *K.stride()[:3], *V.stride()[:3], *o.stride()[:3], scale, kv,
        G=G, D=d, GP=max(16, triton.next_power_of_2(G)), DP=max(16, triton.next_power_of_2(d)), BN=block,
        PREC="ieee" if fp32 else None, num_warps=warps, num_stages=stages)
    return o, lse
