"""What one step of an ordinary (non-DP) fine-tune does, for privcode.train's loop (`privcode finetune`).

    run = PlainStep(cfg)     # the same calls as privcode.dp.step.DPStep
    run.begin(device, data); steps = run.plan(rows); model = run.build(model_ref, device)
    start, losses = run.attach(model, rows, tok, device)
    work, tokens = run.batch(step); loss = run.step(step, work)

One process: AdamW over shuffled batches of `batch_size` records (the same seed on every rank: all
agree on the order). Several (torchrun): DeepSpeed ZeRO-2, each rank taking its token-balanced share
of every global batch in a fixed number of micro-batches. Its output reads raw data without DP: on
private data, privacy.json says ε = inf (ledger.derive composes it through the data's own ledger).
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

from privcode import ledger
from privcode.dp.engine import fused_kwargs, per_record_loss
from privcode.dp.sampling import balanced_split, micro_batches
from privcode.errors import PrivcodeError
from privcode.lora import build_lora_model
from privcode.rows import collate


class PlainStep:
    """Non-DP steps of one run."""

    mode, desc = "non-dp", "finetune"
    privsa = False

    def __init__(self, cfg):
        self.cfg, self.rank, self.engine, self.postfix = cfg, 0, None, {}
        self.world = int(os.environ.get("WORLD_SIZE", "1"))

    def begin(self, device, data) -> None:
        torch.manual_seed(self.cfg.seed)
        self.rng = random.Random(self.cfg.seed)  # same seed on every rank: all ranks agree on the batch order

    def plan(self, rows) -> int:
        c = self.cfg
        return c.steps or max(1, math.ceil(c.epochs * len(rows) / c.batch_size))

    def build(self, model_ref, device):
        return build_lora_model(model_ref, self.cfg, device)

    def attach(self, model, rows, tok, device) -> tuple[int, list]:
        c = self.cfg
        self.model, self.rows, self.tok, self.device = model, rows, tok, device
        self.lengths = [len(r["input_ids"]) for r in rows]
        trainable = [p for p in model.parameters() if p.requires_grad]
        fused = fused_kwargs(trainable) if self.world == 1 else {}  # under DeepSpeed, ZeRO drives the optimizer
        self.opt = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=c.weight_decay, **fused)
        if c.fast:
            from privcode.dp.fastloss import per_record_loss as loss
        else:
            loss = per_record_loss
        self.loss = loss
        self.n_micro = max(1, math.ceil(math.ceil(c.batch_size / self.world) / c.micro_batch_size))
        if self.world > 1:
            self.engine, self.rank = deepspeed_engine(RecordLoss(model, loss), self.opt, c, self.n_micro, device)
        self.order: list[int] = []
        return 0, []

    def batch(self, step: int) -> tuple[tuple, int]:
        """This rank's share of the next `batch_size` records as collated micro-batches (with a weight:
        0 for a padding micro-step under DeepSpeed), the global batch's size, and the share's tokens."""
        c, B = self.cfg, self.cfg.batch_size
        if len(self.order) < B:
            perm = list(range(len(self.rows)))
            self.rng.shuffle(perm)
            self.order += perm
        idx, self.order = self.order[:B], self.order[B:]
        # this rank's share, token-balanced; under DeepSpeed at most its n_micro micro-batches
        cap = self.n_micro * c.micro_batch_size if self.engine else None
        mine = balanced_split(idx, self.lengths, self.world, cap)[self.rank]
        if self.engine is None:
            micro = micro_batches(mine, self.lengths, c.micro_batch_size, c.micro_batch_tokens)
        else:  # DeepSpeed fixes the micro-batch size and count; every rank runs n_micro micro-steps
            micro = [mine[i:i + c.micro_batch_size] for i in range(0, len(mine), c.micro_batch_size)]
            micro += [[]] * (self.n_micro - len(micro))
        batches = [(collate([self.rows[k] for k in (mb or idx[:1])], self.tok.pad_token_id, self.device),
                    1.0 if mb else 0.0) for mb in micro]  # a padding micro-step contributes a zero gradient
        return (batches, len(idx)), sum(self.lengths[k] for k in mine)

    def step(self, step: int, work: tuple) -> float:
        """One optimizer step: the sum of per-record losses / records; the global batch's loss.
        The loss is summed on the device and read once, after the update is queued (as DPSGD.step):
        a host read per micro-batch would idle the GPU between micro-batches."""
        batches, n = work
        total = None
        for batch, weight in batches:
            if self.engine is None:
                loss = self.loss(self.model, batch).sum() / n
                loss.backward()
            else:  # DeepSpeed averages over ranks: each rank's sum is scaled by world / |batch|
                loss = self.engine(batch).sum() * (weight * self.world / n)
                self.engine.backward(loss, scale_wrt_gas=False)
                self.engine.step()  # steps the optimizer only at the accumulation boundary
            part = loss.detach().float() / (self.world if self.engine is not None else 1)
            total = part if total is None else total + part
        if self.engine is None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:  # log the global batch loss, not this rank's share
            total = total.reshape(1).clone()
            torch.distributed.all_reduce(total)
        return float(total)

    def checkpoint(self, done: int, losses: list) -> None:
        """Non-DP runs are not resumable (checkpoint_every is a DP option)."""

    def summary(self, stats: dict) -> dict:
        return {}

    def release(self, tmp: Path, model_ref, data) -> dict:
        # reading raw private data without DP composes to ε = inf through the data's own ledger
        return ledger.derive(tmp, stage="finetune", parents=ledger.model_parents(model_ref) + [str(Path(data).parent)])

    def private_stats(self, rec: dict) -> dict:
        return {}

    def finish(self, rec: dict, out: Path, seconds: float) -> None:
        pass

    def close(self) -> None:
        if self.engine is not None:
            torch.distributed.barrier()


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


def deepspeed_engine(model, opt, cfg, n_micro: int, device):
    """(DeepSpeed ZeRO-2 engine around `model` and `opt`, this process's rank)."""
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
