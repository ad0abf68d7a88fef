"""The privacy ledger: every artifact directory carries a `privacy.json`, written only here.

Guarantee semantics (see docs/privacy.md):
- a DP release (`dp_release`) states (ε, δ) for *one record* of the private data set whose
  sha256 it names, as computed by the accountant — never copied from a config value;
- post-processing (`derive`) keeps the guarantee of its parents: the set of DP releases an
  artifact depends on is carried along, and ε/δ are the sums over *distinct* releases
  (basic sequential composition; a release reached through two paths counts once);
- any stage that reads private data without DP (`non_private`) makes ε = inf;
- an artifact derived from public inputs only has ε = 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import write_json

FILENAME = "privacy.json"
SCHEMA_VERSION = 1


def _eps_out(x: float):
    return "inf" if math.isinf(x) else x


def _eps_in(x) -> float:
    return math.inf if x in ("inf", "Infinity") else float(x)


def _release_id(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def read(artifact_dir) -> dict:
    """Load an artifact's privacy.json; ε/δ come back as floats (inf for non-private)."""
    p = Path(artifact_dir)
    p = p if p.name == FILENAME else p / FILENAME
    if not p.exists():
        raise PrivcodeError("no privacy.json: this artifact was not written by privcode", path=p)
    rec = json.loads(p.read_text())
    for k in ("epsilon", "delta"):
        if k not in rec:
            raise PrivcodeError("missing field", path=p, field=k)
    rec["epsilon"] = _eps_in(rec["epsilon"])
    for r in rec.get("releases", []):
        r["epsilon"] = _eps_in(r["epsilon"])
    rec["_path"] = str(p)
    return rec


def _compose(stage: str, releases: list[dict], parents: list[str], private_sha: list[str], extra: dict) -> dict:
    uniq = {r["id"]: r for r in releases}
    rel = sorted(uniq.values(), key=lambda r: r["id"])
    eps = math.fsum(r["epsilon"] for r in rel) if rel else 0.0
    delta = math.fsum(r["delta"] for r in rel) if rel else 0.0
    shas = sorted(set(private_sha) | {s for r in rel for s in r.get("private_data_sha256", [])})
    return {
        "schema": SCHEMA_VERSION,
        "stage": stage,
        "epsilon": _eps_out(eps),
        "delta": delta,
        "unit": "record" if rel else None,
        "releases": [{**r, "epsilon": _eps_out(r["epsilon"])} for r in rel],
        "private_data_sha256": shas,
        "parents": parents,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def _parent_releases(parents) -> tuple[list[dict], list[str]]:
    rels, paths = [], []
    for p in parents:
        rec = read(p)
        rels.extend(rec.get("releases", []))
        paths.append(str(Path(rec["_path"]).parent))
    return rels, paths


def dp_release(out_dir, *, stage: str, epsilon: float, delta: float, accountant: str, sampler: str,
               sample_rate: float, noise_multiplier: float, max_grad_norm: float, steps: int,
               private_data: str, n_records: int, parents=(), **details) -> dict:
    """Record a new DP release made by `stage` on the private data file `private_data`."""
    if sampler != "poisson":
        raise PrivcodeError(f"the accountant assumes Poisson sampling, got sampler '{sampler}'")
    if not (0 < delta < 1 / n_records):
        raise PrivcodeError(f"delta={delta} must be in (0, 1/N) with N={n_records} records")
    if not math.isfinite(epsilon):
        raise PrivcodeError("a DP release must have a finite epsilon")
    sha = [_sha(private_data)]
    fields = dict(stage=stage, epsilon=epsilon, delta=delta, unit="record", accountant=accountant,
                  sampler=sampler, sample_rate=sample_rate, noise_multiplier=noise_multiplier,
                  max_grad_norm=max_grad_norm, steps=steps, n_records=n_records,
                  private_data_sha256=sha, **details)
    release = {"id": _release_id(fields), **fields}
    prels, ppaths = _parent_releases(parents)
    rec = _compose(stage, prels + [release], ppaths, sha, {"mechanism": "dp-sgd"})
    write_json(Path(out_dir) / FILENAME, rec)
    return read(out_dir)


def non_private(out_dir, *, stage: str, private_data: str, parents=(), **details) -> dict:
    """Record an artifact that read private data without DP: ε = inf."""
    sha = [_sha(private_data)]
    fields = dict(stage=stage, epsilon=math.inf, delta=0.0, unit="record", accountant=None,
                  private_data_sha256=sha, **details)
    release = {"id": _release_id(fields), **fields}
    prels, ppaths = _parent_releases(parents)
    rec = _compose(stage, prels + [release], ppaths, sha, {"mechanism": "non-private"})
    write_json(Path(out_dir) / FILENAME, rec)
    return read(out_dir)


def derive(out_dir, *, stage: str, parents=(), **details) -> dict:
    """Post-processing of `parents` plus public inputs: keeps the parents' guarantee."""
    prels, ppaths = _parent_releases(parents)
    rec = _compose(stage, prels, ppaths, [], {"mechanism": "post-processing" if prels else "public", **details})
    write_json(Path(out_dir) / FILENAME, rec)
    return read(out_dir)


def private_source(out_dir, *, stage: str, private_data: str, n_records: int, **details) -> dict:
    """Mark the private data set itself: it *is* private (ε = inf if released as is)."""
    sha = [_sha(private_data)]
    fields = dict(stage=stage, epsilon=math.inf, delta=0.0, unit="record", accountant=None,
                  private_data_sha256=sha, n_records=n_records, **details)
    release = {"id": _release_id(fields), **fields}
    rec = _compose(stage, [release], [], sha, {"mechanism": "raw-private-data", "n_records": n_records})
    write_json(Path(out_dir) / FILENAME, rec)
    return read(out_dir)


_SHA_CACHE: dict = {}


def _sha(path) -> str:
    from privcode.io import sha256_file

    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


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


# --- spent budget: a DP output path is trained into once ------------------------------------
SPENT = ".privacy_spent.jsonl"  # beside the DP output directory; not an output, so never cleaned up
ALLOW_RETRAIN = "PRIVCODE_ALLOW_RETRAIN"


def check_not_spent(out_dir) -> None:
    """Refuse to train a DP model into a path that already received one: re-training (after a
    config change, a --forcerun, or Snakemake deleting the old output) spends privacy budget again
    on the same data. Set PRIVCODE_ALLOW_RETRAIN=1 to do it deliberately."""
    import os

    out = Path(out_dir)
    reg = out.parent / SPENT
    if os.environ.get(ALLOW_RETRAIN) == "1" or not reg.exists():
        return
    for line in reg.read_text().splitlines():
        rec = json.loads(line)
        if rec["output"] == out.name:
            raise PrivcodeError(
                f"a DP model was already trained here on {rec['created']} (ε={rec['epsilon']}, release "
                f"{rec['release']}); training again spends privacy budget again on the same records. "
                f"Set {ALLOW_RETRAIN}=1 to re-train deliberately (and release only one of the models)",
                path=out)


def record_spent(out_dir) -> None:
    out = Path(out_dir)
    rec = read(out)
    entry = {"output": out.name, "release": rec["releases"][-1]["id"] if rec["releases"] else None,
             "epsilon": rec["epsilon"], "created": rec["created"]}
    with open(out.parent / SPENT, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
