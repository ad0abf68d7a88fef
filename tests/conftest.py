"""Shared fixtures: a tiny random causal LM with a real (small) BPE tokenizer, built on the fly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama (random init) + byte-level BPE tokenizer, with a public ledger entry."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from privcode.dp import ledger
    from privcode.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    texts = ["def add(a, b):\n    return a + b\n", "Question: Write a function.\n\nAnswer: Sure."] * 20
    tok = build_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    ledger.derive(out, stage="build_model", source="test")
    return out


def write_records(path: Path, n: int, long: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            body = "    return x + %d\n" % i
            if long and i == 0:
                body += "    # " + "pad " * long + "\n"
            fh.write(json.dumps({"id": f"r{i}", "problem": f"Write `f{i}(x)` that adds {i} to x.",
                                 "solution": f"```python\ndef f{i}(x):\n{body}```", "lang": "python"}) + "\n")
    return path


@pytest.fixture
def private_data(tmp_path) -> Path:
    """20 private records in a directory with its ledger entry (ε = inf as raw data)."""
    from privcode.dp import ledger

    p = write_records(tmp_path / "private" / "records.jsonl", 20)
    ledger.private_source(p.parent, stage="test", private_data=str(p), n_records=20)
    return p
