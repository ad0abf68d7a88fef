"""The `bwrap` backend: bubblewrap (isolation "namespaces+fs"), the strongest one.

What it does:
    prlimit <limits> bwrap --unshare-net --unshare-pid --unshare-ipc --unshare-uts
        --unshare-cgroup-try [--unshare-user --uid 65534 --gid 65534   when not root]
        --ro-bind /usr /usr  (+ /bin /lib /lib64 /sbin as symlinks or read-only binds, as on the host)
        --ro-bind-try <a few harmless /etc files: ld.so.cache, passwd, group, localtime, ...>
        --proc /proc --dev /dev --tmpfs /tmp --tmpfs /dev/shm (size-limited, 1777)
        [--ro-bind <toolchain dir outside /usr> /tmp/.privcode-tc/<tool>   fork server / compiled]
        --dir /tmp/sandbox --ro-bind <source file> /tmp/sandbox/<name> --chdir /tmp/sandbox
        --die-with-parent --new-session --clearenv --setenv PATH/LANG/HOME
        [setpriv --reuid 65534 ... --no-new-privs   when root] <interpreter> <file>
  The program sees a new root file system made of read-only /usr and nothing else of the host:
  the project directory (and its virtualenv), data, results, /home, /root, /etc/shadow, /var are
  absent. It runs as uid 65534 without capabilities (when we are root, bwrap runs "privileged"
  without a user namespace and setpriv drops to a *real* uid 65534, so RLIMIT_NPROC counts; without
  root, a user namespace maps 65534 to the calling user). The network namespace is empty (no route
  even to the host's 127.0.0.1). bwrap's own PID 1 reaps everything, and --die-with-parent plus the
  process-group kill end the whole namespace on timeout.
  Fork server: the same sandbox (plus the toolchain directories and their /etc config dirs, all
  read-only) with `--as-pid-1` running privcode.sandbox.server as PID 1 and uid 65534.

What it does NOT protect against: kernel exploits (no seccomp filter is installed), reading what
is inside /usr (system files, other installed software), RAM exhaustion through the tmpfs (size
is capped at 4 x fsize_mb but counts against host RAM) or through many concurrent runs.
"""
from __future__ import annotations

import os
from pathlib import Path

from privcode.sandbox.base import (SANDBOX_GID, SANDBOX_UID, Backend, Limits, probe, sandbox_env,
                                   server_prlimit_prefix)
from privcode.sandbox.rlimit import SANDBOX_DIR, _which, setpriv_argv, tmpfs_bytes
from privcode.sandbox.toolchains import TC_ROOT

# /etc entries the programs may need; nothing secret (no shadow, no ssh, no resolv.conf)
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
             "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf")
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


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


class BwrapBackend(Backend):
    """bubblewrap: namespaces + a new root holding only read-only /usr, uid 65534 + rlimits. The
    project, data and results directories are not visible. No seccomp filter."""
    name = "bwrap"
    isolation = "namespaces+fs"
    signal_as_128_plus = True  # bwrap exits 128+N when the program died of signal N

    def available(self) -> bool:
        return probe(self.name, self._probe)[0]

    def why_unavailable(self) -> str:
        return probe(self.name, self._probe)[1]

    @property
    def privileged(self) -> bool:
        return os.geteuid() == 0

    def _probe(self):
        if _which("bwrap") is None:
            return False, "bubblewrap is not installed (apt-get install bubblewrap)"
        if self.privileged and _which("setpriv") is None:
            return False, "'setpriv' not found"
        r = self.run("id -u\n", "shell", Limits(wall_s=20))
        if r.status != "ok" or r.stdout.strip() != str(SANDBOX_UID):
            return False, f"probe run failed ({r.status}: {r.stderr.strip()[-300:]})"
        return True, ""

    def _program_dir(self, workdir: Path) -> str:
        return SANDBOX_DIR

    def _common(self, limits: Limits, binds=(), etc=()) -> list[str]:
        a = [_which("bwrap") or "/usr/bin/bwrap",
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--hostname", "sandbox",
             "--ro-bind", "/usr", "/usr"]
        for p in TOP_LEVEL:
            if os.path.islink(p):
                a += ["--symlink", os.readlink(p), p]
            elif os.path.isdir(p):
                a += ["--ro-bind", p, p]
        made: set = set()
        for p in ETC_FILES + tuple(e for e in etc if e not in ETC_FILES):
            if os.path.exists(p):
                a += _parents(p, made) + ["--ro-bind", p, p]
        size = str(tmpfs_bytes(limits))
        a += ["--proc", "/proc", "--dev", "/dev",
              "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
              "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
        for host, inside in binds:  # toolchains from outside /usr: /tmp/.privcode-tc/<tool>, read-only
            a += _parents(inside, made) + ["--ro-bind", host, inside]
        return a

    def _tail(self, cmd: list[str]) -> list[str]:
        a = ["--die-with-parent", "--new-session", "--clearenv"]
        for k, v in sandbox_env(SANDBOX_DIR).items():
            a += ["--setenv", k, v]
        if self.privileged:
            return a + ["--"] + setpriv_argv() + cmd
        return a + ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
                    "--cap-drop", "ALL", "--"] + cmd

    def _argv(self, cmd, workdir, src, limits):
        a = self._common(limits)
        a += ["--perms", "1777", "--dir", SANDBOX_DIR,
              "--ro-bind", str(src), f"{SANDBOX_DIR}/{src.name}",
              "--chdir", SANDBOX_DIR]
        return a + self._tail(cmd), sandbox_env(SANDBOX_DIR), str(workdir)

    def _server_spec(self, limits):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        binds, etc = self.sandbox_binds()
        cfg = {"workdir": SANDBOX_DIR, "wipe": ["/tmp", "/dev/shm"], "keep": [TC_ROOT.rsplit("/", 1)[1]]}
        # the server is PID 1 of the namespace: snippets cannot signal it (the kernel ignores
        # signals to a namespace's init from inside), kill(-1) from it reaches every leftover
        a = self._common(limits, binds, etc) + ["--chdir", "/tmp", "--as-pid-1"]
        a += self._tail(server_command(self.server_python(), cfg))
        return ServerSpec(server_prlimit_prefix(limits) + a, sandbox_env("/tmp"), "/", cfg)
