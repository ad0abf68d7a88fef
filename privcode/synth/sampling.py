"""Token choice for sampled decoding: top-p (nucleus) sampling with and without a sort.

    nxt = top_p_sample(logits, temperature=0.8, top_p=0.95)      # [rows, vocab] -> [rows]

Both draw with the exponential race (argmax of p / E, E ~ Exp(1)), so for the same random stream
they pick the same tokens; `top_p_sample` never sorts the vocabulary (tests/test_fast_sampling.py).
"""
from __future__ import annotations

import math

import torch

TOP_P_MISS = 1e-12      # top-p sampling may fall back to the most probable token with at most this probability


def sort_top_p_sample(logits, temperature: float, top_p: float):
    """The reference sampler: sort the vocabulary, mask everything after the smallest prefix whose
    mass reaches top_p, draw from the rest (argmax of p / E, E ~ Exp(1): the exponential race)."""
    z = logits.float() / temperature
    if top_p < 1.0:
        zs, idx = z.sort(dim=-1, descending=True)
        ps = zs.softmax(-1)
        drop = (ps.cumsum(-1) - ps) >= top_p  # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        z = z.scatter(-1, idx, zs.masked_fill(drop, float("-inf")))
    probs = z.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


def top_p_candidates(top_p: float, miss: float = TOP_P_MISS) -> int:
    """How many earliest arrivals `top_p_sample` tests so that all miss the nucleus w.p. <= miss."""
    return 1 if top_p >= 1.0 else max(1, math.ceil(math.log(miss) / math.log1p(-top_p)))


def top_p_sample(logits, temperature: float, top_p: float, candidates: int | None = None):
    """A draw from softmax(logits / temperature) restricted to its top-p nucleus, without a sort.

    Token k "arrives" at E_k / p_k (E_k ~ Exp(1), the same stream as `sort_top_p_sample`); the first
    arrival within any set is distributed as p restricted to that set, so the draw is the earliest
    arrival inside the nucleus. A token is in the nucleus iff the mass of strictly more probable
    tokens is < top_p. Only the `candidates` earliest arrivals are tested (a binary search over them,
    one masked sum over the vocabulary per step); given that the earlier ones missed, each misses with
    probability <= 1 - top_p, so the draw is exact but for an event of probability
    <= (1 - top_p)^candidates (default: enough candidates for TOP_P_MISS), where the most probable
    token (always in the nucleus) is taken.
    Same tokens as the reference for the same random stream, except at exact probability ties or
    a boundary mass within float rounding of top_p."""
    p = (logits.float() / temperature).softmax(-1)
    key = p / torch.empty_like(p).exponential_()
    if top_p >= 1.0:
        return key.argmax(-1)
    m = min(candidates or top_p_candidates(top_p), p.shape[-1])
    cand = key.topk(m, dim=-1).indices                      # [B, m], earliest arrival first
    pc = p.gather(-1, cand)
    v = pc.sort(-1).values                                  # candidate probabilities, ascending
    # inside(v_i) = (mass of tokens with p > v_i) < top_p is monotone in i: binary-search the first
    # inside candidate, one masked sum over the vocabulary per step (no sort, no atomics)
    lo = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
    hi = torch.full_like(lo, m)                             # m: no candidate inside
    for _ in range(math.ceil(math.log2(m + 1))):
        mid = (lo + hi) // 2
        t = v.gather(-1, mid.clamp(max=m - 1)[:, None])
        ok = torch.where(p > t, p, 0.0).sum(-1) < top_p
        act = lo < hi
        hi = torch.where(act & ok, mid, hi)
        lo = torch.where(act & ~ok, mid + 1, lo)
    inside = (pc >= v.gather(-1, lo.clamp(max=m - 1)[:, None])) & (lo < m)[:, None]
    first = inside.to(torch.int32).argmax(-1, keepdim=True)  # the earliest candidate inside
    pick = cand.gather(-1, first)[:, 0]
    return torch.where(inside.any(-1), pick, p.argmax(-1))
