"""Training rows: one record of a JSONL file becomes exactly one row (the DP privacy unit).

    rows, stats = load_rows("records.jsonl", tokenizer, TrainConfig(max_length=256), syntax=True)
    batch = collate(rows[:4], tokenizer.pad_token_id, "cuda")

A row holds the prompt and answer tokens, labels with the prompt masked out of the loss, and with
`syntax` the PrivSA mask of its syntax-token positions (privcode.dp.syntax). Long records are
truncated, never split.
"""
from __future__ import annotations

import torch

from privcode.data.prompts import render_example
from privcode.dp.engine import IGNORE
from privcode.errors import PrivcodeError
from privcode.io import iter_jsonl


def load_rows(path, tok, cfg, syntax: bool = False) -> tuple[list[dict], dict]:
    """Tokenize every record into exactly one row (prompt tokens masked out of the loss).
    With `syntax`, each row also carries the PrivSA mask of its syntax-token positions."""
    rows, truncated, empty_answer, unparsed = [], 0, 0, 0
    eos = tok.eos_token or ""
    for lineno, rec in iter_jsonl(path, required=("problem", "solution")):
        prompt, answer = render_example(rec["problem"], rec["solution"], cfg.prompt_format, tok)
        p_ids = tok(prompt, add_special_tokens=cfg.prompt_format == "qa")["input_ids"]
        enc = tok(answer + eos, add_special_tokens=False, return_offsets_mapping=syntax)
        a_ids = enc["input_ids"]
        ids = (p_ids + a_ids)
        labels = [IGNORE] * len(p_ids) + a_ids
        row = {"input_ids": ids, "labels": labels, "line": lineno}
        if syntax:
            from privcode.dp.syntax import syntax_char_spans_in_answer, token_mask

            spans, _, failed = syntax_char_spans_in_answer(answer, rec.get("lang") or "python")
            unparsed += bool(failed) and not spans
            row["syntax"] = [False] * len(p_ids) + token_mask(enc["offset_mapping"], spans)
        if len(ids) > cfg.max_length:
            truncated += 1
            row = {k: (v[: cfg.max_length] if isinstance(v, list) else v) for k, v in row.items()}
        if all(x == IGNORE for x in row["labels"][1:]):
            empty_answer += 1
        rows.append(row)
    if not rows:
        raise PrivcodeError("no training records", path=path)
    stats = {"records": len(rows), "truncated": truncated, "no_answer_tokens": empty_answer}
    if syntax:
        stats["privsa_unparsed_records"] = unparsed  # these get KL 0
        stats["privsa_syntax_tokens"] = sum(sum(r["syntax"]) for r in rows)
    return rows, stats


def collate(rows: list[dict], pad_id: int, device) -> dict:
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    syn = torch.zeros((len(rows), T), dtype=torch.bool) if "syntax" in rows[0] else None
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
        if syn is not None:
            syn[i, :n] = torch.tensor(r["syntax"], dtype=torch.bool)
    # CPU copies of labels/syntax/mask: the fast loss finds its positions (and that rows are
    # right-padded, so no mask is needed) there, without a device sync
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
           "labels_cpu": labels, "attention_mask_cpu": mask}
    if syn is not None:
        out["syntax"], out["syntax_cpu"] = syn.to(device), syn
    return out
