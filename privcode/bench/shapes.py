"""Model shapes and synthetic data for the GPU benchmarks (random weights, no hub access).

Published configs of Qwen2.5-Coder and of Llama-3.1-8B, the paper's round-trip describer (hidden,
intermediate, layers, heads, kv heads, vocab, tied), with the sequence length and micro-batch the
benchmarks use; every shape is built as Qwen2 layers (Llama's matmuls plus q/k/v biases); `small` is
a CPU-sized stand-in that runs every code path in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    seq_len: int = 1024         # T of the training benchmark
    micro_batch: int = 8        # rows per forward/backward in the training benchmark
    prompt_frac: float = 0.25   # leading share of each row that is prompt (no loss)
    syntax_frac: float = 0.4    # share of answer tokens that are PrivSA syntax positions

    @property
    def params_b(self) -> float:
        h, i, L, V = self.hidden, self.intermediate, self.layers, self.vocab
        hd = h // self.heads
        attn = h * h * 2 + 2 * h * self.kv_heads * hd
        return (L * (attn + 3 * h * i) + V * h * (1 if self.tied else 2)) / 1e9


SHAPES = {
    "qwen2.5-coder-1.5b": Shape("qwen2.5-coder-1.5b", 1536, 8960, 28, 12, 2, 151936, True, 1024, 8),
    "qwen2.5-coder-7b": Shape("qwen2.5-coder-7b", 3584, 18944, 28, 28, 4, 152064, False, 1024, 4),
    "llama-3.1-8b": Shape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False, 1024, 4),
    "qwen2.5-coder-32b": Shape("qwen2.5-coder-32b", 5120, 27648, 64, 40, 8, 152064, False, 1024, 1),
    "small": Shape("small", 64, 128, 2, 4, 2, 512, True, 32, 2),
}
ALIASES = {"1.5b": "qwen2.5-coder-1.5b", "7b": "qwen2.5-coder-7b", "8b": "llama-3.1-8b", "32b": "qwen2.5-coder-32b"}


def get_shape(name: str) -> Shape:
    name = ALIASES.get(name, name)
    if name not in SHAPES:
        raise SystemExit(f"unknown shape '{name}' (choose from {sorted(SHAPES) + sorted(ALIASES)})")
    return SHAPES[name]


def build_model(shape: Shape, device, dtype, seed: int = 0):
    """Random-init Qwen2ForCausalLM of `shape`, built directly on `device` in `dtype` — or, while a
    DeepSpeed ZeRO-3 config is active (privcode.dp.zero), straight into its partitions."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    cfg = Qwen2Config(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                      tie_word_embeddings=shape.tied, max_position_embeddings=4096,
                      eos_token_id=shape.vocab - 1, pad_token_id=0, bos_token_id=shape.vocab - 1,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    if is_deepspeed_zero3_enabled():  # zero.Init places every weight; the model never exists whole
        model = Qwen2ForCausalLM._from_config(cfg, dtype=dtype)
        model.config.use_cache = False
        return model
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.to(device=device, dtype=dtype)
    model.config.use_cache = False
    return model


def train_batch(shape: Shape, device, seed: int = 0, rows: int | None = None) -> dict:
    """One collated micro-batch as privcode.rows.collate makes it: full-length rows, the first
    prompt_frac of each row masked out of the loss, syntax_frac of the answer tokens marked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B, T = rows or shape.micro_batch, shape.seq_len
    ids = torch.randint(1, shape.vocab - 1, (B, T), generator=g)
    labels = ids.clone()
    labels[:, : int(T * shape.prompt_frac)] = -100
    syntax = (torch.rand((B, T), generator=g) < shape.syntax_frac) & (labels != -100)
    am = torch.ones((B, T), dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": am.to(device), "attention_mask_cpu": am,
            "labels": labels.to(device), "syntax": syntax.to(device), "labels_cpu": labels, "syntax_cpu": syntax}


def device_info(device) -> dict:
    import datetime
    import platform

    import torch

    info = {"date": datetime.date.today().isoformat(), "device": str(device), "torch": torch.__version__,
            "host": platform.node()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
        import peft
        info["peft"] = peft.__version__
        import opacus
        info["opacus"] = opacus.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(card=p.name, card_memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    else:
        info["card"] = "cpu"
    return info
