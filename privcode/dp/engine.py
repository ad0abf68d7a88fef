"""DP-SGD engine: Poisson sampling, per-record clipping, Gaussian noise added once per step.

    privcode dp-finetune --model M --data private/records.jsonl --out DIR --params '{"epsilon": 4, ...}'
    torchrun --standalone --nproc_per_node 2 -m privcode.cli dp-finetune ...   # one process per GPU

Guarantee: (ε, δ)-DP with one record of the private JSONL as the unit, for the sequence of
noisy LoRA updates (and so for anything computed from them). Mechanism per step:
- Poisson sampling: every record is in the step's batch independently with probability q
  (Opacus's sampler; with several processes every rank draws the same global sample from one
  shared secret stream and computes the clipped gradients of its share: privcode.dp.sampling);
- the per-record loss (CE + λ(t)·KL on syntax positions — PrivSA) is differentiated per record
  (Opacus hooks) and each record's gradient is clipped to norm C;
- N(0, σ²C²) noise is added once to the sum over all records (on rank 0 only, which alone holds
  the noise stream; the ranks' sums are then all-reduced), and the result is divided by the
  *expected* batch size (public);
- all randomness (noise, sampling, LoRA init) is secret: fresh OS entropy per run
  (privcode.dp.noise); a `seed` makes the run reproducible and therefore not a DP release;
- ε is computed by the accountant from the history (σ, q, steps) actually run.
The KL teacher is the same network with its LoRA adapters disabled: public weights, so the KL
term is a function of the record and public data only, and is clipped with the rest.
Engines: `ddp` (default; the base replicated on every process) and `deepspeed` (privcode.dp.zero:
ZeRO-3 shards the frozen base, optionally in CPU memory; the LoRA factors, their per-record
gradients, clipping, noise and all-reduce are this mechanism's, unchanged — DeepSpeed never sees
them; ranks run in lock step, padding micro-batches contribute no gradient).
"""
from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import shutil
from pathlib import Path

import torch

from privcode.errors import PrivcodeError

log = logging.getLogger(__name__)

IGNORE = -100


def privsa_lambda(step: int, lam_max: float, lam_min: float, alpha: float, interval: int = 1) -> float:
    """λ(t) = λmin + (λmax − λmin)·exp(−α·t), held constant over blocks of `interval` steps."""
    t = (step // max(1, interval)) * max(1, interval)
    return lam_min + (lam_max - lam_min) * math.exp(-alpha * t)


def per_record_loss(model, batch, lam: float = 0.0, ce_weight: float = 1.0, peft_model=None) -> torch.Tensor:
    """Loss of each record, shape [B]: ce_weight·CE_i + lam·KL_i.

    CE_i is the mean token cross-entropy over record i's answer tokens. KL_i is
    KL(p_base ‖ p_dp) averaged over record i's syntax-token positions (batch["syntax"]), where
    p_base comes from `peft_model` with its adapters disabled (no second model copy). Records
    are independent: nothing is reduced across rows, which per-record clipping relies on."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           ignore_index=IGNORE, reduction="none").view(labels.shape)
    n = (labels != IGNORE).sum(1).clamp(min=1)
    loss = ce_weight * (ce.sum(1) / n)
    if lam and "syntax" in batch:
        m = batch["syntax"][:, 1:].float()
        if peft_model is None:
            raise ValueError("PrivSA needs the PEFT model (its adapters are disabled for the teacher)")
        with torch.no_grad(), peft_model.disable_adapter():
            base = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).logits[:, :-1].float()
        logp_base = torch.log_softmax(base, -1)
        logp_dp = torch.log_softmax(logits, -1)
        kl_tok = (logp_base.exp() * (logp_base - logp_dp)).sum(-1)  # KL(p_base || p_dp) per position
        kl = (kl_tok * m).sum(1) / m.sum(1).clamp(min=1)
        loss = loss + lam * kl
    return loss


def fused_kwargs(params, optimizer: str = "adamw") -> dict:
    """{"fused": True} for AdamW when every parameter is a CUDA float tensor: one kernel for the
    whole update instead of per-tensor launches and a host read of each tensor's step count
    (hundreds of LoRA tensors: milliseconds of CPU per step, which a 4-GPU DP step waits for).
    Same update rule as the default implementation."""
    ok = optimizer == "adamw" and params and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def init_distributed() -> tuple[int, int]:
    """(rank, world) — initializes the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=backend)
        atexit.register(_destroy_group)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _destroy_group() -> None:
    """At exit, while the interpreter is still whole: tear the process group down. Without it gloo's worker
    threads can outlive it and abort the process during finalization (SIGABRT, "terminate called without an
    active exception": pytorch/pytorch#190489; seen once in CI on a 2-process test), and torchrun then reports
    a run that finished as failed."""
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting: nothing is left to report to
            pass


class _NoiseOnce:
    """add_noise for Opacus's DP optimizers: N(0, σ²C²) per coordinate of the summed clipped
    gradient, drawn by privcode.dp.noise.gaussian over all parameters at once (hardened against
    floating-point attacks), on rank 0 only. Clipping and accumulation stay Opacus's own."""

    def add_noise(self):
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        from privcode.dp.noise import gaussian

        ps = self.params
        for p in ps:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        flat = torch.cat([p.summed_grad.reshape(-1) for p in ps])
        if std > 0 and getattr(self, "rank", 0) == 0:
            flat = flat + gaussian(flat.numel(), std, self.generator, flat.device, flat.dtype)
        for p, v in zip(ps, torch.split(flat, [p.numel() for p in ps])):
            p.grad = v.view_as(p).clone()
            _mark_as_processed(p.summed_grad)


@functools.lru_cache(maxsize=None)
def dp_optimizer_class(world: int):
    """Opacus's DPOptimizer (one process) or DistributedDPOptimizer with privcode's noise."""
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    base = DistributedDPOptimizer if world > 1 else DPOptimizer
    return type(f"Secure{base.__name__}", (_NoiseOnce, base), {})


class DPSGD:
    """Opacus GradSampleModule + (Distributed)DPOptimizer + Poisson sampler around a PEFT model.

    Several processes: every rank draws the same global Poisson sample and computes the clipped
    gradients of its token-balanced share (privcode.dp.sampling); rank 0 alone adds the noise
    and the clipped sums are all-reduced once per step.

    `streams` (privcode.dp.noise.Streams) holds the noise and sampling generators; without it,
    fresh secret ones are drawn (`seed` instead: reproducible, not a DP release)."""

    def __init__(self, peft_model, *, n_records: int, sample_rate: float, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: float, lr: float, weight_decay: float,
                 steps: int, device, seed: int | None = None, streams=None, rank: int = 0, world: int = 1,
                 optimizer: str = "adamw", lengths=None):
        from opacus import GradSampleModule

        from privcode.dp.noise import Streams
        from privcode.dp.sampling import SharedPoissonSampler

        self.peft_model, self.rank, self.world, self.device = peft_model, rank, world, device
        self.sample_rate, self.noise_multiplier, self.max_grad_norm = sample_rate, noise_multiplier, max_grad_norm
        self.gsm = GradSampleModule(peft_model, batch_first=True, loss_reduction="sum")
        self.params = [p for p in self.gsm.parameters() if p.requires_grad]
        if world > 1:  # identical starting point on every rank (LoRA init is random)
            for p in self.params:
                torch.distributed.broadcast(p.data, src=0)
        if optimizer not in ("adamw", "sgd"):
            raise PrivcodeError(f"unknown optimizer '{optimizer}' (adamw, sgd)")
        Base = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
        self.base_opt = Base(self.params, lr=lr, weight_decay=weight_decay, **fused_kwargs(self.params, optimizer))
        self.streams = streams or Streams.create(seed, rank, world, device)
        self.reproducible = self.streams.reproducible
        self.noise_gen = self.streams.noise      # None on ranks other than 0
        self.sample_gen = self.streams.sampling  # the same stream on every rank (sampling.py)
        self.opt = dp_optimizer_class(world)(
            self.base_opt, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=int(round(expected_batch_size)), loss_reduction="sum", generator=self.noise_gen)
        # Opacus adds N(0, σ²C²) to the *sum* of clipped gradients; dividing by the expected batch
        # size (a public constant) keeps the sensitivity analysis intact — the realized size is not.
        self.opt.attach_step_hook(lambda o: torch._foreach_div_([p.grad for p in o.params], float(expected_batch_size)))
        self.sampler = SharedPoissonSampler(n_records=n_records, sample_rate=sample_rate, steps=steps,
                                            generator=self.sample_gen, rank=rank, world=world, lengths=lengths)
        self._it = None

    def next_indices(self) -> list[int]:
        """This rank's share of the next global Poisson sample, longest rows first."""
        if self._it is None:
            self._it = iter(self.sampler)
        return list(next(self._it))

    def step(self, batches, loss_fn) -> tuple[float, int]:
        """One DP-SGD step over this rank's Poisson sample, given as a list of micro-batches
        (each a collated batch, or None for an empty sample). Returns (sum of losses, records)."""
        total, count = None, 0
        batches = list(batches) or [None]
        for j, batch in enumerate(batches):
            if batch is not None:
                loss = loss_fn(self.gsm, batch)
                loss.sum().backward()
            if batch is not None and not batch.get("pad"):
                s = loss.detach().sum()  # summed on the device: no host sync per micro-batch
                total = s if total is None else total + s
                count += int(loss.shape[0])
            else:  # an empty Poisson sample still takes a (pure-noise) step; a lock-step padding
                # micro-batch (privcode.dp.zero) is computed, and its gradients dropped before clipping
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            self.opt.signal_skip_step(do_skip=j < len(batches) - 1)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return (0.0 if total is None else float(total)), count

    # --- checkpoints: LoRA weights, optimizer, RNG streams, accountant history ---
    def state(self, history, losses, step) -> dict:
        """Everything a resume needs, RNG states included: a private-zone file (0600), never released."""
        return {"lora": {n: p.detach().cpu() for n, p in self.gsm.named_parameters() if p.requires_grad},
                "opt": self.base_opt.state_dict(), "sample_rng": self.sample_gen.get_state(),
                "noise_rng": None if self.noise_gen is None else self.noise_gen.get_state(),
                "reproducible": self.reproducible, "history": history, "losses": losses, "step": step}

    def load(self, st: dict) -> None:
        for n, p in self.gsm.named_parameters():
            if p.requires_grad:
                p.data.copy_(st["lora"][n].to(p.device))
        self.base_opt.load_state_dict(st["opt"])
        if bool(st.get("reproducible")) != self.reproducible:
            raise PrivcodeError("checkpoint and run disagree on privacy.reproducible_seed; delete the checkpoint")
        self.sample_gen.set_state(st["sample_rng"])
        if self.noise_gen is not None:
            self.noise_gen.set_state(st["noise_rng"])
        self._it = None


# --- the private zone of a run: checkpoints and the re-train guard --------------------------
# `priv` is the run's private-zone directory (privcode.zone): files 0600, directories 0700.
ALLOW_RETRAIN = "PRIVCODE_ALLOW_RETRAIN"
TRAINED = "trained.json"


def ckpt_path(priv: Path, rank: int) -> Path:
    return Path(priv) / "ckpt" / f"rank{rank}.pt"


def save_ckpt(priv: Path, rank: int, state: dict) -> None:
    """Atomically write a resumable checkpoint (holds RNG state: secret)."""
    from privcode import zone

    p = ckpt_path(priv, rank)
    zone.mkdir(p.parent)
    tmp = p.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, zone.FILE_MODE), "wb") as fh:
        torch.save(state, fh)
    os.replace(tmp, p)


def load_ckpt(priv: Path, rank: int) -> dict | None:
    p = ckpt_path(priv, rank)
    return torch.load(p, weights_only=False) if p.exists() else None


def clear_ckpt(priv: Path) -> None:
    """Checkpoints hold intermediate weights and RNG state: deleted as soon as the run succeeds."""
    shutil.rmtree(ckpt_path(priv, 0).parent, ignore_errors=True)


def check_not_trained(priv: Path, out: Path) -> None:
    """Refuse to train a DP model into a run that already produced one: re-training (after a
    config change, a --forcerun, or Snakemake deleting the old output) spends privacy budget
    again on the same data. Set PRIVCODE_ALLOW_RETRAIN=1 to do it deliberately."""
    import json

    g = Path(priv) / TRAINED
    if os.environ.get(ALLOW_RETRAIN) == "1" or not g.exists():
        return
    rec = json.loads(g.read_text())
    raise PrivcodeError(
        f"a DP model was already trained here on {rec['created']} (ε={rec['epsilon']}); training again spends "
        f"privacy budget again on the same records. Set {ALLOW_RETRAIN}=1 to re-train deliberately (the "
        "budget registry counts both runs: `privcode budget`)", path=out)


def mark_trained(priv: Path, out: Path, rec: dict) -> None:
    from privcode import zone
    from privcode.io import write_json

    write_json(zone.mkdir(priv) / TRAINED, {"output": str(out), "epsilon": rec["epsilon"], "created": rec["created"]},
               private=True)
