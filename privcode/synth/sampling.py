"""Token choice for sampled decoding: top-p (nucleus) sampling with and without a sort, and the
per-row random streams the fast backend draws them from.

    nxt = top_p_sample(logits, temperature=0.8, top_p=0.95)      # [rows, vocab] -> [rows]
    base = row_keys(torch.tensor([0, 1]), max_new=200)   # two rows: identities (prompt * n + sample) 0, 1
    nxt = top_p_sample(logits, 0.8, 0.95, noise=row_exponential(base + t, seed_key(0), logits.shape[-1]))

Both samplers draw with the exponential race (argmax of p / E, E ~ Exp(1)), so for the same random
stream they pick the same tokens; `top_p_sample` never sorts the vocabulary (tests/test_fast_sampling.py).
The stream is torch's global one, or `noise`: `row_exponential` gives each (row identity, token index)
its own Exp(1) vector from a counter-based hash, so a row's tokens do not depend on which batch row,
batch or decode step computes them (what continuous batching needs).
"""
from __future__ import annotations

import math

import torch

TOP_P_MISS = 1e-12      # top-p sampling may fall back to the most probable token with at most this probability
M32 = 0xFFFFFFFF
MIX = 0x45D9F3B         # the multiplier of the 32-bit mixer (< 2**31: every product fits in int64)


def mix32(x):
    """A bijective 32-bit integer mixer on int64 tensors (or ints) holding values in [0, 2**32):
    two rounds of xor-shift and multiply, a final xor-shift; no product leaves int64."""
    x = ((x >> 16) ^ x) * MIX & M32
    x = ((x >> 16) ^ x) * MIX & M32
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """The 32-bit key of a generation seed: every 32-bit word of it (mod 2**128) mixed in, so seeds
    that differ only above bit 32 (the round trip's rounds) get different streams."""
    s, k = int(seed) % (1 << 128), 0x9E3779B9
    for _ in range(4):
        k = mix32(k ^ (s & M32))
        s >>= 32
    return k


def row_keys(ids, max_new: int):
    """The counter base of each row: its identity `ids` (prompt index * n + sample index) times
    `max_new` (mod 2**32; token t of the row uses base + t, so (identity, t) pairs get distinct
    counters as long as identities * max_new < 2**32). The seed enters through `seed_key`."""
    return (ids.long() * int(max_new)) & M32


def row_exponential(counters, key: int, vocab: int):
    """Exp(1) noise [rows, vocab] for the exponential race, a pure function of (counter, key, token):
    counter [rows] int64 (row_keys + token index), key = seed_key(seed). Uniforms of 23 bits at
    bin centres (exact in float32), so E is in [6e-8, 16.6]: never 0 or inf."""
    dev = counters.device
    rk = mix32(mix32(counters & M32) ^ key)                                # [rows]
    vk = mix32((torch.arange(vocab, device=dev, dtype=torch.long) * 0x2545F49 + 0x7F4A7C15) & M32)
    x = mix32(rk[:, None] ^ vk[None, :])
    u = ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(u)


def _noise(p, noise):
    return torch.empty_like(p).exponential_() if noise is None else noise


def sort_top_p_sample(logits, temperature: float, top_p: float, noise=None):
    """The reference sampler: sort the vocabulary, mask everything after the smallest prefix whose
    mass reaches top_p, draw from the rest (argmax of p / E, E ~ Exp(1): the exponential race;
    E = `noise` when given, else torch's global stream)."""
    z = logits.float() / temperature
    if top_p < 1.0:
        zs, idx = z.sort(dim=-1, descending=True)
        ps = zs.softmax(-1)
        drop = (ps.cumsum(-1) - ps) >= top_p  # keep the smallest prefix reaching top_p
        drop[:, 0] = False
        z = z.scatter(-1, idx, zs.masked_fill(drop, float("-inf")))
    probs = z.softmax(-1)
    return (probs / _noise(probs, noise)).argmax(-1)


def top_p_candidates(top_p: float, miss: float = TOP_P_MISS) -> int:
    """How many earliest arrivals `top_p_sample` tests so that all miss the nucleus w.p. <= miss."""
    return 1 if top_p >= 1.0 else max(1, math.ceil(math.log(miss) / math.log1p(-top_p)))


def top_p_sample(logits, temperature: float, top_p: float, candidates: int | None = None, noise=None):
    """A draw from softmax(logits / temperature) restricted to its top-p nucleus, without a sort.

    Token k "arrives" at E_k / p_k (E_k ~ Exp(1), the same stream as `sort_top_p_sample`); the first
    arrival within any set is distributed as p restricted to that set, so the draw is the earliest
    arrival inside the nucleus. A token is in the nucleus iff the mass of strictly more probable
    tokens is < top_p. Only the `candidates` earliest arrivals are tested (a binary search over them,
    one masked sum over the vocabulary per step); given that the earlier ones missed, each misses with
    probability <= 1 - top_p, so the draw is exact but for an event of probability
    <= (1 - top_p)^candidates (default: enough candidates for TOP_P_MISS), where the most probable
    token (always in the nucleus) is taken. `noise`: the E_k (default: torch's global stream).
    Same tokens as the reference for the same random stream, except at exact probability ties or
    a boundary mass within float rounding of top_p."""
    p = (logits.float() / temperature).softmax(-1)
    key = p / _noise(p, noise)
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
