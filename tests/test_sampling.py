"""privcode.dp.sampling: one global Poisson sample per step, dealt to processes by tokens."""
import random

import pytest
import torch

from privcode.dp.sampling import SharedPoissonSampler, balanced_split, micro_batches


def _padded(band, lengths):
    return len(band) * max((lengths[i] for i in band), default=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_split_is_a_partition_into_contiguous_length_bands(world):
    rng = random.Random(world)
    lengths = [rng.randint(20, 1024) for _ in range(500)]
    idx = rng.sample(range(500), 130)
    shares = balanced_split(idx, lengths, world)
    assert len(shares) == world
    assert sorted(i for s in shares for i in s) == sorted(idx)
    bands = [s for s in shares if s]
    for a, b in zip(bands, bands[1:]):  # contiguous bands: every row of a band >= every row of the next
        assert min(lengths[i] for i in a) >= max(lengths[i] for i in b)
    for s in shares:  # longest first, so micro-batches group similar lengths
        assert [lengths[i] for i in s] == sorted((lengths[i] for i in s), reverse=True)
    assert balanced_split(list(reversed(idx)), lengths, world) == shares  # same on every process
    counts = [len(s) for s in balanced_split(idx, None, world)]  # no lengths: equal counts
    assert sum(counts) == len(idx) and max(counts) == -(-len(idx) // world)


@pytest.mark.parametrize("seed", range(12))
def test_split_minimizes_the_largest_padded_band(seed):
    """Against brute force over every contiguous cut of a small sample."""
    import itertools

    rng = random.Random(seed)
    n, world = rng.randint(1, 11), rng.randint(1, 4)
    lengths = [rng.choice([50, 120, 121, 300, 800]) for _ in range(n)]
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    best = min(max(_padded(order[a:b], lengths) for a, b in zip((0, *cuts), (*cuts, n)))
               for k in range(world) for cuts in itertools.combinations(range(1, n), k))
    got = max(_padded(s, lengths) for s in balanced_split(list(range(n)), lengths, world))
    assert got == best


def test_bands_pad_no_more_than_one_process_and_beat_striding():
    lengths = [1000, 10, 10, 10] * 4  # striding gives rank 0 every long row
    idx = list(range(16))
    strided = [len(idx[r::4]) * 1000 for r in range(4)]
    banded = [_padded(s, lengths) for s in balanced_split(idx, lengths, 4)]
    assert max(strided) == 4000 and max(banded) == 2000
    assert balanced_split([0, 1, 2, 3], [5, 9, 2, 7], 2) == [[1, 3], [0, 2]]  # the docstring example
    rng = random.Random(0)  # taskgen-like lengths: per-process padded work ~ 1/world of one process's
    lengths = [int(rng.gauss(207, 45)) + 60 for _ in range(1024)]
    idx = [i for i in range(1024) if rng.random() < 0.25]

    def padded(share):
        return sum(_padded(m, lengths) for m in micro_batches(share, lengths, 256, 16384))
    one = padded(balanced_split(idx, lengths, 1)[0])
    shares = balanced_split(idx, lengths, 4)
    assert max(padded(s) for s in shares) <= 1.10 * one / 4  # round-robin dealing: ~1.27 (docs/scaling.md)
    # the same number of micro-batches everywhere: no straggler paying one more micro-batch's overhead
    assert len({len(micro_batches(s, lengths, 256, 16384)) for s in shares}) == 1


def _samples(world, rank, steps=30, n=300, q=0.1, seed=5):
    s = SharedPoissonSampler(n_records=n, sample_rate=q, steps=steps, rank=rank, world=world,
                             generator=torch.Generator().manual_seed(seed), lengths=[(7 * i) % 97 + 1 for i in range(n)])
    return list(s)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_processes_together_draw_the_single_process_sample(world):
    single = _samples(1, 0)
    per_rank = [_samples(world, r) for r in range(world)]
    for t, step in enumerate(single):
        union = [i for r in range(world) for i in per_rank[r][t]]
        assert sorted(union) == sorted(step)
        assert len(union) == len(set(union))


def test_inclusion_is_poisson_with_rate_q():
    n, q, steps = 400, 0.05, 400
    draws = _samples(1, 0, steps=steps, n=n, q=q, seed=11)
    sizes = torch.tensor([len(d) for d in draws], dtype=torch.float64)
    # |batch| ~ Binomial(n, q): mean nq = 20, variance nq(1-q) = 19; 400 steps -> se of mean 0.22
    assert abs(float(sizes.mean()) - n * q) < 5 * (n * q * (1 - q) / steps) ** 0.5
    assert float(sizes.var()) == pytest.approx(n * q * (1 - q), rel=0.25)
    hits = torch.zeros(n)
    for d in draws:
        hits[d] += 1
    assert float(hits.min()) > 0 and float(hits.max()) < 60  # every record has its chance, none is favoured


@pytest.mark.parametrize("seed", range(6))
def test_split_with_a_row_cap_keeps_every_band_within_it(seed):
    """DeepSpeed's non-DP fine-tune runs n_micro micro-batches on every rank: a token-balanced band
    of short rows must not get more rows than that (it hung the other ranks' reduction)."""
    rng = random.Random(seed)
    lengths = [rng.choice([40, 60, 400, 1000]) for _ in range(64)]
    idx = rng.sample(range(64), 16)
    free = balanced_split(idx, lengths, 2)
    capped = balanced_split(idx, lengths, 2, max_rows=8)
    assert sorted(i for s in capped for i in s) == sorted(idx) and max(map(len, capped)) <= 8
    assert max(map(len, free)) > 8  # token balance alone gives the short rows' band more
    with pytest.raises(ValueError):
        balanced_split(idx, lengths, 2, max_rows=7)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        SharedPoissonSampler(n_records=3, sample_rate=0.5, steps=1, generator=torch.Generator(), lengths=[1, 2])
    with pytest.raises(ValueError):
        SharedPoissonSampler(n_records=3, sample_rate=0.5, steps=1, generator=torch.Generator(), rank=2, world=2)
    with pytest.raises(ValueError):
        balanced_split([1], None, 0)


def test_micro_batches_cap_rows_and_padded_tokens():
    lengths = [1000, 900, 500, 450, 440, 100, 90, 80, 70, 60]
    share = list(range(10))  # longest first, as balanced_split returns it
    mbs = micro_batches(share, lengths, max_rows=4, max_tokens=2000)
    assert [i for mb in mbs for i in mb] == share
    for mb in mbs:
        assert len(mb) <= 4
        assert len(mb) == 1 or max(lengths[i] for i in mb) * len(mb) <= 2000
    assert mbs[0] == [0, 1]  # 2 x 1000 = 2000 fits, a third row would not
    assert micro_batches(share, lengths, max_rows=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert micro_batches([0], [5000], max_rows=8, max_tokens=100) == [[0]]  # a long row still gets a batch
    assert micro_batches([], lengths, max_rows=2) == []
    with pytest.raises(ValueError):
        micro_batches(share, lengths, max_rows=0)
