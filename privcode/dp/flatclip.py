"""Flat per-record clipping for Opacus's DPOptimizer / DistributedDPOptimizer (the fast DP path).

`fast_dp_optimizer(opt)` makes an Opacus DPOptimizer clip and accumulate over one flat
[records, params] tensor (one norm, one matrix-vector product) and draw the noise in one call,
instead of a few kernels per parameter tensor (a LoRA model has hundreds of them).

`accelerate_dpsgd(dp)` switches an engine.DPSGD to hook-free per-record gradients
(privcode.dp.leanlora.LoRAGradSample) and to flat clipping.
"""
from __future__ import annotations

import torch

from privcode.dp.leanlora import LoRAGradSample, lean_trainables, unwrap


# --------------------------------------------------------------------------------------------
# flat clipping for Opacus DPOptimizer / DistributedDPOptimizer


class _FlatClipMixin:
    """clip_and_accumulate / add_noise / reduce_gradients over one flat buffer. Same results as
    Opacus's per-parameter loops: per-record norm = √Σ_p ‖g_p‖², factor min(1, C/(norm+1e-6)),
    summed clipped gradient, N(0, σ²C²) noise on each coordinate from privcode.dp.noise.gaussian
    over the same flat vector as the reference path (rank 0 only when distributed)."""

    _flat_summed = None
    _flat_grad = None

    def _flat_params(self):
        ps = self.params
        return ps, [p.numel() for p in ps]

    def clip_and_accumulate(self):
        from opacus.optimizers.optimizer import (
            _check_processed_flag,
            _mark_as_processed,
        )

        ps, sizes = self._flat_params()
        gs = [self._get_flat_grad_sample(p) for p in ps]
        for p in ps:
            _check_processed_flag(p.grad_sample)
        n = gs[0].shape[0]
        dtype = ps[0].dtype
        if self._flat_summed is None:
            self._flat_summed = torch.zeros(sum(sizes), dtype=dtype, device=ps[0].device)
        if n:
            flat = torch.cat([g.reshape(n, -1).to(dtype) for g in gs], dim=1)  # [n, P]
            norms = torch.linalg.vector_norm(flat, 2, dim=1)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            self._flat_summed.addmv_(flat.t(), factor)
            del flat
        for p, v in zip(ps, torch.split(self._flat_summed, sizes)):
            p.summed_grad = v.view_as(p)
            _mark_as_processed(p.grad_sample)

    def add_noise(self):
        from opacus.optimizers.optimizer import (
            _check_processed_flag,
            _mark_as_processed,
        )

        from privcode.dp.noise import gaussian

        if self._flat_summed is None:
            return super().add_noise()
        ps, sizes = self._flat_params()
        for p in ps:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        flat = self._flat_summed.clone()
        if std > 0 and getattr(self, "rank", 0) == 0:
            flat.add_(gaussian(flat.numel(), std, self.generator, flat.device, flat.dtype))
        self._flat_grad = flat
        for p, v in zip(ps, torch.split(flat, sizes)):
            p.grad = v.view_as(p)
            _mark_as_processed(p.summed_grad)

    def reduce_gradients(self):  # DistributedDPOptimizer: one all-reduce instead of one per tensor
        if self._flat_grad is None:
            return super().reduce_gradients()
        torch.distributed.all_reduce(self._flat_grad, op=torch.distributed.ReduceOp.SUM)
        if self.loss_reduction == "mean":
            self._flat_grad /= self.world_size

    def zero_grad(self, set_to_none: bool = False):
        super().zero_grad(set_to_none)
        if not self._is_last_step_skipped:
            self._flat_summed = None
            self._flat_grad = None


_FAST_CLASSES: dict = {}


def fast_optimizer_class(base):
    """`base` (DPOptimizer or DistributedDPOptimizer) with flat clipping and noise."""
    if issubclass(base, _FlatClipMixin):
        return base
    if base not in _FAST_CLASSES:
        _FAST_CLASSES[base] = type(f"Flat{base.__name__}", (_FlatClipMixin, base), {})
    return _FAST_CLASSES[base]


def fast_dp_optimizer(opt):
    """Switch an existing Opacus DP optimizer to flat clipping in place; returns it."""
    opt.__class__ = fast_optimizer_class(type(opt))
    return opt


def accelerate_dpsgd(dp) -> bool:
    """Make an engine.DPSGD fast in place: flat clipping/noise in its optimizer and, when the
    model's trainable parameters are all lean LoRA factors, hook-free per-record gradients
    (LoRAGradSample instead of GradSampleModule). Returns whether the hooks were replaced."""
    fast_dp_optimizer(dp.opt)
    if isinstance(dp.gsm, LoRAGradSample):
        return True
    m = unwrap(dp.gsm)
    if not lean_trainables(m)[0]:
        return False
    dp.gsm._close()
    dp.gsm = LoRAGradSample(m)
    return True
