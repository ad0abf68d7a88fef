"""Lean LoRA layers and per-record LoRA gradients without module hooks (the fast DP path).

`lean_lora(peft_model)` swaps PEFT's LoRA forward (which upcasts each layer input to fp32 and
materializes fp32 [tokens, out] intermediates) for one that computes in the activations'
dtype with fp32 master weights: `x·Aᵀ` then `result + s·h·Bᵀ` in one addmm. The factors stay
nn.Linear subclasses with the same parameters and state-dict keys; an Opacus grad sampler is
registered for them that returns fp32 per-sample gradients.

Outside per-record mode a factor's gradient Σ_t g_t x_tᵀ is formed as `lean_lora(model, nondp_grad=)`
says (default NONDP_GRAD): "mm", one matrix product over all tokens of the micro-batch, or "bmm",
one per record (the DP path's batched GEMM) summed over the records: the same sum, another order.

`LoRAGradSample(model)` replaces Opacus's GradSampleModule for such a model: each LoRA factor's
own backward (one autograd node) writes its per-record gradients to `weight.grad_sample`, with
no module hooks; `accelerate_dpsgd(dp)` switches an engine.DPSGD to it and to flat clipping.

`unwrap` peels Opacus / DDP / DeepSpeed wrappers; `adapters_disabled` switches the LoRA layers off by
flipping their flags (the PrivSA teacher).
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# model plumbing


def unwrap(model):
    """Peel Opacus / DDP / DeepSpeed wrappers down to the PEFT (or plain HF) model."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "_module") and isinstance(model._module, nn.Module):  # Opacus
            model = model._module
        elif type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine") and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


@contextmanager
def adapters_disabled(peft_model):
    """PEFT's `disable_adapter()` for a plain LoRA model, without its per-call cost: every LoRA
    layer computes its base layer only, as there. PEFT's context manager first computes every
    layer's status (`get_model_status`) and then walks all modules twice — on a 1.5B model
    (196 LoRA layers) that is tens of milliseconds of CPU per call, with the GPU idle (the PrivSA
    teacher runs it every micro-batch; docs/performance.md). Here the LoRA layers are found once
    (cached on the model; LoRA is injected once per run) and only their `_disable_adapters`
    flags flip, restored on exit. requires_grad is left alone: the teacher runs under no_grad.
    Anything but plain LoRA layers (prompt learning, modules_to_save, other tuners) goes
    through PEFT's own context manager."""
    pm = unwrap(peft_model)
    layers = pm.__dict__.get("_privcode_lora_layers")
    if layers is None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        cfg = getattr(pm, "peft_config", {}).get(getattr(pm, "active_adapter", None))
        mods = list(pm.modules())
        plain = cfg is not None and not cfg.is_prompt_learning and not getattr(cfg, "is_adaption_prompt", False) \
            and all(isinstance(m, LoraLayer) for m in mods if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)))
        layers = [m for m in mods if isinstance(m, LoraLayer)] if plain else []
        pm.__dict__["_privcode_lora_layers"] = layers
    if not layers:
        with pm.disable_adapter():
            yield
        return
    prev = [m._disable_adapters for m in layers]
    for m in layers:  # a plain attribute: skip nn.Module.__setattr__'s parameter/module checks
        m.__dict__["_disable_adapters"] = True
    try:
        yield
    finally:
        for m, was in zip(layers, prev):
            m.__dict__["_disable_adapters"] = was


# --------------------------------------------------------------------------------------------
# lean LoRA


FUSE_LORA_PAIRS = True  # one autograd node per LoRA layer (False: one per factor; same math, for comparison)
NONDP_GRADS = ("mm", "bmm")
NONDP_GRAD = "mm"  # how a summed (non-per-record) factor gradient is formed; see _factor_grad
OUT_DTYPE_OK: dict = {}  # "mm"/"bmm" -> whether torch.<op>(..., out_dtype=float32) works here (probed once)


def _mm_f32(op, a, b):
    """a @ b (op: torch.mm or torch.bmm) with an fp32 result: bf16/fp16 operands on CUDA use the
    out_dtype kernels (fp32 accumulate, fp32 output) where torch has them, else fp32 copies."""
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        if OUT_DTYPE_OK.get(op.__name__, True):
            try:
                r = op(a, b, out_dtype=torch.float32)
                OUT_DTYPE_OK[op.__name__] = True
                return r
            except (TypeError, RuntimeError, NotImplementedError):
                OUT_DTYPE_OK[op.__name__] = False
        return op(a.float(), b.float())
    return op(a, b) if a.dtype == torch.float32 else op(a.float(), b.float())


def _bmm_f32(a, b):
    return _mm_f32(torch.bmm, a, b)


def _factor_grad(g, x, n: int, scale: float, how: str) -> torch.Tensor:
    """scale · Σ_t g_t x_tᵀ over the tokens of a micro-batch of `n` records, in fp32. g: [.., out],
    x: [.., in], both n·T rows. how: "per_record" — [n, out, in], one sum per record (one bmm);
    "mm" — [out, in], one matrix product over all n·T tokens (an output of r rows or columns: few
    tiles, each a loop over n·T); "bmm" — [out, in], the per-record products summed over records
    (n times the tiles, 1/n of the loop each). Padding needs no mask here: the loss reaches no
    padded position, so g is 0 there."""
    go, xi = g.shape[-1], x.shape[-1]
    if how == "mm" or (how == "bmm" and n == 1):
        out = _mm_f32(torch.mm, g.reshape(-1, go).t(), x.reshape(-1, xi))
    elif how in ("bmm", "per_record"):
        out = _bmm_f32(g.reshape(n, -1, go).transpose(1, 2), x.reshape(n, -1, xi))
        if how == "bmm":
            out = out.sum(0)
    else:
        raise ValueError(f"unknown LoRA gradient mode {how!r} (per_record, {', '.join(NONDP_GRADS)})")
    if scale != 1.0:
        out.mul_(scale)
    return out


def _record_axis(how: str, x) -> str:
    """"bmm" needs x's first axis to be the records ([records, T, in]); without one, "mm"."""
    return "mm" if how == "bmm" and x.dim() < 3 else how


def _store_grad_sample(p, gs):
    """Opacus's convention: one [records, ...] tensor per backward, a list when several
    backward passes accumulate before the optimizer consumes them."""
    prev = getattr(p, "grad_sample", None)
    if prev is None:
        p.grad_sample = gs
    elif isinstance(prev, list):
        prev.append(gs)
    else:
        p.grad_sample = [prev, gs]


class _LoRAFn(torch.autograd.Function):
    """out = [add +] scale · x·Wᵀ with W cast to x's dtype. Backward: input gradients, and either
    W's gradient (fp32, formed as `how` says: _factor_grad) or — how = "per_record" — each
    record's gradient stored on W.grad_sample (fp32), with no gradient for W itself."""

    @staticmethod
    def forward(ctx, x, add, weight, scale, how):
        w = weight.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        if add is None:
            out = torch.mm(x2, w.t())
            if scale != 1.0:
                out.mul_(scale)
            out = out.view(*x.shape[:-1], w.shape[0])
        elif add._base is None and add.is_contiguous() and not add.is_leaf:
            # accumulate into the base layer's fresh output (not a view, not a leaf): the GEMM
            # reads and writes it in place instead of first copying it into a new C
            add.view(-1, add.shape[-1]).addmm_(x2, w.t(), alpha=scale)
            ctx.mark_dirty(add)
            out = add
        else:
            out = torch.addmm(add.reshape(-1, add.shape[-1]), x2, w.t(), alpha=scale).view(add.shape)
        ctx.save_for_backward(x, w)
        ctx.scale, ctx.how, ctx.param, ctx.has_add = scale, _record_axis(how, x), weight, add is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        s = ctx.scale
        gx = gadd = gw = None
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = torch.mm(g2, w)
            if s != 1.0:
                gx.mul_(s)
            gx = gx.view(x.shape)
        if ctx.has_add and ctx.needs_input_grad[1]:
            gadd = g
        if ctx.needs_input_grad[2]:
            gw = _factor_grad(g, x, x.shape[0], s, ctx.how).to(ctx.param.dtype)
            if ctx.how == "per_record":
                _store_grad_sample(ctx.param, gw)
                gw = None
        return gx, gadd, gw, None, None


class _LoRAPairFn(torch.autograd.Function):
    """out = add + s·(x·Aᵀ)·Bᵀ for a whole LoRA layer as ONE autograd node — the same operations
    as an A node followed by a B node (_LoRAFn), with half the autograd nodes and Python per
    layer (a DP step with 196 LoRA layers is CPU-bound at short micro-batches, docs/scaling.md).
    Backward: input gradient and each factor's gradient, summed (`.grad`, formed as `how` says) or
    — how = "per_record" — per record on `weight.grad_sample`, fp32."""

    @staticmethod
    def forward(ctx, x, add, wa, wb, scale, how):
        a, b = wa.to(x.dtype), wb.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(x2, a.t())                                      # [tokens, r]
        if add._base is None and add.is_contiguous() and not add.is_leaf:
            add.view(-1, add.shape[-1]).addmm_(h, b.t(), alpha=scale)  # into the base output, as _LoRAFn
            ctx.mark_dirty(add)
            out = add
        else:
            out = torch.addmm(add.reshape(-1, add.shape[-1]), h, b.t(), alpha=scale).view(add.shape)
        ctx.save_for_backward(x, h, a, b)
        ctx.scale, ctx.how, ctx.wa, ctx.wb = scale, _record_axis(how, x), wa, wb
        return out

    @staticmethod
    def backward(ctx, g):
        x, h, a, b = ctx.saved_tensors
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1])
        gh = torch.mm(g2, b)                                         # d out / d h = s·g·B
        if s != 1.0:
            gh.mul_(s)
        gx = torch.mm(gh, a).view(x.shape) if ctx.needs_input_grad[0] else None
        gadd = g if ctx.needs_input_grad[1] else None
        ga = gb = None
        n, per_record = x.shape[0], ctx.how == "per_record"
        if ctx.needs_input_grad[2]:                                  # A: Σ_t gh_t x_tᵀ
            ga = _factor_grad(gh, x, n, 1.0, ctx.how).to(ctx.wa.dtype)
            if per_record:
                _store_grad_sample(ctx.wa, ga)
                ga = None
        if ctx.needs_input_grad[3]:                                  # B: s·Σ_t g_t h_tᵀ
            gb = _factor_grad(g, h, n, s, ctx.how).to(ctx.wb.dtype)
            if per_record:
                _store_grad_sample(ctx.wb, gb)
                gb = None
        return gx, gadd, ga, gb, None, None


class LoRAFactor(nn.Linear):
    """A LoRA factor (A or B) that computes in its input's dtype from fp32 master weights.
    `forward(x, add=None, scale=1.0)` returns `add + scale · x·Wᵀ` (one addmm), as one autograd
    node. With `per_record = True` (set by LoRAGradSample) its backward stores each record's
    gradient on `weight.grad_sample` instead of accumulating `weight.grad`; else `nondp_grad`
    (None: the module's NONDP_GRAD) says how `weight.grad` is formed (_factor_grad)."""

    _lora_scale = 1.0
    per_record = False
    nondp_grad = None

    def grad_mode(self) -> str:
        return "per_record" if self.per_record else (self.nondp_grad or NONDP_GRAD)

    def forward(self, x, add=None, scale: float = 1.0):
        if self._lora_scale != scale:
            self._lora_scale = scale
        return _LoRAFn.apply(x, add, self.weight, float(scale), self.grad_mode())


def _lora_factor_grad_sample(layer, activations, backprops):
    """Per-record gradient of a LoRAFactor: scale · Σ_t g_t x_tᵀ, in fp32."""
    a = activations[0]
    gs = _factor_grad(backprops, a, a.shape[0], layer._lora_scale, "per_record")
    return {layer.weight: gs.to(layer.weight.dtype)}


def _register_opacus() -> None:
    try:
        from opacus.grad_sample import GradSampleModule
        from opacus.grad_sample.utils import register_grad_sampler
    except ImportError:
        return
    if LoRAFactor not in GradSampleModule.GRAD_SAMPLERS:
        register_grad_sampler(LoRAFactor)(_lora_factor_grad_sample)


def _lean_forward(self, x, *args, **kwargs):
    if args or kwargs or self.disable_adapters or self.merged:
        return self._privcode_orig_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        fa, fb = self.lora_A[name], self.lora_B[name]
        if (not FUSE_LORA_PAIRS or fa._forward_hooks or fb._forward_hooks or fa._forward_pre_hooks
                or fb._forward_pre_hooks):
            # module hooks (Opacus's GradSampleModule) must see each factor's call
            result = fb(fa(x), add=result, scale=self.scaling[name])
            continue
        fb._lora_scale = self.scaling[name]
        if fa.per_record != fb.per_record:
            raise RuntimeError("LoRA factors of one layer disagree on per-record mode")
        result = _LoRAPairFn.apply(x, result, fa.weight, fb.weight, float(self.scaling[name]), fa.grad_mode())
    return result


def lean_lora(model, nondp_grad: str | None = None) -> int:
    """Patch every plain LoRA Linear of a PEFT model in place (idempotent). Returns how many
    layers now run the lean forward; layers with dropout, DoRA or other variants are left as
    they are. nondp_grad ("mm" | "bmm"; None: leave as is, NONDP_GRAD by default): how the lean
    factors form their summed gradient outside per-record mode (_factor_grad)."""
    if nondp_grad is not None and nondp_grad not in NONDP_GRADS:
        raise ValueError(f"lean_lora: nondp_grad must be one of {', '.join(NONDP_GRADS)}, not {nondp_grad!r}")
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    _register_opacus()
    n = 0
    for mod in unwrap(model).modules():
        if type(mod) is not LoraLinear:
            continue
        if getattr(mod, "_privcode_lean", False):
            n += 1
            _set_nondp_grad(mod, nondp_grad)
            continue
        names = list(mod.lora_A.keys())
        variants = getattr(mod, "lora_variant", {}) or {}
        if any(k in variants for k in names) or any(getattr(mod, "use_dora", {}).get(k, False) for k in names):
            continue
        if not all(isinstance(mod.lora_dropout[k], nn.Identity) for k in names):
            continue
        if not all(type(mod.lora_A[k]) in (nn.Linear, LoRAFactor) and type(mod.lora_B[k]) in (nn.Linear, LoRAFactor)
                   and mod.lora_A[k].bias is None and mod.lora_B[k].bias is None for k in names):
            continue
        for k in names:
            mod.lora_A[k].__class__ = LoRAFactor
            mod.lora_B[k].__class__ = LoRAFactor
        mod._privcode_orig_forward = types.MethodType(LoraLinear.forward, mod)
        mod.forward = types.MethodType(_lean_forward, mod)
        mod._privcode_lean = True
        _set_nondp_grad(mod, nondp_grad)
        n += 1
    return n


def _set_nondp_grad(mod, nondp_grad) -> None:
    if nondp_grad is not None:
        for k in mod.lora_A.keys():
            mod.lora_A[k].nondp_grad = mod.lora_B[k].nondp_grad = nondp_grad


# --------------------------------------------------------------------------------------------
# per-record gradients without module hooks


def lean_trainables(m):
    factors = [mod for mod in m.modules() if isinstance(mod, LoRAFactor)]
    owned = {id(f.weight) for f in factors}
    trainable = [p for p in m.parameters() if p.requires_grad]
    ok = bool(trainable) and all(id(p) in owned for p in trainable)
    return ok, factors, trainable


def supports_hook_free(model) -> bool:
    """Whether every trainable parameter of `model` is a lean LoRA factor (LoRAGradSample applies)."""
    return lean_trainables(unwrap(model))[0]


class LoRAGradSample(nn.Module):
    """Stand-in for Opacus's GradSampleModule when every trainable parameter is a lean LoRA
    factor: each factor's own backward writes `weight.grad_sample` ([records, out, in], fp32,
    Opacus's layout, so Opacus's DPOptimizer consumes it unchanged) — no forward/backward hooks,
    no activation lists, no second copy of the per-record gradients, no `.grad` computed."""

    def __init__(self, m):
        super().__init__()
        ok, factors, trainable = lean_trainables(m)
        if not ok:
            raise ValueError("LoRAGradSample needs every trainable parameter to be a lean LoRA factor "
                             "(run leanlora.lean_lora first)")
        self._module = m
        self._factors = [f for f in factors if f.weight.requires_grad]
        for f in self._factors:
            f.per_record = True
        for p in trainable:
            p.grad_sample = None

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._module, name)

    def _close(self):
        for f in self._factors:
            f.per_record = False
            if hasattr(f.weight, "grad_sample"):
                del f.weight.grad_sample
