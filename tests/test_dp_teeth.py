"""DP mechanism tests with teeth (#15): bind what the accountant assumes to what the engine does,
on the reference, the fast and the DeepSpeed ZeRO-3 path (privcode.dp.zero), in one and in two
processes — and prove that they bite.

Each *probe* runs the real engine (privcode.dp.engine.DPSGD around a LoRA model, Opacus's
optimizer, privcode's noise; train_dp end to end for the last one) and measures what happened
from the outside: parameter updates of a plain SGD step (lr = 1, no weight decay, so the update

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it
*is* −(clipped sum + noise) / E[B]), the indices the engine sampled, the noise draws and the
optimizer steps it took. Each *check* is a function that raises AssertionError when the
measurement contradicts the claim:

- noise (zero gradients, so an update is the noise alone) — noise_std, noise_independent,
  noise_gaussian: N(0, (σC/E[B])²) per coordinate, independent across coordinates, steps and runs,
  added once per step, also for batches of E[B]/2 and 2E[B] rows, 3 micro-batches, an empty sample;
- sensitivity (same noise stream, with and without one extra record whose loss is ×10⁴) —
  sensitivity: the pre-noise clipped sum moves by at most C when one record is added or removed;
- sampling (the engine's next 200 samples; with two processes, each rank's shares) — sampling_*:
  every rank draws the same global sample, each record in it independently with probability q;
- train (train_dp, DDP path and ZeRO-3, 80 steps, killed after its first checkpoint and resumed) — train_steps,
  train_wiring, sampling_*: privacy.json's T = the noisy updates applied (resume included); its
  σ, C, q, E[B] = what the engine was given; the realized samples are Binomial(N, q) with its q.
(docs/privacy-testing.md has the same as a table, and which mutation each check catches.)

Statistics. Every statistical check is a two-sided test at level ALPHA = 1e-7 (chi-square for
variances and dispersions, exact binomial for the sampling rate, √n·r ~ N(0, 1) for
correlations, Kolmogorov–Smirnov for normality). The whole suite (honest runs, one and two
processes) makes about 310 such tests, so an honest mechanism fails it with probability
< 3.1·10⁻⁵ whatever its random seeds; noise and sampling use secret (OS-entropy) streams, as a DP
run does, and the sensitivity probe a fixed `seed` so that both of its runs draw the same noise.

Mutations (`MUTATIONS`): each breaks the mechanism in one way, by monkeypatching (never by
editing a source), inside this process or — by name — inside the two-process workers
(tests/dist_worker.py "teeth"). test_mutation_is_caught runs the probes under each and requires
at least one check to fail; test_mutation_is_caught_on_the_zero3_path requires it of the ZeRO-3
path's own probes for every mutation of code that path runs (ZERO_MUTATIONS); PRIVCODE_TEETH_FULL=1
runs every probe under every mutation and prints which checks fail (the table in
docs/privacy-testing.md).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, mark_private, write_records

ALPHA = 1e-7                  # level of every statistical check (two-sided)
SIGMA, C, E = 2.0, 0.5, 10.0  # noise multiplier, clip bound, expected batch size given to the engine
N_REC = 40                    # records of the noise/sensitivity/sampling probes
ADV = N_REC - 1               # the adversarial record (its loss ×1e4) of the sensitivity probe
LORA = dict(lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"], lora_r=16, max_length=48)  # 7168 coords
NOISE_STEPS = [(5, 1), (20, 3), (0, 1), (10, 2)]  # (global batch size, micro-batches) of the noise probe
SAMPLING_DRAWS, SAMPLING_Q = 200, 0.25
TRAIN = dict(steps=80, batch_size=5, checkpoint_every=30, n=20)
PATHS = ("ref", "fast", "zero")  # engines: Opacus hooks, hook-free + flat clipping, DeepSpeed ZeRO-3 (privcode.dp.zero)
FULL = os.environ.get("PRIVCODE_TEETH_FULL") == "1"


# ============================================================================================
# statistics


def _z() -> float:
    from scipy import stats

    return float(stats.norm.isf(ALPHA / 2))


def _chi2(stat: float, df: int, what: str) -> None:
    from scipy import stats

    lo, hi = stats.chi2.ppf(ALPHA / 2, df), stats.chi2.isf(ALPHA / 2, df)
    assert lo <= stat <= hi, f"{what}: chi-square {stat:.1f} outside [{lo:.1f}, {hi:.1f}] (df {df}, α {ALPHA:g})"


def _uncorrelated(x, y, what: str) -> None:
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    r = float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else 1.0
    z = abs(r) * math.sqrt(len(x))
    assert z <= _z(), f"{what}: correlation {r:.4f} (√n·|r| = {z:.1f} > {_z():.1f})"


# ============================================================================================
# mutations: each breaks the mechanism in one way (applied by monkeypatching)


@contextlib.contextmanager
def _patched(*triples):
    """Set obj.name = value for each (obj, name, value); restore on exit (a class attribute that
    was inherited is deleted again, not copied into the class)."""
    missing = object()
    old = [(o, n, vars(o).get(n, missing)) for o, n, _ in triples]
    try:
        for o, n, v in triples:
            setattr(o, n, v)
        yield
    finally:
        for o, n, v in reversed(old):
            if v is missing:
                delattr(o, n)
            else:
                setattr(o, n, v)


def _m_clip_x10():
    from privcode.audit import run as audit

    return audit.broken_mechanism("clip_x10")       # clip 10C, σ/10: same noise std, 10× sensitivity


def _m_noise_off():
    from privcode.audit import run as audit

    return audit.broken_mechanism("noise_off")


def _m_noise_x2():
    from privcode.dp import noise

    orig = noise.gaussian

    def gaussian(n, std, generator, device, dtype=torch.float32):
        return 2 * orig(n, std, generator, device, dtype)

    return _patched((noise, "gaussian", gaussian))


def _m_realized_divisor():
    """Divide the noisy sum by the realized (global) batch size instead of the expected one."""
    from privcode.dp import engine

    init0, step0 = engine.DPSGD.__init__, engine.DPSGD.step

    def init(self, *a, **kw):
        init0(self, *a, **kw)
        self.opt.attach_step_hook(lambda o: torch._foreach_div_([p.grad for p in o.params],
                                                                float(max(self._realized, 1))))

    def step(self, batches, loss_fn):
        batches = list(batches)
        n = sum(int(b["input_ids"].shape[0]) for b in batches if b is not None)
        if self.world > 1:
            t = torch.tensor([n], dtype=torch.int64)
            torch.distributed.all_reduce(t)
            n = int(t)
        self._realized = n
        return step0(self, batches, loss_fn)

    return _patched((engine.DPSGD, "__init__", init), (engine.DPSGD, "step", step))


def _no_clip(cls):
    orig = cls.__dict__["clip_and_accumulate"]

    def clip_and_accumulate(self):
        c = self.max_grad_norm
        self.max_grad_norm = float("inf")  # factor min(1, ∞/norm) = 1: no clipping (noise keeps C)
        try:
            orig(self)
        finally:
            self.max_grad_norm = c

    return _patched((cls, "clip_and_accumulate", clip_and_accumulate))


def _m_no_clip_fast():
    from privcode.dp import flatclip

    return _no_clip(flatclip._FlatClipMixin)


def _m_no_clip_reference():
    from opacus.optimizers.optimizer import DPOptimizer

    return _no_clip(DPOptimizer)


def _m_noise_every_rank():
    """Every rank adds its own N(0, σ²C²) before the all-reduce (√world times the noise)."""
    from privcode.dp import engine, flatclip, noise

    def every(orig):
        def add_noise(self):
            orig(self)
            if getattr(self, "rank", 0) != 0:
                std = self.noise_multiplier * self.max_grad_norm
                g = torch.Generator().manual_seed(noise.secret_seed())
                for p in self.params:
                    p.grad.add_(noise.gaussian(p.numel(), std, g, p.device, p.dtype).view_as(p))
        return add_noise

    return _patched((engine._NoiseOnce, "add_noise", every(engine._NoiseOnce.__dict__["add_noise"])),
                    (flatclip._FlatClipMixin, "add_noise", every(flatclip._FlatClipMixin.__dict__["add_noise"])))


def _sampler_mutation(make):
    from privcode.dp import sampling

    base = sampling.SharedPoissonSampler

    class Mutated(base):
        def __init__(self, **kw):
            super().__init__(**kw)
            make(self, kw)

    return _patched((sampling, "SharedPoissonSampler", Mutated))


def _m_sampler_rate_2q():
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    def make(self, kw):
        self.sampler = UniformWithReplacementSampler(num_samples=kw["n_records"], generator=kw["generator"],
                                                     sample_rate=min(1.0, 2 * kw["sample_rate"]), steps=kw["steps"])
    return _sampler_mutation(make)


class _Shuffled:
    """Fixed-size batches of round(qN) records cut from shuffled passes over the data."""

    def __init__(self, n, q, steps, generator):
        self.n, self.b, self.steps, self.gen = n, max(1, round(q * n)), steps, generator

    def __len__(self):
        return self.steps

    def __iter__(self):
        perm: list[int] = []
        for _ in range(self.steps):
            if len(perm) < self.b:
                perm += torch.randperm(self.n, generator=self.gen).tolist()
            batch, perm = perm[:self.b], perm[self.b:]
            yield batch


def _m_shuffled_sampler():
    def make(self, kw):
        self.sampler = _Shuffled(kw["n_records"], kw["sample_rate"], kw["steps"], kw["generator"])
    return _sampler_mutation(make)


def _m_noise_per_microbatch():
    """Ignore the engine's skip signals: every micro-batch becomes a full noisy update."""
    from opacus.optimizers.optimizer import DPOptimizer

    orig = DPOptimizer._check_skip_next_step

    def check(self, pop_next=True):
        orig(self, pop_next)
        return False

    return _patched((DPOptimizer, "_check_skip_next_step", check))


def _m_fixed_secret_seed():
    from privcode.dp import noise

    return _patched((noise, "secret_seed", lambda: 12345))


def _m_unshared_sampling_seed():
    """Ranks keep their own sampling seed instead of rank 0's: different global samples."""
    from privcode.dp import noise

    return _patched((noise, "_shared", lambda value, rank, world, device: value))


def _m_resume_drops_history():
    """A resumed run forgets the accountant history of the steps before its checkpoint."""
    from privcode.dp import engine

    orig = engine.load_ckpt

    def load(priv, rank):
        st = orig(priv, rank)
        return None if st is None else {**st, "history": []}

    return _patched((engine, "load_ckpt", load))


# name -> (context-manager factory, what it breaks). The first seven are #15's list.
MUTATIONS = {
    "clip_x10_sigma_div10": (_m_clip_x10, "clip bound ×10 and σ ÷10 (noise std unchanged, sensitivity 10×)"),
    "sampler_rate_2q": (_m_sampler_rate_2q, "the sampler draws at rate 2q while the accountant uses q"),
    "noise_x2": (_m_noise_x2, "noise ×2"),
    "realized_divisor": (_m_realized_divisor, "divide by the realized batch size instead of the expected one"),
    "no_clip_fast": (_m_no_clip_fast, "no clipping on the fast path"),
    "noise_every_rank": (_m_noise_every_rank, "noise added on every rank"),
    "shuffled_sampler": (_m_shuffled_sampler, "a non-Poisson sampler: fixed-size batches of shuffled passes"),
    "no_clip_reference": (_m_no_clip_reference, "no clipping on the reference path"),
    "noise_off": (_m_noise_off, "no noise"),
    "noise_per_microbatch": (_m_noise_per_microbatch, "noise added per micro-batch (skip signals ignored)"),
    "fixed_secret_seed": (_m_fixed_secret_seed, "the 'secret' seed is a constant: runs replay each other's noise"),
    "unshared_sampling_seed": (_m_unshared_sampling_seed, "ranks draw their own Poisson samples"),
    "resume_drops_history": (_m_resume_drops_history, "a resumed run's privacy.json forgets the steps before it"),
}


@contextlib.contextmanager
def mutated(name: str | None):
    if name is None:
        yield
        return
    with MUTATIONS[name][0]():
        yield


# ============================================================================================
# the engine under test, driven from outside


class Bench:
    """The tiny model's LoRA engine on N_REC tokenized records, in this process's rank."""

    def __init__(self, model_dir, data, device="cpu", rank=0, world=1):
        from privcode.models import load_tokenizer
        from privcode.train import TrainConfig, load_rows

        self.model_dir, self.device, self.rank, self.world = str(model_dir), device, rank, world
        self.tok = load_tokenizer(self.model_dir)
        self.rows, _ = load_rows(data, self.tok, TrainConfig(**LORA))
        self.lengths = [len(r["input_ids"]) for r in self.rows]

    def engine(self, path: str, seed, q: float = 0.25, steps: int = 8):
        """The engine of `path`: "ref" (Opacus hooks), "fast" (hook-free, flat clipping) or "zero"
        (DeepSpeed ZeRO-3 over the frozen base, privcode.dp.zero)."""
        from privcode.dp import engine, flatclip, zero
        from privcode.train import TrainConfig, build_lora_model

        cfg = TrainConfig(**LORA, fast=path != "ref")
        torch.manual_seed(0)  # the same starting weights for every run (the sensitivity probe compares two)
        if path == "zero":
            model = zero.build_lora_model(self.model_dir, cfg, self.device)
            Engine = functools.partial(zero.ZeroDPSGD, pad_token=self.tok.pad_token_id)
        else:
            model, Engine = build_lora_model(self.model_dir, cfg, self.device), engine.DPSGD
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:  # every LoRA factor gets a gradient (B = 0 would zero A's)
                p.data.normal_(0, 0.2)
        dp = Engine(model, n_records=len(self.rows), sample_rate=q, noise_multiplier=SIGMA, max_grad_norm=C,
                    expected_batch_size=E, lr=1.0, weight_decay=0.0, steps=steps, seed=seed,
                    device=self.device, rank=self.rank, world=self.world, optimizer="sgd", lengths=self.lengths)
        if path != "ref":
            flatclip.accelerate_dpsgd(dp)
        return dp, model

    def update(self, dp, model, path: str, global_idx, weights=None, n_micro: int = 1, scale: float = 1.0):
        """One DP-SGD step on this rank's share of `global_idx` (loss_i × weights[i] × scale), cut into
        n_micro micro-batches; returns the update of all LoRA parameters as one flat vector."""
        from privcode.dp import engine, fastloss
        from privcode.dp.sampling import balanced_split
        from privcode.train import collate

        share = balanced_split(list(global_idx), self.lengths, self.world)[self.rank]
        batches = []
        for chunk in np.array_split(np.array(share, dtype=int), n_micro):
            if len(chunk):
                b = collate([self.rows[int(i)] for i in chunk], self.tok.pad_token_id, self.device)
                b["w"] = torch.tensor([(weights or {}).get(int(i), 1.0) * scale for i in chunk], device=self.device)
                batches.append(b)
        loss = {"ref": engine.per_record_loss, "fast": fastloss.per_record_loss,
                "zero": functools.partial(fastloss.per_record_loss, lockstep=True)}[path]
        before = _flat(dp)
        dp.step(batches, lambda m, b: loss(m, b, peft_model=model) * b.get("w", 1.0))  # no "w": ZeRO-3 padding
        return _flat(dp) - before


def _flat(dp):
    return torch.cat([p.detach().reshape(-1).double() for p in dp.params]).clone()


# ============================================================================================
# probes (measure) — usable in this process and in the two-process workers


def probe_noise(bench: Bench, path: str) -> dict:
    """Zero gradients (loss × 0): each update is −noise/E[B]. Two runs with secret streams, each
    over NOISE_STEPS: batches of E/2 and 2E rows (3 micro-batches), an empty sample, E rows."""
    runs = []
    for _ in range(2):
        dp, model = bench.engine(path, seed=None)
        runs.append([(-bench.update(dp, model, path, range(b), None, nm, scale=0.0) * E).numpy()
                     for b, nm in NOISE_STEPS])
    return {"kind": "noise", "z": np.array(runs), "std": SIGMA * C}


def probe_sensitivity(bench: Bench, path: str) -> dict:
    """Two runs with the same noise stream: batch D (10 records) and D + the adversarial record
    (loss ×1e4). The difference of the updates × E[B] is the change of the pre-noise clipped sum."""
    base = list(range(10))
    out = {}
    for n_micro in (1, 3):
        ups = []
        for batch in (base, base + [ADV]):
            dp, model = bench.engine(path, seed=1234)
            ups.append(bench.update(dp, model, path, batch, {ADV: 1e4}, n_micro))
        out[n_micro] = float(torch.linalg.vector_norm((ups[1] - ups[0]) * E))
    return {"kind": "sensitivity", "delta_norm": out, "C": C}


def probe_sampling(bench: Bench) -> dict:
    """This rank's shares of SAMPLING_DRAWS consecutive samples of one engine (secret streams)."""
    dp, _ = bench.engine("ref", seed=None, q=SAMPLING_Q, steps=SAMPLING_DRAWS)
    shares = [dp.next_indices() for _ in range(SAMPLING_DRAWS)]
    return {"kind": "sampling", "shares": shares, "samples": shares, "rank_shares": [shares],
            "n": len(bench.rows), "q": SAMPLING_Q}


class _Crash(Exception):
    pass


def probe_train(model_dir, root: Path, fast: bool = True, engine_name: str = "ddp") -> dict:
    """train_dp end to end (secret streams): 80 steps, killed right after its first checkpoint
    (step 30) and resumed. Records what the engine was given, every index it sampled, every noise
    draw and every optimizer update, and reads privacy.json."""
    from privcode import ledger, zone
    from privcode.dp import engine, noise
    from privcode.train import TrainConfig, train_dp

    d = zone.mkdir(zone.root() / root.name / "data")
    mark_private(write_records(d / "records.jsonl", TRAIN["n"]).parent)
    cfg = TrainConfig(epsilon=100.0, delta=1e-3, noise_multiplier=1.0, max_grad_norm=C, dataset_size="public",
                      steps=TRAIN["steps"], batch_size=TRAIN["batch_size"], checkpoint_every=TRAIN["checkpoint_every"],
                      lr=1e-2, max_length=32, lora_targets=["q_proj"], lora_r=4, prompt_format="qa", fast=fast,
                      engine=engine_name)
    rec = {"init": [], "samples": [], "noise_std": [], "updates": 0}
    init0, gaussian0, save0 = engine.DPSGD.__init__, noise.gaussian, engine.save_ckpt

    def init(self, *a, **kw):
        rec["init"].append({k: kw[k] for k in ("noise_multiplier", "max_grad_norm", "sample_rate",
                                                 "expected_batch_size", "n_records")})
        init0(self, *a, **kw)
        step0, next0 = self.base_opt.step, self.next_indices

        def step(*a, **k):
            rec["updates"] += 1
            return step0(*a, **k)

        def next_indices():
            idx = next0()
            rec["samples"].append(list(idx))
            return idx

        self.base_opt.step, self.next_indices = step, next_indices

    def gaussian(n, std, *a, **k):
        rec["noise_std"].append(float(std))
        return gaussian0(n, std, *a, **k)

    def crash(priv, rank, state):
        save0(priv, rank, state)
        raise _Crash

    out = root / "adapter"
    with _patched((engine.DPSGD, "__init__", init), (noise, "gaussian", gaussian)):
        with _patched((engine, "save_ckpt", crash)):
            with pytest.raises(_Crash):
                train_dp(str(model_dir), str(d / "records.jsonl"), out, cfg)
        resumed = train_dp(str(model_dir), str(d / "records.jsonl"), out, cfg)
    return {"kind": "train", "release": ledger.read(out)["releases"][0], "rec": rec, "steps": cfg.steps,
            "resumed_at": resumed["resumed_at"], "n": TRAIN["n"]}


# ============================================================================================
# checks (raise AssertionError when a measurement contradicts the claim)


def noise_std(res) -> None:
    """Every step's noise has std σC/E[B] per coordinate (after dividing by E[B]): chi-square of
    Σ(z/σC)² against χ²(P). Noise added twice, on two ranks, per micro-batch, ×2, off, or divided
    by the realized batch size moves it by ≥ 41 %; the test's band is ±6 % (P = 7168)."""
    z, s = res["z"], res["std"]
    for r in range(z.shape[0]):
        for t, (b, nm) in enumerate(NOISE_STEPS):
            x = z[r, t] / s
            ratio = float(np.sqrt(np.mean(x ** 2)))
            _chi2(float(np.sum(x ** 2)), x.size,
                  f"noise variance (run {r}, batch {b} in {nm} micro-batch(es); std ratio {ratio:.3f})")
            m = abs(float(np.mean(x))) * math.sqrt(x.size)
            assert m <= _z(), f"noise mean (run {r}, step {t}): √n·|mean| = {m:.1f}"


def noise_independent(res) -> None:
    """Independent across coordinates (neighbours, and coordinates a quarter of the vector apart:
    different tensors), across steps, and across runs (fresh secret streams)."""
    z = res["z"]
    R, T, P = z.shape
    for r in range(R):
        for t in range(T):
            _uncorrelated(z[r, t][1:], z[r, t][:-1], f"noise of neighbouring coordinates (run {r}, step {t})")
            _uncorrelated(z[r, t][P // 4:], z[r, t][:-(P // 4)],
                          f"noise {P // 4} coordinates apart (run {r}, step {t})")
        for t in range(T):
            for u in range(t + 1, T):
                _uncorrelated(z[r, t], z[r, u], f"noise of steps {t} and {u} (run {r})")
    for t in range(T):
        _uncorrelated(z[0, t], z[1, t], f"noise of two runs at step {t}")


def noise_gaussian(res) -> None:
    """Gaussian: Kolmogorov–Smirnov of all normalized draws against N(0, 1)."""
    from scipy import stats

    x = (res["z"] / res["std"]).ravel()
    p = float(stats.kstest(x, "norm").pvalue)
    assert p >= ALPHA, f"noise is not N(0, (σC)²): KS p = {p:.2g}"


def sensitivity(res) -> None:
    """Adding one record (whatever its gradient) moves the clipped sum by at most C."""
    for n_micro, d in res["delta_norm"].items():
        assert d <= res["C"] * (1 + 1e-3), \
            f"adding one record changed the clipped sum by {d:.4g} > C = {res['C']} ({n_micro} micro-batch(es))"


def sensitivity_has_power(res) -> None:
    """Not a privacy check: the adversarial record does reach the bound (so the test can see C)."""
    for n_micro, d in res["delta_norm"].items():
        assert d >= res["C"] * (1 - 1e-3), f"the adversarial record moved the sum by only {d:.4g} < C"


def _samples(res) -> list[list[int]]:
    if res["kind"] == "train":
        return res["rec"]["samples"]
    return res["samples"]


def _q(res) -> float:
    return res["release"]["sample_rate"] if res["kind"] == "train" else res["q"]


def _indicator(res) -> np.ndarray:
    s = _samples(res)
    m = np.zeros((len(s), res["n"]), dtype=float)
    for t, idx in enumerate(s):
        assert len(set(idx)) == len(idx), f"step {t}: a record sampled twice"
        m[t, idx] = 1.0
    return m


def sampling_rate(res) -> None:
    """The number of inclusions over all steps and records is Binomial(T·N, q) (exact test)."""
    from scipy import stats

    m, q = _indicator(res), _q(res)
    k, n = int(m.sum()), m.size
    lo, hi = stats.binom.ppf(ALPHA / 2, n, q), stats.binom.isf(ALPHA / 2, n, q)
    assert lo <= k <= hi, f"{k} inclusions in {m.shape[0]} steps × {m.shape[1]} records: rate {k / n:.4f}, q = {q:.4f}"


def sampling_per_record(res) -> None:
    """Each record's inclusion count is Binomial(T, q): chi-square over the records."""
    m, q = _indicator(res), _q(res)
    T = m.shape[0]
    c = m.sum(0)
    _chi2(float(np.sum((c - T * q) ** 2) / (T * q * (1 - q))), m.shape[1], "per-record inclusion counts")


def sampling_batch_size(res) -> None:
    """Batch sizes are Binomial(N, q): their dispersion Σ(B − Nq)²/(Nq(1−q)) against χ²(T)
    (a fixed-size sampler has none)."""
    m, q = _indicator(res), _q(res)
    T, N = m.shape
    b = m.sum(1)
    _chi2(float(np.sum((b - N * q) ** 2) / (N * q * (1 - q))), T,
          f"batch-size dispersion (sizes {int(b.min())}..{int(b.max())}, mean {b.mean():.2f}, Nq = {N * q:.2f})")


def sampling_across_steps(res) -> None:
    """A record's inclusion at step t says nothing about step t+1 (a shuffled pass does)."""
    m = _indicator(res)
    _uncorrelated(m[1:], m[:-1], "inclusion of a record at consecutive steps")


def sampling_shared(res) -> None:
    """Several processes: their shares of each step are disjoint (every rank drew the same
    global sample and computed only its band)."""
    for t, shares in enumerate(zip(*res["rank_shares"])):
        flat = [i for s in shares for i in s]
        assert len(flat) == len(set(flat)), f"step {t}: ranks computed overlapping shares {shares}"


def train_steps(res) -> None:
    """T in privacy.json = steps run = noise draws = optimizer updates = samples drawn, across the
    kill and the resume."""
    rel, rec = res["release"], res["rec"]
    counts = {"privacy.json steps": rel["steps"], "history": sum(int(h[2]) for h in rel["history"]),
              "noise draws": len(rec["noise_std"]), "optimizer updates": rec["updates"],
              "samples": len(rec["samples"]), "configured": res["steps"]}
    assert len(set(counts.values())) == 1, f"T disagrees: {counts} (resumed at {res['resumed_at']})"


def train_wiring(res) -> None:
    """privacy.json's σ, C, q and E[B] are what the engine was given, and every noise draw has
    std σ·C."""
    rel, rec = res["release"], res["rec"]
    for kw in rec["init"]:
        for k in ("noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size"):
            assert kw[k] == rel[k], f"the engine got {k}={kw[k]}, privacy.json says {rel[k]}"
    want = rel["noise_multiplier"] * rel["max_grad_norm"]
    assert all(abs(s - want) <= 1e-12 * want for s in rec["noise_std"]), (set(rec["noise_std"]), want)


SAMPLING_CHECKS = [sampling_rate, sampling_per_record, sampling_batch_size, sampling_across_steps]
CHECKS = {"noise": [noise_std, noise_independent, noise_gaussian], "sensitivity": [sensitivity],
          "sampling": [sampling_shared] + SAMPLING_CHECKS, "train": [train_steps, train_wiring] + SAMPLING_CHECKS}


def failures(res) -> list[str]:
    """Names and messages of the checks that a probe result fails."""
    out = []
    for check in CHECKS[res["kind"]]:
        try:
            check(res)
        except AssertionError as e:
            out.append(f"{check.__name__}: {str(e).splitlines()[0][:160]}")
    return out


# ============================================================================================
# the two-process worker (tests/dist_worker.py "teeth" calls this in every rank)


def worker(model_dir, out_dir, data, names: list[str]) -> None:
    """Each name is a mutation ("" = honest), optionally followed by "@" and the probes to run
    ("noise", "sensitivity", "sampling", joined by "+"; default all)."""
    import time

    from privcode.dp import engine
    from privcode.models import default_device

    rank, world = engine.init_distributed()
    bench = Bench(model_dir, data, default_device(), rank, world)
    out_dir = Path(out_dir)
    t0 = time.time()
    for spec in names:
        name, _, kinds = spec.partition("@")
        kinds = kinds.split("+") if kinds else ["noise", "sensitivity", "sampling"]
        key = name or "honest"
        if rank == 0:
            print(f"teeth worker: {key} {kinds} at {time.time() - t0:.1f}s", file=sys.stderr, flush=True)
        res = {}
        with mutated(name or None):
            for path in PATHS:
                if "noise" in kinds:
                    res[f"noise_{path}"] = probe_noise(bench, path)
                if "sensitivity" in kinds:
                    res[f"sensitivity_{path}"] = probe_sensitivity(bench, path)
            shares = probe_sampling(bench)["shares"] if "sampling" in kinds else None
        if rank == 0:
            torch.save(res, out_dir / f"{key}.pt")
        if shares is not None:
            torch.save(shares, out_dir / f"{key}.shares{rank}.pt")
        torch.distributed.barrier()


def _env():
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def run_two_processes(model_dir, tmp: Path, names: list[str]) -> dict:
    """One torchrun of 2 processes (gloo on CPU) runs the probes under each name ("" = honest)."""
    data = write_records(tmp / "records.jsonl", N_REC)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_worker.py"), str(model_dir), str(tmp), str(data), "teeth", ",".join(names)]
    env = {**_env(), "PRIVCODE_ZONE": str(tmp / "zone"), "PRIVCODE_BUDGET_DIR": str(tmp / "budget")}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    out = {}
    for spec in names:
        key = spec.partition("@")[0] or "honest"
        res = torch.load(tmp / f"{key}.pt", weights_only=False)
        if (tmp / f"{key}.shares0.pt").exists():
            shares = [torch.load(tmp / f"{key}.shares{r}.pt") for r in range(2)]
            union = [sorted(a + b) for a, b in zip(*shares)]
            res["sampling"] = {"kind": "sampling", "samples": union, "rank_shares": shares, "n": N_REC,
                               "q": SAMPLING_Q}
        out[key] = res
    return out


# the mutations that only a run of several processes can show (the others are caught in-process,
# and PRIVCODE_TEETH_FULL=1 runs them all in the two-process worker as well)
TWO_PROCESS_MUTATIONS = ["noise_every_rank@noise", "unshared_sampling_seed@sampling"]
TWO_PROCESS_ONLY = {m.partition("@")[0] for m in TWO_PROCESS_MUTATIONS}


# ============================================================================================
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tensors are tiny, and two threads on a busy 2-core CI machine spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bench(tiny_model, tmp_path_factory):
    return Bench(tiny_model, write_records(tmp_path_factory.mktemp("teeth") / "records.jsonl", N_REC))


@pytest.fixture(scope="module")
def two_processes(tiny_model, tmp_path_factory):
    names = list(MUTATIONS) if FULL else TWO_PROCESS_MUTATIONS
    return run_two_processes(tiny_model, tmp_path_factory.mktemp("teeth2"), [""] + names)


# ============================================================================================
# the mechanism tests (honest mechanism: every check passes)


@pytest.mark.parametrize("path", PATHS)
def test_noise_std_independent_gaussian_added_once(bench, path):
    res = probe_noise(bench, path)
    noise_std(res)
    noise_independent(res)
    noise_gaussian(res)


@pytest.mark.parametrize("path", PATHS)
def test_one_record_moves_the_clipped_sum_by_at_most_C(bench, path):
    res = probe_sensitivity(bench, path)
    sensitivity(res)
    sensitivity_has_power(res)


def test_sampling_is_poisson_at_rate_q(bench):
    assert failures(probe_sampling(bench)) == []


@pytest.mark.parametrize("engine_name", ["ddp", "deepspeed"])
def test_train_run_matches_its_privacy_json(tiny_model, tmp_path, engine_name):
    """T, σ, C, q, E[B] in privacy.json against what the run did, over a kill and a resume, and
    the realized Poisson sampling against privacy.json's q — on the DDP path and under ZeRO-3."""
    res = probe_train(tiny_model, tmp_path, engine_name=engine_name)
    assert 0 < res["resumed_at"] < res["steps"]
    assert failures(res) == []


def test_two_processes(two_processes):
    """The same checks with two processes (gloo): noise once, sensitivity C, one shared global
    Poisson sample split into disjoint shares."""
    honest = two_processes["honest"]
    assert set(honest) == {f"{k}_{p}" for k in ("noise", "sensitivity") for p in PATHS} | {"sampling"}
    for key, res in honest.items():
        assert failures(res) == [], key
    for key in (f"sensitivity_{p}" for p in PATHS):
        sensitivity_has_power(honest[key])


# ============================================================================================
# the mutation check: every mutation fails at least one check


def _in_process_failures(name, bench, model_dir, tmp: Path) -> dict:
    """Probe results' failures under a mutation, cheapest probes first; stop at the first probe that
    fails unless PRIVCODE_TEETH_FULL=1."""
    found = {}
    plan = [("noise_ref", lambda: probe_noise(bench, "ref")), ("noise_fast", lambda: probe_noise(bench, "fast")),
            ("sensitivity_ref", lambda: probe_sensitivity(bench, "ref")),
            ("sensitivity_fast", lambda: probe_sensitivity(bench, "fast")),
            ("sampling", lambda: probe_sampling(bench)),
            ("train", lambda: probe_train(model_dir, tmp))]
    for key, probe in plan:
        with mutated(name):
            try:
                res = probe()
            except Exception as e:  # noqa: BLE001 - a mutation that crashes a probe is caught too
                found[key] = [f"probe raised {type(e).__name__}: {str(e)[:120]}"]
                res = None
        if res is not None:
            f = failures(res)
            if f:
                found[key] = f
        if found and not FULL:
            break
    return found


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(name, bench, two_processes, tiny_model, tmp_path):
    found = {f"2proc/{k}": failures(v) for k, v in two_processes.get(name, {}).items()}
    found = {k: v for k, v in found.items() if v}
    if not found or FULL:
        found.update(_in_process_failures(name, bench, tiny_model, tmp_path))
    if FULL:
        print(f"\nMUTATION {name}: " + json.dumps({k: [x.split(':')[0] for x in v] for k, v in found.items()}))
    assert found, f"mutation '{name}' ({MUTATIONS[name][1]}) passed every mechanism test"


# the mutations of what the ZeRO-3 engine runs itself (its clipping and noise are the fast path's
# code, its sampler engine.DPSGD's): each must fail a check of the ZeRO-3 path's own probes
ZERO_MUTATIONS = ["clip_x10_sigma_div10", "noise_x2", "realized_divisor", "no_clip_fast", "noise_off",
                  "noise_per_microbatch", "fixed_secret_seed", "noise_every_rank"]


@pytest.mark.parametrize("name", ZERO_MUTATIONS)
def test_mutation_is_caught_on_the_zero3_path(name, bench, two_processes):
    found = {f"2proc/{k}": failures(v) for k, v in two_processes.get(name, {}).items() if k.endswith("_zero")}
    for key, probe in (("noise", probe_noise), ("sensitivity", probe_sensitivity)):
        if any(found.values()) or name in TWO_PROCESS_ONLY:
            break
        with mutated(name):
            found[key] = failures(probe(bench, "zero"))
    assert any(found.values()), f"mutation '{name}' ({MUTATIONS[name][1]}) passed every ZeRO-3 check: {found}"
