"""One training loop for DP (stage 1, DPFT) and non-DP (stage 6, NonDPFT) LoRA fine-tuning.

    privcode dp-finetune --model results/models/smollm2/base --data results/data/private/records.jsonl \
        --out results/dp/smollm2/eps4/adapter --params '{"epsilon": 4, "delta": 1e-5, "steps": 4}'
    privcode finetune --model results/models/smollm2/base --data results/synth/smollm2/eps4/roundtrip/kept.jsonl \
        --out results/ft/smollm2/PrivCode/eps4/adapter --params '{"epochs": 1}'

DP guarantee (dp-finetune): (ε, δ)-DP for one record of the private JSONL (the privacy unit),
under add/remove-one-record adjacency, Poisson sampling with rate q = batch_size / N̂ (N̂: the
declared size, or the true N declared public — privcode.dp.plan), per-record clipping to C and
Gaussian noise σ·C added once per step; σ is calibrated so that the PRV accountant's ε after
`steps` steps is ≤ the target, and the ε written to privacy.json is recomputed from the
accountant's history of the steps actually taken. Each record becomes exactly one training
row (long records are truncated, never split). Noise, sampling and LoRA init draw from fresh OS
entropy (privcode.dp.noise). What leaves the run: the adapter directory (weights, adapter config,
tokenizer, privacy.json); statistics, checkpoints and logs stay in the private zone
(--private-dir). Not covered: the prompts/instructions the tokenizer and base model saw in
pre-training (public), and side channels such as timing.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from privcode.data.prompts import render_example
from privcode.dp.engine import IGNORE, fused_kwargs, per_record_loss, privsa_lambda
from privcode.dp.sampling import balanced_split, micro_batches
from privcode.errors import PrivcodeError
from privcode.params import Params
from privcode.io import atomic_dir, atomic_file, iter_jsonl, write_json

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(Params):
    """Hyper-parameters of one fine-tuning run (the `dp` / `finetune` sections of the config)."""
    _what = "training"
    steps: int | None = None          # optimizer steps; DP: the accountant's T. Non-DP: overrides epochs
    epochs: float = 1.0               # non-DP only: passes over the data when steps is None
    batch_size: int = 8               # DP: expected batch size q*N (Poisson); non-DP: records per step
    micro_batch_size: int = 4         # rows per forward/backward; memory knob, no effect on the result
    micro_batch_tokens: int = 0       # > 0: also cap rows × longest row per micro-batch (not in the non-DP
                                      # DeepSpeed fine-tune): short rows fill the GPU, long ones still fit
    max_length: int = 256             # tokens per record; longer records are truncated (one record = one row)
    lr: float = 5e-4                  # LoRA tolerates a high LR; DP noise favours few, large steps
    weight_decay: float = 0.0
    prompt_format: str = "qa"         # qa | chat (see privcode.data.prompts)
    lora_r: int = 8                   # rank ≤ 64 keeps per-record LoRA gradients cheap
    lora_alpha: int = 16
    lora_dropout: float = 0.0         # dropout would make per-record gradients non-deterministic
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    dtype: str = "float32"            # bfloat16 on GPUs; clipping and noise stay fp32
    seed: int = 0                     # non-DP only (batch order); DP randomness is secret, see below
    # --- DP only ---
    epsilon: float | None = None      # target ε; σ is calibrated to it
    delta: float | None = None        # must be < 1/N
    dataset_size: int | str | None = None  # privacy.dataset_size: a declared public size N̂ (q = B/N̂) or
                                      # "public" (the true N is released); privcode.dp.plan
    reproducible_seed: int | None = None  # opt-in replayable noise/sampling: NOT a DP release
    total_epsilon_cap: float | None = None  # refuse to start when the data set's total would pass it
    noise_multiplier: float | None = None  # set to fix σ instead of calibrating (ε still from the accountant)
    max_grad_norm: float = 1.0        # per-record clipping norm C
    accountant: str = "prv"           # prv (reported) | rdp
    checkpoint_every: int = 0         # steps between resumable checkpoints (0: off)
    sampler: str = "poisson"          # the only sampler the accountant covers; anything else is refused
    optimizer: str = "adamw"          # adamw | sgd (sgd: the update is exactly -lr * noisy gradient)
    fast: bool = False                # privcode.dp.fastloss: lean LoRA, chunked head loss, hook-free
                                      # per-record gradients (the GPU speed path; same math, fp32-exact)
    # --- PrivSA (DP only): loss_i = CE_i + λ(t)·KL(p_base ‖ p_dp) over record i's syntax tokens ---
    privsa_lambda_max: float = 0.0    # 0 turns PrivSA off (plain DP-SGD, the DPFT baseline)
    privsa_lambda_min: float = 0.0
    privsa_alpha: float = 0.05        # decay rate of λ per optimizer step
    privsa_interval: int = 1          # λ is held constant over blocks of this many steps
    cudnn_attention: bool = False     # cuDNN SDPA builds a plan per new (rows, length) shape: with
                                      # rows of varying length, 1-2 s stalls (docs/scaling.md); off -> flash
    privsa_compile: bool = False      # with fast on CUDA: torch.compile the frozen teacher + KL math;
                                      # off: ~90 s of compile per process for ~7% of a step pays only
                                      # after ~600 steps, and it leaves a bf16 KL floor (docs/scaling.md)
    engine: str = "ddp"               # DP only: ddp | deepspeed (ZeRO-3 shards the frozen base for models
                                      # larger than a GPU; same mechanism: privcode.dp.zero)
    zero_offload: str = "none"        # engine deepspeed: none | cpu (the base's partitions in CPU memory)
    deepspeed: dict = field(default_factory=dict)  # engine deepspeed: extra zero_optimization settings
                                      # (placement/prefetch only; privcode.dp.zero.check_config)



    def __post_init__(self):  # values checked before any model or data is loaded
        for name, ok in (("epsilon", self.epsilon is None or (not isinstance(self.epsilon, bool) and self.epsilon > 0)),
                         ("delta", self.delta is None or 0 < self.delta < 1),
                         ("max_grad_norm", self.max_grad_norm > 0), ("batch_size", self.batch_size >= 1),
                         ("steps", self.steps is None or self.steps >= 1), ("lr", self.lr > 0),
                         ("engine", self.engine in ("ddp", "deepspeed")),
                         ("zero_offload", self.zero_offload in ("none", "cpu"))):
            if not ok:
                raise PrivcodeError(f"invalid value {getattr(self, name)!r}", path="--params", field=name)


# --------------------------------------------------------------------------------------------
# data: one record -> one row


def load_rows(path, tok, cfg: TrainConfig, syntax: bool = False) -> tuple[list[dict], dict]:
    """Tokenize every record into exactly one row (prompt tokens masked out of the loss).
    With `syntax`, each row also carries the PrivSA mask of its syntax-token positions."""
    rows, truncated, empty_answer, unparsed = [], 0, 0, 0
    eos = tok.eos_token or ""
    for lineno, rec in iter_jsonl(path, required=("problem", "solution")):
        prompt, answer = render_example(rec["problem"], rec["solution"], cfg.prompt_format, tok)
        p_ids = tok(prompt, add_special_tokens=cfg.prompt_format == "qa")["input_ids"]
        enc = tok(answer + eos, add_special_tokens=False, return_offsets_mapping=syntax)
        a_ids = enc["input_ids"]
        ids = (p_ids + a_ids)
        labels = [IGNORE] * len(p_ids) + a_ids
        row = {"input_ids": ids, "labels": labels, "line": lineno}
        if syntax:
            from privcode.dp.syntax import syntax_char_spans_in_answer, token_mask

            spans, _, failed = syntax_char_spans_in_answer(answer, rec.get("lang") or "python")
            unparsed += bool(failed) and not spans
            row["syntax"] = [False] * len(p_ids) + token_mask(enc["offset_mapping"], spans)
        if len(ids) > cfg.max_length:
            truncated += 1
            row = {k: (v[: cfg.max_length] if isinstance(v, list) else v) for k, v in row.items()}
        if all(x == IGNORE for x in row["labels"][1:]):
            empty_answer += 1
        rows.append(row)
    if not rows:
        raise PrivcodeError("no training records", path=path)
    stats = {"records": len(rows), "truncated": truncated, "no_answer_tokens": empty_answer}
    if syntax:
        stats["privsa_unparsed_records"] = unparsed  # these get KL 0
        stats["privsa_syntax_tokens"] = sum(sum(r["syntax"]) for r in rows)
    return rows, stats


def collate(rows: list[dict], pad_id: int, device) -> dict:
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    syn = torch.zeros((len(rows), T), dtype=torch.bool) if "syntax" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if syn is not None:
            syn[i, :n] = torch.tensor(r["syntax"], dtype=torch.bool)
    # CPU copies of labels/syntax/mask: the fast loss finds its positions (and that rows are
    # right-padded, so no mask is needed) there, without a device sync
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
           "labels_cpu": labels, "attention_mask_cpu": mask}
    if syn is not None:
        out["syntax"], out["syntax_cpu"] = syn.to(device), syn
    return out


def set_attention_backends(cfg: TrainConfig, device) -> None:
    """Process-wide SDPA choice for a training run on CUDA: without cuDNN attention, PyTorch
    picks flash / memory-efficient kernels, which need no per-shape plan."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(bool(cfg.cudnn_attention))


# --------------------------------------------------------------------------------------------
# model


def build_lora_model(model_ref: str, cfg: TrainConfig, device, base=None):
    """LoRA (PEFT) on the base `model_ref`, or on `base` when given (privcode.dp.zero: a sharded base)."""
    from peft import LoraConfig, get_peft_model

    from privcode.models import load_model

    model = base if base is not None else load_model(model_ref, dtype=cfg.dtype, device=device)
    model.config.use_cache = False
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # LoRA weights in fp32: clipping/noise/optimizer precision
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.fast:
        from privcode.dp import fastloss

        fastloss.lean_lora(model)
    return model


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_lora_delta(before: dict, model) -> float:
    now = lora_state(model)
    return max(float((now[n] - before[n]).abs().max()) for n in before)


# --------------------------------------------------------------------------------------------
# DP-SGD (mechanism in privcode.dp.engine)


def train_dp(model_ref: str, data: str, out: Path, cfg: TrainConfig, private_dir=None) -> dict:
    """DP-SGD into `out` (the release side: adapter weights, config, tokenizer, privacy.json);
    statistics, checkpoints and the re-train guard go to `private_dir` (private zone; default
    privcode.zone.run_dir(out))."""
    from tqdm import tqdm

    from privcode import budget, ledger, zone
    from privcode.dp import accountant as acct
    from privcode.dp import engine
    from privcode.dp.noise import Streams
    from privcode.dp.plan import plan
    from privcode.models import default_device, load_tokenizer

    out = Path(out)
    priv = Path(private_dir) if private_dir else zone.run_dir(out)
    zero = None
    if cfg.engine == "deepspeed":  # ZeRO-3 shards the frozen base; the mechanism stays engine.DPSGD's
        from privcode.dp import zero

        zero.check_config(cfg)
    rank, world = engine.init_distributed()
    engine.check_not_trained(priv, out)  # training again into the same output spends budget again
    device = default_device()
    streams = Streams.create(cfg.reproducible_seed, rank, world, device)
    torch.manual_seed(streams.init_seed)  # LoRA init: secret too (rank 0's is broadcast)
    data_id, _ = ledger.data_identity(Path(data).parent)
    tok = load_tokenizer(model_ref)
    privsa = cfg.privsa_lambda_max > 0 or cfg.privsa_lambda_min > 0
    rows, data_stats = load_rows(data, tok, cfg, syntax=privsa)
    N = len(rows)
    p = plan(epsilon=cfg.epsilon, delta=cfg.delta, steps=cfg.steps, batch_size=cfg.batch_size,
             dataset_size=cfg.dataset_size, n_records=N, noise_multiplier=cfg.noise_multiplier,
             accountant=cfg.accountant, sampler=cfg.sampler, lora_dropout=cfg.lora_dropout)
    q, sigma = p.sample_rate, p.noise_multiplier
    if rank == 0:  # this log is a private-zone file (the rule's log lives there)
        log.info("DP-SGD: N=%d q=%.5f σ=%.4f C=%g T=%d processes=%d PrivSA=%s -> ε=%.4f (δ=%g, %s)%s", N, q,
                 sigma, cfg.max_grad_norm, cfg.steps, world, privsa, p.planned_epsilon, cfg.delta, cfg.accountant,
                 "; REPRODUCIBLE SEED: not a DP release" if streams.reproducible else "")

    lengths = [len(r["input_ids"]) for r in rows]
    set_attention_backends(cfg, device)
    if zero:
        model = zero.build_lora_model(model_ref, cfg, device)
        Engine = functools.partial(zero.ZeroDPSGD, pad_token=tok.pad_token_id, syntax=privsa)
    else:
        model, Engine = build_lora_model(model_ref, cfg, device), engine.DPSGD
    model.train()
    dp = Engine(model, n_records=N, sample_rate=q, noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm,
                expected_batch_size=p.expected_batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                steps=cfg.steps, streams=streams, device=device, rank=rank, world=world,
                optimizer=cfg.optimizer, lengths=lengths)
    if cfg.fast:
        from privcode.dp import fastloss

        fastloss.accelerate_dpsgd(dp)
        compile_privsa = privsa and cfg.privsa_compile and str(device).startswith("cuda")
        loss_impl = functools.partial(fastloss.per_record_loss, compile_privsa=compile_privsa, lockstep=bool(zero))
    else:
        loss_impl = per_record_loss
    before = lora_state(model)
    history, losses, start = [], [], 0
    st = engine.load_ckpt(priv, rank) if cfg.checkpoint_every else None
    if st is not None:
        dp.load(st)
        history, losses, start = [tuple(h) for h in st["history"]], st["losses"], st["step"]
        log.info("resumed at step %d (ε so far %.4f)", start, acct.epsilon_from_history(history, cfg.delta))

    # ε is monotone in the steps taken, so checking the whole remaining plan once (also after a
    # resume, whose history may come from another σ or q) guards every step of this run.
    full = history + [(sigma, q, cfg.steps - start)] if cfg.steps > start else history
    eps_full = acct.epsilon_from_history(full, cfg.delta, cfg.accountant)
    if eps_full > cfg.epsilon * (1 + 1e-6):
        raise PrivcodeError(f"finishing this run would spend ε={eps_full:.4f} > target {cfg.epsilon}; not starting")
    run_key = str(priv.resolve())
    run_id = budget.begin_run(data_id, run=run_key, history=full, delta=cfg.delta, reproducible=streams.reproducible,
                              cap=cfg.total_epsilon_cap) if rank == 0 else None
    batch_sizes: list[int] = []
    timer = StepTimer(device, world)
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="dp-finetune", unit="step", initial=start, total=cfg.steps,
               disable=rank != 0)
    prof = StepProfiler(rank, start)
    for step in bar:
        prof.at(step)
        idx = dp.next_indices()
        lam = privsa_lambda(step, cfg.privsa_lambda_max, cfg.privsa_lambda_min, cfg.privsa_alpha,
                            cfg.privsa_interval) if privsa else 0.0
        micro = [collate([rows[i] for i in mb], tok.pad_token_id, device)
                 for mb in micro_batches(idx, lengths, cfg.micro_batch_size, cfg.micro_batch_tokens)]
        timer.start()
        total, count = dp.step(micro, lambda m, b: loss_impl(m, b, lam=lam, peft_model=model))
        timer.stop(sum(len(rows[i]["input_ids"]) for i in idx))
        history = _merge_history(history, sigma, q)
        if world > 1:  # log the global batch's mean loss, not this rank's share
            t = torch.tensor([total, float(count)], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        batch_sizes.append(count)
        losses.append(total / max(count, 1))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", batch=count, lam=f"{lam:.3g}")  # private-zone log
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            engine.save_ckpt(priv, rank, dp.state(history, losses, step + 1))
    prof.at(cfg.steps)
    elapsed = time.time() - t0

    delta_max = max_lora_delta(before, model)
    if delta_max == 0.0:
        raise PrivcodeError("LoRA weights did not change during DP training (Opacus hooks not attached?)")
    eps = acct.epsilon_from_history(history, cfg.delta, "prv")
    eps_rdp = acct.epsilon_from_history(history, cfg.delta, "rdp")
    # private zone only: realized batch sizes, losses, record counts are not DP
    stats = {"mode": "dp", **data_stats, **timer.summary(), "steps": cfg.steps, "noisy_updates": len(batch_sizes),
             "batch_sizes": batch_sizes, "losses": losses, "seconds": elapsed, "lora_max_abs_delta": delta_max,
             "world_size": world, "resumed_at": start, "config": asdict(cfg), "base_model": model_ref,
             "reproducible": streams.reproducible}
    if rank == 0:
        with atomic_dir(out) as tmp:
            save_release_adapter(model, tok, tmp)
            rec = ledger.dp_release(tmp, stage="dp_finetune", epsilon=eps, delta=cfg.delta, history=history,
                                    accountant="prv", epsilon_rdp=eps_rdp, sampler="poisson", size=p.size,
                                    reproducible=streams.reproducible, max_grad_norm=cfg.max_grad_norm,
                                    expected_batch_size=p.expected_batch_size, target_epsilon=cfg.epsilon,
                                    processes=world, privsa=privsa,
                                    noise="Gaussian, sum of 4 draws halved (Opacus secure_mode)",
                                    parents=ledger.model_parents(model_ref))
        release_id = rec["releases"][-1]["id"]
        write_json(zone.mkdir(priv) / "train_stats.json", {**stats, "release_id": release_id}, private=True)
        budget.finish_run(data_id, run_id, run=run_key, release_id=release_id, history=history, delta=cfg.delta,
                          reproducible=streams.reproducible, output=str(out.resolve()))
        engine.mark_trained(priv, out, rec)
        engine.clear_ckpt(priv)
        log.info("done: ε=%.4f (PRV), %.4f (RDP) in %.1fs", eps, eps_rdp, elapsed)
    if world > 1:
        torch.distributed.barrier()
    return stats


# files a released adapter directory may hold (a test lists them): weights, adapter config,
# tokenizer files and privacy.json — nothing computed from the private data but the weights
RELEASE_FILES = {"adapter_model.safetensors", "adapter_config.json", "privacy.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                 "merges.txt", "tokenizer.model", "added_tokens.json"}


def save_release_adapter(model, tok, out: Path) -> None:
    """Save the LoRA adapter and tokenizer; drop PEFT's model card; refuse anything unexpected."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    extra = sorted(f.name for f in out.iterdir() if f.name not in RELEASE_FILES)
    if extra:
        raise PrivcodeError(f"unexpected files {extra} in a release-side adapter directory", path=out)


def _merge_history(history, sigma, q):
    if history and history[-1][0] == sigma and history[-1][1] == q:
        return history[:-1] + [(sigma, q, history[-1][2] + 1)]
    return history + [(sigma, q, 1)]


# --------------------------------------------------------------------------------------------
# step instrumentation: profiler and timer


class StepProfiler:
    """PRIVCODE_PROFILE=DIR: torch.profiler over steps 3-5 of this run (after warm-up), every rank;
    DIR/profile_rank<r>.txt gets the kernel and operator tables (by device and by CPU time)."""

    FIRST, STEPS = 2, 3

    def __init__(self, rank: int, start: int):
        self.dir = os.environ.get("PRIVCODE_PROFILE")
        self.rank, self.begin, self.prof = rank, start + self.FIRST, None

    def at(self, step: int) -> None:
        if not self.dir:
            return
        if step == self.begin and self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif self.prof is not None and step >= self.begin + self.STEPS:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            ka = self.prof.key_averages()
            tables = [f"rank {self.rank}, steps {self.begin}..{step - 1}"]
            for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
                try:
                    tables.append(f"\n== sorted by {key}\n" + ka.table(sort_by=key, row_limit=40, max_name_column_width=80))
                except Exception as e:  # noqa: BLE001 - column names differ across torch versions
                    tables.append(f"\n== {key}: {e}")
            Path(self.dir).mkdir(parents=True, exist_ok=True)
            with atomic_file(Path(self.dir) / f"profile_rank{self.rank}.txt") as fh:
                fh.write("\n".join(tables))
            self.prof, self.dir = None, None


class StepTimer:
    """Per-step wall time (synchronized on GPUs) and global token counts, for throughput figures."""

    def __init__(self, device, world: int):
        self.device, self.world, self.seconds, self.tokens = device, world, [], []
        self._t = None
        if str(device).startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

    def _sync(self):
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self._t = time.perf_counter()

    def stop(self, local_tokens: int):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t)
        t = torch.tensor([float(local_tokens)], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        self.tokens.append(int(t.item()))

    def summary(self) -> dict:
        """Throughput over steps after the first (warm-up), and the peak GPU memory of any rank."""
        peak = 0.0
        if str(self.device).startswith("cuda"):
            m = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2 ** 30], device=self.device)
            if self.world > 1:
                torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX)
            peak = float(m)
        secs, toks = self.seconds[1:] or self.seconds, self.tokens[1:] or self.tokens
        return {"step_seconds": self.seconds, "step_tokens": self.tokens,
                "tokens_per_s": sum(toks) / max(sum(secs), 1e-9), "peak_mem_gib_max_rank": peak}


# --------------------------------------------------------------------------------------------
# non-DP


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_nondp(model_ref: str, data: str, out: Path, cfg: TrainConfig, private_dir=None) -> dict:
    """Ordinary fine-tuning. One process: plain AdamW. Several (torchrun): DeepSpeed ZeRO-2, each
    rank taking its share of every global batch; rank 0 writes the artifact (statistics go to
    `private_dir`, a private-zone directory: on private data they are non-private functions of it)."""
    from tqdm import tqdm

    from privcode import ledger, zone
    from privcode.models import default_device, load_tokenizer

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # same seed on every rank: all ranks agree on the batch order
    world = world_size()
    device = default_device()
    tok = load_tokenizer(model_ref)
    rows, data_stats = load_rows(data, tok, cfg)
    lengths = [len(r["input_ids"]) for r in rows]
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(rows) / cfg.batch_size))
    set_attention_backends(cfg, device)
    model = build_lora_model(model_ref, cfg, device)
    model.train()
    before = lora_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = fused_kwargs(trainable) if world == 1 else {}  # under DeepSpeed, ZeRO drives the optimizer
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    if cfg.fast:
        from privcode.dp.fastloss import per_record_loss as loss_impl
    else:
        loss_impl = per_record_loss
    engine, rank = None, 0
    n_micro = max(1, math.ceil(math.ceil(cfg.batch_size / world) / cfg.micro_batch_size))
    if world > 1:
        engine, rank = _deepspeed_engine(RecordLoss(model, loss_impl), opt, cfg, n_micro, device)
    order: list[int] = []
    losses, t0 = [], time.time()
    timer = StepTimer(device, world)
    for _ in tqdm(range(steps), desc="finetune", unit="step", disable=rank != 0):
        timer.start()
        if len(order) < cfg.batch_size:
            perm = list(range(len(rows)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        # this rank's share, token-balanced; under DeepSpeed at most its n_micro micro-batches
        mine = balanced_split(idx, lengths, world, n_micro * cfg.micro_batch_size if engine else None)[rank]
        if engine is None:
            micro = micro_batches(mine, lengths, cfg.micro_batch_size, cfg.micro_batch_tokens)
        else:  # DeepSpeed fixes the micro-batch size and count
            micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
        if engine is not None:  # every rank runs the same number of micro-steps (ZeRO reduces each one)
            micro += [[]] * (n_micro - len(micro))
        total = 0.0
        for mb in micro:
            batch = collate([rows[k] for k in (mb or idx[:1])], tok.pad_token_id, device)
            weight = 1.0 if mb else 0.0  # a padding micro-step contributes a zero gradient
            if engine is None:
                loss = loss_impl(model, batch).sum() / len(idx)
                loss.backward()
            else:  # DeepSpeed averages over ranks: each rank's sum is scaled by world / |batch|
                loss = engine(batch).sum() * (weight * world / len(idx))
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
        timer.stop(sum(len(rows[k]["input_ids"]) for k in mine))
    elapsed = time.time() - t0
    stats = {"mode": "non-dp", **data_stats, **timer.summary(), "steps": steps, "losses": losses, "seconds": elapsed,
             "world_size": world, "lora_max_abs_delta": max_lora_delta(before, model), "config": asdict(cfg),
             "base_model": model_ref}
    if rank == 0:
        with atomic_dir(out) as tmp:
            save_release_adapter(model, tok, tmp)
            # reading raw private data without DP composes to ε = inf through the data's own ledger
            ledger.derive(tmp, stage="finetune", parents=ledger.model_parents(model_ref) + [str(Path(data).parent)])
        priv = Path(private_dir) if private_dir else zone.run_dir(out)
        write_json(zone.mkdir(priv) / "train_stats.json", stats, private=True)
    if engine is not None:
        torch.distributed.barrier()
    return stats


class RecordLoss(torch.nn.Module):
    """The per-record loss as the module DeepSpeed runs. DeepSpeed's contract is `loss = engine(...)`:
    its forward arms the backward prologue on the output (ZeRO's accumulation-boundary flag and
    reduction bookkeeping). The fast loss calls the decoder, not the model, so run on the engine's
    submodules it skipped that forward; inside this module it does not."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _deepspeed_engine(model, opt, cfg: TrainConfig, n_micro: int, device):
    try:
        import deepspeed
    except ImportError as e:
        raise PrivcodeError("multi-GPU fine-tuning needs DeepSpeed: pip install 'privcode[gpu]'") from e
    from privcode.dp.zero import init_group

    init_group(device)
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
    ap.add_argument("--private-dir", type=Path, default=None,
                    help="private-zone directory for statistics, checkpoints and the re-train guard "
                         "(default: the output's path under $PRIVCODE_ZONE, ./private)")
    a = ap.parse_args(argv)
    try:
        params = json.loads(a.params)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"--params is not valid JSON: {e.msg}") from None
    cfg = TrainConfig.from_dict(params)
    (train_dp if dp else train_nondp)(a.model, a.data, a.out, cfg, private_dir=a.private_dir)
