"""One cgroup per sandbox worker: a memory and a pids limit for the sandbox as a whole.

RLIMIT_AS bounds one process's address space only; memfds, tmpfs files and many processes are
not covered by it. A worker's cgroup bounds everything the sandbox charges (every process, memfd,
tmpfs page) at its step's `mem_mb` + SERVER_MB (the fork server and its template) and its process
count at `nproc` + PIDS_EXTRA. When the memory limit is hit the kernel's OOM killer kills inside
the cgroup only; `oom_kills()` tells the host that it happened (the step is then "oom").

Where: `privcode-<pid>/w<N>` below this process's own cgroup -- cgroup v2 when its memory and
pids controllers can be enabled there, else the v1 `memory` and `pids` hierarchies. Needs the
right to create cgroups there (root, or a delegated subtree). Where neither works `create`
returns None and a warning is logged once: the sandbox then has per-process rlimits only.
The wrapper's command is started by a /bin/sh that joins the cgroup first (`wrap`), so every
process of the sandbox is in it from the start.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

SERVER_MB = 16   # on top of a step's mem_mb: the sandbox's server and template (about 9 MiB), the wrapper
PIDS_EXTRA = 8   # on top of nproc: wrapper, server, template
_counter = itertools.count()
_lock = threading.Lock()
_layout: dict | None = None


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _write(path: str, value) -> None:
    with open(path, "w") as fh:
        fh.write(str(value))


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _own_dirs(pid="self") -> dict:
    """{"v2": dir} and/or {"memory": dir, "pids": dir}: the cgroup directories of process `pid` (default
    this one), as this process's cgroup mounts show them."""
    paths = {}
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        num, ctrls, path = line.split(":", 2)
        for c in (ctrls.split(",") if ctrls else ["v2"]):
            paths[c] = path
    out = {}
    for line in _read("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        f, r = left.split(), right.split()
        root, mnt, fstype, opts = _unescape(f[3]), _unescape(f[4]), r[0], r[2].split(",") if len(r) > 2 else []
        keys = ["v2"] if fstype == "cgroup2" else [c for c in ("memory", "pids") if fstype == "cgroup" and c in opts]
        for k in keys:
            p = paths.get(k)
            if k in out or p is None:
                continue
            if root == "/":
                out[k] = mnt.rstrip("/") + p
            elif p == root or p.startswith(root + "/"):
                out[k] = mnt.rstrip("/") + p[len(root):]
    return {k: v.rstrip("/") or "/" for k, v in out.items()}


def read_oom_kills(fd: int) -> int:
    """The `oom_kill` count of an open memory.events (v2) or memory.oom_control (v1) file; 0 where it says none."""
    for line in os.pread(fd, 4096, 0).decode().splitlines():
        k, _, v = line.partition(" ")
        if k == "oom_kill":
            return int(v)
    return 0


def oom_file_of(pid: int) -> str | None:
    """The file that counts the OOM kills of the memory cgroup process `pid` is in (v2 memory.events, v1
    memory.oom_control), as this process sees it -- e.g. a docker/podman container's, found from the host
    by its init's pid; None where it is not readable from here (another host, another cgroup namespace)."""
    try:
        dirs = _own_dirs(pid)
    except (OSError, ValueError):
        return None
    for key, name in (("v2", "memory.events"), ("memory", "memory.oom_control")):
        f = os.path.join(dirs[key], name) if key in dirs else None
        if f and os.access(f, os.R_OK):
            return f
    return None


def _clean_stale(parent: str) -> None:
    """Remove privcode-<pid> directories of processes that are gone (a crash left them)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        if n.startswith("privcode-") and n[9:].isdigit() and not os.path.exists(f"/proc/{n[9:]}"):
            base = os.path.join(parent, n)
            for w in os.listdir(base) if os.path.isdir(base) else []:
                if os.path.isdir(os.path.join(base, w)):
                    _Group([os.path.join(base, w)], "").remove()
            try:
                os.rmdir(base)
            except OSError:
                pass


def _make_parent(own: str, v2: bool) -> str:
    _clean_stale(own)
    base = os.path.join(own, f"privcode-{os.getpid()}")
    os.makedirs(base, exist_ok=True)
    if v2:
        have = _read(os.path.join(own, "cgroup.subtree_control")).split()
        if not {"memory", "pids"} <= set(have):
            _write(os.path.join(own, "cgroup.subtree_control"), "+memory +pids")
        _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
    return base


def _detect() -> dict:
    try:
        own = _own_dirs()
    except (OSError, ValueError) as e:
        return {"mode": None, "why": f"cannot read this process's cgroups: {e}"}
    why = []
    v2 = own.get("v2")
    if v2:
        try:
            ctrls = _read(os.path.join(v2, "cgroup.controllers")).split()
            if not {"memory", "pids"} <= set(ctrls):
                raise OSError(f"controllers here: {' '.join(ctrls) or 'none'}")
            return {"mode": "v2", "dirs": [_make_parent(v2, True)]}
        except OSError as e:
            why.append(f"v2 ({v2}): no memory+pids controllers usable ({e})")
    if "memory" in own and "pids" in own:
        try:
            return {"mode": "v1", "dirs": [_make_parent(own["memory"], False), _make_parent(own["pids"], False)]}
        except OSError as e:
            why.append(f"v1: cannot create cgroups ({e})")
    else:
        why.append("v1: no memory and pids hierarchies")
    return {"mode": None, "why": "; ".join(why)}


def layout() -> dict:
    """{"mode": "v2" | "v1" | None, "dirs": parents, "why": ...}, detected once per process."""
    global _layout
    with _lock:
        if _layout is None:
            _layout = _detect()
            if _layout["mode"] is None:
                log.warning("privcode sandbox: no cgroup memory/pids limit (%s); sandboxes are bounded by "
                            "per-process rlimits only (RLIMIT_AS does not bound memfds, tmpfs or many "
                            "processes)", _layout["why"])
            else:
                atexit.register(_remove_parents, list(_layout["dirs"]))
        return _layout


def _remove_parents(dirs) -> None:
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            pass


def mode() -> str:
    """What bounds a sandbox as a whole here: "v1", "v2" or "none"."""
    return layout()["mode"] or "none"


def create(mem_mb: int, nproc: int):
    """A new worker cgroup (limits set), or None where the host offers none."""
    lay = layout()
    if lay["mode"] is None:
        return None
    name = f"w{next(_counter)}"
    dirs = [os.path.join(d, name) for d in lay["dirs"]]
    g = _Group(dirs, lay["mode"])
    try:
        for d in dirs:
            os.mkdir(d)
        g.set_memory(mem_mb)
        _write(g.file("pids", "pids.max"), int(nproc) + PIDS_EXTRA)
    except OSError as e:
        g.remove()
        log.warning("privcode sandbox: cannot set up cgroup %s: %s", dirs[0], e)
        return None
    return g


class _Group:
    def __init__(self, dirs: list[str], mode: str):
        self.dirs, self.mode = dirs, mode
        self.mem_mb = None
        self._oom_fd = None

    def file(self, ctrl: str, name: str) -> str:
        return os.path.join(self.dirs[0 if self.mode == "v2" or ctrl == "memory" else 1], name)

    def set_memory(self, mem_mb: int) -> None:
        """Limit = mem_mb + SERVER_MB, no swap. Raises OSError if it cannot be set."""
        if mem_mb == self.mem_mb:
            return
        b = (int(mem_mb) + SERVER_MB) * 1024 * 1024
        if self.mode == "v2":
            _write(self.file("memory", "memory.max"), b)
            if os.path.exists(self.file("memory", "memory.swap.max")):
                _write(self.file("memory", "memory.swap.max"), 0)
        else:
            memsw = self.file("memory", "memory.memsw.limit_in_bytes")
            grow = self.mem_mb is not None and mem_mb > self.mem_mb
            # memsw >= limit at every moment: raise memsw first when growing, last when shrinking
            if grow and os.path.exists(memsw):
                _write(memsw, b)
            _write(self.file("memory", "memory.limit_in_bytes"), b)
            if not grow and os.path.exists(memsw):
                _write(memsw, b)
            if self.mem_mb is None:
                _write(self.file("memory", "memory.swappiness"), 0)
        self.mem_mb = mem_mb

    def oom_kills(self) -> int:
        """How often the kernel's OOM killer killed in this cgroup (0 where it does not say)."""
        try:
            if self._oom_fd is None:
                name = "memory.events" if self.mode == "v2" else "memory.oom_control"
                self._oom_fd = os.open(self.file("memory", name), os.O_RDONLY | os.O_CLOEXEC)
            return read_oom_kills(self._oom_fd)
        except (OSError, ValueError):
            return 0

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run by a /bin/sh that first joins this cgroup (every controller), then execs it:
        the whole sandbox is in the cgroup from its first process on."""
        procs = [os.path.join(d, "cgroup.procs") for d in self.dirs]
        procs = (procs + procs)[:2]
        return ["/bin/sh", "-c", 'echo 0 > "$1" && echo 0 > "$2" && shift 2 && exec "$@"', "sh"] + procs + argv

    def pids(self) -> set[int]:
        out = set()
        for d in self.dirs:
            try:
                out |= {int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()}
            except OSError:
                pass
        return out

    def kill(self, seconds: float = 5.0) -> bool:
        """SIGKILL every process in the cgroup until it is empty; False if some would not go."""
        kill_file = os.path.join(self.dirs[0], "cgroup.kill")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return True
            if self.mode == "v2" and os.path.exists(kill_file):
                try:
                    _write(kill_file, 1)
                except OSError:
                    pass
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.005)
        return not self.pids()

    def remove(self) -> None:
        self.kill()
        if self._oom_fd is not None:
            os.close(self._oom_fd)
            self._oom_fd = None
        for d in reversed(self.dirs):
            deadline = time.monotonic() + 2
            while os.path.isdir(d):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        log.warning("privcode sandbox: cannot remove cgroup %s", d)
                        break
                    time.sleep(0.01)
