"""Poisson sampling for DP-SGD, shared by all processes, split across them by tokens.

Guarantee: every step's batch is a Poisson sample of the whole private data set — each record
is in it independently with probability q — drawn by Opacus's `UniformWithReplacementSampler`
from a generator seeded identically on every process, so all processes draw the *same* global
sample. `balanced_split` then only decides which process computes which sampled record's
clipped gradient; the sum of clipped gradients over all processes (the quantity that gets the
noise, once, on rank 0) is the same for every split. The accountant's assumptions (Poisson
sampling with rate q, one record = one unit) hold for any number of processes.

Why not Opacus's `DistributedUniformWithReplacementSampler`: it Poisson-samples each process's
own shard, so process batch sizes vary by ±√(qN/world) records and every step waits for the
largest one (±12 % at 64 records per GPU). Sharing the global sample and cutting it into
length bands of equal padded tokens evens out the processes' work.

    from privcode.dp.sampling import balanced_split
    balanced_split([0, 1, 2, 3], lengths=[5, 9, 2, 7], world=2)   # -> [[1, 3], [0, 2]]: 2x9, 2x5 padded
"""
from __future__ import annotations

from collections.abc import Sequence


def balanced_split(indices: Sequence[int], lengths: Sequence[int] | None, world: int,
                   max_rows: int | None = None) -> list[list[int]]:
    """Cut `indices`, sorted by decreasing length, into `world` contiguous bands of about equal
    padded work, each of at most `max_rows` rows when given (DeepSpeed's non-DP fine-tune runs a
    fixed number of micro-batches per rank and step).

    A band's work is its padded tokens, rows × its longest row (what its micro-batches cost the
    GPU). The cut minimizes the largest band's work exactly (binary search over the bound, greedy
    fill: the band of long rows gets fewer rows). Contiguous bands hold rows of similar length,
    so they pad about as little as one process would over the whole sample; dealing rows out
    round-robin instead gives every process the full spread of lengths, and 4 processes then pad
    ~25 % more (docs/scaling.md). Each share comes out longest first; ties break on the index, so
    every process computes the same split. Without lengths every row counts 1 (equal counts)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    cap = len(indices) if max_rows is None else max_rows
    if cap * world < len(indices):
        raise ValueError(f"{len(indices)} rows do not fit {world} bands of at most {max_rows} rows")
    if lengths is None:
        ordered, size = sorted(indices), [1] * len(indices)
    else:
        ordered = sorted(indices, key=lambda i: (-int(lengths[i]), i))
        size = [int(lengths[i]) for i in ordered]
    if not ordered:
        return [[] for _ in range(world)]

    def cut(bound: int) -> list[int] | None:
        """Band starts of the greedy fill under `bound` padded tokens, or None if > world bands."""
        starts, first = [0], 0
        for k in range(1, len(ordered)):
            if (k - first + 1) * size[first] > bound or k - first >= cap:  # sorted: the first row is the longest
                starts.append(k)
                first = k
                if len(starts) > world:
                    return None
        return starts

    lo, hi = max(size), len(size) * size[0]  # hi: one band holds everything
    while lo < hi:
        mid = (lo + hi) // 2
        if cut(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    starts = cut(lo) + [len(ordered)]
    shares = [ordered[a:b] for a, b in zip(starts, starts[1:])]
    return shares + [[] for _ in range(world - len(shares))]


def micro_batches(indices: Sequence[int], lengths: Sequence[int], max_rows: int,
                  max_tokens: int = 0) -> list[list[int]]:
    """Cut a share (longest rows first, as `balanced_split` returns it) into consecutive
    micro-batches of at most `max_rows` rows and — when max_tokens > 0 — at most `max_tokens`
    padded tokens (rows × the longest row), never fewer than one row. Which rows share a
    micro-batch changes only memory and speed: each record's clipped gradient is its own."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in indices:
        n = int(lengths[i])
        wider = max(longest, n)
        if cur and (len(cur) >= max_rows or (max_tokens > 0 and wider * (len(cur) + 1) > max_tokens)):
            out.append(cur)
            cur, wider = [], n
        cur.append(i)
        longest = wider
    if cur:
        out.append(cur)
    return out


class SharedPoissonSampler:
    """This process's share of a global Poisson sample per step (see the module docstring).

    `generator` must be seeded identically on every process: the global sample is the same
    everywhere, and only `balanced_split` makes the shares differ."""

    def __init__(self, *, n_records: int, sample_rate: float, steps: int, generator, rank: int = 0,
                 world: int = 1, lengths: Sequence[int] | None = None):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if lengths is not None and len(lengths) != n_records:
            raise ValueError(f"{len(lengths)} lengths for {n_records} records")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        self.rank, self.world, self.lengths = rank, world, lengths
        self.sampler = UniformWithReplacementSampler(num_samples=n_records, sample_rate=sample_rate,
                                                     generator=generator, steps=steps)
        self.last_global_size = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for idx in self.sampler:
            idx = [int(i) for i in idx]
            self.last_global_size = len(idx)
            yield balanced_split(idx, self.lengths, self.world)[self.rank]
