"""The `unshare` backend: util-linux `unshare` + `setpriv`, needs root (isolation "namespaces+fs";
meets the isolation contract -- the same allow-list root as bwrap).

What it runs, per worker:
    prlimit --core=0 --fsize unshare --net --pid --fork --kill-child --ipc --uts --mount --cgroup
        /usr/bin/python3 -I -S -B -c SHIM <root ops json> setpriv --reuid 65534 ... --no-new-privs
        /usr/bin/python3 -I -B -c <privcode.sandbox.server> <config>
  SHIM runs as root, PID 1 of the new PID namespace, in the new mount namespace (nothing it
  mounts reaches the host): it mounts a small tmpfs over /tmp as the new root, builds in it the
  allow-list root of privcode.sandbox.mounts (read-only binds with every submount read-only, a
  fresh /proc with /proc/sys & co. read-only, a minimal /dev of bound device nodes, private
  size-limited tmpfs /tmp and /dev/shm), remounts the root read-only, sets the hostname,
  pivot_root()s into it and detaches the old root entirely, then execs setpriv -> the server
  (PID 1, uid 65534, no capabilities, no_new_privs). The network namespace has only a loopback
  that is down.

Limitation: a toolchain that lives under the host's /tmp cannot be bound (the new root covers it).
Not protected: kernel exploits beyond the server's small seccomp filter; reading what is in /usr.
"""
from __future__ import annotations

import json
import os
import platform

from privcode.sandbox.base import (SANDBOX_DIR, SANDBOX_UID, Backend, Limits, sandbox_env, server_prlimit_prefix,
                                   setpriv_argv, sys_which, tmpfs_bytes)
from privcode.sandbox.mounts import root_ops

PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # syscall numbers (glibc has no wrapper)

_SHIM = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
KEEP = [(os.ST_NOEXEC, NOEXEC), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)]
R = "/tmp"
def fail(what):
    sys.exit("privcode sandbox: %s: %s" % (what, os.strerror(ctypes.get_errno())))
def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        fail("mount %s" % target)
def unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8))); i += 4
        else:
            out.append(s[i]); i += 1
    return "".join(out)
def remount_ro(path, nodev=True):
    with open("/proc/self/mountinfo") as fh:
        mps = [unescape(line.split()[4]) for line in fh]
    for mp in mps:
        if mp == path or mp.startswith(path + "/"):
            f = os.statvfs(mp).f_flag
            flags = REMOUNT | BIND | RDONLY | NOSUID | (NODEV if nodev else 0)
            for st, ms in KEEP:
                if f & st:
                    flags |= ms
            mount(None, mp, None, flags)
def at(p):
    return R + p
def target(p, is_dir):
    if is_dir:
        os.makedirs(at(p), 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(at(p)), 0o755, exist_ok=True)
        open(at(p), "a").close()
os.umask(0o022)
pivot, ops, cmd = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3:]
mount(None, "/", None, REC | PRIVATE)
mount("tmpfs", R, "tmpfs", NOSUID | NODEV, "size=1m,mode=0755")
for op in ops:
    kind = op[0]
    if kind == "ro":
        target(op[2], os.path.isdir(op[1]))
        mount(op[1], at(op[2]), None, BIND | REC)
        remount_ro(at(op[2]))
    elif kind == "link":
        os.makedirs(os.path.dirname(at(op[2])), 0o755, exist_ok=True)
        os.symlink(op[1], at(op[2]))
    elif kind == "proc":
        target(op[1], True)
        mount("proc", at(op[1]), "proc", NOSUID | NODEV | NOEXEC)
        for sub in ("sys", "sysrq-trigger", "irq", "bus"):
            q = at(op[1]) + "/" + sub
            if os.path.exists(q):
                mount(q, q, None, BIND | REC)
                remount_ro(q)
    elif kind == "dev":
        target(op[1], True)
        d = at(op[1])
        mount("tmpfs", d, "tmpfs", NOSUID | NOEXEC, "size=64k,mode=0755")
        for n in ("null", "zero", "full", "random", "urandom", "tty"):
            if os.path.exists("/dev/" + n):
                open(d + "/" + n, "a").close()
                mount("/dev/" + n, d + "/" + n, None, BIND)
        for n, t in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
            os.symlink(t, d + "/" + n)
    elif kind == "tmpfs":
        target(op[1], True)
        mount("tmpfs", at(op[1]), "tmpfs", NOSUID | NODEV, "size=%d,mode=1777" % op[2])
    elif kind == "hide":
        mount("tmpfs", at(op[1]), "tmpfs", NOSUID | NODEV | RDONLY, "size=4k,mode=0755")
    else:
        sys.exit("privcode sandbox: unknown mount %r" % (op,))
mount(None, R, None, REMOUNT | RDONLY | NOSUID | NODEV)
if libc.sethostname(b"sandbox", 7) != 0:
    fail("sethostname")
os.chdir(R)
if libc.syscall(pivot, b".", b".") != 0:
    fail("pivot_root")
if libc.umount2(b".", 2) != 0:  # MNT_DETACH: the host's tree is gone from this namespace
    fail("umount old root")
os.chdir("/tmp")
os.execv(cmd[0], cmd)
"""

SHIM_PYTHON = ("/usr/bin/python3", "/usr/local/bin/python3")


def _shim_python() -> str | None:
    for p in SHIM_PYTHON:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


class UnshareBackend(Backend):
    """Namespaces (net, pid, ipc, uts, mount, cgroup) + the allow-list root of bwrap + uid 65534
    + rlimits (+ a cgroup); needs root. For hosts with root but without bubblewrap."""
    name = "unshare"
    isolation = "namespaces+fs"

    def _probe(self):
        if os.geteuid() != 0:
            return False, "needs root (mounts in the new namespace, setpriv to uid 65534)"
        for tool in ("unshare", "setpriv", "prlimit"):
            if sys_which(tool) is None:
                return False, f"'{tool}' not found"
        if platform.machine() not in PIVOT_ROOT:
            return False, f"pivot_root's syscall number is not known for {platform.machine()}"
        if _shim_python() is None:
            return False, f"no system python for the mount setup (looked for {', '.join(SHIM_PYTHON)})"
        r = self.run("id -u; hostname\n", "shell", Limits(wall_s=20))
        if r.status != "ok" or r.stdout.split() != [str(SANDBOX_UID), "sandbox"]:
            return False, f"probe run failed ({r.status}: {(r.stderr or r.detail).strip()[-300:]})"
        return True, ""

    def _server_spec(self, limits: Limits, langs=None):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        binds, etc = self.sandbox_binds(langs)
        cfg = {"workdir": SANDBOX_DIR, "wipe": ["/tmp", "/dev/shm"]}
        ops = root_ops(binds, etc, tmpfs_bytes(limits))
        argv = [sys_which("unshare") or "/usr/bin/unshare", "--net", "--pid", "--fork", "--kill-child", "--ipc",
                "--uts", "--mount", "--cgroup", _shim_python() or SHIM_PYTHON[0], "-I", "-S", "-B", "-c", _SHIM,
                str(PIVOT_ROOT.get(platform.machine(), -1)), json.dumps(ops)]
        argv += setpriv_argv() + server_command(self.server_python(), cfg)
        return ServerSpec(server_prlimit_prefix(limits) + argv, sandbox_env(SANDBOX_DIR), "/", cfg)
