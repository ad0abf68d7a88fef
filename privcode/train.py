"""One training loop for DP (stage 1, DPFT) and non-DP (stage 6, NonDPFT) LoRA fine-tuning.

    privcode dp-finetune --model results/models/smollm2/base --data private/data/private/records.jsonl \
        --out results/dp/smollm2/privsa/eps4/adapter --params '{"epsilon": 4, "delta": 1e-5, "steps": 4}'
    privcode finetune --model results/models/smollm2/base \
        --data results/synth/smollm2/privsa/eps4/roundtrip/kept.jsonl \
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
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privcode.dp.engine import per_record_loss
from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, write_json
from privcode.lora import RELEASE_FILES, build_lora_model, lora_state, max_lora_delta, save_release_adapter
from privcode.lora import set_attention_backends
from privcode.params import Params, parse_params
from privcode.rows import collate, load_rows

# the training API: the loop, its options, and the pieces its steps are made of
__all__ = ["TrainConfig", "train", "train_dp", "train_nondp", "main", "load_rows", "collate", "build_lora_model",
           "set_attention_backends", "per_record_loss", "RELEASE_FILES"]
log = logging.getLogger(__name__)


@dataclass
class TrainConfig(Params):
    """Hyper-parameters of one fine-tuning run: the config's dp_finetune / finetune sections, whose
    keys a config leaves out take these defaults (the schema writes none of its own)."""
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
    fast: bool = False                # dp.fastloss + dp.leanlora + dp.flatclip: chunked head loss, lean LoRA, hook-free
                                      # per-record gradients (the GPU speed path; same math, fp32-exact)
    # --- PrivSA (DP only): loss_i = CE_i + λ(t)·KL(p_base ‖ p_dp) over record i's syntax tokens ---
    privsa_lambda_max: float = 0.0    # 0 turns PrivSA off (plain DP-SGD, the DPFT baseline)
    privsa_lambda_min: float = 0.0
    privsa_alpha: float = 0.05        # decay rate of λ per optimizer step
    privsa_interval: int = 1          # λ is held constant over blocks of this many steps
    cudnn_attention: bool = False     # cuDNN SDPA plans every new batch shape (stalls: docs/scaling.md)
    privsa_compile: bool = False      # fast on CUDA: torch.compile the PrivSA teacher + KL (docs/scaling.md)
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


def train(model_ref: str, data: str, out: Path, cfg: TrainConfig, *, dp: bool, private_dir=None) -> dict:
    """Fine-tune LoRA on `model_ref` with the records of `data` into `out` (the release side: adapter
    weights, config, tokenizer, privacy.json); statistics, checkpoints and the re-train guard go to
    `private_dir` (private zone; default privcode.zone.run_dir(out)). What a step does is the DP or
    the plain step's (privcode.dp.step.DPStep, privcode.plain.PlainStep); the loop is this one."""
    from tqdm import tqdm

    from privcode import zone
    from privcode.dp.step import DPStep
    from privcode.models import default_device, load_tokenizer
    from privcode.plain import PlainStep
    from privcode.steptimer import StepProfiler, StepTimer

    out = Path(out)
    priv = Path(private_dir) if private_dir else zone.run_dir(out)
    run = DPStep(cfg, out, priv) if dp else PlainStep(cfg)  # refusals before anything is loaded
    device = default_device()
    run.begin(device, data)
    tok = load_tokenizer(model_ref)
    rows, data_stats = load_rows(data, tok, cfg, syntax=run.privsa)
    steps = run.plan(rows)
    set_attention_backends(cfg, device)
    model = run.build(model_ref, device)
    model.train()
    before = lora_state(model)
    start, losses = run.attach(model, rows, tok, device)

    timer, prof = StepTimer(device, run.world), StepProfiler(run.rank, start)
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=run.desc, unit="step", initial=start, total=steps, disable=run.rank != 0)
    for step in bar:
        prof.at(step)
        work, tokens = run.batch(step)
        timer.start()
        losses.append(run.step(step, work))
        timer.stop(tokens)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **run.postfix)  # private-zone log
        run.checkpoint(step + 1, losses)
    prof.at(steps)
    elapsed = time.time() - t0

    stats = {"mode": run.mode, **data_stats, **timer.summary(), "steps": steps, "losses": losses, "seconds": elapsed,
             "world_size": run.world, "lora_max_abs_delta": max_lora_delta(before, model), "config": asdict(cfg),
             "base_model": model_ref}
    stats.update(run.summary(stats))
    if run.rank == 0:
        with atomic_dir(out) as tmp:
            save_release_adapter(model, tok, tmp)
            rec = run.release(tmp, model_ref, data)
        write_json(zone.mkdir(priv) / "train_stats.json", {**stats, **run.private_stats(rec)}, private=True)
        run.finish(rec, out, elapsed)
    run.close()
    return stats


def train_dp(model_ref: str, data: str, out: Path, cfg: TrainConfig, private_dir=None) -> dict:
    """DP-SGD (stage 1, DPFT): `train` with the DP step."""
    return train(model_ref, data, out, cfg, dp=True, private_dir=private_dir)


def train_nondp(model_ref: str, data: str, out: Path, cfg: TrainConfig, private_dir=None) -> dict:
    """Ordinary fine-tuning (stage 6, NonDPFT): `train` with the plain step. One process: AdamW;
    several (torchrun): DeepSpeed ZeRO-2; rank 0 writes the artifact."""
    return train(model_ref, data, out, cfg, dp=False, private_dir=private_dir)


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
    train(a.model, a.data, a.out, parse_params(a.params, TrainConfig), dp=dp, private_dir=a.private_dir)
