"""The LoRA model a fine-tune trains, and the adapter directory it releases.

    model = build_lora_model("results/models/smollm2/base", cfg, "cuda")   # a reference: loaded here
    model = build_lora_model(base, cfg, "cuda")                            # a model already in memory
    save_release_adapter(model, tokenizer, out_dir)   # weights, adapter config, tokenizer; nothing else
"""
from __future__ import annotations

from pathlib import Path

import torch

from privcode.errors import PrivcodeError


def build_lora_model(model, cfg, device):
    """LoRA (PEFT) with cfg's rank, α, dropout and targets on `model`: a base model in memory (a
    torch module, e.g. ZeRO-3's sharded base: privcode.dp.zero), or a reference (hub name or local
    directory) loaded in cfg.dtype onto `device`. Trainable weights are fp32; `cfg.fast` makes the
    LoRA layers lean (privcode.dp.leanlora)."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(model, torch.nn.Module):
        from privcode.models import load_model

        model = load_model(model, dtype=cfg.dtype, device=device)
    model.config.use_cache = False
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():  # LoRA weights in fp32: clipping/noise/optimizer precision
        if p.requires_grad:
            p.data = p.data.float()
    if cfg.fast:
        from privcode.dp import leanlora

        leanlora.lean_lora(model)
    return model


def set_attention_backends(cfg, device) -> None:
    """Process-wide SDPA choice for a training run on CUDA: without cuDNN attention, PyTorch
    picks flash / memory-efficient kernels, which need no per-shape plan."""
    if str(device).startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(bool(cfg.cudnn_attention))


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_lora_delta(before: dict, model) -> float:
    now = lora_state(model)
    return max(float((now[n] - before[n]).abs().max()) for n in before)


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
