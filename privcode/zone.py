"""The private zone: where private data and every non-private function of it live.

    PRIVCODE_ZONE=private privcode dp-finetune ... --private-dir private/dp/smollm2/privsa/eps4

Layout of a pipeline run (relative to Snakemake's working directory; `privacy.zone` in the config):

    private/                       0700, owned by the pipeline user
      data/private/                the private records (the prepared split), their ledger
      data/private_canary/         the same with canaries (Table 4), the canaries' secrets
      data/private_masked/         JFT's PII-masked copy
      dp/<model>/<variant>/eps<ε>/ train_stats.json (realized batch sizes, losses, record counts),
                                   checkpoints with RNG state (deleted on success), the re-train guard
      ft/<model>/<method>/<tag>/   train_stats.json of the non-DP fine-tunes
      logs/, benchmarks/           logs and runtimes of the rules that read private data

and the budget registry (privcode.budget), which lives outside any run directory.

Everything here is files 0600 and directories 0700, so the sandbox uid (65534) cannot read it
even where a sandbox could see the path; nothing here is mounted into a sandbox, read by the
report or the figures, or copied by `privcode release`. Everything outside it is the release
side: artifacts whose privacy.json states their guarantee.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

ENV = "PRIVCODE_ZONE"
DEFAULT = "private"
DIR_MODE, FILE_MODE = 0o700, 0o600


def root() -> Path:
    """The zone of this run: $PRIVCODE_ZONE, else ./private."""
    return Path(os.environ.get(ENV) or DEFAULT)


def mkdir(path) -> Path:
    """Create `path` (and missing parents) as 0700 directories; returns it."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for p in missing + [path]:
        os.chmod(p, DIR_MODE)
    return path


def harden(path) -> None:
    """Make `path` and everything below it owner-only: directories 0700, files 0600."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_file():
        os.chmod(path, FILE_MODE)
        return
    os.chmod(path, DIR_MODE)
    for d, dirs, files in os.walk(path):
        for n in dirs:
            os.chmod(os.path.join(d, n), DIR_MODE)
        for n in files:
            fp = os.path.join(d, n)
            if not os.path.islink(fp):
                os.chmod(fp, FILE_MODE)


def contains(path, zone=None) -> bool:
    """Whether `path` lies inside the zone (resolved paths)."""
    z = Path(zone or root()).resolve()
    p = Path(path).resolve()
    return p == z or z in p.parents


def run_dir(out) -> Path:
    """Default private directory of a training run writing `out`: the zone mirrors the path
    (results/dp/x/adapter -> private/dp/x/adapter)."""
    out = Path(out).resolve()
    try:
        rel = out.relative_to(Path.cwd().resolve())
    except ValueError:
        rel = Path("abs", *out.parts[1:])
    if rel.parts and rel.parts[0] == "results":
        rel = Path(*rel.parts[1:])
    return root() / rel


def unreadable_by(uid: int, zone=None) -> tuple[bool, str]:
    """Whether a process of `uid` (the sandbox's) cannot enter the zone: the zone root is a
    directory of another owner with no group/other permissions. (True when there is no zone.)"""
    z = Path(zone or root())
    if not z.exists():
        return True, f"no private zone at {z}"
    st = z.stat()
    if st.st_uid == uid:
        return False, f"the private zone {z} belongs to the sandbox uid {uid}"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return False, f"the private zone {z} is mode {oct(stat.S_IMODE(st.st_mode))}, not 0700"
    return True, f"{z} is 0700, owner uid {st.st_uid}"
