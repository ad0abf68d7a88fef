"""The privacy ledger: every artifact directory carries a `privacy.json`, written only here.

    python -c "from privcode import ledger; print(ledger.read('results/dp/smollm2/privsa/eps4/adapter')['epsilon'])"

What a privacy.json states (docs/privacy.md):
- a DP release (`dp_release`) is (ε, δ)-DP for one record (the unit) under add/remove-one-record
  adjacency, with ε from the accountant's history of the steps actually run — never a config
  value — and the assumption made about the data set's size N;
- post-processing (`derive`) keeps the guarantee of its parents: the set of releases an artifact
  depends on is carried along, and ε/δ are the sums over *distinct* releases (basic sequential
  composition; a release reached through two paths counts once; `privcode release` composes
  the accountant histories instead, which is tighter);
- a stage that reads private data without DP (`non_private`) makes ε = inf; the private data
  itself (`private_source`, in the private zone) is such a release;
- an artifact derived from public inputs only has ε = 0.

What it never states on the release side (a test checks): anything computed from the private
data without DP — no hash or id of the data (release ids are drawn from OS entropy), no record
count unless the owner declared N public, no realized batch size, loss or count. So two runs on
neighbouring data sets write the same privacy.json up to the random ids and the timestamps.
`dp_release: false` (with a note) marks artifacts that are not DP releases whatever their ε says,
e.g. those of a run with `privacy.reproducible_seed`.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path

from privcode import zone
from privcode.errors import PrivcodeError
from privcode.io import write_json

FILENAME = "privacy.json"
SCHEMA_VERSION = 2
UNIT = "record"
ADJACENCY = "add/remove one record"
# keys that are functions of the private data: allowed only inside the private zone
ZONE_ONLY = ("data_id", "n_records", "private_data_sha256")
REPRODUCIBLE_NOTE = "not a DP release: trained with privacy.reproducible_seed (noise and sampling can be replayed)"


def new_id() -> str:
    """A release id: random, so it says nothing about the data."""
    return secrets.token_hex(8)


def eps_str(x: float):
    """ε as written to JSON: a number, or the string "inf"."""
    return "inf" if math.isinf(x) else x


_eps_out = eps_str


def eps_in(x) -> float:
    return math.inf if x in ("inf", "Infinity") else float(x)


def read(artifact_dir) -> dict:
    """Load an artifact's privacy.json; ε/δ come back as floats (inf for non-private)."""
    p = Path(artifact_dir)
    p = p if p.name == FILENAME else p / FILENAME
    if not p.exists():
        raise PrivcodeError("no privacy.json: this artifact was not written by privcode", path=p)
    try:
        rec = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"malformed JSON: {e.msg}", path=p, line=e.lineno) from None
    for k in ("epsilon", "delta", "schema"):
        if k not in rec:
            raise PrivcodeError("missing field (written by an older privcode? re-run the stage)", path=p, field=k)
    if rec["schema"] != SCHEMA_VERSION:
        raise PrivcodeError(f"privacy.json schema {rec['schema']}, this privcode reads {SCHEMA_VERSION}; "
                            "re-run the stage that wrote it", path=p, field="schema")
    rec["epsilon"] = eps_in(rec["epsilon"])
    for r in rec.get("releases", []):
        r["epsilon"] = eps_in(r["epsilon"])
    rec["_path"] = str(p)
    return rec


def _check_release_side(out_dir, rec: dict) -> None:
    if zone.contains(out_dir):
        return
    for where in [rec, *rec["releases"]]:
        bad = [k for k in ZONE_ONLY if k in where]
        if bad:
            raise PrivcodeError(f"refusing to write {bad} (a function of the private data) into a release-side "
                                "privacy.json", path=out_dir)


def _write(out_dir, stage: str, releases: list[dict], parents: list[str], mechanism: str, notes=(),
           top: dict | None = None, **details) -> dict:
    uniq = {r["id"]: r for r in releases}
    rel = sorted(uniq.values(), key=lambda r: r["id"])
    eps = math.fsum(r["epsilon"] for r in rel) if rel else 0.0
    delta = math.fsum(r["delta"] for r in rel) if rel else 0.0
    notes = sorted({*(r["note"] for r in rel if r.get("note")), *(n for n in notes if n)})
    rec = {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "epsilon": _eps_out(eps),
        "delta": delta,
        "unit": UNIT if rel else None,
        "adjacency": ADJACENCY if rel else None,
        "dp_release": math.isfinite(eps) and not any(r.get("reproducible") for r in rel),
        "notes": notes,
        "assumptions": sorted({r["assumption"] for r in rel if r.get("assumption")}),
        "mechanism": mechanism,
        "releases": [{**r, "epsilon": _eps_out(r["epsilon"])} for r in rel],
        "parents": parents,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(top or {}),
        **details,
    }
    _check_release_side(out_dir, rec)
    write_json(Path(out_dir) / FILENAME, rec, private=zone.contains(out_dir))
    return read(out_dir)


def _parents(parents) -> tuple[list[dict], list[str], list[dict]]:
    rels, paths, recs = [], [], []
    for p in parents:
        rec = read(p)
        rels.extend(rec.get("releases", []))
        paths.append(str(Path(rec["_path"]).parent))
        recs.append(rec)
    return rels, paths, recs


def dp_release(out_dir, *, stage: str, epsilon: float, delta: float, history, accountant: str, sampler: str,
               size: dict, reproducible: bool, parents=(), **details) -> dict:
    """Record a new DP release made by `stage`. `history` is the accountant's [(σ, q, steps), ...];
    `size` the N assumption (privcode.dp.plan.size_assumption)."""
    if sampler != "poisson":
        raise PrivcodeError(f"the accountant assumes Poisson sampling, got sampler '{sampler}'")
    if not (0 < delta < 1):
        raise PrivcodeError(f"delta={delta} must be in (0, 1)")
    if not math.isfinite(epsilon):
        raise PrivcodeError("a DP release must have a finite epsilon")
    sigmas, qs = {h[0] for h in history}, {h[1] for h in history}
    release = {"id": new_id(), "kind": "dp", "stage": stage, "epsilon": epsilon, "delta": delta, "unit": UNIT,
               "adjacency": ADJACENCY, "accountant": accountant, "sampler": sampler,
               "history": [list(h) for h in history], "steps": sum(int(h[2]) for h in history),
               "noise_multiplier": sigmas.pop() if len(sigmas) == 1 else None,
               "sample_rate": qs.pop() if len(qs) == 1 else None,
               **size, "randomness": "reproducible seed" if reproducible else "secret (OS entropy, fresh per run)",
               **details}
    if reproducible:
        release["reproducible"] = True
        release["note"] = REPRODUCIBLE_NOTE
    prels, ppaths, _ = _parents(parents)
    return _write(out_dir, stage, prels + [release], ppaths, "dp-sgd")


def non_private(out_dir, *, stage: str, reason: str, parents=(), note: str | None = None, **details) -> dict:
    """Record an artifact whose output may depend on private data without DP: ε = inf."""
    release = {"id": new_id(), "kind": "non-private", "stage": stage, "epsilon": math.inf, "delta": 0.0,
               "reason": reason, **({"note": note} if note else {})}
    prels, ppaths, _ = _parents(parents)
    return _write(out_dir, stage, prels + [release], ppaths, "non-private", **details)


def guarantee(parents) -> tuple[float, float]:
    """(ε, δ) that an artifact derived from `parents` alone would carry (nothing is written)."""
    rels = {r["id"]: r for r in _parents(parents)[0]}.values()
    return math.fsum(r["epsilon"] for r in rels), math.fsum(r["delta"] for r in rels)


def derive(out_dir, *, stage: str, parents=(), note: str | None = None, **details) -> dict:
    """Post-processing of `parents` plus public inputs: keeps the parents' guarantee."""
    prels, ppaths, _ = _parents(parents)
    return _write(out_dir, stage, prels, ppaths, "post-processing" if prels else "public", notes=[note],
                  **details)


def private_source(out_dir, *, stage: str, n_records: int, data_id: str | None = None, parents=(),
                   note: str | None = None, **details) -> dict:
    """Mark a private data set (a private-zone directory): raw private records are ε = inf if
    released as they are. `data_id` names the data set in the budget registry; a data set made
    from another private one (canaries added, PII masked) inherits its parent's."""
    if not zone.contains(out_dir):
        raise PrivcodeError(f"private data must live in the private zone ({zone.root()}); "
                            "set PRIVCODE_ZONE or write it under the zone", path=out_dir)
    prels, ppaths, precs = _parents(parents)
    if data_id is None:
        ids = {r.get("data_id") for r in precs} - {None}
        if len(ids) != 1:
            raise PrivcodeError("a derived private data set needs exactly one private parent with a data_id",
                                path=out_dir)
        data_id = ids.pop()
    release = {"id": new_id(), "kind": "raw-private-data", "stage": stage, "epsilon": math.inf, "delta": 0.0,
               "reason": "the private records themselves", **({"note": note} if note else {})}
    return _write(out_dir, stage, prels + [release], ppaths, "raw-private-data",
                  top={"data_id": data_id, "n_records": n_records}, **details)


def data_identity(data_dir) -> tuple[str, int]:
    """(data_id, N) of a private data directory, from its (private-zone) privacy.json."""
    rec = read(data_dir)
    if "data_id" not in rec:
        raise PrivcodeError("not a private data set written by privcode (no data_id in its privacy.json): "
                            "DP training reads data prepared by `privcode prepare-data`", path=rec["_path"])
    return rec["data_id"], int(rec["n_records"])


def model_parents(ref: str) -> list[str]:
    """Ledger parents for a model reference: a local directory must carry privacy.json (its
    provenance is unknown otherwise); a hub name ('org/name') is public by assumption."""
    p = Path(ref)
    if p.exists():
        if not (p / FILENAME).exists():
            raise PrivcodeError("local model has no privacy.json, so its provenance is unknown; "
                                "build it with `privcode build-model` or add a public ledger entry", path=p)
        return [str(p)]
    return []
