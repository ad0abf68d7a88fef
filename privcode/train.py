"""One training loop for DP (stage 1, DPFT) and non-DP (stage 6, NonDPFT) LoRA fine-tuning.

    privcode dp-finetune --model results/models/smollm2/base --data results/data/private/records.jsonl \
        --out results/dp/smollm2/eps4/adapter --params '{"epsilon": 4, "delta": 1e-5, "steps": 4}'
    privcode finetune --model results/models/smollm2/base --data results/synth/smollm2/eps4/roundtrip/kept.jsonl \
        --out results/ft/smollm2/PrivCode/eps4/adapter --params '{"epochs": 1}'

DP guarantee (dp-finetune): (ε, δ)-DP for one record of the private JSONL (the privacy unit),
under Poisson sampling with rate q = expected_batch_size / N, per-record clipping to C and
Gaussian noise σ·C added once per step; σ is calibrated so that the PRV accountant's ε after
`steps` steps is ≤ the target, and the ε written to privacy.json is recomputed from the
accountant's history of the steps actually taken. Each record becomes exactly one training
row (long records are truncated, never split). Not covered: the prompts/instructions the
tokenizer and base model saw in pre-training (public), and side channels such as timing.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from privcode.data.prompts import render_example
from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, iter_jsonl, write_json

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of one fine-tuning run (the `dp` / `finetune` sections of the config)."""
    steps: int | None = None          # optimizer steps; DP: the accountant's T. Non-DP: overrides epochs
    epochs: float = 1.0               # non-DP only: passes over the data when steps is None
    batch_size: int = 8               # DP: expected batch size q*N (Poisson); non-DP: records per step
    micro_batch_size: int = 4         # rows per forward/backward; memory knob, no effect on the result
    max_length: int = 256             # tokens per record; longer records are truncated (one record = one row)
    lr: float = 5e-4                  # LoRA tolerates a high LR; DP noise favours few, large steps
    weight_decay: float = 0.0
    prompt_format: str = "qa"         # qa | chat (see privcode.data.prompts)
    lora_r: int = 8                   # rank ≤ 64 keeps per-record LoRA gradients cheap
    lora_alpha: int = 16
    lora_dropout: float = 0.0         # dropout would make per-record gradients non-deterministic
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dtype: str = "float32"            # bfloat16 on GPUs; clipping and noise stay fp32
    seed: int = 0
    # --- DP only ---
    epsilon: float | None = None      # target ε; σ is calibrated to it
    delta: float | None = None        # must be < 1/N
    noise_multiplier: float | None = None  # set to fix σ instead of calibrating (ε still from the accountant)
    max_grad_norm: float = 1.0        # per-record clipping norm C
    accountant: str = "prv"           # prv (reported) | rdp
    checkpoint_every: int = 0         # steps between resumable checkpoints (0: off)

    @classmethod
    def from_dict(cls, d: dict, where: str = "--params") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PrivcodeError(f"unknown training option(s) {unknown}; known: {sorted(known)}", path=where)
        return cls(**d)


# --------------------------------------------------------------------------------------------
# data: one record -> one row


def load_rows(path, tok, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Tokenize every record into exactly one row (prompt tokens masked out of the loss)."""
    rows, truncated, empty_answer = [], 0, 0
    eos = tok.eos_token or ""
    for lineno, rec in iter_jsonl(path, required=("problem", "solution")):
        prompt, answer = render_example(rec["problem"], rec["solution"], cfg.prompt_format, tok)
        p_ids = tok(prompt, add_special_tokens=cfg.prompt_format == "qa")["input_ids"]
        a_ids = tok(answer + eos, add_special_tokens=False)["input_ids"]
        ids = (p_ids + a_ids)
        labels = [IGNORE] * len(p_ids) + a_ids
        if len(ids) > cfg.max_length:
            truncated += 1
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if all(x == IGNORE for x in labels[1:]):
            empty_answer += 1
        rows.append({"input_ids": ids, "labels": labels, "line": lineno})
    if not rows:
        raise PrivcodeError("no training records", path=path)
    return rows, {"records": len(rows), "truncated": truncated, "no_answer_tokens": empty_answer}


def collate(rows: list[dict], pad_id: int, device) -> dict:
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def per_record_loss(model, batch) -> torch.Tensor:
    """Mean token cross-entropy of each record's answer: shape [B]. Records are independent
    (no cross-row reduction), which is what makes per-record clipping meaningful."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                           ignore_index=IGNORE, reduction="none").view(labels.shape)
    n = (labels != IGNORE).sum(1).clamp(min=1)
    return ce.sum(1) / n


# --------------------------------------------------------------------------------------------
# model


def build_lora_model(model_ref: str, cfg: TrainConfig, device):
    from peft import LoraConfig, get_peft_model

    from privcode.models import load_model

    model = load_model(model_ref, dtype=cfg.dtype, device=device)
    model.config.use_cache = False
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # LoRA weights in fp32: clipping/noise/optimizer precision
        if p.requires_grad:
            p.data = p.data.float()
    return model


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_lora_delta(before: dict, model) -> float:
    now = lora_state(model)
    return max(float((now[n] - before[n]).abs().max()) for n in before)


# --------------------------------------------------------------------------------------------
# DP-SGD


def check_dp_inputs(cfg: TrainConfig, n_records: int) -> float:
    """Refuse to start when the run would not match what the accountant assumes. Returns q."""
    if cfg.epsilon is None and cfg.noise_multiplier is None:
        raise PrivcodeError("DP training needs a target 'epsilon' (or a fixed 'noise_multiplier')")
    if cfg.delta is None or not (0 < cfg.delta < 1.0 / n_records):
        raise PrivcodeError(f"'delta'={cfg.delta} must be in (0, 1/N) = (0, {1.0 / n_records:.3g}) for N={n_records} records")
    if not cfg.steps or cfg.steps < 1:
        raise PrivcodeError("DP training needs 'steps' ≥ 1 (the accountant's T)")
    q = cfg.batch_size / n_records
    if not (0 < q <= 1):
        raise PrivcodeError(f"expected batch size {cfg.batch_size} must be in [1, N={n_records}]")
    if cfg.lora_dropout:
        raise PrivcodeError("lora_dropout must be 0 under DP (per-record gradients must be deterministic)")
    return q


def train_dp(model_ref: str, data: str, out: Path, cfg: TrainConfig) -> dict:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from tqdm import tqdm

    from privcode.dp import accountant as acct
    from privcode.dp import ledger
    from privcode.models import default_device, load_tokenizer

    if world_size() > 1:
        raise PrivcodeError("DP fine-tuning runs in one process for now (set resources.gpus.dp_finetune: 1); "
                            "multi-GPU DP with noise added once per step is tracked in issue #3")
    torch.manual_seed(cfg.seed)
    device = default_device()
    tok = load_tokenizer(model_ref)
    rows, data_stats = load_rows(data, tok, cfg)
    N = len(rows)
    q = check_dp_inputs(cfg, N)
    sigma = cfg.noise_multiplier
    if sigma is None:
        sigma = acct.calibrate_sigma(cfg.epsilon, cfg.delta, q, cfg.steps, cfg.accountant)
    planned_eps = acct.epsilon(q, sigma, cfg.steps, cfg.delta, cfg.accountant)
    if cfg.epsilon is not None and planned_eps > cfg.epsilon * (1 + 1e-6):
        raise PrivcodeError(f"σ={sigma} gives ε={planned_eps:.4f} > target {cfg.epsilon} after {cfg.steps} steps")
    log.info("DP-SGD: N=%d q=%.5f σ=%.4f C=%g T=%d -> ε=%.4f (δ=%g, %s)", N, q, sigma, cfg.max_grad_norm,
             cfg.steps, planned_eps, cfg.delta, cfg.accountant)

    model = build_lora_model(model_ref, cfg, device)
    model.train()
    before = lora_state(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    base_opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_gen = torch.Generator(device=device if device != "cpu" else "cpu").manual_seed(cfg.seed + 1)
    opt = DPOptimizer(base_opt, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                      expected_batch_size=cfg.batch_size, loss_reduction="sum", generator=noise_gen)
    # Opacus adds N(0, σ²C²) to the *sum* of clipped gradients; average by the expected batch size
    # (a public constant) — dividing by the realized batch size would leak it.
    opt.attach_step_hook(lambda o: [p.grad.div_(cfg.batch_size) for p in o.params])
    sample_gen = torch.Generator().manual_seed(cfg.seed + 2)
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=q, generator=sample_gen, steps=cfg.steps)

    ckpt_dir = out.parent / f".{out.name}.ckpt"
    history, losses, start = [], [], 0
    if cfg.checkpoint_every and (ckpt_dir / "state.pt").exists():
        st = torch.load(ckpt_dir / "state.pt", weights_only=False)
        for n, p in gsm.named_parameters():
            if p.requires_grad:
                p.data.copy_(st["lora"][n])
        base_opt.load_state_dict(st["opt"])
        sample_gen.set_state(st["sample_rng"])
        noise_gen.set_state(st["noise_rng"])
        history, losses, start = st["history"], st["losses"], st["step"]
        log.info("resumed from %s at step %d", ckpt_dir, start)

    batch_sizes = []
    it = iter(sampler)  # on resume the sampler's RNG state was restored: it continues the sequence
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="dp-finetune", unit="step", initial=start, total=cfg.steps)
    for step in bar:
        if cfg.epsilon is not None:
            eps_next = acct.epsilon_from_history(history + [(sigma, q, 1)], cfg.delta, cfg.accountant)
            if eps_next > cfg.epsilon * (1 + 1e-6):
                raise PrivcodeError(f"step {step + 1} would spend ε={eps_next:.4f} > target {cfg.epsilon}; stopping")
        idx = next(it)
        batch_sizes.append(len(idx))
        micro = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)] or [[]]
        step_loss = 0.0
        for j, mb in enumerate(micro):
            if mb:
                batch = collate([rows[i] for i in mb], tok.pad_token_id, device)
                loss = per_record_loss(gsm, batch)
                loss.sum().backward()
                step_loss += float(loss.detach().sum())
            else:  # an empty Poisson sample still takes a (pure-noise) step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            opt.signal_skip_step(do_skip=j < len(micro) - 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
        history = _merge_history(history, sigma, q)
        losses.append(step_loss / max(len(idx), 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", batch=len(idx))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_ckpt(ckpt_dir, gsm, base_opt, sample_gen, noise_gen, history, losses, step + 1)
    elapsed = time.time() - t0

    delta_max = max_lora_delta(before, model)
    if delta_max == 0.0:
        raise PrivcodeError("LoRA weights did not change during DP training (Opacus hooks not attached?)")
    eps = acct.epsilon_from_history(history, cfg.delta, "prv")
    eps_rdp = acct.epsilon_from_history(history, cfg.delta, "rdp")
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        stats = {"mode": "dp", **data_stats, "steps": cfg.steps, "batch_sizes": batch_sizes,
                 "losses": losses, "seconds": elapsed, "lora_max_abs_delta": delta_max,
                 "config": asdict(cfg), "base_model": model_ref}
        write_json(tmp / "train_stats.json", stats)
        ledger.dp_release(tmp, stage="dp_finetune", epsilon=eps, delta=cfg.delta, accountant="prv",
                          epsilon_rdp=eps_rdp, sampler="poisson", sample_rate=q, noise_multiplier=sigma,
                          max_grad_norm=cfg.max_grad_norm, steps=len(batch_sizes) + start,
                          private_data=data, n_records=N, target_epsilon=cfg.epsilon,
                          parents=ledger.model_parents(model_ref))
    if ckpt_dir.exists():
        import shutil

        shutil.rmtree(ckpt_dir)
    log.info("done: ε=%.4f (PRV), %.4f (RDP) in %.1fs", eps, eps_rdp, elapsed)
    return stats


def _merge_history(history, sigma, q):
    if history and history[-1][0] == sigma and history[-1][1] == q:
        return history[:-1] + [(sigma, q, history[-1][2] + 1)]
    return history + [(sigma, q, 1)]


def _save_ckpt(d: Path, gsm, opt, sample_gen, noise_gen, history, losses, step):
    d.mkdir(parents=True, exist_ok=True)
    st = {"lora": {n: p.detach().cpu() for n, p in gsm.named_parameters() if p.requires_grad},
          "opt": opt.state_dict(), "sample_rng": sample_gen.get_state(), "noise_rng": noise_gen.get_state(),
          "history": history, "losses": losses, "step": step}
    tmp = d / "state.pt.tmp"
    torch.save(st, tmp)
    os.replace(tmp, d / "state.pt")


# --------------------------------------------------------------------------------------------
# non-DP


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_nondp(model_ref: str, data: str, out: Path, cfg: TrainConfig) -> dict:
    """Ordinary fine-tuning. One process: plain AdamW. Several (torchrun): DeepSpeed ZeRO-2, each
    rank taking its share of every global batch; rank 0 writes the artifact."""
    from tqdm import tqdm

    from privcode.dp import ledger
    from privcode.models import default_device, load_tokenizer

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # same seed on every rank: all ranks agree on the batch order
    world = world_size()
    device = default_device()
    tok = load_tokenizer(model_ref)
    rows, data_stats = load_rows(data, tok, cfg)
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    model = build_lora_model(model_ref, cfg, device)
    model.train()
    before = lora_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine, rank = None, 0
    n_micro = max(1, math.ceil(math.ceil(cfg.batch_size / world) / cfg.micro_batch_size))
    if world > 1:
        engine, rank = _deepspeed_engine(model, opt, cfg, n_micro)
    order: list[int] = []
    losses, t0 = [], time.time()
    for _ in tqdm(range(steps), desc="finetune", unit="step", disable=rank != 0):
        if len(order) < cfg.batch_size:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        mine = idx[rank::world]  # this rank's share of the global batch
        micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        if engine is not None:  # every rank runs the same number of micro-steps (ZeRO reduces each one)
            micro += [[]] * (n_micro - len(micro))
        total = 0.0
        for mb in micro:
            batch = collate([rows[k] for k in (mb or idx[:1])], tok.pad_token_id, device)
            weight = 1.0 if mb else 0.0  # a padding micro-step contributes a zero gradient
            if engine is None:
                loss = per_record_loss(model, batch).sum() / len(idx)
                loss.backward()
            else:  # DeepSpeed averages over ranks: each rank's sum is scaled by world / |batch|
                loss = per_record_loss(engine, batch).sum() * (weight * world / len(idx))
                engine.backward(loss, scale_wrt_gas=False)
                engine.step()  # steps the optimizer only at the accumulation boundary
            total += float(loss.detach()) / (world if engine is not None else 1)
        if engine is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:  # log the global batch loss, not this rank's share
            t = torch.tensor([total], device=device)
            torch.distributed.all_reduce(t)
            total = float(t)
        losses.append(total)
    elapsed = time.time() - t0
    stats = {"mode": "non-dp", **data_stats, "steps": steps, "losses": losses, "seconds": elapsed,
             "world_size": world, "lora_max_abs_delta": max_lora_delta(before, model), "config": asdict(cfg),
             "base_model": model_ref}
    if rank == 0:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / "train_stats.json", stats)
            # reading raw private data without DP composes to ε = inf through the data's own ledger
            ledger.derive(tmp, stage="finetune", parents=ledger.model_parents(model_ref) + [str(Path(data).parent)])
    if engine is not None:
        torch.distributed.barrier()
    return stats


def _deepspeed_engine(model, opt, cfg: TrainConfig, n_micro: int):
    try:
        import deepspeed
    except ImportError as e:
        raise PrivcodeError("multi-GPU fine-tuning needs DeepSpeed: pip install 'privcode[gpu]'") from e
    deepspeed.init_distributed()
    ds_cfg = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": n_micro,
        "zero_optimization": {"stage": 2},  # partitions optimizer state and gradients
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "steps_per_print": 10 ** 9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    return engine, torch.distributed.get_rank()


def main(argv=None, dp: bool = False) -> None:
    name = "dp-finetune" if dp else "finetune"
    ap = argparse.ArgumentParser(prog=f"privcode {name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: hub name or local directory")
    ap.add_argument("--data", required=True, help="JSONL with problem/solution fields")
    ap.add_argument("--out", required=True, type=Path, help="output adapter directory")
    ap.add_argument("--params", default="{}", help="JSON object of TrainConfig fields")
    a = ap.parse_args(argv)
    try:
        params = json.loads(a.params)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"--params is not valid JSON: {e.msg}") from None
    cfg = TrainConfig.from_dict(params)
    (train_dp if dp else train_nondp)(a.model, a.data, a.out, cfg)
