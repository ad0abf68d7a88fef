"""The `bwrap` backend: bubblewrap (isolation "namespaces+fs"); meets the isolation contract.

What it runs, per worker:
    prlimit --core=0 --fsize bwrap --unshare-net --unshare-pid --unshare-ipc --unshare-uts
        --unshare-cgroup-try --hostname sandbox
        <the allow-list root of privcode.sandbox.mounts: read-only /usr (+ /bin, /lib... links),
         harmless /etc files, toolchains at /opt/privcode-tc/<tool>, /proc, a minimal /dev,
         private size-limited tmpfs /tmp and /dev/shm>
        --chdir /tmp --as-pid-1 --die-with-parent --new-session --clearenv --setenv PATH/LANG/HOME
        [setpriv --reuid 65534 ... --no-new-privs   as root | --unshare-user --uid 65534 --cap-drop ALL]
        /usr/bin/python3 -I -B -c <privcode.sandbox.server> <config>
  The server is PID 1 of the namespace, uid 65534, without capabilities; the network namespace
  has only a loopback that is down; no descriptor of the host is inherited. As root bwrap runs
  without a user namespace and setpriv drops to a real uid 65534 (so RLIMIT_NPROC counts);
  otherwise a user namespace maps 65534 to the calling user.

Not protected: kernel exploits beyond the server's small seccomp filter; reading what is in /usr.
"""
from __future__ import annotations

import os

from privcode.sandbox.base import (SANDBOX_DIR, SANDBOX_GID, SANDBOX_UID, Backend, Limits, sandbox_env,
                                   server_prlimit_prefix, setpriv_argv, sys_which, tmpfs_bytes)
from privcode.sandbox.mounts import root_ops


def _parents(path: str, made: set) -> list[str]:
    """--dir for each missing parent of `path`, mode 0755 (bwrap would make them 0700: the
    sandbox uid could not reach a bound /etc file or toolchain)."""
    out = []
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if d in made or d in ("/usr", "/tmp", "/dev", "/proc") or d.startswith("/usr/"):
            continue
        made.add(d)
        out += ["--perms", "0755", "--dir", d]
    return out


def bwrap_args(ops) -> list[str]:
    """The root of privcode.sandbox.mounts as bubblewrap options."""
    a: list[str] = []
    made: set = set()
    for op in ops:
        kind = op[0]
        if kind == "ro":
            a += _parents(op[2], made) + ["--ro-bind", op[1], op[2]]
        elif kind == "link":
            a += ["--symlink", op[1], op[2]]
        elif kind in ("proc", "dev"):
            a += [f"--{kind}", op[1]]
        elif kind == "tmpfs":
            a += ["--perms", "1777", "--size", str(op[2]), "--tmpfs", op[1]]
        elif kind == "hide":
            a += ["--tmpfs", op[1], "--remount-ro", op[1]]
        else:  # pragma: no cover
            raise ValueError(f"unknown mount {op!r}")
    return a + ["--remount-ro", "/"]


class BwrapBackend(Backend):
    """bubblewrap: namespaces + an allow-list root + uid 65534 + rlimits (+ a cgroup where the
    host offers one). The project, data, results and private zone are not visible."""
    name = "bwrap"
    isolation = "namespaces+fs"

    @property
    def privileged(self) -> bool:
        return os.geteuid() == 0

    def _probe(self):
        if sys_which("bwrap") is None:
            return False, "bubblewrap is not installed (apt-get install bubblewrap)"
        if self.privileged and sys_which("setpriv") is None:
            return False, "'setpriv' not found"
        r = self.run("id -u\n", "shell", Limits(wall_s=20))
        if r.status != "ok" or r.stdout.strip() != str(SANDBOX_UID):
            return False, f"probe run failed ({r.status}: {(r.stderr or r.detail).strip()[-300:]})"
        return True, ""

    def _tail(self, cmd: list[str]) -> list[str]:
        a = ["--die-with-parent", "--new-session", "--clearenv"]
        for k, v in sandbox_env(SANDBOX_DIR).items():
            a += ["--setenv", k, v]
        if self.privileged:
            return a + ["--"] + setpriv_argv() + cmd
        return a + ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
                    "--cap-drop", "ALL", "--"] + cmd

    def _server_spec(self, limits: Limits, langs=None):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        binds, etc = self.sandbox_binds(langs)
        cfg = {"workdir": SANDBOX_DIR, "wipe": ["/tmp", "/dev/shm"]}
        a = [sys_which("bwrap") or "/usr/bin/bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc",
             "--unshare-uts", "--unshare-cgroup-try", "--hostname", "sandbox"]
        a += bwrap_args(root_ops(binds, etc, tmpfs_bytes(limits)))
        # the server is PID 1 of the namespace: snippets cannot signal it (the kernel ignores
        # signals to a namespace's init from inside)
        a += ["--chdir", "/tmp", "--as-pid-1"] + self._tail(server_command(self.server_python(), cfg))
        return ServerSpec(server_prlimit_prefix(limits) + a, sandbox_env("/tmp"), "/", cfg)
