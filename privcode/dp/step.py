"""What one step of a DP fine-tune does, for privcode.train's loop (`privcode dp-finetune`).

    run = DPStep(cfg, out, priv)      # refusals first: engine settings, a spent output (engine.check_not_trained)
    run.begin(device, data); steps = run.plan(rows); model = run.build(model_ref, device)
    start, losses = run.attach(model, rows, tok, device)     # resume, the whole run's ε checked, budget entry
    work, tokens = run.batch(step); loss = run.step(step, work); run.checkpoint(step + 1, losses)
    run.summary(stats); rec = run.release(adapter_dir, model_ref, data); run.finish(rec, out, seconds)

The mechanism is privcode.dp.engine.DPSGD's (privcode.dp.zero.ZeroDPSGD under `engine: deepspeed`):
each step draws this rank's share of the secret Poisson sample, λ(t) of PrivSA, clipped per-record
gradients, noise once; the planning (q, σ, the ε checks) is privcode.dp.plan's. The accountant's
history of the steps actually taken gives the ε of privacy.json and of the budget registry.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from privcode import budget, ledger
from privcode.dp import accountant as acct
from privcode.dp import engine
from privcode.dp import plan as planning
from privcode.dp.sampling import micro_batches
from privcode.errors import PrivcodeError
from privcode.lora import build_lora_model
from privcode.rows import collate

log = logging.getLogger(__name__)


class DPStep:
    """DP-SGD steps of one run (see the module docstring for the order of the calls)."""

    mode, desc = "dp", "dp-finetune"

    def __init__(self, cfg, out: Path, priv: Path):
        self.cfg, self.priv = cfg, Path(priv)
        self.zero = None
        if cfg.engine == "deepspeed":  # ZeRO-3 shards the frozen base; the mechanism stays engine.DPSGD's
            from privcode.dp import zero

            zero.check_config(cfg)
            self.zero = zero
        self.rank, self.world = engine.init_distributed()
        engine.check_not_trained(self.priv, out)  # training again into the same output spends budget again
        self.privsa = cfg.privsa_lambda_max > 0 or cfg.privsa_lambda_min > 0
        self.postfix: dict = {}

    def begin(self, device, data) -> None:
        """Secret randomness (noise, sampling, LoRA init: rank 0's is broadcast) and the data's identity."""
        from privcode.dp.noise import Streams

        self.streams = Streams.create(self.cfg.reproducible_seed, self.rank, self.world, device)
        torch.manual_seed(self.streams.init_seed)
        self.data_id, _ = ledger.data_identity(Path(data).parent)

    def plan(self, rows) -> int:
        """q, σ and the accountant's checks (privcode.dp.plan); the number of steps."""
        c = self.cfg
        self.p = planning.plan(epsilon=c.epsilon, delta=c.delta, steps=c.steps, batch_size=c.batch_size,
                               dataset_size=c.dataset_size, n_records=len(rows), noise_multiplier=c.noise_multiplier,
                               accountant=c.accountant, sampler=c.sampler, lora_dropout=c.lora_dropout)
        self.q, self.sigma = self.p.sample_rate, self.p.noise_multiplier
        if self.rank == 0:  # this log is a private-zone file (the rule's log lives there)
            seeded = "; REPRODUCIBLE SEED: not a DP release" if self.streams.reproducible else ""
            log.info("DP-SGD: N=%d q=%.5f σ=%.4f C=%g T=%d processes=%d PrivSA=%s -> ε=%.4f (δ=%g, %s)%s", len(rows),
                     self.q, self.sigma, c.max_grad_norm, c.steps, self.world, self.privsa, self.p.planned_epsilon,
                     c.delta, c.accountant, seeded)
        return c.steps

    def build(self, model_ref, device):
        if self.zero:
            return self.zero.build_lora_model(model_ref, self.cfg, device)
        return build_lora_model(model_ref, self.cfg, device)

    def attach(self, model, rows, tok, device) -> tuple[int, list]:
        """The DP engine around `model`; a checkpoint resumed; the whole run's ε checked against the
        target and entered in the budget registry. Returns (first step, losses so far)."""
        c = self.cfg
        self.model, self.rows, self.tok, self.device = model, rows, tok, device
        self.lengths = [len(r["input_ids"]) for r in rows]
        Engine = engine.DPSGD
        if self.zero:
            Engine = functools.partial(self.zero.ZeroDPSGD, pad_token=tok.pad_token_id, syntax=self.privsa)
        self.dp = Engine(model, n_records=len(rows), sample_rate=self.q, noise_multiplier=self.sigma,
                         max_grad_norm=c.max_grad_norm, expected_batch_size=self.p.expected_batch_size, lr=c.lr,
                         weight_decay=c.weight_decay, steps=c.steps, streams=self.streams, device=device,
                         rank=self.rank, world=self.world, optimizer=c.optimizer, lengths=self.lengths)
        self.loss = engine.per_record_loss
        if c.fast:
            from privcode.dp import fastloss, flatclip

            flatclip.accelerate_dpsgd(self.dp)
            compile_privsa = self.privsa and c.privsa_compile and str(device).startswith("cuda")
            self.loss = functools.partial(fastloss.per_record_loss, compile_privsa=compile_privsa,
                                          lockstep=bool(self.zero))
        self.history, losses, self.start = [], [], 0
        st = engine.load_ckpt(self.priv, self.rank) if c.checkpoint_every else None
        if st is not None:
            self.dp.load(st)
            self.history, losses, self.start = [tuple(h) for h in st["history"]], st["losses"], st["step"]
            log.info("resumed at step %d (ε so far %.4f)", self.start,
                     acct.epsilon_from_history(self.history, c.delta))
        full = planning.remaining(self.history, sigma=self.sigma, q=self.q, steps=c.steps, start=self.start,
                                  delta=c.delta, epsilon=c.epsilon, accountant=c.accountant)
        self.run_key = str(self.priv.resolve())
        self.run_id = budget.begin_run(self.data_id, run=self.run_key, history=full, delta=c.delta,
                                       reproducible=self.streams.reproducible,
                                       cap=c.total_epsilon_cap) if self.rank == 0 else None
        self.batch_sizes: list[int] = []
        return self.start, losses

    def batch(self, step: int) -> tuple[list, int]:
        """This rank's share of the step's Poisson sample as collated micro-batches, and its tokens."""
        idx = self.dp.next_indices()
        micro = [collate([self.rows[i] for i in mb], self.tok.pad_token_id, self.device)
                 for mb in micro_batches(idx, self.lengths, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens)]
        return micro, sum(self.lengths[i] for i in idx)

    def step(self, step: int, micro: list) -> float:
        """One noisy update; the global batch's mean loss (a private-zone statistic)."""
        c = self.cfg
        lam = engine.privsa_lambda(step, c.privsa_lambda_max, c.privsa_lambda_min, c.privsa_alpha,
                                   c.privsa_interval) if self.privsa else 0.0
        total, count = self.dp.step(micro, lambda m, b: self.loss(m, b, lam=lam, peft_model=self.model))
        self.history = planning.add_step(self.history, self.sigma, self.q)
        if self.world > 1:  # the global batch's mean loss, not this rank's share
            t = torch.tensor([total, float(count)], device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        self.batch_sizes.append(count)
        self.postfix = {"batch": count, "lam": f"{lam:.3g}"}
        return total / max(count, 1)

    def checkpoint(self, done: int, losses: list) -> None:
        every = self.cfg.checkpoint_every
        if every and done % every == 0 and done < self.cfg.steps:
            engine.save_ckpt(self.priv, self.rank, self.dp.state(self.history, losses, done))

    def summary(self, stats: dict) -> dict:
        """The run's ε from the accountant's history; private-zone statistics of the DP run."""
        if stats["lora_max_abs_delta"] == 0.0:
            raise PrivcodeError("LoRA weights did not change during DP training (Opacus hooks not attached?)")
        self.eps = acct.epsilon_from_history(self.history, self.cfg.delta, "prv")
        self.eps_rdp = acct.epsilon_from_history(self.history, self.cfg.delta, "rdp")
        # private zone only: realized batch sizes, losses, record counts are not DP
        return {"noisy_updates": len(self.batch_sizes), "batch_sizes": self.batch_sizes, "resumed_at": self.start,
                "reproducible": self.streams.reproducible}

    def release(self, tmp: Path, model_ref, data) -> dict:
        """privacy.json of the adapter in `tmp`: the DP release, its (ε, δ) from the history run."""
        c = self.cfg
        return ledger.dp_release(tmp, stage="dp_finetune", epsilon=self.eps, delta=c.delta, history=self.history,
                                 accountant="prv", epsilon_rdp=self.eps_rdp, sampler="poisson", size=self.p.size,
                                 reproducible=self.streams.reproducible, max_grad_norm=c.max_grad_norm,
                                 expected_batch_size=self.p.expected_batch_size, target_epsilon=c.epsilon,
                                 processes=self.world, privsa=self.privsa,
                                 noise="Gaussian, sum of 4 draws halved (Opacus secure_mode)",
                                 parents=ledger.model_parents(model_ref))

    def private_stats(self, rec: dict) -> dict:
        return {"release_id": rec["releases"][-1]["id"]}

    def finish(self, rec: dict, out: Path, seconds: float) -> None:
        """The budget registry's entry closed, the output marked trained, checkpoints deleted."""
        budget.finish_run(self.data_id, self.run_id, run=self.run_key, release_id=rec["releases"][-1]["id"],
                          history=self.history, delta=self.cfg.delta, reproducible=self.streams.reproducible,
                          output=str(Path(out).resolve()))
        engine.mark_trained(self.priv, out, rec)
        engine.clear_ckpt(self.priv)
        log.info("done: ε=%.4f (PRV), %.4f (RDP) in %.1fs", self.eps, self.eps_rdp, seconds)

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
