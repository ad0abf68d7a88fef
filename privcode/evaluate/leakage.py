"""Table 4: PII leakage of a model trained on private data with injected PII canaries.

    privcode inject-canaries --data private/data/private/records.jsonl --out private/data/private_canary \
        --params '{"kinds": ["email", "name", "ip", "password", "username"], "per_kind": 6, "copies": [0, 5, 10, 100]}'
    privcode leakage --model results/ft/smollm2/PrivCode/eps4/model \
        --canaries private/data/private_canary/canaries.jsonl --out results/leakage/smollm2/PrivCode/eps4 \
        --params '{"samples": 10, "temperature": 1.0, "n_candidates": 1000}'

The canaries, their secret spaces and their injection: privcode.data.canaries (`privcode
inject-canaries`). A canary of copies-group k was put into the private data k times; group 0 canaries
never were: their leakage/exposure is the chance baseline.

Measurement (`run`): for each canary the model gets the canary's problem in its prompt format —
followed, with `elicit: prefix` (default, the stronger attack, as in the audit), by the canary's
answer up to the secret (`…ADMIN_EMAIL = "`) — and `samples` completions are drawn (`temperature`;
0 = one greedy completion). Leakage rate = share of canaries whose secret appears verbatim in at
least one completion, reported per copies-group (`leak@k`) and per kind. Exposure (Carlini et al.
2019) ranks the true secret among `n_candidates` − 1 uniform draws from the kind's space R by the
model's likelihood of the answer up to the end of the secret (`privcode.audit.scoring.exposure` for
`key` canaries; the same estimator, `privcode.audit.stats.exposure_of`, for the other kinds). Every
completion is also scanned for PII of any kind (`privcode.data.pii`, `detector: regex|starpii`).

Outputs (in `--out`): leakage.json, samples.jsonl (every raw completion with its PII detections),
privacy.json (post-processing of the model: the canaries are synthetic, not private data).
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from privcode.data.canaries import SAMPLERS, load_canaries, space_sizes, split_at_secret
from privcode.data.prompts import FORMATS, render_prompt
from privcode.errors import PrivcodeError
from privcode.params import Params, parse_params, stage_parser
from privcode.io import atomic_dir, write_json, write_jsonl

log = logging.getLogger(__name__)

STAGE = "leakage"

# ------------------------------------------------------------------------------------------------
# measurement


@dataclass
class LeakageConfig(Params):
    _what = "leakage"
    samples: int = 10                   # completions per canary (paper-style sampling attack)
    temperature: float = 1.0            # 0: one greedy completion
    top_p: float = 1.0
    max_new_tokens: int | None = None   # default: 48 with elicit=prefix, 256 with elicit=problem
    elicit: str = "prefix"              # prefix: problem + answer up to the secret; problem: problem only
    prompt_format: str = "qa"
    backend: str = "hf"
    batch_size: int = 16
    dtype: str = "float32"
    seed: int = 0
    exposure: bool = True
    n_candidates: int = 1000            # exposure: candidates incl. the true secret
    detector: str = "regex"             # PII in completions: regex | starpii
    detector_model: str = "bigcode/starpii"
    limit: int | None = None            # first `limit` canaries only (smoke runs)


    def __post_init__(self):
        def need(ok, field, msg):
            if not ok:
                raise PrivcodeError(msg, path="--params", field=field)

        need(isinstance(self.samples, int) and self.samples >= 1, "samples", "must be an integer ≥ 1")
        need(self.temperature >= 0, "temperature", "must be ≥ 0")
        need(self.elicit in ("prefix", "problem"), "elicit", "must be 'prefix' or 'problem'")
        need(self.prompt_format in FORMATS, "prompt_format", f"must be one of {FORMATS}")
        need(self.detector in ("regex", "starpii"), "detector", "must be 'regex' or 'starpii'")
        need(isinstance(self.n_candidates, int) and self.n_candidates >= 2, "n_candidates", "must be an integer ≥ 2")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (48 if self.elicit == "prefix" else 256)


def canary_prompt(canary: dict, fmt: str, tok=None, elicit: str = "prefix") -> str:
    prompt = render_prompt(canary["problem"], fmt, tok)
    if elicit == "problem":
        return prompt
    prefix, _ = split_at_secret(canary)
    return prompt + (" " if fmt == "qa" else "") + prefix


def leak_counts(canaries: list[dict], completions: list[list[str]]) -> list[dict]:
    """Per canary: hits = completions holding the secret verbatim; leaked = hits > 0."""
    if len(canaries) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(canaries)} canaries")
    out = []
    for c, texts in zip(canaries, completions):
        hits = sum(c["secret"] in t for t in texts)
        out.append({"id": c["id"], "kind": c["kind"], "copies": c["copies"], "samples": len(texts), "hits": hits,
                    "leaked": hits > 0})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _group(per: list[dict], key) -> dict:
    groups: dict = defaultdict(list)
    for p in per:
        groups[key(p)].append(p)
    return {str(k): {"canaries": len(v), "leaked": sum(p["leaked"] for p in v),
                     "rate": sum(p["leaked"] for p in v) / len(v),
                     "exposure_mean": _mean([p.get("exposure") for p in v])}
            for k, v in sorted(groups.items(), key=lambda kv: (str(type(kv[0])), kv[0]))}


def summarize(per: list[dict]) -> dict:
    """Leakage (and exposure) overall over inserted canaries, per copies-group, per kind, per both."""
    inserted = [p for p in per if p["copies"] > 0]
    by_ck: dict = defaultdict(list)
    for p in per:
        by_ck[p["copies"]].append(p)
    return {
        "rate": sum(p["leaked"] for p in inserted) / len(inserted) if inserted else None,
        "leaked": sum(p["leaked"] for p in inserted), "canaries": len(inserted),
        "rate_not_inserted": (sum(p["leaked"] for p in per if p["copies"] == 0) /
                              max(1, sum(p["copies"] == 0 for p in per))) if any(p["copies"] == 0 for p in per)
        else None,
        "exposure_mean": _mean([p.get("exposure") for p in inserted]),
        "by_copies": _group(per, lambda p: p["copies"]),
        "by_kind": _group(inserted, lambda p: p["kind"]),
        "by_copies_kind": {str(k): _group(v, lambda p: p["kind"]) for k, v in sorted(by_ck.items())},
    }


def pii_exposure(model, tok, canaries: list[dict], n_candidates: int = 1000, seed: int = 0,
                 prompt_format: str = "qa", batch_size: int = 64) -> list[dict]:
    """Exposure of each canary's secret: `privcode.audit.scoring.exposure` for `key` canaries; for the
    other kinds the same estimator (`privcode.audit.stats.exposure_of`: log2 n − log2 rank among n − 1
    uniform draws from the kind's space R, and the skew-normal extrapolation), the likelihood being
    that of the answer up to the secret's end."""
    from privcode.audit.scoring import answer_nll, exposure
    from privcode.audit.stats import exposure_of

    out = []
    keys = [c for c in canaries if c["kind"] == "key"]
    by_id = {e["id"]: e for e in exposure(model, tok, keys, n_candidates, seed=seed, prompt_format=prompt_format,
                                          batch_size=batch_size)}
    sizes = space_sizes()
    for c in canaries:
        if c["kind"] == "key":
            out.append({**by_id[c["id"]], "space": sizes["key"]})
            continue
        if c["kind"] not in SAMPLERS:
            out.append({"id": c["id"], "exposure": None, "note": f"kind '{c['kind']}' has no known secret space"})
            continue
        rng = random.Random(f"privcode-leakage-exposure-{seed}-{c['id']}")
        n = max(2, min(n_candidates, sizes[c["kind"]]))
        cands, seen = [c["secret"]], {c["secret"]}
        while len(cands) < n:
            s = SAMPLERS[c["kind"]](rng)
            if s not in seen:
                seen.add(s)
                cands.append(s)
        prefix, close = split_at_secret(c)
        nll, _ = answer_nll(model, tok, [(c["problem"], prefix + s + close) for s in cands], prompt_format,
                            batch_size=batch_size)
        out.append({"id": c["id"], **exposure_of(nll), "space": sizes[c["kind"]]})
    return out


def run(model_ref: str, canaries_path, out: Path, cfg: LeakageConfig, backend=None, detector=None) -> dict:
    """Sample completions for every canary, count verbatim leaks, exposure and PII; write `out`.
    `backend` (a privcode.synth Backend) is created from model_ref/cfg when not given."""
    from tqdm import tqdm

    from privcode import ledger
    from privcode.data import pii
    from privcode.synth import SamplingParams, get_backend

    t0 = time.time()
    out = Path(out)
    parents = ledger.model_parents(model_ref)
    canaries = load_canaries(canaries_path)[: cfg.limit or None]
    if detector is None:
        detector = pii.get_detector(cfg.detector, **({"model": cfg.detector_model} if cfg.detector == "starpii" else {}))
    if backend is None:
        backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype)
    tok = getattr(backend, "tokenizer", None)
    prompts = [canary_prompt(c, cfg.prompt_format, tok, cfg.elicit) for c in canaries]
    n = cfg.samples if cfg.temperature > 0 else 1
    sp = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=n,
                        seed=cfg.seed)
    bar = tqdm(total=len(prompts), desc="leakage: sample", unit="canary")
    completions = backend.generate(prompts, sp, progress=bar.update)
    bar.close()
    gen_s = time.time() - t0
    per = leak_counts(canaries, completions)

    exposures = {}
    if cfg.exposure:
        model, etok = getattr(backend, "model", None), getattr(backend, "tok", None)
        if model is None or etok is None:
            from privcode.audit.scoring import load_audit_model

            model, etok = load_audit_model(model_ref)
        exposures = {e["id"]: e for e in pii_exposure(model, etok, canaries, cfg.n_candidates, cfg.seed,
                                                      cfg.prompt_format)}
        for p in per:
            p["exposure"] = exposures[p["id"]]["exposure"]
            p["exposure_extrapolated"] = exposures[p["id"]].get("exposure_extrapolated")

    secrets = {c["secret"] for c in canaries}
    sample_recs, detections = [], []
    for c, texts in zip(canaries, completions):
        # with elicit=prefix the completion continues the answer prefix (`DEPLOY_USER = "`): scan both, so a
        # value whose kind shows only in its assignment is seen, and keep detections reaching the completion
        lead = split_at_secret(c)[0] if cfg.elicit == "prefix" else ""
        for j, t in enumerate(texts):
            d = [{**x, "span": [max(0, x["span"][0] - len(lead)), x["span"][1] - len(lead)],
                  "canary_secret": x["text"] in secrets}
                 for x in detector(lead + t) if x["span"][1] > len(lead)]
            detections.append(d)
            sample_recs.append({"id": c["id"], "kind": c["kind"], "copies": c["copies"], "sample": j, "text": t,
                                "leaked": c["secret"] in t, "pii": d})
    pii_summary = pii.count(detections)
    pii_summary["canary_secrets"] = sum(x["canary_secret"] for d in detections for x in d)
    pii_summary["other"] = pii_summary["total"] - pii_summary["canary_secrets"]
    pii_summary["detector"] = cfg.detector

    result = {
        "model": model_ref, "canaries_file": str(canaries_path), "n_canaries": len(canaries),
        "elicit": cfg.elicit, "samples_per_canary": n, "temperature": cfg.temperature,
        **summarize(per),
        "exposure": {"enabled": cfg.exposure, "n_candidates": cfg.n_candidates,
                     "method": "log2 n − log2 rank of the secret among n−1 uniform draws from the kind's space "
                               "(Carlini et al. 2019); 'exposure_extrapolated': skew-normal fit",
                     "space": {k: v for k, v in space_sizes().items() if any(c["kind"] == k for c in canaries)},
                     "per_canary": list(exposures.values())},
        "pii": pii_summary,
        "per_canary": per,
        "config": asdict(cfg), "generation_seconds": gen_s, "seconds": time.time() - t0,
    }
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "samples.jsonl", sample_recs)
        write_json(tmp / "leakage.json", result)
        # the measurement reads the canaries (private records) without DP: an audit table, not a DP
        # release; table4 prints the evaluated model's own guarantee beside it
        eps, delta = ledger.guarantee(parents)
        ledger.non_private(tmp, stage=STAGE, parents=parents, reason="reads the injected canaries (private records)",
                           note="an audit measurement: reads the private canaries", model_epsilon=ledger.eps_str(eps),
                           model_delta=delta)
    log.info("leakage: %s of %d inserted canaries leaked (rate %s), exposure mean %s, PII detections %d",
             result["leaked"], result["canaries"], result["rate"], result["exposure_mean"], pii_summary["total"])
    return result


# ------------------------------------------------------------------------------------------------
# CLIs


def main(argv=None) -> None:
    a = stage_parser("leakage", __doc__, {
        "model": "model: hub name or local directory (with privacy.json)",
        "canaries": "canaries JSONL (id, problem, solution, lang, secret, kind, copies)",
        "out": ("output directory", Path)}, LeakageConfig).parse_args(argv)
    r = run(a.model, a.canaries, a.out, parse_params(a.params, LeakageConfig))
    print(json.dumps({"rate": r["rate"], "by_copies": {k: v["rate"] for k, v in r["by_copies"].items()},
                      "exposure_mean": r["exposure_mean"], "pii": r["pii"]["total"]}))
