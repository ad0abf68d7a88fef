"""Fast DP training pieces: memory-lean per-record loss, lean LoRA layers, flat per-record clipping.

Same semantics as `privcode.dp.engine.per_record_loss` (per-record mean CE over answer tokens
plus lam · KL(p_base ‖ p_dp) averaged over the record's syntax positions), but:

- the language-model head runs only on the positions that enter the loss (answer tokens, and
  syntax tokens for PrivSA), in chunks, straight from the final hidden states: the
  [B, T, vocab] fp32 logits (5 GB at B=8, T=1024, 152k vocabulary) never exist;
- the head's gradient is formed chunk by chunk inside the forward (one extra matmul per chunk,
  none in the backward), so the backward keeps only a [positions, hidden] tensor;
- the PrivSA teacher (the network with its adapters disabled) runs under no_grad up to the
  last syntax position only, and its head only at syntax positions; with compile_privsa the
  teacher forward and the KL math run under torch.compile (pure functions of frozen weights);
- records stay independent: every position's gradient depends only on its own record's
  loss weight (nothing is reduced across rows), which Opacus's per-sample hooks rely on;
- right-padded batches (checked on the host copy of the mask) run without an attention mask:
  attention is causal, so nothing at a real position changes (`model_attention_mask`);
- the teacher's adapters are switched off by flipping the LoRA layers' flags
  (`adapters_disabled`), not through PEFT's `disable_adapter()`, whose per-call status scan
  left the GPU idle.

`lean_lora(peft_model)` swaps PEFT's LoRA forward (which upcasts each layer input to fp32 and
materializes fp32 [tokens, out] intermediates) for one that computes in the activations'
dtype with fp32 master weights: `x·Aᵀ` then `result + s·h·Bᵀ` in one addmm. The factors stay
nn.Linear subclasses with the same parameters and state-dict keys; an Opacus grad sampler is
registered for them that returns fp32 per-sample gradients.

`LoRAGradSample(model)` replaces Opacus's GradSampleModule for such a model: each LoRA factor's
own backward (one autograd node) writes its per-record gradients to `weight.grad_sample`, with
no module hooks; `accelerate_dpsgd(dp)` switches an engine.DPSGD to it and to flat clipping.

`fast_dp_optimizer(opt)` makes an Opacus DPOptimizer clip and accumulate over one flat
[records, params] tensor (one norm, one matrix-vector product) and draw the noise in one call,
instead of a few kernels per parameter tensor (a LoRA model has hundreds of them).
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
CHUNK_ELEMS = 1 << 26  # fp32 logits per chunk (256 MiB); a few such buffers live at once


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


HEAD_WEIGHT = "_privcode_head_weight"  # a full copy of a sharded head's frozen weight (privcode.dp.zero)


def decoder_and_head(model):
    """(decoder returning last_hidden_state, lm_head weight [V, H]) or None when the model's head
    is not a plain bias-free linear layer on the decoder's output (then use the reference loss).
    A head whose weight ZeRO-3 shards carries a full copy of it (HEAD_WEIGHT, set by
    privcode.dp.zero: frozen, so gathered once); that copy is the weight returned."""
    m = unwrap(model)
    try:
        head = m.get_output_embeddings()
        dec = m.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(head, nn.Linear) or head.bias is not None or dec is None:
        return None
    cfg = getattr(m, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return dec, head.__dict__.get(HEAD_WEIGHT, head.weight)


# --------------------------------------------------------------------------------------------
# head loss: chunked, gradient formed in the forward


class _HeadLoss(torch.autograd.Function):
    """Per-position CE and KL from hidden states, without materializing the full logits.

    h [N, H] (requires grad), weight [V, H] (frozen), target [N] (IGNORE: no CE at that
    position), hb [K, H] teacher hidden states of the first K positions (the KL positions come
    first) or None. Returns ce [N], kl [N] (0 beyond K) in fp32. Logits are computed as in the
    reference (`lm_head(h)` in the model's dtype, then upcast to fp32)."""

    @staticmethod
    def forward(ctx, h, weight, target, hb, chunk, kl_fn=None):
        kl_fn = kl_fn or kl_rows
        N = h.shape[0]
        nkl = 0 if hb is None else hb.shape[0]
        ce = torch.zeros(N, dtype=torch.float32, device=h.device)
        kl = torch.zeros(N, dtype=torch.float32, device=h.device)
        dce = torch.empty_like(h)
        dkl = torch.empty((nkl, h.shape[1]), dtype=h.dtype, device=h.device) if nkl else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            z = F.linear(h[s:e], weight).float()                     # [c, V]
            t = target[s:e]
            valid = t != IGNORE
            tc = t.clamp(min=0)
            lse = torch.logsumexp(z, dim=-1)
            zt = z.gather(1, tc[:, None]).squeeze(1)
            ce[s:e] = (lse - zt) * valid
            logp = z.sub_(lse[:, None])                              # z is now log p_dp
            p = logp.exp()
            k = max(0, min(e, nkl) - s)                              # KL rows in this chunk
            if k:
                kl[s:s + k], g = kl_fn(logp[:k], F.linear(hb[s:s + k], weight))
                dkl[s:s + k] = g @ weight
                del g
            del logp
            p.scatter_add_(1, tc[:, None], torch.full((e - s, 1), -1.0, device=p.device, dtype=p.dtype))
            p.mul_(valid[:, None].to(p.dtype))                          # d CE / d z = p - onehot
            dce[s:e] = p.to(weight.dtype) @ weight
            del p, z
        ctx.save_for_backward(dce, dkl if dkl is not None else dce)
        ctx.nkl = nkl
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        dce, dkl = ctx.saved_tensors
        nkl = ctx.nkl
        gh = torch.zeros_like(dce) if g_ce is None else dce * g_ce[:, None].to(dce.dtype)
        if nkl and g_kl is not None:
            gh[:nkl] += dkl * g_kl[:nkl, None].to(dkl.dtype)
        return gh, None, None, None, None, None


def kl_rows(logp, teacher_logits):
    """KL(p_base ‖ p_dp) per row and its gradient w.r.t. the student logits, p_dp − p_base, in the
    teacher logits' dtype. logp: [k, V] fp32 student log-probabilities; teacher_logits: [k, V]
    as the head computes them (upcast to fp32 here, as in the reference)."""
    logpb = torch.log_softmax(teacher_logits.float(), dim=-1)
    pb = logpb.exp()
    kl = (pb * (logpb - logp)).sum(-1)
    return kl, (logp.exp() - pb).to(teacher_logits.dtype)


# --------------------------------------------------------------------------------------------
# PrivSA under torch.compile: the frozen teacher's forward and the KL math are pure functions
# (no autograd, no side effects), so compiling them fuses their elementwise work (RMSNorm,
# rotary, SiLU·mul, softmax/KL) without touching the trained path. Shapes vary with the batch:
# dynamic=True compiles once. Any compile failure falls back to eager with a warning.
# Not the default (`privsa_compile: false`): compile time per process, and its fused bf16 kernels
# differ from the student's, so KL is not 0 before the first update (docs/scaling.md).

_COMPILED: dict = {}  # name -> compiled function (None: failed, eager from then on)


def _registry(holder) -> dict:
    """Where compiled callables live: on `holder` (a module — a compiled teacher then lives and
    dies with its model; kept in __dict__ so it is no submodule and no state-dict entry), or in
    this module's _COMPILED for plain functions."""
    return _COMPILED if holder is None else holder.__dict__.setdefault("_privcode_compiled", {})


def _warn_compile(key, e) -> None:
    import logging

    logging.getLogger(__name__).warning("torch.compile of %s failed (%s: %s); running it eagerly",
                                        key, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")


def _call_compiled(key, fn, *args, holder=None, **kwargs):
    """fn(*args, **kwargs) through torch.compile(fn, dynamic=True), compiled once per (holder, key);
    a compile failure warns once and runs fn eagerly from then on."""
    reg = _registry(holder)
    if key not in reg:
        try:
            reg[key] = torch.compile(fn, dynamic=True)
        except Exception as e:  # noqa: BLE001 - compile is an optimization, never a requirement
            _warn_compile(key, e)
            reg[key] = None
    c = reg[key]
    if c is not None:
        try:
            return c(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. an op inductor cannot lower on this device
            _warn_compile(key, e)
            reg[key] = None
    return fn(*args, **kwargs)


def compile_status(peft_model) -> dict:
    """{"teacher", "kl_rows"}: True compiled, False fell back to eager, None not tried (yet)."""
    dh = decoder_and_head(peft_model)
    teacher = _registry(dh[0]) if dh is not None else {}
    state = lambda reg, k: None if k not in reg else reg[k] is not None  # noqa: E731
    return {"teacher": state(teacher, "teacher"), "kl_rows": state(_COMPILED, "kl_rows")}


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMS // max(1, vocab))


def _kl_rows_compiled(logp, teacher_logits):
    return _call_compiled("kl_rows", kl_rows, logp, teacher_logits)


def loss_positions(batch, use_kl: bool):
    """(rows, cols) of the positions that enter the loss — answer tokens, and syntax tokens when
    use_kl, KL positions first — with the number of KL positions and the teacher's length
    (last KL position + 1). Computed from the CPU copies that privcode.rows.collate keeps
    ("labels_cpu", "syntax_cpu") when present: then no device sync stalls the GPU queue between
    micro-batches, and the indices travel pinned and non-blocking. Else from the device tensors
    (one sync)."""
    cpu = "labels_cpu" in batch and (not use_kl or "syntax_cpu" in batch)
    tgt = (batch["labels_cpu"] if cpu else batch["labels"])[:, 1:]
    sel = tgt != IGNORE
    syn = (batch["syntax_cpu"] if cpu else batch["syntax"])[:, 1:].bool() if use_kl else None
    if use_kl:
        sel = sel | syn
    rows, cols = sel.nonzero(as_tuple=True)
    nkl = tmax = 0
    if use_kl:
        klm = syn[rows, cols]
        nkl = int(klm.sum())
        if nkl:
            order = torch.argsort((~klm).to(torch.int8), stable=True)
            rows, cols = rows[order], cols[order]
            tmax = int(cols[:nkl].max()) + 1  # causal: later positions don't change the teacher there
    dev = batch["input_ids"].device
    if rows.device != dev:
        if dev.type == "cuda":
            rows, cols = (t.pin_memory().to(dev, non_blocking=True) for t in (rows, cols))
        else:
            rows, cols = rows.to(dev), cols.to(dev)
    return rows, cols, nkl, tmax


def model_attention_mask(batch):
    """The attention mask to hand the decoder: None when the host copy of the mask
    ("attention_mask_cpu", kept by privcode.rows.collate) shows every row right-padded (ones,
    then zeros), else the batch's mask. Safe because attention is causal: a real token only sees
    earlier positions, all real under right padding, so its hidden state — and every loss term
    and per-record gradient, which are taken at real positions only — is the same with or
    without the mask (tested). Without a mask, SDPA runs its causal kernel (flash) and
    transformers skips the device sync it makes to check whether a mask is all ones."""
    am_cpu = batch.get("attention_mask_cpu")
    if am_cpu is not None and bool((am_cpu[:, 1:] <= am_cpu[:, :-1]).all()) and bool(am_cpu[:, 0].all()):
        return None
    return batch["attention_mask"]


def per_record_loss(model, batch, lam: float = 0.0, ce_weight: float = 1.0, peft_model=None,
                    chunk_rows: int | None = None, compile_privsa: bool = False,
                    lockstep: bool = False) -> torch.Tensor:
    """Loss of each record, shape [B]: ce_weight·CE_i + lam·KL_i — same as
    `engine.per_record_loss`, without full-vocabulary logits (see the module docstring).
    compile_privsa: run the PrivSA teacher forward and the KL math under torch.compile.
    lockstep (privcode.dp.zero): with PrivSA on, run the teacher even on a micro-batch without
    syntax positions, so that every rank runs the same modules (ZeRO-3 gathers are collectives)."""
    from privcode.dp import engine

    dh = decoder_and_head(model)
    if dh is None:
        return engine.per_record_loss(model, batch, lam=lam, ce_weight=ce_weight, peft_model=peft_model)
    dec, weight = dh
    if weight.requires_grad:  # a trained head would need its own gradient: keep the reference path
        return engine.per_record_loss(model, batch, lam=lam, ce_weight=ce_weight, peft_model=peft_model)
    ids, am = batch["input_ids"], model_attention_mask(batch)
    B = ids.shape[0]
    tgt = batch["labels"][:, 1:]
    ce_mask = tgt != IGNORE
    use_kl = bool(lam) and "syntax" in batch
    if use_kl and peft_model is None:
        raise ValueError("PrivSA needs the PEFT model (its adapters are disabled for the teacher)")
    syn = batch["syntax"][:, 1:].bool() if use_kl else None
    rows, cols, nkl, tmax = loss_positions(batch, use_kl)
    N = int(rows.numel())

    hb_sel = None
    if use_kl:
        if nkl or lockstep:  # KL positions first, so the teacher's head runs on them only
            tmax = max(tmax, 1)
            tdec, _ = decoder_and_head(peft_model)
            with torch.no_grad(), adapters_disabled(peft_model):
                targs = {"input_ids": ids[:, :tmax], "attention_mask": None if am is None else am[:, :tmax],
                         "use_cache": False}
                out = (_call_compiled("teacher", tdec, holder=tdec, **targs) if compile_privsa
                       else tdec(**targs))
                hb = out.last_hidden_state
            hb_sel = hb[rows[:nkl], cols[:nkl]] if nkl else None
            del hb
        use_kl = bool(nkl)

    h = dec(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state  # [B, T, H]
    if N == 0:  # nothing to learn from: a zero loss that still reaches every record's graph
        return h.flatten(1).float().sum(1) * 0.0
    h_sel = h[:, :-1][rows, cols]
    t_sel = torch.where(ce_mask[rows, cols], tgt[rows, cols], torch.full_like(rows, IGNORE))
    chunk = chunk_rows or _chunk_rows(weight.shape[0])
    kl_fn = _kl_rows_compiled if (compile_privsa and use_kl) else kl_rows
    ce_tok, kl_tok = _HeadLoss.apply(h_sel, weight, t_sel, hb_sel, chunk, kl_fn)
    n = ce_mask.sum(1).clamp(min=1).to(torch.float32)
    loss = torch.zeros(B, dtype=torch.float32, device=h.device).index_add(0, rows, ce_tok) / n
    loss = ce_weight * loss
    if use_kl:
        m = syn.sum(1).clamp(min=1).to(torch.float32)
        kl = torch.zeros(B, dtype=torch.float32, device=h.device).index_add(0, rows, kl_tok) / m
        loss = loss + lam * kl
    return loss


# --------------------------------------------------------------------------------------------
# lean LoRA


FUSE_LORA_PAIRS = True  # one autograd node per LoRA layer (False: one per factor; same math, for comparison)
_OUT_DTYPE_OK = None  # whether torch.mm/bmm(..., out_dtype=float32) work here (probed once)


def _mm_f32(op, a, b):
    """a @ b (op: torch.mm or torch.bmm) with an fp32 result: bf16/fp16 operands on CUDA use the
    out_dtype kernels (fp32 accumulate, fp32 output) where torch has them."""
    global _OUT_DTYPE_OK
    if a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda:
        if _OUT_DTYPE_OK is not False:
            try:
                r = op(a, b, out_dtype=torch.float32)
                _OUT_DTYPE_OK = True
                return r
            except (TypeError, RuntimeError, NotImplementedError):
                _OUT_DTYPE_OK = False
        return op(a.float(), b.float())
    return op(a, b) if a.dtype == torch.float32 else op(a.float(), b.float())


def _bmm_f32(a, b):
    return _mm_f32(torch.bmm, a, b)


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
    W's gradient (fp32) or — in per-record mode — each record's gradient stored on
    W.grad_sample (fp32), with no gradient for W itself."""

    @staticmethod
    def forward(ctx, x, add, weight, scale, per_record):
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
        ctx.scale, ctx.per_record, ctx.param, ctx.has_add = scale, per_record, weight, add is not None
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
            if ctx.per_record:
                n = x.shape[0]
                gs = _bmm_f32(g.reshape(n, -1, g.shape[-1]).transpose(1, 2), x.reshape(n, -1, x.shape[-1]))
                if s != 1.0:
                    gs.mul_(s)
                _store_grad_sample(ctx.param, gs.to(ctx.param.dtype))
            else:
                gw = _mm_f32(torch.mm, g2.t(), x.reshape(-1, x.shape[-1]))
                if s != 1.0:
                    gw.mul_(s)
                gw = gw.to(ctx.param.dtype)
        return gx, gadd, gw, None, None


class _LoRAPairFn(torch.autograd.Function):
    """out = add + s·(x·Aᵀ)·Bᵀ for a whole LoRA layer as ONE autograd node — the same operations
    as an A node followed by a B node (_LoRAFn), with half the autograd nodes and Python per
    layer (a DP step with 196 LoRA layers is CPU-bound at short micro-batches, docs/scaling.md).
    Backward: input gradient and each factor's gradient, summed (`.grad`) or — in per-record
    mode — per record on `weight.grad_sample`, fp32."""

    @staticmethod
    def forward(ctx, x, add, wa, wb, scale, per_record):
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
        ctx.scale, ctx.per_record, ctx.wa, ctx.wb = scale, per_record, wa, wb
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
        x2 = x.reshape(-1, x.shape[-1])
        n = x.shape[0]
        if ctx.needs_input_grad[2]:                                  # A: Σ_t gh_t x_tᵀ
            if ctx.per_record:
                gs = _bmm_f32(gh.reshape(n, -1, gh.shape[-1]).transpose(1, 2), x.reshape(n, -1, x.shape[-1]))
                _store_grad_sample(ctx.wa, gs.to(ctx.wa.dtype))
            else:
                ga = _mm_f32(torch.mm, gh.t(), x2).to(ctx.wa.dtype)
        if ctx.needs_input_grad[3]:                                  # B: s·Σ_t g_t h_tᵀ
            if ctx.per_record:
                gs = _bmm_f32(g.reshape(n, -1, g.shape[-1]).transpose(1, 2), h.reshape(n, -1, h.shape[-1]))
                if s != 1.0:
                    gs.mul_(s)
                _store_grad_sample(ctx.wb, gs.to(ctx.wb.dtype))
            else:
                gb = _mm_f32(torch.mm, g2.t(), h)
                if s != 1.0:
                    gb.mul_(s)
                gb = gb.to(ctx.wb.dtype)
        return gx, gadd, ga, gb, None, None


class LoRAFactor(nn.Linear):
    """A LoRA factor (A or B) that computes in its input's dtype from fp32 master weights.
    `forward(x, add=None, scale=1.0)` returns `add + scale · x·Wᵀ` (one addmm), as one autograd
    node. With `per_record = True` (set by LoRAGradSample) its backward stores each record's
    gradient on `weight.grad_sample` instead of accumulating `weight.grad`."""

    _lora_scale = 1.0
    per_record = False

    def forward(self, x, add=None, scale: float = 1.0):
        if self._lora_scale != scale:
            self._lora_scale = scale
        return _LoRAFn.apply(x, add, self.weight, float(scale), self.per_record)


def _lora_factor_grad_sample(layer, activations, backprops):
    """Per-record gradient of a LoRAFactor: scale · Σ_t g_t x_tᵀ, in fp32."""
    a = activations[0]
    n = a.shape[0]
    a3 = a.reshape(n, -1, a.shape[-1])
    g3 = backprops.reshape(n, -1, backprops.shape[-1])
    gs = _bmm_f32(g3.transpose(1, 2), a3)
    if layer._lora_scale != 1.0:
        gs.mul_(layer._lora_scale)
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
        result = _LoRAPairFn.apply(x, result, fa.weight, fb.weight, float(self.scaling[name]), fa.per_record)
    return result


def lean_lora(model) -> int:
    """Patch every plain LoRA Linear of a PEFT model in place (idempotent). Returns how many
    layers now run the lean forward; layers with dropout, DoRA or other variants are left as
    they are."""
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
        n += 1
    return n


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


# --------------------------------------------------------------------------------------------
# per-record gradients without module hooks


def _lean_trainables(m):
    factors = [mod for mod in m.modules() if isinstance(mod, LoRAFactor)]
    owned = {id(f.weight) for f in factors}
    trainable = [p for p in m.parameters() if p.requires_grad]
    ok = bool(trainable) and all(id(p) in owned for p in trainable)
    return ok, factors, trainable


def supports_hook_free(model) -> bool:
    """Whether every trainable parameter of `model` is a lean LoRA factor (LoRAGradSample applies)."""
    return _lean_trainables(unwrap(model))[0]


class LoRAGradSample(nn.Module):
    """Stand-in for Opacus's GradSampleModule when every trainable parameter is a lean LoRA
    factor: each factor's own backward writes `weight.grad_sample` ([records, out, in], fp32,
    Opacus's layout, so Opacus's DPOptimizer consumes it unchanged) — no forward/backward hooks,
    no activation lists, no second copy of the per-record gradients, no `.grad` computed."""

    def __init__(self, m):
        super().__init__()
        ok, factors, trainable = _lean_trainables(m)
        if not ok:
            raise ValueError("LoRAGradSample needs every trainable parameter to be a lean LoRA factor "
                             "(run fastloss.lean_lora first)")
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


def accelerate_dpsgd(dp) -> bool:
    """Make an engine.DPSGD fast in place: flat clipping/noise in its optimizer and, when the
    model's trainable parameters are all lean LoRA factors, hook-free per-record gradients
    (LoRAGradSample instead of GradSampleModule). Returns whether the hooks were replaced."""
    fast_dp_optimizer(dp.opt)
    if isinstance(dp.gsm, LoRAGradSample):
        return True
    m = unwrap(dp.gsm)
    if not _lean_trainables(m)[0]:
        return False
    dp.gsm._close()
    dp.gsm = LoRAGradSample(m)
    return True
