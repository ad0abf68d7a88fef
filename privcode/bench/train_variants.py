"""The training step of each `privcode bench train` variant: the model, optimizer and step(k) closure.

    import torch
    from privcode.bench.shapes import get_shape
    from privcode.bench.train_variants import Bench
    bench = Bench(get_shape("small"), "cpu", torch.float32)
    step, cleanup = bench.variant("privcode-dp")     # step(k): one optimizer step over k micro-batches
    loss = step(); cleanup()                         # cleanup unloads the adapters from bench.base

The variants are listed in privcode.bench.train_bench (the CLI that times them).
"""
from __future__ import annotations

import functools

PEERS = ["hf-peft", "opacus-hooks", "opacus-ghost"]
STOCK = ["privcode-nondp-stock", "privcode-dp-stock"]
FAST = ["privcode-nondp", "privcode-nondp-bmm", "privcode-dp-hooks", "privcode-dp", "privcode-dp-privsa",
        "privcode-dp-privsa-eager"]
NONDP = {"privcode-nondp": None, "privcode-nondp-mm": "mm", "privcode-nondp-bmm": "bmm"}  # lean_lora nondp_grad
ALL = PEERS + STOCK + FAST
ACCUM_VARIANTS = ["privcode-dp", "privcode-dp-privsa", "privcode-dp-privsa-eager"]


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _mem(device, what="alloc"):
    import torch

    if not str(device).startswith("cuda"):
        return None
    f = torch.cuda.max_memory_allocated if what == "peak" else torch.cuda.memory_allocated
    return round(f(device) / 2**30, 3)


class Bench:
    def __init__(self, shape, device, dtype, lam: float = 0.5):
        import torch

        from privcode.bench.shapes import (
            LORA_ALPHA,
            LORA_R,
            LORA_TARGETS,
            build_model,
            train_batch,
        )

        self.shape, self.device, self.dtype, self.lam = shape, device, dtype, lam
        self.base = build_model(shape, device, dtype)
        self.base.train()
        self.batches = [train_batch(shape, device, seed=s) for s in range(2)]
        self.lora = {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS}
        self._k = 0
        self.torch = torch

    def next_batch(self):
        self._k += 1
        return self.batches[self._k % len(self.batches)]

    # ---- models
    def peer_peft(self):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.lora["r"], lora_alpha=self.lora["alpha"], lora_dropout=0.0,
                         target_modules=self.lora["targets"], bias="none", task_type="CAUSAL_LM")
        return get_peft_model(self.base, cfg)

    def privcode_peft(self, lean: bool, nondp_grad: str | None = None):
        from privcode.dp import leanlora
        from privcode.train import TrainConfig, build_lora_model

        cfg = TrainConfig(lora_r=self.lora["r"], lora_alpha=self.lora["alpha"], lora_targets=self.lora["targets"],
                          dtype={"bfloat16": "bfloat16", "float32": "float32"}[str(self.dtype).split(".")[-1]],
                          max_length=self.shape.seq_len, micro_batch_size=self.shape.micro_batch)
        model = build_lora_model(self.base, cfg, self.device)
        if lean:
            leanlora.lean_lora(model, nondp_grad=nondp_grad)
        model.train()
        return model

    def release(self, pm):
        self.base = pm.unload()
        self.base.train()

    def _opacus_step(self, gsm, opt, pm, backward):
        """(step, cleanup) of an Opacus peer: per-record CE, `backward(loss)`, one DP step per k."""
        from privcode.dp import engine

        B = self.shape.micro_batch

        def step(k=1):
            tot = 0.0
            for j in range(k):
                loss = engine.per_record_loss(gsm, self.next_batch())
                backward(loss)
                tot += loss.detach().sum()
                opt.signal_skip_step(do_skip=j < k - 1)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return tot / (k * B)

        def cleanup():
            gsm._close()
            self.release(pm)
        return step, cleanup

    # ---- variants: each returns (step(k) -> loss, cleanup, model)
    def variant(self, name):
        from privcode.dp import engine, fastloss, flatclip

        B = self.shape.micro_batch
        if name == "hf-peft":
            pm = self.peer_peft()
            opt = _adamw([p for p in pm.parameters() if p.requires_grad])

            def step(k=1):
                tot = 0.0
                for _ in range(k):
                    b = self.next_batch()
                    loss = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                    (loss / k).backward()
                    tot += loss.detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return tot / k
            return step, lambda: self.release(pm)

        if name == "opacus-hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            pm = self.peer_peft()
            gsm = GradSampleModule(pm, batch_first=True, loss_reduction="sum")
            base_opt = _adamw([p for p in gsm.parameters() if p.requires_grad])
            opt = DPOptimizer(base_opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=256,
                              loss_reduction="sum")

            return self._opacus_step(gsm, opt, pm, lambda loss: loss.sum().backward())

        if name == "opacus-ghost":
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import (
                DPTensorFastGradientClipping,
            )

            pm = self.peer_peft()
            gsm = GradSampleModuleFastGradientClipping(pm, batch_first=True, loss_reduction="sum",
                                                       max_grad_norm=1.0, use_ghost_clipping=True)
            base_opt = _adamw([p for p in gsm.parameters() if p.requires_grad])
            opt = DPOptimizerFastGradientClipping(base_opt, noise_multiplier=1.0, max_grad_norm=1.0,
                                                  expected_batch_size=256, loss_reduction="sum")

            return self._opacus_step(gsm, opt, pm,
                                     lambda loss: DPTensorFastGradientClipping(gsm, opt, loss, "sum").backward())

        if name in NONDP or name == "privcode-nondp-stock":
            fast = name != "privcode-nondp-stock"
            model = self.privcode_peft(lean=fast, nondp_grad=NONDP.get(name))
            self.grad_mode = sorted({m.grad_mode() for m in model.modules() if hasattr(m, "grad_mode")})
            loss_fn = fastloss.per_record_loss if fast else engine.per_record_loss
            opt = _adamw([p for p in model.parameters() if p.requires_grad])

            def step(k=1):  # as privcode.train.train_nondp: sum of per-record losses / records
                tot = 0.0
                for _ in range(k):
                    loss = loss_fn(model, self.next_batch()).sum() / (k * B)
                    loss.backward()
                    tot += loss.detach()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return tot
            return step, lambda: self.release(model)

        if name in ("privcode-dp", "privcode-dp-privsa", "privcode-dp-privsa-eager", "privcode-dp-stock",
                    "privcode-dp-hooks"):
            fast = name != "privcode-dp-stock"
            lam = self.lam if name.startswith("privcode-dp-privsa") else 0.0
            compile_privsa = name == "privcode-dp-privsa" and str(self.device).startswith("cuda")
            model = self.privcode_peft(lean=fast)
            N = 10_000
            dp = engine.DPSGD(model, n_records=N, sample_rate=256 / N, noise_multiplier=1.0, max_grad_norm=1.0,
                              expected_batch_size=256, lr=5e-4, weight_decay=0.0, steps=10_000, seed=0,
                              device=self.device)
            if name == "privcode-dp-hooks":
                flatclip.fast_dp_optimizer(dp.opt)
            elif fast:
                flatclip.accelerate_dpsgd(dp)
            loss_impl = (functools.partial(fastloss.per_record_loss, compile_privsa=compile_privsa) if fast
                         else engine.per_record_loss)
            self.compile_probe = lambda: fastloss.compile_status(model)  # did torch.compile take?

            def step(k=1):
                total, count = dp.step([self.next_batch() for _ in range(k)],
                                       lambda m, b: loss_impl(m, b, lam=lam, peft_model=model))
                return total / max(count, 1)

            def cleanup():
                dp.gsm._close()
                self.release(model)
            return step, cleanup
        raise SystemExit(f"unknown variant '{name}' (choose from {ALL})")


def _adamw(params):
    """AdamW as every variant uses it: fused on CUDA (HF Trainer's default optimizer since torch 2.8)."""
    import torch

    from privcode.dp.engine import fused_kwargs

    return torch.optim.AdamW(params, lr=5e-4, **fused_kwargs(params))

