"""Empirical privacy audit: canaries, exposure, verbatim leakage and a one-run lower bound on ε.

    privcode audit --model results/models/tiny/base --data results/data/private/records.jsonl \
        --out results/audit/tiny/eps4 --params '{"epsilon": 4, "delta": 1e-5, "steps": 100, "canaries": 1000}'
    privcode audit ... --out results/audit/tiny/control --params '{"epsilon": "inf", ...}'           # non-private
    privcode audit ... --out results/audit/tiny/broken --params '{"epsilon": 4, "broken": "clip_x10", ...}'

What it does (`run_audit`):

1. Canaries. `make_canaries(m, seed)` (privcode.data.canaries) makes m records in the private
   data's format ({id, problem, solution, lang}): "Write the config loader for service <name>."
   whose solution holds `API_KEY = "<secret>"`, the secret being 6 uniformly random decimal
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

import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from privcode.audit.scoring import (answer_rows, exposure, load_audit_model, loss_scores, secret_pair, secret_scores,
                                    verbatim_leakage)
from privcode.audit.stats import (REFERENCE, audit_counts, audit_power, eps_json, eps_lower_bound, group_privacy,
                                  guesses_from_scores)
from privcode.data.canaries import SECRET_SPACE, inject, make_canaries, secret_of
from privcode.errors import PrivcodeError
from privcode.io import iter_jsonl, write_json, write_jsonl
from privcode.params import check_options, parse_params, stage_parser

log = logging.getLogger(__name__)

SCORES = ("secret", "record")
BROKEN = ("clip_x10", "noise_off")


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
        check_options(d, sorted(own | train_keys), "audit", where)  # own and TrainConfig's options
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
    rows = answer_rows(tok, [secret_pair(c, secret_of(c)) for c in canaries], tcfg.prompt_format, eos=False)
    need = max(len(r["input_ids"]) for r in rows)
    if need > tcfg.max_length:
        raise PrivcodeError(f"canary secrets end at token {need} but training keeps max_length={tcfg.max_length} "
                            f"tokens per record; raise 'max_length'")


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
        "claimed": {"epsilon": eps_json(eps_c), "delta": delta_c, "unit": "record",
                    "target_epsilon": eps_json(cfg.epsilon)},
        "canary_unit": {"copies": cfg.copies, "epsilon": eps_json(eps_unit), "delta": delta_unit,
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
        "params": {k: eps_json(v) for k, v in asdict(cfg).items()},
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
    # AuditConfig: epsilon (number or "inf"), delta, canaries, copies, seed, k_pos, k_neg, beta, score,
    # broken, allow_weak, n_candidates, samples, temperature, and TrainConfig fields (steps, batch_size, lr, ...)
    a = stage_parser("audit", __doc__, {
        "model": "base model: hub name or local directory", "data": "private JSONL (problem/solution records)",
        "out": ("output directory (audit.json, adapter/, canaries.json)", Path)}, AuditConfig).parse_args(argv)
    run_audit(a.model, a.data, a.out, parse_params(a.params, AuditConfig))
