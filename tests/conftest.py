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

    from privcode import ledger
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


@pytest.fixture(autouse=True)
def _zone(tmp_path, monkeypatch):
    """Every test gets its own private zone (tmp/private) and budget registry (tmp/budget)."""
    monkeypatch.setenv("PRIVCODE_ZONE", str(tmp_path / "private"))
    monkeypatch.setenv("PRIVCODE_BUDGET_DIR", str(tmp_path / "budget"))


def mark_private(path: Path) -> Path:
    """Give a directory of records (inside the zone) its private-data ledger entry."""
    from privcode import ledger
    from privcode.data.records import data_id_of
    from privcode.io import read_jsonl

    recs = read_jsonl(path / "records.jsonl")
    ledger.private_source(path, stage="test", n_records=len(recs), data_id=data_id_of(recs))
    return path / "records.jsonl"


@pytest.fixture
def private_data(tmp_path) -> Path:
    """20 private records in the zone with their ledger entry (ε = inf as raw data)."""
    p = write_records(tmp_path / "private" / "data" / "records.jsonl", 20)
    return mark_private(p.parent)


def fake_dp_release(path, epsilon: float, delta: float, reproducible: bool = False) -> dict:
    """A DP release's privacy.json as dp-finetune writes it (for report and release tests)."""
    from privcode import ledger

    size = {"size": "declared", "declared_size": 20, "assumption": "q = batch_size / declared size 20"}
    return ledger.dp_release(path, stage="dp_finetune", epsilon=epsilon, delta=delta, accountant="prv",
                             sampler="poisson", history=[(1.0, 0.1, 10)], size=size, reproducible=reproducible)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def in_triton_interpreter(nodeid: str) -> None:
    """Run the test `nodeid` (path::name[params]) in a subprocess with TRITON_INTERPRET=1, which Triton reads
    when it is first imported (here it already is: torch imports it), and assert it passed there."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
