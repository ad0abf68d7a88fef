"""The round-trip threshold τ: which programs it keeps, in the run (privcode.filters.roundtrip) and
afterwards on the run's stored scores, without new descriptions or scores (`privcode rethreshold`).

    privcode rethreshold --roundtrip results/synth/smollm2/<variant>/eps4/roundtrip --tau 0.5 \
        --out results/synth/smollm2/<variant>/eps4/roundtrip-tau0.5
    kept, dropped = apply_threshold("results/synth/smollm2/<variant>/eps4/roundtrip/scores.jsonl", 0.5)

A program is kept when its best valid description scores F1 ≥ τ. τ is applied after generation and
scoring, so another τ needs no new descriptions: `rethreshold` re-applies it to the run's scores.jsonl
(`apply_threshold`) and writes kept.jsonl, dropped.jsonl, scores.jsonl, stats.json and privacy.json
(post-processing of the round-trip directory: same ε). Table 5's τ sweep evaluates its outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from privcode.data.prompts import parse_description
from privcode.errors import PrivcodeError
from privcode.filters import early_stop
from privcode.io import atomic_dir, iter_jsonl, read_json, read_jsonl, write_json, write_jsonl

STAGE = "roundtrip_filter_rethreshold"
_PLACEHOLDER = "[full described problem]"  # the template itself, echoed back: not a description


def valid_descriptions(texts: list[str]) -> list[tuple[int, str]]:
    """(index, description) of the answers that parse as 'You are tasked with ...'."""
    out = []
    for i, t in enumerate(texts):
        d = parse_description(t)
        if d is not None and _PLACEHOLDER not in d:
            out.append((i, d))
    return out


def _decide(rec: dict, threshold: float) -> tuple[dict | None, dict | None]:
    """(kept record, None) or (None, dropped record) for one scores.jsonl record."""
    best = rec.get("best")
    if best is None:
        return None, {"id": rec["id"], "reason": "no_valid_description", "score": None, "n_valid": 0}
    if best["f1"] >= threshold:
        return {"id": rec["id"], "problem": rec["problem"], "solution": rec["solution"], "lang": rec["lang"],
                "best_description": best["text"], "score": best["f1"]}, None
    return None, {"id": rec["id"], "reason": "below_threshold", "score": best["f1"], "n_valid": len(rec["valid"])}


def split(score_records: list[dict], threshold: float) -> tuple[list[dict], list[dict]]:
    kept, dropped = [], []
    for rec in score_records:
        k, d = _decide(rec, threshold)
        (kept.append(k) if k is not None else dropped.append(d))
    return kept, dropped


def apply_threshold(scores_path, threshold: float) -> tuple[list[dict], list[dict]]:
    """Re-apply τ to a run's scores.jsonl: (kept, dropped) exactly as `run` writes them. A run with
    early stop refuses a τ its stopped programs cannot decide (privcode.filters.early_stop)."""
    recs = [r for _, r in iter_jsonl(scores_path, required=("id", "problem", "solution", "lang"))]
    for r in recs:
        if "valid" not in r or "best" not in r:
            raise PrivcodeError("not a round-trip scores record (no 'valid'/'best')", path=scores_path)
    early_stop.check_threshold(recs, threshold, scores_path)
    return split(recs, threshold)


def first_match(rec: dict) -> float | None:
    """F1 of the first valid description (the naive strategy best-of-n improves on)."""
    return rec["valid"][0]["f1"] if rec["valid"] else None


def rethreshold(roundtrip_dir, tau: float, out_dir) -> dict:
    """Re-apply τ to a round-trip run's scores (no generation, no scoring); returns the stats."""
    from privcode import ledger

    src, out = Path(roundtrip_dir), Path(out_dir)
    if not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise PrivcodeError(f"τ must be a finite number, got {tau!r}")
    ledger.read(src)  # no privacy.json: not a privcode artifact
    scores_path = src / "scores.jsonl"
    kept, dropped = apply_threshold(scores_path, float(tau))
    if not kept:
        raise PrivcodeError(f"τ={tau} keeps none of the {len(dropped)} programs", path=scores_path)
    scores = read_jsonl(scores_path)
    kept_ids = {k["id"] for k in kept}
    for r in scores:
        r["kept"] = r["id"] in kept_ids
    best = [r["best"]["f1"] for r in scores if r.get("best") is not None]
    old = read_json(src / "stats.json") if (src / "stats.json").exists() else {}
    stats = {"samples": len(scores), "kept": len(kept), "dropped": len(dropped), "kept_rate": len(kept) / len(scores),
             "no_valid": sum(d["reason"] == "no_valid_description" for d in dropped),
             "below_threshold": sum(d["reason"] == "below_threshold" for d in dropped),
             "threshold": float(tau), "best_score_mean": statistics.fmean(best) if best else None,
             "best_score_median": statistics.median(best) if best else None,
             "rethreshold_of": str(src), "source_threshold": old.get("threshold"),
             "scorer": old.get("scorer"), "model": old.get("model")}
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_jsonl(tmp / "scores.jsonl", scores)
        write_json(tmp / "stats.json", stats)
        ledger.derive(tmp, stage=STAGE, parents=[str(src)], threshold=float(tau))
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode rethreshold", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--roundtrip", required=True, type=Path, help="a round-trip filter output directory")
    ap.add_argument("--tau", required=True, type=float)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    s = rethreshold(a.roundtrip, a.tau, a.out)
    print(json.dumps({k: s[k] for k in ("samples", "kept", "kept_rate", "threshold")}))
