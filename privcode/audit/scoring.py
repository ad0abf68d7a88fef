"""Scoring canaries with a model: answer likelihoods, exposure, verbatim leakage, membership scores.

    from privcode.audit.scoring import exposure, load_audit_model, secret_scores
    model, tok = load_audit_model("results/audit/tiny/eps4/adapter", base="results/models/tiny/base")
    exposure(model, tok, canaries, n_candidates=1000)          # [{id, rank, exposure, ...}] per canary
    secret_scores(model, tok, canaries)                        # the one-run audit's scores

Every likelihood is taken as in training: the canary's prompt in the training prompt format, the
answer tokens scored (privcode.rows.collate), so a memorized secret shows as a low loss.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from privcode.audit.stats import exposure_of
from privcode.data.canaries import ANSWER_PREFIX, secret_of
from privcode.errors import PrivcodeError


def load_audit_model(path, base: str | None = None, device: str | None = None):
    """(model, tokenizer) for a LoRA adapter directory (its base from `base` or adapter_config.json)
    or a plain/merged model directory. The adapter stays separate, so `loss_scores` can switch it
    off to get the base model's losses."""
    from privcode.models import default_device, load_model, load_tokenizer

    device = device or default_device()
    p = Path(path)
    if (p / "adapter_config.json").exists():
        from peft import PeftModel

        base = base or json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise PrivcodeError("adapter names no base model; pass base=", path=p)
        model = PeftModel.from_pretrained(load_model(base, device=device), str(p))
        tok_src = base  # training saves the base's tokenizer beside the adapter: the same one
    else:
        model = load_model(str(p), device=device)
        tok_src = str(p)
    model.eval()
    return model, load_tokenizer(tok_src)


def _device(model):
    return next(model.parameters()).device


def answer_rows(tok, pairs, fmt: str, eos: bool) -> list[dict]:
    """One row {input_ids, labels} per (problem, answer) pair, the prompt masked out of the labels."""
    from privcode.data.prompts import render_example

    rows = []
    for problem, solution in pairs:
        prompt, answer = render_example(problem, solution, fmt, tok)
        p = tok(prompt, add_special_tokens=fmt == "qa")["input_ids"]
        a = tok(answer + ((tok.eos_token or "") if eos else ""), add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


def answer_nll(model, tok, pairs, fmt: str = "qa", eos: bool = False, batch_size: int = 64):
    """(sums, counts): per (problem, answer) pair, the sum and the number of its answer tokens'
    negative log-likelihoods, tokenized exactly as in training."""
    import torch

    from privcode.rows import collate

    rows = answer_rows(tok, pairs, fmt, eos)
    sums, counts = [], []
    dev = _device(model)
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            b = collate(rows[i:i + batch_size], tok.pad_token_id, dev)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            logits, labels = logits[:, :-1].float(), b["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                   ignore_index=-100, reduction="none").view(labels.shape)
            sums.append(ce.sum(1).cpu())
            counts.append((labels != -100).sum(1).cpu())
    return torch.cat(sums).double().numpy(), torch.cat(counts).numpy()


def secret_pair(canary: dict, secret: str) -> tuple[str, str]:
    """(problem, answer text up to and including the secret's closing quote) of an audit canary."""
    return canary["problem"], f'{ANSWER_PREFIX}{secret}"'


def exposure(model, tok, canaries: list[dict], n_candidates: int = 1000, seed: int = 0, prompt_format: str = "qa",
             batch_size: int = 64, extrapolate: bool = True) -> list[dict]:
    """Exposure of each canary's secret (Carlini et al. 2019, 'The Secret Sharer'; `exposure_of`).

    Candidates: the true secret plus n_candidates − 1 other secrets drawn uniformly without
    replacement from R (6 digits, |R| = 10^6), all ranked by the model's log-likelihood of the
    canary's answer up to the end of the secret, given the canary's prompt."""
    rng = random.Random(f"privcode-exposure-{seed}")
    out = []
    for c in canaries:
        secret = secret_of(c)
        d = len(secret)
        space = 10 ** d
        n = max(2, min(n_candidates, space))
        others = [x for x in rng.sample(range(space), n) if x != int(secret)][: n - 1]
        cands = [secret] + [str(x).zfill(d) for x in others]
        nll, _ = answer_nll(model, tok, [secret_pair(c, s) for s in cands], prompt_format, batch_size=batch_size)
        out.append({"id": c["id"], **exposure_of(nll, extrapolate)})
    return out


def verbatim_leakage(model, tok, canaries: list[dict], samples: int = 10, temperature: float = 1.0,
                     prompt_format: str = "qa", seed: int = 0, max_new_tokens: int | None = None) -> dict:
    """Share of canaries whose secret appears verbatim in at least one of `samples` completions of
    the canary's prompt followed by its answer prefix up to the secret ('… API_KEY = "').
    temperature 0 means one greedy completion. Pure sampling (no top-k / top-p)."""
    import torch

    from privcode.data.prompts import render_example

    if not canaries:
        return {"rate": 0.0, "leaked": 0, "canaries": 0, "per_canary": []}
    dev = _device(model)
    torch.manual_seed(seed)
    per, leaked = [], 0
    for c in canaries:
        secret = secret_of(c)
        prompt, answer = render_example(c["problem"], ANSWER_PREFIX, prompt_format, tok)
        ids = tok(prompt, add_special_tokens=prompt_format == "qa")["input_ids"] + \
            tok(answer, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids], device=dev)
        new = max_new_tokens or len(tok(secret + '"', add_special_tokens=False)["input_ids"]) + 4
        greedy = temperature <= 0
        kw = dict(do_sample=False, num_return_sequences=1) if greedy else \
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=samples)
        with torch.inference_mode():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                 pad_token_id=tok.pad_token_id, **kw)
        texts = tok.batch_decode(gen[:, x.shape[1]:], skip_special_tokens=True)
        hits = sum(secret in t for t in texts)
        leaked += hits > 0
        per.append({"id": c["id"], "hits": hits, "samples": len(texts)})
    return {"rate": leaked / len(canaries), "leaked": leaked, "canaries": len(canaries), "per_canary": per}


def loss_scores(model, tok, canaries: list[dict], reference=None, prompt_format: str = "qa",
                batch_size: int = 64) -> list[dict]:
    """Per canary: mean answer-token loss of the whole canary record (as trained, with EOS) under the
    model and under a reference; score = ref_loss − loss (higher: more likely trained on).
    reference: a model, or None — then a PEFT model is compared with its adapter switched off
    (the base model), and any other model gets score = −loss."""
    pairs = [(c["problem"], c["solution"]) for c in canaries]
    s, n = answer_nll(model, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
    loss = s / np.maximum(n, 1)
    ref = None
    if reference is not None:
        rs, rn = answer_nll(reference, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
        ref = rs / np.maximum(rn, 1)
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            rs, rn = answer_nll(model, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
        ref = rs / np.maximum(rn, 1)
    out = []
    for i, c in enumerate(canaries):
        r = None if ref is None else float(ref[i])
        out.append({"id": c["id"], "loss": float(loss[i]), "ref_loss": r,
                    "score": (r - float(loss[i])) if r is not None else -float(loss[i])})
    return out


def secret_scores(model, tok, canaries: list[dict], n_candidates: int = 16, seed: int = 0, prompt_format: str = "qa",
                  batch_size: int = 64) -> list[dict]:
    """Per canary: how much more likely the trained model finds the canary's own secret than random
    other secrets in the same place — mean log-loss of `n_candidates` random secrets − log-loss of
    the true one, each over the canary's prompt and its answer up to the end of the secret. Prompt
    and answer prefix are the same for all of a canary's candidates, so only the secret counts: an
    excluded canary's secret is one more random secret (score ≈ 0 in expectation), an included one
    scores high where training memorized it. The candidates are drawn from the auditor's seed, never
    from the coins."""
    rng = random.Random(f"privcode-score-{seed}")
    pairs = []
    for c in canaries:
        secret = secret_of(c)
        d = len(secret)
        cands = [str(rng.randrange(10 ** d)).zfill(d) for _ in range(n_candidates)]
        pairs += [secret_pair(c, secret)] + [secret_pair(c, x) for x in cands]
    nll, _ = answer_nll(model, tok, pairs, prompt_format, batch_size=batch_size)
    nll = nll.reshape(len(canaries), n_candidates + 1)
    return [{"id": c["id"], "loss": float(nll[i, 0]), "ref_loss": float(nll[i, 1:].mean()),
             "score": float(nll[i, 1:].mean() - nll[i, 0])} for i, c in enumerate(canaries)]
