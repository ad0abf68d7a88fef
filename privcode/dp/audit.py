"""Empirical privacy audit: canaries, exposure, verbatim leakage and a one-run lower bound on ε.

    privcode audit --model results/models/tiny/base --data results/data/private/records.jsonl \
        --out results/audit/tiny/eps4 --params '{"epsilon": 4, "delta": 1e-5, "steps": 100, "canaries": 1000}'
    privcode audit ... --out results/audit/tiny/control --params '{"epsilon": "inf", ...}'           # non-private
    privcode audit ... --out results/audit/tiny/broken --params '{"epsilon": 4, "broken": "clip_x10", ...}'

What it does (`run_audit`):

1. Canaries. `make_canaries(m, seed)` makes m records in the private data's format
   ({id, problem, solution, lang}): "Write the config loader for service <name>." whose solution
   holds `API_KEY = "<secret>"`, the secret being `SECRET_DIGITS` = 6 uniformly random decimal
   digits — the secret space R = {000000 … 999999}, |R| = 10^6.
2. One-run audit (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
   NeurIPS 2023, arXiv:2305.08846): each canary is put into the training set independently with
   probability 1/2 (a secret, seeded coin), `copies` times (`inject`). The model is trained with
   `train_dp` (the given target ε) or `train_nondp` (the control, ε = inf). Each canary is then
   scored by how much more likely the trained model finds its secret than random other secrets
   in the same place (`score: "secret"`, the default, `secret_scores`) or by how much training
   lowered the loss of its whole record (`score: "record"`: mean answer-token loss under the base
   model − under the trained model; the base model is the adapter switched off); the auditor
   guesses "in" for the k+ highest scores, "out" for the k− lowest and abstains on the rest,
   *without* looking at the coins. From the number v of correct guesses among r guesses,
   `eps_lower_bound` returns ε_lb such that, with confidence 1 − β, the training run is not
   (ε, δ)-DP for any ε < ε_lb (see `p_value`).
3. Memorization of the included canaries (and of the excluded ones, as a baseline):
   exposure (Carlini et al. 2019, "The Secret Sharer") and verbatim leakage under sampling.

Power. Even an auditor whose every guess is right gets at most `max_eps_lb(m, r, δ, β)` (e.g.
1.18 for m = 24, r = 12; 5.09 for m = 1000, r = 500, δ = 1e-5): a design whose maximum is not
above the claimed ε can never refute the claim, so "ε_lb ≤ claimed" would say nothing. The audit
computes that maximum before training and refuses such a design (`allow_weak: true` runs it
anyway, with a loud warning in the log and in audit.json).

Controls. `epsilon: "inf"` trains without DP (`train_nondp`). `broken: "clip_x10"` (clip bound ×10
and σ ÷10: the same noise std, 10× the sensitivity) or `broken: "noise_off"` trains with
`train_dp` at the given ε while the mechanism is deliberately broken (`broken_mechanism`): the
accountant and privacy.json still claim ε, so a working audit must find ε_lb above it. A broken
control's adapter is then re-labelled non-private (ε = inf) and its run uses a reproducible
seed, so the budget registry counts its data set as spent without limit: it is never a release.

Privacy unit of the audit: one canary. With `copies` = k > 1 a canary is k records, so the claim
that the audit tests is the group-privacy guarantee (kε, k·e^{(k−1)ε}·δ) of the per-record
(ε, δ) in privacy.json; audit.json states both. ε_lb is computed at the canary's δ (or
`audit_delta`), and is to be compared with the canary's ε (= ε when k = 1).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from privcode.errors import PrivcodeError
from privcode.io import iter_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

SECRET_DIGITS = 6
SECRET_SPACE = 10 ** SECRET_DIGITS  # |R|: the secret is uniform over all 6-digit strings
KINDS = ("secret",)
REFERENCE = ("Steinke, Nasr & Jagielski, 'Privacy Auditing with One (1) Training Run', NeurIPS 2023 "
             "(arXiv:2305.08846), Theorem 5.2 / Algorithm 2")
EPS_MAX = 100.0  # search range of ε_lb; q = 1/(1+e^-ε) is 1.0 in float64 well before this
SCORES = ("secret", "record")
BROKEN = ("clip_x10", "noise_off")

_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "vu", "zen", "dor", "pix", "bel", "nor", "qua", "sil", "tor",
              "wex", "yam", "fin", "gus", "hal", "jor"]
_ANSWER_PREFIX = '```python\nAPI_KEY = "'
_SECRET_RE = re.compile(r'API_KEY = "(\d+)"')
_NAME_RE = re.compile(r"for service ([a-z_]+)\.")


# --------------------------------------------------------------------------------------------
# canaries


def _name(rng: random.Random) -> str:
    return "_".join("".join(rng.choice(_SYLLABLES) for _ in range(2)) for _ in range(2))


def make_canaries(n: int, seed: int, kind: str = "secret", digits: int = SECRET_DIGITS) -> list[dict]:
    """n canary records {id, problem, solution, lang} with distinct service names and independent
    secrets, each uniform over the `digits`-digit strings (|R| = 10**digits)."""
    if kind not in KINDS:
        raise PrivcodeError(f"unknown canary kind '{kind}' (choose from {list(KINDS)})")
    if n < 0:
        raise PrivcodeError(f"number of canaries must be ≥ 0, got {n}")
    rng = random.Random(f"privcode-canaries-{seed}")
    names: set[str] = set()
    out = []
    while len(out) < n:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        secret = "".join(rng.choice("0123456789") for _ in range(digits))
        solution = (f'{_ANSWER_PREFIX}{secret}"\n\n\ndef load_config():\n'
                    f'    return {{"service": "{name}", "api_key": API_KEY}}\n```')
        out.append({"id": f"canary-{seed}-{len(out)}", "problem": f"Write the config loader for service {name}.",
                    "solution": solution, "lang": "python"})
    return out


def secret_of(canary: dict) -> str:
    m = _SECRET_RE.search(canary["solution"])
    if not m:
        raise PrivcodeError("not a canary record (no API_KEY secret)", field="solution")
    return m.group(1)


def with_secret(canary: dict, secret: str) -> dict:
    """The same canary with another candidate secret."""
    return {**canary, "solution": _SECRET_RE.sub(f'API_KEY = "{secret}"', canary["solution"], count=1)}


def inject(records: list[dict], canaries: list[dict], copies: int = 1, seed: int | None = None) -> list[dict]:
    """records + `copies` copies of each canary (ids suffixed '#c<j>'), shuffled when `seed` is given.
    k copies are k records: the guarantee a canary gets is group privacy for a group of k."""
    if copies < 1:
        raise PrivcodeError(f"copies must be ≥ 1, got {copies}")
    out = list(records) + [{**c, "id": f"{c['id']}#c{j}"} for c in canaries for j in range(copies)]
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(ε, δ)-DP per record ⇒ (kε, k·e^{(k−1)ε}·δ)-DP for a group of k records (Dwork & Roth 2014, Lemma 2.2)."""
    if k == 1:
        return epsilon, delta
    if math.isinf(epsilon):
        return math.inf, delta
    try:
        d = k * math.exp((k - 1) * epsilon) * delta
    except OverflowError:
        d = 1.0
    return k * epsilon, min(1.0, d)


# --------------------------------------------------------------------------------------------
# the one-run bound (Steinke, Nasr & Jagielski 2023)


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on P[W ≥ v] when the trained model is (ε, δ)-DP w.r.t. each of the m canaries,
    each included independently with probability 1/2, and the auditor makes r guesses, W of them
    right (Theorem 5.2 of Steinke et al. 2023):

        P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i=1..v} (f(v−i) − f(v)) / i,
        f(u) = P[Binomial(r, q) ≥ u],  q = e^ε / (1 + e^ε)

    (q is the accuracy of ε-DP randomized response; f(v−i) − f(v) = P[v−i ≤ Bin(r, q) < v], and the
    max over i > v is attained at i = v). Returned value is clipped to [0, 1]."""
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v} r={r} m={m}")
    if not eps >= 0:
        raise ValueError(f"need ε ≥ 0, got {eps}")
    if not (0 <= delta <= 1):
        raise ValueError(f"need 0 ≤ δ ≤ 1, got {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-eps)) if eps < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # P[Bin(r, q) ≥ v]
    alpha = 0.0
    if delta > 0:
        pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v−1], P[Bin = v−2], …, P[Bin = 0]
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))  # max_i P[v−i ≤ Bin < v] / i
    p = tail + 2.0 * m * delta * alpha
    return min(1.0, max(0.0, p)) if math.isfinite(p) else 1.0


def eps_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6) -> float:
    """ε_lb: the smallest ε at which `p_value` reaches β (0 if it does at ε = 0).

    For every ε < ε_lb the observation (v of r guesses right) had probability < β under (ε, δ)-DP,
    so "the run is not (ε_lb', δ)-DP for any ε_lb' < ε_lb" holds with confidence 1 − β. Taking the
    first crossing (a scan on a 0.05 grid, then bisection to `tol`) rather than a plain bisection
    keeps this true even where p_value is not monotone in ε. Never NaN; at most EPS_MAX."""
    if not (0 < beta < 1):
        raise ValueError(f"need 0 < β < 1, got {beta}")
    if r == 0 or v == 0 or p_value(m, r, v, 0.0, delta) >= beta:
        if not (0 <= v <= r <= m):
            raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v} r={r} m={m}")
        return 0.0
    lo, hi, step = 0.0, None, 0.05
    e = step
    while e <= EPS_MAX:
        if p_value(m, r, v, e, delta) >= beta:
            hi = e
            break
        lo = e
        e = round(e + step, 10)
    if hi is None:
        return EPS_MAX
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_eps_lb(m: int, r: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """The highest ε_lb that an audit of m canaries and r guesses can report: all r guesses right.
    A claim ε at or above it can never be refuted by that design."""
    return eps_lower_bound(m, r, r, delta, beta)


def guesses_from_scores(scores, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 (in) for the k_pos highest scores, −1 (out) for the k_neg lowest, 0 (abstain) otherwise.
    Ties are broken by index, so the guesses are a deterministic function of the scores."""
    s = np.asarray(scores, dtype=float)
    m = len(s)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg ≥ 0 and k_pos + k_neg ≤ m = {m}, got {k_pos}, {k_neg}")
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-s, kind="stable")
    g = np.zeros(m, dtype=int)
    g[order[:k_pos]] = 1
    if k_neg:
        g[order[m - k_neg:]] = -1
    return g


def audit_counts(guesses, included) -> dict:
    g = np.asarray(guesses, dtype=int)
    s = np.where(np.asarray(included, dtype=bool), 1, -1)
    return {"guesses": int(np.sum(g != 0)), "correct": int(np.sum(g * s == 1)),
            "guesses_in": int(np.sum(g == 1)), "correct_in": int(np.sum((g == 1) & (s == 1))),
            "guesses_out": int(np.sum(g == -1)), "correct_out": int(np.sum((g == -1) & (s == -1)))}


# --------------------------------------------------------------------------------------------
# model access


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
        tok_src = base  # train_dp/train_nondp save the base's tokenizer beside the adapter: the same one
    else:
        model = load_model(str(p), device=device)
        tok_src = str(p)
    model.eval()
    return model, load_tokenizer(tok_src)


def _device(model):
    return next(model.parameters()).device


def _rows(tok, pairs, fmt: str, eos: bool):
    from privcode.data.prompts import render_example

    rows = []
    for problem, solution in pairs:
        prompt, answer = render_example(problem, solution, fmt, tok)
        p = tok(prompt, add_special_tokens=fmt == "qa")["input_ids"]
        a = tok(answer + ((tok.eos_token or "") if eos else ""), add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return rows


def _answer_nll(model, tok, pairs, fmt: str = "qa", eos: bool = False, batch_size: int = 64):
    """Sum and count of answer-token negative log-likelihoods, tokenized exactly as in training."""
    import torch

    from privcode.train import collate

    rows = _rows(tok, pairs, fmt, eos)
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


def _secret_pair(canary: dict, secret: str) -> tuple[str, str]:
    """(problem, answer text up to and including the secret's closing quote)."""
    return canary["problem"], f'{_ANSWER_PREFIX}{secret}"'


# --------------------------------------------------------------------------------------------
# measurements


def exposure(model, tok, canaries: list[dict], n_candidates: int = 1000, seed: int = 0, prompt_format: str = "qa",
             batch_size: int = 64, extrapolate: bool = True) -> list[dict]:
    """Exposure of each canary's secret (Carlini et al. 2019, 'The Secret Sharer').

    Candidates: the true secret plus n_candidates − 1 other secrets drawn uniformly without
    replacement from R (6 digits, |R| = 10^6), all ranked by the model's log-likelihood of the
    canary's answer up to the end of the secret, given the canary's prompt. Estimates:
      - `exposure` (sampled-candidate estimator): log2 n_candidates − log2 rank, i.e. Carlini's
        log2|R| − log2 rank with the rank in R estimated as rank·|R|/n_candidates; its maximum
        is log2 n_candidates;
      - `exposure_extrapolated` (Carlini et al. §4.3): −log2 P_{t∼R}[nll(t) ≤ nll(secret)] with the
        candidates' nll distribution fitted by a skew-normal, which can exceed log2 n_candidates."""
    rng = random.Random(f"privcode-exposure-{seed}")
    out = []
    for c in canaries:
        secret = secret_of(c)
        d = len(secret)
        space = 10 ** d
        n = max(2, min(n_candidates, space))
        others = [x for x in rng.sample(range(space), n) if x != int(secret)][: n - 1]
        cands = [secret] + [str(x).zfill(d) for x in others]
        nll, _ = _answer_nll(model, tok, [_secret_pair(c, s) for s in cands], prompt_format, batch_size=batch_size)
        true = nll[0]
        rank = 1 + int(np.sum(nll[1:] <= true))  # ties ranked above the secret (conservative)
        rec = {"id": c["id"], "rank": rank, "n_candidates": n, "exposure": math.log2(n) - math.log2(rank),
               "nll": float(true)}
        if extrapolate:
            rec["exposure_extrapolated"] = _extrapolated_exposure(nll[1:], true)
        out.append(rec)
    return out


def _extrapolated_exposure(others, true) -> float | None:
    from scipy.stats import skewnorm

    x = np.asarray(others, dtype=float)
    if len(x) < 10 or float(np.std(x)) == 0.0:
        return None
    try:
        a, loc, scale = skewnorm.fit(x)
        lc = float(skewnorm.logcdf(true, a, loc, scale))
    except Exception:  # a failed fit is reported as missing, never as a number
        return None
    if not math.isfinite(lc):
        return None
    return max(0.0, -lc / math.log(2))


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
        prompt, answer = render_example(c["problem"], _ANSWER_PREFIX, prompt_format, tok)
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
    s, n = _answer_nll(model, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
    loss = s / np.maximum(n, 1)
    ref = None
    if reference is not None:
        rs, rn = _answer_nll(reference, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
        ref = rs / np.maximum(rn, 1)
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            rs, rn = _answer_nll(model, tok, pairs, prompt_format, eos=True, batch_size=batch_size)
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
        pairs += [_secret_pair(c, secret)] + [_secret_pair(c, x) for x in cands]
    nll, _ = _answer_nll(model, tok, pairs, prompt_format, batch_size=batch_size)
    nll = nll.reshape(len(canaries), n_candidates + 1)
    return [{"id": c["id"], "loss": float(nll[i, 0]), "ref_loss": float(nll[i, 1:].mean()),
             "score": float(nll[i, 1:].mean() - nll[i, 0])} for i, c in enumerate(canaries)]


@contextmanager
def broken_mechanism(kind: str):
    """Inside: every DP-SGD engine (privcode.dp.engine.DPSGD) built runs a deliberately broken
    mechanism while the plan, the accountant and privacy.json keep the honest values —
    "clip_x10": clip bound 10·C and noise multiplier σ/10 (the noise std σ·C is unchanged, the
    sensitivity is 10×); "noise_off": no noise. For audit controls and the mutation tests only."""
    from privcode.dp import engine

    if kind not in BROKEN:
        raise PrivcodeError(f"unknown broken mechanism '{kind}' (choose from {list(BROKEN)})")
    orig = engine.DPSGD.__init__

    def init(self, *args, **kw):
        if kind == "clip_x10":
            kw["max_grad_norm"] = 10.0 * kw["max_grad_norm"]
            kw["noise_multiplier"] = kw["noise_multiplier"] / 10.0
        else:
            kw["noise_multiplier"] = 0.0
        orig(self, *args, **kw)

    engine.DPSGD.__init__ = init
    try:
        yield
    finally:
        engine.DPSGD.__init__ = orig


# --------------------------------------------------------------------------------------------
# the audit run


@dataclass
class AuditConfig:
    """Options of `privcode audit --params`; any other key must be a TrainConfig field."""
    epsilon: float | str | None = None  # target ε of the DP run, or "inf" for the non-private control
    delta: float = 1e-5
    canaries: int = 1000                # m: audit canaries, each included with probability 1/2
    copies: int = 1                     # records per included canary (group privacy for k > 1)
    seed: int = 0                       # canaries, coins, training, candidates
    k_pos: int | None = None            # "in" guesses (top scores); default m // 4
    k_neg: int | None = None            # "out" guesses (bottom scores); default m // 4
    beta: float = 0.05                  # ε_lb holds with confidence 1 − β
    audit_delta: float | None = None    # δ of the hypothesis tested; default: the canary's claimed δ
    score: str = "secret"               # secret: the true secret's log-loss against random candidates';
                                        # record: mean answer-token loss drop of the whole canary record
    score_candidates: int = 16          # secret score: random candidate secrets per canary
    broken: str | None = None           # a broken-mechanism control: clip_x10 | noise_off (see the docstring)
    allow_weak: bool = False            # run a design whose highest ε_lb is not above the claim (warns)
    n_candidates: int = 1000            # exposure: candidate secrets incl. the true one
    exposure_canaries: int = 20         # exposure/leakage on at most this many included (and excluded) canaries
    samples: int = 10                   # verbatim leakage: completions per canary
    temperature: float = 1.0
    keep_data: bool = False             # keep the audit training set (private records + canaries) in the zone
    train: dict = field(default_factory=dict)  # TrainConfig fields (steps, batch_size, lr, ...)

    @classmethod
    def from_dict(cls, d: dict, where: str = "--params") -> "AuditConfig":
        from privcode.train import TrainConfig

        own = {f.name for f in fields(cls)}
        train_keys = {f.name for f in fields(TrainConfig)} - {"epsilon", "delta", "seed"}
        unknown = sorted(set(d) - own - train_keys)
        if unknown:
            raise PrivcodeError(f"unknown audit option(s) {unknown}; audit options: {sorted(own)}, "
                                f"training options: {sorted(train_keys)}", path=where)
        train = {**d.get("train", {}), **{k: v for k, v in d.items() if k in train_keys and k not in own}}
        cfg = cls(**{k: v for k, v in d.items() if k in own and k != "train"}, train=train)
        cfg.epsilon = _parse_eps(cfg.epsilon)
        TrainConfig.from_dict(cfg.train, where)  # validate early
        if cfg.canaries < 1 or cfg.copies < 1:
            raise PrivcodeError("'canaries' and 'copies' must be ≥ 1", path=where)
        if cfg.score not in SCORES:
            raise PrivcodeError(f"unknown score '{cfg.score}' (choose from {list(SCORES)})", path=where)
        if cfg.broken is not None:
            if cfg.broken not in BROKEN:
                raise PrivcodeError(f"unknown broken mechanism '{cfg.broken}' (choose from {list(BROKEN)})",
                                    path=where)
            if cfg.control:
                raise PrivcodeError("a broken-mechanism control needs a finite 'epsilon' (the claim it breaks)",
                                    path=where)
        return cfg

    @property
    def control(self) -> bool:
        return math.isinf(self.epsilon)


def _parse_eps(x) -> float:
    if x is None:
        raise PrivcodeError("audit needs 'epsilon': the target ε of the DP run, or \"inf\" for the non-private control")
    if isinstance(x, str) and x.lower() in ("inf", "infinity"):
        return math.inf
    try:
        e = float(x)
    except (TypeError, ValueError):
        raise PrivcodeError(f"'epsilon' must be a number or \"inf\", got {x!r}") from None
    if not e > 0:
        raise PrivcodeError(f"'epsilon' must be > 0, got {e}")
    return e


def _eps_json(x):
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _stats(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0, "mean": None, "max": None, "min": None}
    return {"n": len(xs), "mean": float(np.mean(xs)), "max": float(np.max(xs)), "min": float(np.min(xs))}


def check_canary_length(model_ref: str, canaries: list[dict], tcfg) -> None:
    """Refuse canaries whose secret would fall beyond max_length: training truncates each record
    (one record = one row), and a truncated secret is never trained on, so the audit would be void."""
    from privcode.models import load_tokenizer

    tok = load_tokenizer(model_ref)
    rows = _rows(tok, [_secret_pair(c, secret_of(c)) for c in canaries], tcfg.prompt_format, eos=False)
    need = max(len(r["input_ids"]) for r in rows)
    if need > tcfg.max_length:
        raise PrivcodeError(f"canary secrets end at token {need} but training keeps max_length={tcfg.max_length} "
                            f"tokens per record; raise 'max_length'")


def audit_power(m: int, r: int, claim: float, delta: float, beta: float) -> dict:
    """Whether a design of m canaries and r guesses can refute the claim ε at all (`max_eps_lb`)."""
    top = max_eps_lb(m, r, delta, beta)
    return {"eps_lb_max": top, "claim": _eps_json(claim), "can_refute": bool(top > claim), "m": m, "guesses": r,
            "delta": delta, "beta": beta,
            "note": f"the highest ε_lb this design can report (all {r} guesses right) is {top:.3f}"}


def run_audit(model_ref: str, data_path: str, out_dir, cfg: AuditConfig) -> dict:
    """Train on private records + the coin-selected canaries, measure, write out_dir/audit.json."""
    import contextlib

    import torch

    from privcode import ledger, zone
    from privcode.data.records import data_id_of
    from privcode.io import atomic_dir
    from privcode.train import TrainConfig, train_dp, train_nondp

    t0 = time.time()
    out = Path(out_dir)
    m = cfg.canaries
    k_pos = m // 4 if cfg.k_pos is None else cfg.k_pos
    k_neg = m // 4 if cfg.k_neg is None else cfg.k_neg
    if k_pos + k_neg == 0:
        k_pos = 1
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise PrivcodeError(f"need 0 ≤ k_pos, k_neg and k_pos + k_neg ≤ canaries = {m}, got {k_pos}, {k_neg}")
    # power, before anything is trained: can this design refute the claim at all?
    warnings = []
    eps_unit0, delta_unit0 = group_privacy(cfg.epsilon, cfg.delta, cfg.copies)
    power = audit_power(m, k_pos + k_neg, eps_unit0, cfg.audit_delta if cfg.audit_delta is not None else delta_unit0,
                        cfg.beta)
    if not cfg.control and not power["can_refute"]:
        msg = (f"this audit cannot refute the claim: its highest ε_lb (all {k_pos + k_neg} guesses right, "
               f"m={m} canaries, δ={power['delta']:.3g}, β={cfg.beta:g}) is {power['eps_lb_max']:.3f} ≤ the "
               f"claimed ε={eps_unit0:g} per canary; raise 'canaries' and 'k_pos'/'k_neg'")
        if not cfg.allow_weak:
            raise PrivcodeError(msg + " (or set allow_weak to run it anyway)")
        log.warning("AUDIT WITHOUT POWER: %s", msg)
        warnings.append(msg)
    out.mkdir(parents=True, exist_ok=True)
    private = [rec for _, rec in iter_jsonl(data_path, required=("problem", "solution"))]
    canaries = make_canaries(m, cfg.seed)
    coins = np.random.default_rng([cfg.seed, 0x0a0d17]).integers(0, 2, size=m).astype(bool)  # secret coins
    included = [c for c, b in zip(canaries, coins) if b]
    # the audit designs its own training set, so its size is public to the auditor by construction;
    # a broken control is never a release: a reproducible seed marks it (and its data set's budget)
    extra = {} if cfg.control else {"epsilon": cfg.epsilon, "delta": cfg.delta}
    if cfg.broken and cfg.train.get("reproducible_seed") is None:
        extra["reproducible_seed"] = cfg.seed
    tcfg = TrainConfig.from_dict({"dataset_size": "public", **cfg.train, "seed": cfg.seed, **extra})
    check_canary_length(model_ref, canaries, tcfg)
    rows = inject(private, included, cfg.copies, seed=cfg.seed)
    write_json(out / "canaries.json", {"note": "audit ground truth: canary secrets and inclusion coins",
                                       "copies": cfg.copies, "canaries": [
                                           {**c, "secret": secret_of(c), "included": bool(b)}
                                           for c, b in zip(canaries, coins)]})

    priv = zone.run_dir(out)  # the training copy of the private records and the run's statistics
    data_dir = priv / "train_data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_file = data_dir / "records.jsonl"
    with atomic_dir(data_dir, private=True) as tmp:
        write_jsonl(tmp / "records.jsonl", rows)
        try:  # the same data set as the audited one for the budget registry
            data_id = ledger.data_identity(Path(data_path).parent)[0]
        except PrivcodeError:
            data_id = data_id_of(private)
        ledger.private_source(tmp, stage="audit_data", n_records=len(rows), data_id=data_id,
                              canaries=len(included), copies=cfg.copies)
    adapter = out / "adapter"
    broken = broken_mechanism(cfg.broken) if cfg.broken else contextlib.nullcontext()
    try:
        with broken:
            tstats = (train_nondp if cfg.control else train_dp)(model_ref, str(data_file), adapter, tcfg,
                                                                 private_dir=priv / "run")
    finally:  # the copy holds the raw private records: gone unless asked for, also after a failure
        if not cfg.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    claim = ledger.read(adapter)
    if cfg.broken:  # what it claims is false by construction: the adapter is labelled non-private
        ledger.non_private(adapter, stage="audit_broken_control", parents=ledger.model_parents(model_ref),
                           reason=f"trained with a deliberately broken DP mechanism ({cfg.broken}) to test the audit",
                           claimed_epsilon=claim["epsilon"])
    eps_c, delta_c = claim["epsilon"], (cfg.delta if cfg.control else claim["delta"])
    eps_unit, delta_unit = group_privacy(eps_c, delta_c, cfg.copies)
    audit_delta = cfg.audit_delta if cfg.audit_delta is not None else delta_unit
    power = audit_power(m, k_pos + k_neg, eps_unit, audit_delta, cfg.beta)

    model, tok = load_audit_model(adapter, base=model_ref)
    fmt = tcfg.prompt_format
    torch.manual_seed(cfg.seed)
    if cfg.score == "secret":
        scores = secret_scores(model, tok, canaries, cfg.score_candidates, seed=cfg.seed, prompt_format=fmt)
    else:
        scores = loss_scores(model, tok, canaries, prompt_format=fmt)
    guesses = guesses_from_scores([s["score"] for s in scores], k_pos, k_neg)
    counts = audit_counts(guesses, coins)
    eps_lb = eps_lower_bound(m, counts["guesses"], counts["correct"], audit_delta, cfg.beta)
    if cfg.control:
        verdict = "non-private control: no claim to test"
    elif eps_lb > eps_unit:
        verdict = f"VIOLATION: ε_lb={eps_lb:.3f} > claimed ε={eps_unit:g}: the run does not deliver its claim"
    else:
        verdict = f"consistent: ε_lb={eps_lb:.3f} ≤ claimed ε={eps_unit:g}"
    if cfg.broken:
        verdict += f" (broken-mechanism control {cfg.broken}: a violation is expected)"

    ins = [c for c, b in zip(canaries, coins) if b][: cfg.exposure_canaries]
    outs = [c for c, b in zip(canaries, coins) if not b][: cfg.exposure_canaries]
    exp_in = exposure(model, tok, ins, cfg.n_candidates, seed=cfg.seed, prompt_format=fmt)
    exp_out = exposure(model, tok, outs, cfg.n_candidates, seed=cfg.seed, prompt_format=fmt)
    leak_in = verbatim_leakage(model, tok, ins, cfg.samples, cfg.temperature, fmt, seed=cfg.seed)
    leak_out = verbatim_leakage(model, tok, outs, cfg.samples, cfg.temperature, fmt, seed=cfg.seed)

    n_cand = min(cfg.n_candidates, SECRET_SPACE)
    mode = ("control (non-private)" if cfg.control else
            f"broken control ({cfg.broken}): not DP" if cfg.broken else "dp")
    score_desc = (f"mean log-loss of {cfg.score_candidates} random secrets − log-loss of the true secret, under the "
                  "trained model" if cfg.score == "secret" else
                  "mean answer loss under the base model − under the trained model")
    result = {
        "mode": mode,
        "model": model_ref, "data": str(data_path), "adapter": str(adapter),
        "claimed": {"epsilon": _eps_json(eps_c), "delta": delta_c, "unit": "record",
                    "target_epsilon": _eps_json(cfg.epsilon)},
        "canary_unit": {"copies": cfg.copies, "epsilon": _eps_json(eps_unit), "delta": delta_unit,
                        "note": (f"each included canary is {cfg.copies} records, so its guarantee is group privacy: "
                                 f"(kε, k·e^((k−1)ε)·δ) with k = {cfg.copies}") if cfg.copies > 1 else
                        "each included canary is one record: its guarantee is the per-record (ε, δ)"},
        "eps_lb": eps_lb,
        "eps_lb_max": power["eps_lb_max"],
        "power": power,
        "verdict": verdict,
        "warnings": warnings,
        "one_run": {"reference": REFERENCE, "m": m, "included": int(coins.sum()), "k_pos": k_pos, "k_neg": k_neg,
                    **counts, "beta": cfg.beta, "delta": audit_delta, "score": score_desc,
                    "statement": f"with confidence {1 - cfg.beta:g}, the run is not (ε, {audit_delta:.3g})-DP "
                                 f"w.r.t. one canary for any ε < {eps_lb:.4f}"},
        "exposure": {"method": f"sampled candidates: {n_cand} incl. the true secret, drawn uniformly from R "
                               f"(6 random digits, |R| = {SECRET_SPACE}); exposure = log2 n − log2 rank "
                               f"(max {math.log2(n_cand):.3f}); 'extrapolated' fits a skew-normal to the candidates' nll",
                     "secret_space": SECRET_SPACE, "n_candidates": n_cand,
                     "in": _stats([e["exposure"] for e in exp_in]),
                     "out": _stats([e["exposure"] for e in exp_out]),
                     "in_extrapolated": _stats([e.get("exposure_extrapolated") for e in exp_in]),
                     "out_extrapolated": _stats([e.get("exposure_extrapolated") for e in exp_out]),
                     "per_canary_in": exp_in, "per_canary_out": exp_out},
        "leakage": {"prefix": "the canary prompt + answer up to the secret", "samples": cfg.samples,
                    "temperature": cfg.temperature, "rate": leak_in["rate"], "rate_out": leak_out["rate"],
                    "leaked": leak_in["leaked"], "canaries": leak_in["canaries"]},
        "scores": [{**s, "included": bool(b), "guess": int(g)} for s, b, g in zip(scores, coins, guesses)],
        # no record count or loss here: those are non-private statistics (private zone, train_stats.json)
        "train": {"mode": tstats["mode"], "steps": tstats["steps"],
                  "config": {k: v for k, v in asdict(tcfg).items()}},
        "params": {k: _eps_json(v) for k, v in asdict(cfg).items()},
        "seconds": time.time() - t0,
    }
    write_json(out / "audit.json", result)
    (log.error if verdict.startswith("VIOLATION") and not cfg.broken else log.info)(
        "audit (%s): claimed ε=%s (canary ε=%s), ε_lb=%.3f of at most %.3f (%d/%d right), exposure in %.2f / "
        "out %.2f, leakage %.2f — %s", mode, eps_c, eps_unit, eps_lb, power["eps_lb_max"], counts["correct"],
        counts["guesses"], result["exposure"]["in"]["mean"] or 0, result["exposure"]["out"]["mean"] or 0,
        leak_in["rate"], verdict)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode audit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model: hub name or local directory")
    ap.add_argument("--data", required=True, help="private JSONL (problem/solution records)")
    ap.add_argument("--out", required=True, type=Path, help="output directory (audit.json, adapter/, canaries.json)")
    ap.add_argument("--params", default="{}", help="JSON: epsilon (number or \"inf\"), delta, canaries, copies, "
                                                    "seed, k_pos, k_neg, beta, score, broken, allow_weak, "
                                                    "n_candidates, samples, temperature, "
                                                    "and TrainConfig fields (steps, batch_size, lr, ...)")
    a = ap.parse_args(argv)
    try:
        params = json.loads(a.params)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"--params is not valid JSON: {e.msg}") from None
    if not isinstance(params, dict):
        raise PrivcodeError("--params must be a JSON object")
    run_audit(a.model, a.data, a.out, AuditConfig.from_dict(params))
