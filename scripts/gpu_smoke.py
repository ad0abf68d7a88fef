"""GPU smoke check of the training paths on random weights of a published shape (no hub access).

    python scripts/gpu_smoke.py prepare --out /tmp/smoke --shape qwen2.5-coder-1.5b
    PRIVCODE_ZONE=/tmp/smoke/private python -m privcode.cli dp-finetune --model /tmp/smoke/model \
        --data /tmp/smoke/private/data/records.jsonl --private-dir /tmp/smoke/private/dp1 ...
    torchrun --standalone --nproc_per_node 2 -m privcode.cli finetune --model /tmp/smoke/model ...

Writes a random-init model of the named shape with a small BPE tokenizer, and taskgen records
with a ledger (the private split in OUT/private, the private zone of these runs), so that the same
`privcode` commands as the Snakemake GPU rules can be timed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {  # published configs (hidden, intermediate, layers, heads, kv heads, vocab, tied)
    "qwen2.5-coder-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-coder-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "small": (512, 1408, 4, 8, 2, 151936, True),
    "tiny": (64, 128, 2, 4, 2, 2048, True),  # CPU checks of the scripts (the BPE tokenizer has 1,024 tokens)
}


def prepare(out: Path, shape: str, n_records: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import os

    os.environ["PRIVCODE_ZONE"] = str(out / "private")  # this layout's private zone
    from privcode.data import taskgen
    from privcode.data.records import prepare as split_data
    from privcode import ledger
    from privcode.io import write_jsonl
    from privcode.tiny import build_tokenizer

    h, i, L, nh, kv, V, tied = SHAPES[shape]
    recs = [taskgen.to_record(t) for t in taskgen.generate_tasks(0, n_records)]
    write_jsonl(out / "all.jsonl", recs)
    split_data(str(out / "all.jsonl"), out / "private" / "data", out / "public", private_fraction=0.5, seed=0,
               source_is_public=True)
    tok = build_tokenizer([r["problem"] + r["solution"] for r in recs])
    cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=nh,
                      num_key_value_heads=kv, vocab_size=V, tie_word_embeddings=tied,
                      max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    ledger.derive(out / "model", stage="build_model", source=f"random {shape}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["prepare"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--records", type=int, default=512)
    a = ap.parse_args()
    prepare(a.out, a.shape, a.records)
