"""DP-SGD under DeepSpeed ZeRO-3 (`dp_finetune.engine: deepspeed`): the frozen base is sharded over
the processes (or kept in CPU memory), the LoRA update is the DDP path's (privcode.dp.engine).

    dp_finetune: {engine: deepspeed, fast: true, zero_offload: cpu}      # a config section
    torchrun --standalone --nproc_per_node 4 -m privcode.cli dp-finetune ... --params '{"engine": "deepspeed", ...}'
    privcode dp-finetune ... --params '{"engine": "deepspeed", "fast": true, "zero_offload": "cpu", ...}'   # one GPU

What DeepSpeed does here, and what it never does:
- ZeRO stage 3 partitions the *frozen base* (ZeRO-Inference: DeepSpeed gets no optimizer). The base
  is built straight into its partitions (transformers' zero.Init path); each layer's weights are
  all-gathered for its forward and backward and freed after; zero_offload: cpu keeps the partitions
  in pinned CPU memory, so a model larger than the GPU trains on one GPU.
- The LoRA factors are injected after partitioning: plain tensors, replicated on every rank, unseen
  by DeepSpeed — no DeepSpeed gradient hook, reduction, clipping, loss scaling or accumulation
  touches them (`check_engine` refuses a model where one could).
- The mechanism is engine.DPSGD's, unchanged: the same global Poisson sample on every rank, each
  rank's length band in micro-batches, per-record LoRA gradients from the hook-free path
  (leanlora.LoRAGradSample), clipped to C over the whole trainable vector and summed, N(0, σ²C²) added
  once on rank 0 (privcode.dp.noise), one all-reduce, ÷ E[B], the optimizer step; the same accountant,
  ledger and privacy.json.
- Lock step: ZeRO-3's gathers are collectives, so every rank runs the same number of micro-batches,
  each through the same modules: a rank with fewer rows runs padding micro-batches (one public row of
  pad tokens) whose per-record gradients are dropped before clipping (engine.DPSGD.step); the PrivSA
  teacher runs on every micro-batch (fastloss.per_record_loss(lockstep=True)); the LM head's weight is
  frozen, so it is gathered once and a full copy kept (fastloss.HEAD_WEIGHT).
Refused before anything loads (`check_config`): the reference path (fast: false, Opacus hooks),
dtype float16 (DeepSpeed's fp16 mode is tied to its loss scaler), privsa_compile (ZeRO-3's hooks
inside a compiled teacher), and `deepspeed` settings beyond placing the frozen partitions.
"""
from __future__ import annotations

import os
import socket

import torch

from privcode.dp import engine, fastloss, flatclip
from privcode.errors import PrivcodeError

# keys of DeepSpeed's zero_optimization section that only place or prefetch the frozen partitions
ZERO_KEYS = ("offload_param", "overlap_comm", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
             "stage3_max_reuse_distance", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold")
REFUSED = {  # DeepSpeed settings a DP run cannot take, and why
    "optimizer": "privcode's DP optimizer steps the LoRA factors; DeepSpeed gets none",
    "scheduler": "privcode's DP optimizer steps the LoRA factors; DeepSpeed gets none",
    "gradient_clipping": "records are clipped one by one (max_grad_norm); DeepSpeed would clip the noisy sum",
    "fp16": "fp16 loss scaling rescales gradients and noise; use dtype bfloat16 or float32",
    "bf16": "the base's precision is the dtype option",
    "gradient_accumulation_steps": "one noisy step per Poisson sample: privcode accumulates its micro-batches",
    "train_batch_size": "the batch is the Poisson sample (batch_size)",
    "train_micro_batch_size_per_gpu": "rows per micro-batch are micro_batch_size / micro_batch_tokens",
    "stage": "ZeRO stage 3 only: what is sharded is the frozen base",
    "offload_optimizer": "DeepSpeed has no optimizer here",
}
ZERO_ENGINE = "_privcode_zero_engine"  # the DeepSpeed engine of a model built here (kept alive on it)


def check_config(cfg) -> None:
    """Refuse a DP configuration the ZeRO-3 engine cannot run with the DDP path's mechanism."""
    where = "--params"
    if not cfg.fast:
        raise PrivcodeError("engine deepspeed takes its per-record gradients from the hook-free path: set fast: true",
                            path=where, field="fast")
    if cfg.dtype == "float16":
        raise PrivcodeError(f"engine deepspeed: {REFUSED['fp16']}", path=where, field="dtype")
    if cfg.privsa_compile:
        raise PrivcodeError("engine deepspeed: the PrivSA teacher runs eagerly (ZeRO-3's parameter hooks)",
                            path=where, field="privsa_compile")
    extra = cfg.deepspeed or {}
    if not isinstance(extra, dict):
        raise PrivcodeError("expected an object (DeepSpeed settings)", path=where, field="deepspeed")
    for k, v in extra.items():
        if k != "zero_optimization":
            raise PrivcodeError(REFUSED.get(k, "not a ZeRO-3 partitioning setting"), path=where, field=f"deepspeed.{k}")
        if not isinstance(v, dict):
            raise PrivcodeError("expected an object", path=where, field="deepspeed.zero_optimization")
        for z in v:
            if z not in ZERO_KEYS:
                why = REFUSED.get(z, f"DP runs take only {', '.join(ZERO_KEYS)}")
                raise PrivcodeError(why, path=where, field=f"deepspeed.zero_optimization.{z}")


def ds_config(cfg) -> dict:
    """DeepSpeed's config: ZeRO stage 3 over the frozen base, nothing that touches gradients."""
    zero = {"stage": 3}
    if cfg.zero_offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    zero.update((cfg.deepspeed or {}).get("zero_optimization", {}))
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": zero, "bf16": {"enabled": cfg.dtype == "bfloat16"}, "fp16": {"enabled": False},
            "steps_per_print": 10 ** 9}


def init_group(device) -> None:
    """DeepSpeed's communication on privcode's process group (engine.init_distributed: torchrun's
    processes); a process started without torchrun gets a group of one."""
    import deepspeed

    engine.init_distributed()
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    if not str(device).startswith("cuda"):  # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on
        # first use (~30 s, needs a compiler) and serves its inference all-reduce only, which nothing here calls
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False)


def build_lora_model(model_ref: str, cfg, device):
    """The base built into ZeRO-3 partitions and wrapped by DeepSpeed, then LoRA injected outside it
    (privcode.lora.build_lora_model with that base); the head's frozen weight gathered once."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from privcode import lora, models

    init_group(device)
    ds = ds_config(cfg)
    with torch.random.fork_rng(devices=[]):  # loading draws no LoRA-init randomness, as in the DDP path
        hf = HfDeepSpeedConfig(ds)  # while it lives, from_pretrained builds every weight into its partition
        try:
            base = models.load_model(model_ref, dtype=cfg.dtype)
        finally:
            del hf
        ds_engine = deepspeed.initialize(model=base, config=ds)[0]
    model = lora.build_lora_model(base, cfg, device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(device)
    head = model.get_output_embeddings()
    with deepspeed.zero.GatheredParameters([head.weight]):
        head.__dict__[fastloss.HEAD_WEIGHT] = head.weight.detach().to(device, copy=True)
    model.__dict__[ZERO_ENGINE] = ds_engine
    check_engine(model)
    return model


def check_engine(model) -> None:
    """Refuse a model on which DeepSpeed could touch what the accountant assumes: a trainable
    parameter it manages (its hooks would reduce that gradient), an optimizer, clipping, fp16 loss
    scaling or accumulation of its own."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    ds_engine = model.__dict__.get(ZERO_ENGINE)
    managed = [n for n, p in model.named_parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if managed:
        raise PrivcodeError(f"DeepSpeed manages {len(managed)} trainable parameter(s) ({managed[0]}, ...): LoRA must "
                            "be injected after ZeRO-3 partitions the base, so that its gradients stay privcode's")
    if ds_engine is None or not isinstance(ds_engine.optimizer, DeepSpeedZeRoOffload):
        raise PrivcodeError("the DeepSpeed engine must be ZeRO-3 parameter partitioning without an optimizer")
    if ds_engine.gradient_clipping() or ds_engine.fp16_enabled() or ds_engine.gradient_accumulation_steps() != 1:
        raise PrivcodeError("the DeepSpeed engine clips, loss-scales or accumulates gradients: refused for DP")


class ZeroDPSGD(engine.DPSGD):
    """engine.DPSGD around a model from `build_lora_model`: hook-free per-record gradients and flat
    clipping (flatclip.accelerate_dpsgd), every rank in lock step (module docstring).

    `pad_token`: the (public) token of the padding micro-batch; `syntax`: whether rows carry PrivSA masks."""

    def __init__(self, peft_model, *, pad_token: int, syntax: bool = False, **kw):
        from privcode.rows import collate

        super().__init__(peft_model, **kw)
        if not flatclip.accelerate_dpsgd(self):
            raise PrivcodeError("engine deepspeed needs every trainable parameter to be a lean LoRA factor")
        self.offload = peft_model.__dict__[ZERO_ENGINE].optimizer  # DeepSpeedZeRoOffload: the gather hooks
        row = {"input_ids": [pad_token, pad_token], "labels": [engine.IGNORE, pad_token]}
        if syntax:
            row["syntax"] = [False, True]
        self.pad = {**collate([row], pad_token, self.device), "pad": True}

    def step(self, batches, loss_fn) -> tuple[float, int]:
        batches = [b for b in batches if b is not None]
        n = torch.tensor([max(1, len(batches))], device=self.device)
        if self.world > 1:  # every rank runs as many micro-batches as the busiest one
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)

        def lockstep(model, batch):
            self.offload.release_backward_leftovers()
            self.offload.get_param_coordinator().reset_step()  # one traced fetch order per micro-batch
            return loss_fn(model, batch)

        try:
            return super().step(batches + [self.pad] * (int(n) - len(batches)), lockstep)
        finally:
            self.offload.release_backward_leftovers()
