"""The `unshare` backend (namespaces + rlimits, needs root) and the plain `rlimit` fallback.

unshare (isolation "namespaces"), what it does:
    prlimit <limits> unshare --net --pid --fork --kill-child --ipc --uts --mount --mount-proc
        /usr/bin/python3 -I -S -c SHIM ...
  where SHIM (the system python, still root but inside the new mount namespace) remounts every
  mount read-only (bind remounts, keeping nosuid/nodev/noexec: only this namespace's view
  changes), covers /tmp, /var/tmp and /dev/shm with fresh small tmpfs and /sys with an empty
  read-only one, copies the program into /tmp/sandbox, then execs
    setpriv --reuid 65534 --regid 65534 --clear-groups --no-new-privs --bounding-set=-all
            --inh-caps=-all /bin/sh -c '"$@"; exit $?' sh <interpreter> <file>
  so the program runs as nobody, without capabilities, unable to gain privileges through setuid
  binaries, as PID 2 under a /bin/sh PID 1 (when PID 1 exits the kernel kills the namespace).
  Protects: the network (an empty network namespace: not even the host's 127.0.0.1), host
  processes (invisible and unsignalable), writes anywhere outside its own tmpfs, hostname/IPC.
  Does NOT protect: READS -- the host file system is all there, read-only; whatever is readable
  by uid 65534 (world-readable project files, data sets, results) can be read and printed.
  Disk: the tmpfs are size-limited but count against host RAM.
  Toolchains outside /usr (rustup's sysroot) are bind-mounted read-only by SHIM under
  /tmp/.privcode-tc/<tool> (root-owned). Fork server / compiled languages: SHIM execs
  setpriv ... python3 -c <privcode.sandbox.server>, which is then PID 1 of the namespace (no
  /bin/sh in between): snippets cannot signal it, and its kill(-1) reaches every leftover.

rlimit (isolation "rlimit"), what it does: the same rlimits, empty environment and a temporary
  working directory (in a tmp dir that uid 65534 can traverse), without namespaces; as root it
  drops to uid 65534 with setpriv (no_new_privs, no capabilities). Every snippet -- one per
  sandbox or on a fork-server worker -- runs as a child of privcode.sandbox.server, a child
  subreaper: processes that leave the process group (setsid, double fork) are re-parented to it
  and killed after the snippet. Tools the sandbox uid cannot reach (e.g. rustup under /root, mode
  0700) count as missing. Does NOT protect: the network (it can reach any host and localhost
  services), the file system (reads and writes whatever its uid may: as nobody, all
  world-writable places such as /tmp; as your user, your files), other processes of the same uid
  (a snippet can kill its server -- the snippet is then "killed" and the worker replaced -- or
  other sandboxes of uid 65534), disk space (RLIMIT_FSIZE is per file), and leftovers of a snippet
  that killed its server first. Use it only for trusted code or when nothing else works;
  `require_isolation=True` refuses it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from privcode.sandbox.base import (SANDBOX_GID, SANDBOX_UID, Backend, Limits, probe, sandbox_env,
                                   server_prlimit_prefix)
from privcode.sandbox.toolchains import TC_ROOT, world_reachable

_SYS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
SANDBOX_DIR = "/tmp/sandbox"  # the program's working directory inside the namespaced backends


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SYS_PATH)


def setpriv_argv() -> list[str]:
    """Drop to nobody: no supplementary groups, no capabilities (also none inheritable or in the
    bounding set), no_new_privs so setuid binaries cannot give root back."""
    return [_which("setpriv") or "/usr/bin/setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}",
            "--clear-groups", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]


def tmpfs_bytes(limits: Limits) -> int:
    return max(8, 4 * int(limits.fsize_mb)) * 1024 * 1024


# Runs as root, PID 1 of the new PID namespace, in the new mount namespace (mount changes here do
# not reach the host). One system-python process does all mounts (exec'ing mount(8) per mount point
# costs ~5 ms each). argv: source file on the host ("-": none, the fork server), its name in the
# sandbox, tmpfs size in bytes, the toolchain binds (JSON [[host dir, sandbox dir], ...]), then the
# command to exec (setpriv ... program).
_SHIM = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
KEEP = [(os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
        (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)]
def mount(src, target, fstype, flags, data):
    if libc.mount(src, target.encode(), fstype, flags, data) != 0:
        e = ctypes.get_errno()
        sys.exit("privcode sandbox: mount %s: %s" % (target, os.strerror(e)))
def unescape(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8))); i += 4
        else:
            out.append(s[i]); i += 1
    return "".join(out)
import json
src, name, size, binds = sys.argv[1:5]
cmd = sys.argv[5:]
code = None
if src != "-":
    with open(src, "rb") as fh:
        code = fh.read()
covered = ("/proc", "/sys", "/tmp", "/var/tmp", "/dev/shm")
seen = set()
with open("/proc/self/mountinfo") as fh:
    mps = [unescape(line.split()[4]) for line in fh]
for mp in mps:
    if mp in seen or any(mp == c or mp.startswith(c + "/") for c in covered):
        continue
    seen.add(mp)
    f = os.statvfs(mp).f_flag
    if f & os.ST_RDONLY:
        continue
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st, ms in KEEP:
        if f & st:
            flags |= ms
    mount(None, mp, None, flags, None)
opts = ("size=%s,mode=1777" % size).encode()
mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts)
for d, o in (("/var/tmp", b"size=1m,mode=1777"), ("/dev/shm", opts)):
    if os.path.isdir(d):
        mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, o)
if os.path.isdir("/sys"):
    mount(b"tmpfs", "/sys", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k,mode=755")
for host, inside in json.loads(binds):  # toolchains: read-only, in root-owned dirs under /tmp
    os.makedirs(inside, 0o755, exist_ok=True)
    mount(host.encode(), inside, None, MS_BIND | 16384, None)  # MS_REC
    f = os.statvfs(inside).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    for st, ms in KEEP:
        if f & st:
            flags |= ms
    mount(None, inside, None, flags, None)
if os.path.isdir("/tmp/.privcode-tc"):
    os.chmod("/tmp/.privcode-tc", 0o755)
if code is None:
    os.chdir("/tmp")
    os.execv(cmd[0], cmd)
os.mkdir("/tmp/sandbox")
os.chmod("/tmp/sandbox", 0o1777)
path = "/tmp/sandbox/" + name
with open(path, "wb") as fh:
    fh.write(code)
os.chmod(path, 0o644)
os.chdir("/tmp/sandbox")
os.execv(cmd[0], cmd)
"""

SHIM_PYTHON = ("/usr/bin/python3", "/usr/local/bin/python3")


def _shim_python() -> str | None:
    for p in SHIM_PYTHON:
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


class UnshareBackend(Backend):
    """Namespaces (net, pid, ipc, uts, mount) + read-only host mounts + uid 65534 + rlimits; needs
    root. Hides the network and host processes and blocks writes, but NOT reads of world-readable
    host files (use bwrap for that)."""
    name = "unshare"
    isolation = "namespaces"
    signal_as_128_plus = True

    def available(self) -> bool:
        return probe(self.name, self._probe)[0]

    def why_unavailable(self) -> str:
        return probe(self.name, self._probe)[1]

    def _probe(self):
        if os.geteuid() != 0:
            return False, "needs root (setpriv to uid 65534 and mounts in the new namespace)"
        for tool in ("unshare", "setpriv", "prlimit"):
            if _which(tool) is None:
                return False, f"'{tool}' not found"
        if _shim_python() is None:
            return False, f"no system python for the mount setup (looked for {', '.join(SHIM_PYTHON)})"
        r = self.run("id -u; hostname >/dev/null; touch /tmp/sandbox/w\n", "shell", Limits(wall_s=20))
        if r.status != "ok" or r.stdout.strip() != str(SANDBOX_UID):
            return False, f"probe run failed ({r.status}: {r.stderr.strip()[-300:]})"
        return True, ""

    def _program_dir(self, workdir: Path) -> str:
        return SANDBOX_DIR

    def _argv(self, cmd, workdir, src, limits):
        inner = setpriv_argv() + ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd
        return self._unshare(src, src.name, limits, "[]") + inner, sandbox_env(SANDBOX_DIR), str(workdir)

    def _unshare(self, src, name, limits, binds_json) -> list[str]:
        return [_which("unshare") or "/usr/bin/unshare", "--net", "--pid", "--fork", "--kill-child",
                "--ipc", "--uts", "--mount", "--mount-proc",
                _shim_python() or SHIM_PYTHON[0], "-I", "-S", "-B", "-c", _SHIM,
                str(src), name, str(tmpfs_bytes(limits)), binds_json]

    def _server_spec(self, limits):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        binds, _ = self.sandbox_binds()  # /etc is visible as it is
        cfg = {"workdir": SANDBOX_DIR, "wipe": ["/tmp", "/var/tmp", "/dev/shm"],
               "keep": [TC_ROOT.rsplit("/", 1)[1]]}
        # no /bin/sh in between: the server is PID 1 (unsignalable from inside, reaps everything)
        argv = self._unshare("-", "-", limits, json.dumps(binds)) + setpriv_argv() + \
            server_command(self.server_python(), cfg)
        return ServerSpec(server_prlimit_prefix(limits) + argv, sandbox_env(SANDBOX_DIR), "/", cfg)


class RlimitBackend(Backend):
    """Plain subprocess + rlimits (+ uid 65534 when root). No isolation of network, file system or
    processes: a last resort for trusted code."""
    name = "rlimit"
    isolation = "rlimit"
    signal_as_128_plus = False
    # without a PID namespace only the server (a child subreaper) can find and kill descendants
    # that left the process group (setsid, double fork): every language goes through it
    direct_langs = ()

    @property
    def tool_mode(self) -> str:
        return "host-nobody" if self.drops_uid else "host"

    def available(self) -> bool:
        return probe(self.name, self._probe)[0]

    def why_unavailable(self) -> str:
        return probe(self.name, self._probe)[1]

    @property
    def drops_uid(self) -> bool:
        return os.geteuid() == 0 and _which("setpriv") is not None

    def _probe(self):
        if not hasattr(os, "killpg"):
            return False, "not a POSIX system"
        r = self.run("exit 0\n", "shell", Limits(wall_s=20))
        if r.status != "ok":
            return False, f"probe run failed ({r.status}: {r.stderr.strip()[-300:]})"
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

    def _prepare(self, workdir: Path, src: Path) -> None:
        if self.drops_uid:
            os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
        workdir.chmod(0o700)

    def _argv(self, cmd, workdir, src, limits):
        argv = (setpriv_argv() if self.drops_uid else []) + cmd
        return argv, sandbox_env(str(workdir)), str(workdir)

    def _server_spec(self, limits):
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
        cfg = {"workdir": "sandbox", "wipe": [], "keep": [], "own_ipc": False, "pdeathsig": False}
        argv = (setpriv_argv() if self.drops_uid else []) + server_command(self.server_python(), cfg)
        return ServerSpec(server_prlimit_prefix(limits) + argv, sandbox_env(workdir), base,
                          dict(cfg, home=workdir), cleanup=[base])

    def describe(self) -> dict:
        return {**super().describe(), "uid": SANDBOX_UID if self.drops_uid else os.geteuid()}
