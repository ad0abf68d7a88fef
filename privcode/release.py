"""Releasing artifacts: copy chosen DP artifacts out with a certificate of what leaving costs.

    privcode release --out release results/ft/smollm2/PrivCode/eps4/model results/synth/smollm2/privsa/eps4/roundtrip
    snakemake --cores all release       # the config's release.artifacts into release.out

Refused: anything inside the private zone; anything whose privacy.json is not a DP release —
ε = inf (NonDPFT, JFT, an exec filter on an unisolated sandbox, prompts split from private data)
or a run with `privacy.reproducible_seed`; a directory holding private-zone files (train_stats.json,
checkpoints); a DP release the budget registry does not know; a release that would take the total
over `--cap` (privacy.total_epsilon_cap).

The certificate (`CERTIFICATE.json`, `CERTIFICATE.md` in the release directory) states each
artifact's own guarantee and, per private data set, the total cost of everything ever released
from it through this command — this release included: the PRV accountant's composition of the
histories of all distinct DP releases (valid because every DP run draws independent secret
noise), at δ = the largest δ among them. It also states what the data set has spent in all (every
DP run trained on it, released or not). Data sets are numbered, never named: their identity is a
function of the private data and stays in the registry.
"""
from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

from privcode import budget, ledger, zone
from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, atomic_file, write_json

CERTIFICATE = "CERTIFICATE.json"
ZONE_FILES = ("train_stats.json", "trained.json", "ckpt")  # never in a release


def check_releasable(d: Path) -> dict:
    """The artifact's privacy.json, or PrivcodeError saying why it may not leave."""
    if zone.contains(d):
        raise PrivcodeError("inside the private zone: never released", path=d)
    rec = ledger.read(d)
    if math.isinf(rec["epsilon"]):
        why = "; ".join(r.get("reason", r["stage"]) for r in rec["releases"] if math.isinf(r["epsilon"]))
        raise PrivcodeError(f"not releasable: ε = inf ({why})", path=d)
    if not rec["dp_release"]:
        raise PrivcodeError(f"not releasable: {'; '.join(rec['notes']) or 'not a DP release'}", path=d)
    found = [str(p.relative_to(d)) for n in ZONE_FILES for p in d.rglob(n)]
    if found:
        raise PrivcodeError(f"holds private-zone files {found}: not releasable as it is", path=d)
    return rec


def _dp_releases(rec: dict) -> list[dict]:
    return [r for r in rec["releases"] if r["kind"] == "dp"]


def release(artifacts, out: Path, *, cap: float | None = None) -> dict:
    """Copy `artifacts` into `out` (atomically) with a certificate; returns the certificate."""
    out = Path(out)
    if zone.contains(out):
        raise PrivcodeError("the release directory must lie outside the private zone", path=out)
    if out.exists():
        raise PrivcodeError("release directory exists: a release is written once (choose a new one)", path=out)
    arts = [Path(a) for a in artifacts]
    if not arts:
        raise PrivcodeError("nothing to release")
    names = [a.name if a.name not in ("model", "adapter") else "-".join(a.parts[-3:]) for a in arts]
    if len(set(names)) != len(names):
        names = ["-".join(a.parts[-4:]) for a in arts]
    recs = [check_releasable(a) for a in arts]

    by_data: dict[str, dict] = {}  # data_id -> {release id -> its finished run}
    for a, rec in zip(arts, recs):
        for r in _dp_releases(rec):
            hit = budget.locate(r["id"])
            if hit is None:
                raise PrivcodeError(f"DP release {r['id']} is not in the budget registry ({budget.registry_dir()}): "
                                    "the total cost cannot be composed (another PRIVCODE_BUDGET_DIR?)", path=a)
            by_data.setdefault(hit[0], {})[r["id"]] = hit[1]

    datasets = []
    for i, (data_id, new) in enumerate(sorted(by_data.items()), 1):
        runs = budget.runs(data_id)
        by_release = {e["release_id"]: e for e in runs.values() if e.get("release_id")}
        before = budget.released_ids(data_id)
        all_ids = before | set(new)
        rs = [by_release[r] for r in sorted(all_ids) if r in by_release]
        delta = max(r["delta"] for r in rs)
        total = budget.compose([r["history"] for r in rs], delta)
        if cap is not None and total > cap:
            raise PrivcodeError(f"this release would take the total released from data set {i} to ε={total:.4g} "
                                f"(δ={delta:g}) over the cap {cap:g}")
        spent = budget.spent(data_id, delta)
        datasets.append({"data_set": i, "_id": data_id, "new_release_ids": sorted(new),
                         "earlier_release_ids": sorted(before), "released_total": {
                             "epsilon": total, "delta": delta, "releases_composed": len(rs),
                             "accountant": "prv composition of the releases' histories"},
                         "spent_total": {"epsilon": ledger.eps_str(spent["epsilon"]), "delta": spent["delta"],
                                         "dp_runs": spent["runs"]}})
    cert = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifacts": [{"name": n, "source": str(a), "epsilon": rec["epsilon"], "delta": rec["delta"],
                       "unit": rec["unit"], "adjacency": rec["adjacency"], "assumptions": rec["assumptions"],
                       "releases": [r["id"] for r in rec["releases"]]} for n, a, rec in zip(names, arts, recs)],
        "data_sets": [{k: v for k, v in d.items() if k != "_id"} for d in datasets],
    }
    with atomic_dir(out) as tmp:
        for n, a in zip(names, arts):
            shutil.copytree(a, tmp / n, ignore=shutil.ignore_patterns(".snakemake_timestamp"))
        write_json(tmp / CERTIFICATE, cert)
        with atomic_file(tmp / "CERTIFICATE.md") as fh:
            fh.write(render(cert))
    for d in datasets:
        budget.record_release(d["_id"], release_ids=d["new_release_ids"], dest=str(out.resolve()),
                              epsilon=d["released_total"]["epsilon"], delta=d["released_total"]["delta"])
    return cert


def render(cert: dict) -> str:
    lines = ["# Release certificate", "", f"Created {cert['created']}.", "", "## Artifacts", ""]
    for a in cert["artifacts"]:
        eps = "0 (public inputs only)" if a["epsilon"] == 0 else f"{a['epsilon']:.4g}"
        lines.append(f"- `{a['name']}` (from `{a['source']}`): (ε = {eps}, δ = {a['delta']:g})-DP"
                     + (f", unit: one {a['unit']}, adjacency: {a['adjacency']}" if a["unit"] else ""))
        lines += [f"  - assumption: {s}" for s in a["assumptions"]]
    lines += ["", "## Total cost per private data set", ""]
    for d in cert["data_sets"]:
        r, s = d["released_total"], d["spent_total"]
        lines.append(f"- data set {d['data_set']}: everything released from it so far, this release included: "
                     f"ε = {r['epsilon']:.4g}, δ = {r['delta']:g} ({r['releases_composed']} DP release(s), "
                     f"{r['accountant']}); all {s['dp_runs']} DP run(s) trained on it: ε = {s['epsilon']}")
    if not cert["data_sets"]:
        lines.append("- none: these artifacts were made from public inputs only")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode release", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="release directory (must not exist)")
    ap.add_argument("--cap", type=float, default=None, help="refuse when the released total would pass this ε")
    ap.add_argument("artifacts", nargs="+", help="artifact directories (each with its privacy.json)")
    a = ap.parse_args(argv)
    cert = release(a.artifacts, a.out, cap=a.cap)
    print(render(cert))
