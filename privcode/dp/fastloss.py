"""The memory-lean per-record loss of fast DP training (lean LoRA: privcode.dp.leanlora; flat
clipping: privcode.dp.flatclip).

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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privcode.dp.leanlora import adapters_disabled, unwrap

IGNORE = -100
CHUNK_ELEMS = 1 << 26  # fp32 logits per chunk (256 MiB); a few such buffers live at once


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
