"""Secret randomness of DP-SGD: seeds from OS entropy, Gaussian noise hardened against
floating-point attacks.

    from privcode.dp.noise import Streams, gaussian
    s = Streams.create(reproducible_seed=None, rank=0, world=1, device="cpu")   # a DP run
    z = gaussian(1000, std=2.0, generator=s.noise, device="cpu")

What is safe (docs/privacy.md, "Randomness"):
- `Streams.create(None, ...)` draws every seed from the OS (`secrets`, i.e. getrandom/urandom),
  fresh for every run: the noise stream (rank 0 only — no other rank can add noise), the Poisson
  sampling stream (rank 0 draws it and broadcasts it: every rank must draw the same global
  sample) and the LoRA initialisation. No seed is returned to the caller as a number, logged or
  written; the generators' states live only in checkpoints, which are private-zone files.
- `Streams.create(<int>, ...)` is the opt-in reproducible mode for tests and research: the same
  int replays a run bit for bit, so whatever it trains is NOT a DP release (the ledger marks it).
- `gaussian` draws N(0, std²) per coordinate as (z1 + z2 + z3 + z4) / 2 of four standard draws,
  after one discarded draw — Opacus's `secure_mode` construction (Holohan & Braghin 2021,
  arXiv 2107.10138 §5.1), which defeats the Mironov (2012) / Jin et al. (2022) attacks that read
  the low bits of one floating-point Gaussian sample.
Residual assumption: the generators are PyTorch's Mersenne Twister (CPU) and Philox (CUDA),
seeded with 63 bits of OS entropy. They are not cryptographic generators: the guarantee assumes
the adversary cannot recover their state from the released noisy model.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

SEED_BITS = 63  # torch generators take a 64-bit seed; 63 keeps it a positive int64 for broadcast


def secret_seed() -> int:
    """A fresh seed from the operating system's entropy source."""
    return secrets.randbits(SEED_BITS)


def _shared(value: int, rank: int, world: int, device) -> int:
    """Rank 0's `value` on every rank (a broadcast; the identity in one process)."""
    if world == 1:
        return value
    t = torch.tensor([value if rank == 0 else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t.item())


@dataclass
class Streams:
    """The three random streams of one DP run (see the module docstring)."""

    noise: torch.Generator | None   # rank 0 only
    sampling: torch.Generator       # identical on every rank
    init_seed: int                  # LoRA initialisation of this process (rank 0's is broadcast)
    reproducible: bool

    @classmethod
    def create(cls, reproducible_seed: int | None, rank: int, world: int, device) -> "Streams":
        gen_dev = device if str(device).startswith("cuda") else "cpu"
        if reproducible_seed is None:
            noise_seed, init_seed = secret_seed(), secret_seed()
            sample_seed = _shared(secret_seed(), rank, world, gen_dev)
        else:
            s = int(reproducible_seed)
            init_seed, noise_seed, sample_seed = s, s + 1, s + 2
        noise = torch.Generator(device=gen_dev).manual_seed(noise_seed) if rank == 0 else None
        sampling = torch.Generator().manual_seed(sample_seed)
        return cls(noise=noise, sampling=sampling, init_seed=init_seed, reproducible=reproducible_seed is not None)


def gaussian(n: int, std: float, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """`n` coordinates of N(0, std²): four Gaussian draws summed and halved, after one discarded
    draw (Opacus `secure_mode`). The same function serves the reference and the fast path, so
    both add the same noise for the same stream."""
    if generator is None:
        raise ValueError("noise needs the noise stream, which only rank 0 holds")
    torch.normal(0.0, 1.0, size=(1,), generator=generator, device=device)  # discarded
    acc = torch.zeros(n, device=device, dtype=torch.float32)
    for _ in range(4):
        acc.add_(torch.normal(0.0, 1.0, size=(n,), generator=generator, device=device))
    return acc.mul_(std / 2.0).to(dtype)
