"""The sandbox's root file system as an allow-list: what the isolating backends (bwrap, unshare)
build for every worker, so both meet one contract (docs/sandbox.md, "The isolation contract").

`root_ops(binds, etc, tmpfs_bytes)` lists the mounts of a new, empty root, in order:
  ("ro", host, inside)    read-only bind (recursive, every submount read-only too)
  ("link", target, path)  a symlink (/bin -> usr/bin, where the host has one)
  ("proc", path)          a fresh procfs of the sandbox's own PID namespace
  ("dev", path)           a minimal /dev: null zero full random urandom tty, fd/stdin/stdout/stderr
  ("tmpfs", path, bytes)  a private, size-limited tmpfs, mode 1777 (/tmp, /dev/shm)
  ("hide", path)          an empty read-only tmpfs over a path that must not be seen
What is bound: /usr (and the /bin, /lib... links or directories), a few harmless /etc files
(ETC_FILES), the toolchains' config directories, toolchains from outside /usr under TC_ROOT
(root-owned, read-only). Everything else of the host is simply absent: /home, /root, /srv, /work,
/var, /run (and the host's sockets there), /sys, the rest of /etc, the project, its results and
the private zone. Should one of those lie below a bound path (a checkout under /usr/local, say),
it is covered with an empty tmpfs ("hide").
"""
from __future__ import annotations

import os
from pathlib import Path

# /etc entries programs may need; nothing secret (no shadow, no ssh, no resolv.conf, no hosts)
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
             "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def _must_not_see() -> list[str]:
    """Host paths that must stay invisible even where they lie below a bound directory: the
    working directory (results/, private/), the private zone, the home directory, this checkout."""
    out = [os.getcwd(), os.environ.get("PRIVCODE_ZONE") or "private", str(Path.home())]
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        out.append(str(checkout))
    return [os.path.realpath(p) for p in out]


def _hidden(sources: list[str]) -> list[str]:
    hide = []
    for p in _must_not_see():
        if not os.path.isdir(p):
            continue
        below = any(p.startswith(s.rstrip("/") + "/") for s in sources)
        covers = any(s == p or s.startswith(p.rstrip("/") + "/") for s in sources)  # never hide /usr itself
        if below and not covers and p not in hide:
            hide.append(p)
    return hide


def root_ops(binds=(), etc=(), tmpfs_bytes: int = 64 << 20) -> list[tuple]:
    """The mounts of the sandbox root (see the module docstring). `binds`: (host dir, sandbox
    dir) of toolchains outside /usr; `etc`: config files/directories they read."""
    ops: list[tuple] = [("ro", "/usr", "/usr")]
    for p in TOP_LEVEL:
        if os.path.islink(p):
            ops.append(("link", os.readlink(p), p))
        elif os.path.isdir(p):
            ops.append(("ro", p, p))
    for p in ETC_FILES + tuple(e for e in etc if e not in ETC_FILES):
        if os.path.exists(p):
            ops.append(("ro", p, p))
    ops += [("proc", "/proc"), ("dev", "/dev"), ("tmpfs", "/tmp", int(tmpfs_bytes)),
            ("tmpfs", "/dev/shm", int(tmpfs_bytes))]
    ops += [("ro", host, inside) for host, inside in binds]
    ops += [("hide", p) for p in _hidden([op[1] for op in ops if op[0] == "ro" and op[1] == op[2]])]
    return ops
