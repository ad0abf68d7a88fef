"""The `rlimit` backend (isolation "rlimit"): NOT isolating -- refused by the exec filter unless
the user opts in, and then its output counts as a non-private function of what it could read.

What it does: every snippet runs as a child of privcode.sandbox.server on the host, with the
server's rlimits, seccomp filter, empty environment and a fresh working directory (in a tmp
dir that uid 65534 can traverse); as root it drops to uid 65534 with setpriv (no_new_privs, no
capabilities) and the worker is in a cgroup where the host offers one. The server is a child
subreaper: processes that leave the process group (setsid, double fork) are re-parented to it
and killed after each step. Tools the sandbox uid cannot reach (e.g. rustup under /root, mode
0700) count as missing.
Does NOT protect: the network (any host, localhost services), the file system (it reads and
writes whatever its uid may: as nobody, world-readable files and world-writable places such as
/tmp and /dev/shm, which later snippets can see; as your user, your files), other processes of
the same uid (visible with their command lines; a snippet can kill its server -- the snippet is
then "killed" and the worker replaced), disk space (RLIMIT_FSIZE is per file).
"""
from __future__ import annotations

import os
import tempfile

from privcode.sandbox.base import (SANDBOX_GID, SANDBOX_UID, Backend, Limits, sandbox_env, server_prlimit_prefix,
                                   setpriv_argv, sys_which)
from privcode.sandbox.toolchains import world_reachable


class RlimitBackend(Backend):
    """The fork server on the host + rlimits (+ uid 65534 when root). No isolation of network,
    file system or processes: not isolating (see the module docstring)."""
    name = "rlimit"
    isolation = "rlimit"

    @property
    def tool_mode(self) -> str:
        return "host-nobody" if self.drops_uid else "host"

    @property
    def drops_uid(self) -> bool:
        return os.geteuid() == 0 and sys_which("setpriv") is not None

    def _probe(self):
        if not hasattr(os, "killpg"):
            return False, "not a POSIX system"
        r = self.run("exit 0\n", "shell", Limits(wall_s=20))
        if r.status != "ok":
            return False, f"probe run failed ({r.status}: {(r.stderr or r.detail).strip()[-300:]})"
        return True, ""

    def _tmp_root(self) -> str | None:
        """The program (uid 65534) works in a host directory: it must be able to reach it by its
        absolute path (compilers and node resolve it), so skip a tmp dir it cannot traverse."""
        if not self.drops_uid:
            return None
        for d in (tempfile.gettempdir(), "/var/tmp", "/dev/shm"):
            if os.path.isdir(d) and world_reachable(d):
                return d
        return None

    def _server_spec(self, limits, langs=None):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        base = tempfile.mkdtemp(prefix="privcode-fsrv-", dir=self._tmp_root())
        if self.drops_uid:
            os.chown(base, SANDBOX_UID, SANDBOX_GID)
        os.chmod(base, 0o700)
        workdir = os.path.join(base, "sandbox")
        # no private /tmp to wipe and no PID namespace: the server removes only its own directory
        # and kills what re-parents to it (it is a child subreaper). The directory is given
        # relative to the server's cwd (`base`): the host's tmp dir may not be traversable for 65534.
        # no PR_SET_PDEATHSIG: its parent is the host thread that started it, which may end first
        cfg = {"workdir": "sandbox", "wipe": [], "own_ipc": False, "pdeathsig": False}
        argv = (setpriv_argv() if self.drops_uid else []) + server_command(self.server_python(), cfg)
        return ServerSpec(server_prlimit_prefix(limits) + argv, sandbox_env(workdir), base,
                          dict(cfg, home=workdir), cleanup=[base])

    def describe(self) -> dict:
        return {**super().describe(), "uid": SANDBOX_UID if self.drops_uid else os.geteuid()}
