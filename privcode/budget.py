"""The privacy budget registry: every DP run trained on, and every release made from, one private
data set — composed by the accountant.

    privcode budget                                  # ε spent and released, per data set
    PRIVCODE_BUDGET_DIR=/secure/budget snakemake ...   # where the registry lives

Where: $PRIVCODE_BUDGET_DIR, else ~/.privcode/budget — a private-zone directory (0700, one JSONL
file per data set, 0600) outside every run directory, so `rm -rf results`, `snakemake -d
runs/table4` or a new ε tag do not reset it. Keyed by the data set's identity (`data_id`, a
hash of the source records that never leaves the zone).

What counts:
- *spent*: every DP run started on the data set (a run that was started and not finished counts
  with its planned steps: its checkpoint may be resumed). Every trained model lands on the release
  side, so this is what the data set has paid if everything were shared. The accountant composes
  the runs' histories [(σ, q, steps), ...] (valid because every run draws fresh secret noise);
  a run with `privacy.reproducible_seed` makes it inf (its noise can be replayed).
- *released*: the DP releases that went out through `privcode release` (privcode.release).
`privacy.total_epsilon_cap` makes a DP run whose start would take *spent* over the cap refuse to
start, and a release that would take *released* over it refuse.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import time
from pathlib import Path

from privcode import zone
from privcode.errors import PrivcodeError

ENV = "PRIVCODE_BUDGET_DIR"


def registry_dir() -> Path:
    d = Path(os.environ.get(ENV) or Path.home() / ".privcode" / "budget").expanduser()
    return zone.mkdir(d)


@contextlib.contextmanager
def _locked():
    """One writer at a time over the whole registry (concurrent Snakemake jobs)."""
    d = registry_dir()
    with open(d / ".lock", "a") as fh:
        os.chmod(d / ".lock", zone.FILE_MODE)
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _path(data_id: str) -> Path:
    if not data_id or any(c not in "0123456789abcdef" for c in data_id):
        raise PrivcodeError(f"bad data id {data_id!r}")
    return registry_dir() / f"{data_id}.jsonl"


def entries(data_id: str) -> list[dict]:
    p = _path(data_id)
    if not p.exists():
        return []
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PrivcodeError(f"malformed registry entry ({e.msg})", path=p, line=i) from None
    return out


def _append(data_id: str, entry: dict) -> None:
    p = _path(data_id)
    with open(p, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(p, zone.FILE_MODE)


def runs(data_id: str) -> dict:
    """run id -> its latest entry (a finished run supersedes its start)."""
    out: dict = {}
    for e in entries(data_id):
        if e["kind"] in ("run_started", "run_finished"):
            out[e["run_id"]] = e
    return out


def compose(histories, delta: float) -> float:
    """ε at δ of the composition of several DP runs' accountant histories (PRV)."""
    from privcode.dp import accountant

    flat = [tuple(h) for hist in histories for h in hist]
    return accountant.epsilon_from_history(flat, delta, "prv") if flat else 0.0


def _total(rs, delta: float, extra=None) -> float:
    rs = list(rs) + ([extra] if extra else [])
    if any(r.get("reproducible") for r in rs):
        return math.inf
    return compose([r["history"] for r in rs], delta)


def spent(data_id: str, delta: float | None = None) -> dict:
    rs = list(runs(data_id).values())
    d = delta if delta is not None else max((r["delta"] for r in rs), default=0.0)
    return {"runs": len(rs), "unfinished": sum(r["kind"] == "run_started" for r in rs),
            "delta": d, "epsilon": _total(rs, d) if rs else 0.0}


def begin_run(data_id: str, *, run: str, history, delta: float, reproducible: bool, cap: float | None) -> str:
    """Register a DP run before its first step (refused when it would take *spent* over `cap`).
    A resumed run (same `run` key, not finished) keeps its id and is not counted twice."""
    from privcode.ledger import new_id

    with _locked():
        rs = runs(data_id)
        for rid, e in rs.items():
            if e["run"] == run and e["kind"] == "run_started":
                return rid
        planned = {"history": [list(h) for h in history], "delta": delta, "reproducible": reproducible}
        if cap is not None:
            d = max([delta] + [r["delta"] for r in rs.values()])
            total = _total(rs.values(), d, planned)
            if total > cap:
                raise PrivcodeError(
                    f"this DP run would take the total privacy cost of its data set to ε={total:.4g} (δ={d:g}) over "
                    f"privacy.total_epsilon_cap={cap:g} ({len(rs)} earlier run(s) in {registry_dir()}); "
                    "not starting", field="total_epsilon_cap")
        rid = new_id()
        _append(data_id, {"kind": "run_started", "run_id": rid, "run": run, **planned})
        return rid


def finish_run(data_id: str, run_id: str, *, run: str, release_id: str, history, delta: float,
               reproducible: bool, output: str) -> None:
    with _locked():
        _append(data_id, {"kind": "run_finished", "run_id": run_id, "run": run, "release_id": release_id,
                          "history": [list(h) for h in history], "delta": delta, "reproducible": reproducible,
                          "output": output})


def locate(release_id: str) -> tuple[str, dict] | None:
    """(data_id, the finished run) that made DP release `release_id`, searching the registry."""
    for p in sorted(registry_dir().glob("*.jsonl")):
        for r in runs(p.stem).values():
            if r.get("release_id") == release_id:
                return p.stem, r
    return None


def released_ids(data_id: str) -> set[str]:
    return {i for e in entries(data_id) if e["kind"] == "release" for i in e["release_ids"]}


def record_release(data_id: str, *, release_ids, dest: str, epsilon: float, delta: float) -> None:
    with _locked():
        _append(data_id, {"kind": "release", "release_ids": sorted(release_ids), "dest": dest,
                          "epsilon": "inf" if math.isinf(epsilon) else epsilon, "delta": delta})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode budget", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    files = sorted(registry_dir().glob("*.jsonl"))
    if not files:
        print(f"no DP runs recorded in {registry_dir()}")
    for i, p in enumerate(files, 1):
        s = spent(p.stem)
        rel = released_ids(p.stem)
        by_rel = {r["release_id"]: r for r in runs(p.stem).values() if r.get("release_id")}
        eps_rel = _total([by_rel[i] for i in rel if i in by_rel], s["delta"]) if rel else 0.0
        print(f"data set {i}: {s['runs']} DP run(s) ({s['unfinished']} unfinished): spent ε={s['epsilon']:.4g}; "
              f"released {len(rel)}: ε={eps_rel:.4g} (δ={s['delta']:g})")
