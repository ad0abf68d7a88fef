"""One job over several GPUs: one process per device, each on its own slice of the prompts.

    CUDA_VISIBLE_DEVICES=0,1,2,3 privcode generate --model M --prompts P --out O --params '{"shards": 0}'
    privcode gpu-run --gpus 4 -- privcode generate ...        # what the rule runs (resources.gpus.generate: 4)

`shards: 0` (the default) means one process per device in $CUDA_VISIBLE_DEVICES (which `privcode gpu-run`
sets to the job's GPUs), 1 means this process alone. The parent starts `privcode <stage> ... --shard i/n`
once per device with CUDA_VISIBLE_DEVICES set to that one device; shard i answers items i, i+n, i+2n, …
and appends them to its own progress file; the parent then merges the shards' progress in input order.
A killed job resumes: each shard skips what its progress file holds. Items are independent and each
shard uses the same sampling seed; greedy outputs do not depend on n, nor do sampled ones with the fast
backend (each item samples from its own stream, keyed by its index in the whole input).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from privcode.errors import PrivcodeError


def devices() -> list[str]:
    v = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return [d.strip() for d in v.split(",") if d.strip() and d.strip() != "-1"]


def count(shards: int) -> int:
    """The number of processes for a `shards` setting (0: one per visible device, at least 1)."""
    if shards < 0:
        raise PrivcodeError(f"shards must be ≥ 0 (0: one per visible GPU), got {shards}")
    return shards if shards > 0 else max(len(devices()), 1)


def parse(spec: str | None) -> tuple[int, int] | None:
    """'i/n' → (i, n); None → None."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise PrivcodeError(f"--shard expects i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise PrivcodeError(f"--shard {spec}: need 0 ≤ i < n")
    return i, n


def part(items: list, shard: tuple[int, int] | None) -> list:
    return items if shard is None else items[shard[0]::shard[1]]


def spawn(stage: str, argv: list[str], n: int) -> None:
    """Run `privcode <stage> <argv> --shard i/n` for i < n at once, one device each; raise if one fails."""
    devs = devices()
    if 0 < len(devs) < n:
        raise PrivcodeError(f"{n} shards but CUDA_VISIBLE_DEVICES lists {len(devs)} device(s): {','.join(devs)}")
    procs = []
    for i in range(n):
        env = dict(os.environ)
        if devs:
            env["CUDA_VISIBLE_DEVICES"] = devs[i]
        cmd = [sys.executable, "-m", "privcode.cli", stage, *argv, "--shard", f"{i}/{n}"]
        procs.append(subprocess.Popen(cmd, env=env))
    rcs = [p.wait() for p in procs]
    bad = [f"shard {i}/{n} (exit {rc})" for i, rc in enumerate(rcs) if rc != 0]
    if bad:
        raise PrivcodeError(f"{stage}: {', '.join(bad)} failed; its log is above; re-run to resume")


def progress_files(out: Path) -> list[Path]:
    """The progress files of output `out`: `.<out>.progress.jsonl` (one process) and the shards'."""
    return sorted(out.parent.glob(f".{out.name}.progress*.jsonl"))


def child_progress(out: Path, me: tuple[int, int]) -> tuple[Path, set]:
    """Shard `me`'s own progress file for output `out`, and the ids already done in the others that
    it must not redo: those of another shard count or of one process (read only: siblings of this
    count are appending to theirs right now)."""
    seen = set()
    for f in progress_files(out):
        if not f.name.endswith(f"of{me[1]}.jsonl"):
            seen |= ids_in(f)
    return out.parent / f".{out.name}.progress.{me[0]}of{me[1]}.jsonl", seen


def remove_progress(out: Path) -> None:
    """Delete every progress file of `out` (once `out` itself is written)."""
    for f in progress_files(out):
        f.unlink(missing_ok=True)


def ids_in(path: Path) -> set:
    """The ids of a progress file, read without touching it: a sibling shard may be appending to it
    (a torn last line is skipped)."""
    ids = set()
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            try:
                ids.add(json.loads(raw)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    return ids
