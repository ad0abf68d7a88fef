"""Running untrusted generated code: limits, results, the backend interface and `get_backend`.

Backends, strongest first (`get_backend("auto")` picks the first that works on this machine):

- ``bwrap`` (privcode.sandbox.bwrap, isolation ``"namespaces+fs"``): bubblewrap. New network, PID,
  IPC, UTS (and cgroup) namespaces; a new root file system that holds only read-only /usr (and the
  /bin, /lib symlinks), a few harmless files of /etc, a fresh /proc, a minimal /dev and a small
  size-limited tmpfs /tmp. The project, the data and result directories, /home, /root are simply
  not there. The program runs as uid/gid 65534 (nobody), no capabilities, no_new_privs.
- ``unshare`` (privcode.sandbox.rlimit, isolation ``"namespaces"``): util-linux ``unshare`` + ``setpriv``
  (needs root). New network, PID, IPC, UTS and mount namespaces; inside the mount namespace every
  mount is made read-only and /tmp, /var/tmp and /dev/shm are fresh small tmpfs; the program runs as
  uid/gid 65534 with no capabilities and no_new_privs. It does NOT hide the file system: everything
  that is world-readable on the host (the project directory, data sets, results) can be READ.
- ``rlimit`` (privcode.sandbox.rlimit, isolation ``"rlimit"``): a plain subprocess with the same
  resource limits and no namespaces -- the fallback for machines where neither of the above works.
  As root it still drops to uid 65534 (setpriv); otherwise the program runs as *your* user. It
  does NOT protect the network (the program can connect anywhere, including localhost services),
  the file system (it can read and write whatever that uid can), or other processes of the same
  uid, and a child that calls setsid() can outlive the wall-clock kill (RLIMIT_CPU still ends a
  busy one). Use ``require_isolation=True`` to refuse it.

What every backend does: an empty environment (PATH=/usr/bin:/bin, LANG=C.UTF-8, HOME=the working
directory), stdin from /dev/null, a fresh temporary working directory removed afterwards, rlimits
(RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0, applied with prlimit(1)), a
wall-clock limit after which the whole process group (and with namespaces, the whole PID namespace)
is SIGKILLed, and stdout/stderr read incrementally and capped (the program is killed when either
stream passes the cap).

What NO backend protects against: kernel exploits (no seccomp filter), CPU/memory side channels,
exhausting host RAM through tmpfs files or many concurrent runs (RLIMIT_AS is per process),
RLIMIT_NPROC being shared by all processes of uid 65534 on the host (so concurrent sandboxes share
it), and reading world-readable files (unshare/rlimit only).

Interpreters: Python code runs under the *system* interpreter (/usr/bin/python3, else
/usr/local/bin/python3), never the project's virtualenv, whose path lies under the project
directory that bwrap hides; the program therefore sees only the system's site-packages. Shell code
runs under /bin/sh. Any other language gives status "toolchain_missing" (extend `LANGUAGES`).
"""
from __future__ import annotations

import abc
import dataclasses
import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from privcode.data.prompts import LANG_ALIASES
from privcode.errors import PrivcodeError

# ---- default limits -------------------------------------------------------------------------
WALL_S = 10            # wall-clock seconds, sandbox start-up included
CPU_S = 10             # RLIMIT_CPU seconds (soft; SIGKILL one second later)
MEM_MB = 1024          # RLIMIT_AS, MiB of address space per process
FSIZE_MB = 16          # RLIMIT_FSIZE, MiB per written file (bwrap/unshare /tmp is 4x this)
NPROC = 64             # RLIMIT_NPROC, processes of the sandbox uid (65534) host-wide
OUTPUT_BYTES = 64 * 1024  # cap per stream (stdout, stderr); the program is killed beyond it

STATUSES = ("ok", "error", "timeout", "oom", "killed", "toolchain_missing", "no_code")
ISOLATION_LEVELS = ("rlimit", "namespaces", "namespaces+fs")  # weakest first

SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_PATH = "/usr/bin:/bin"

_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory",
                   "OutOfMemoryError")


@dataclass(frozen=True)
class Limits:
    wall_s: float = WALL_S
    cpu_s: int = CPU_S
    mem_mb: int = MEM_MB
    fsize_mb: int = FSIZE_MB
    nproc: int = NPROC
    output_bytes: int = OUTPUT_BYTES

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise PrivcodeError(f"sandbox limit {f.name} must be a positive number, got {v!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    status: str                 # one of STATUSES
    returncode: int | None      # exit code; -N when killed by signal N; None if never run
    stdout: str = ""            # decoded (utf-8, errors replaced), at most limits.output_bytes
    stderr: str = ""
    wall_s: float = 0.0
    backend: str = ""
    cpu_s: float = 0.0          # user+sys CPU of the program tree (as far as the kernel reports)
    truncated: bool = False     # output passed the cap (and the program was killed)
    detail: str = ""            # why, in words: "wall-clock limit 10s", "cpu limit", ...

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Toolchain:
    """How to run one language: the source file name and the command, with "{exe}" (the first
    existing path in `candidates`) and "{file}" (the source file) filled in. A compiled language
    can use a shell command line, e.g. ("/bin/sh", "-c", "g++ -O2 -o p {file} && exec ./p")."""
    filename: str
    candidates: tuple[str, ...]
    command: tuple[str, ...]
    syntax_markers: tuple[str, ...] = ()  # stderr text that means "does not even parse/compile"

    def exe(self) -> str | None:
        for c in self.candidates:
            if os.path.isfile(c) and os.access(c, os.X_OK):
                return c
        return None

    def argv(self, file: str) -> list[str] | None:
        exe = self.exe()
        if exe is None:
            return None
        return [a.replace("{exe}", exe).replace("{file}", file) for a in self.command]


LANGUAGES: dict[str, Toolchain] = {
    "python": Toolchain("main.py", ("/usr/bin/python3", "/usr/local/bin/python3"),
                        ("{exe}", "-B", "-s", "{file}"),
                        ("SyntaxError", "IndentationError", "TabError")),
    "shell": Toolchain("main.sh", ("/bin/sh",), ("{exe}", "{file}"), ("Syntax error", "syntax error")),
}


def canonical_lang(lang: str | None) -> str:
    """'py' -> 'python', 'bash' -> 'shell' (the aliases of privcode.data.prompts); else lowercased."""
    lang = (lang or "").strip().lower()
    for name, aliases in LANG_ALIASES.items():
        if lang == name or lang in aliases:
            return name
    return lang


def is_syntax_error(result: RunResult, lang: str) -> bool:
    tc = LANGUAGES.get(canonical_lang(lang))
    if tc is None or result.status != "error":
        return False
    tail = result.stderr[-2000:]
    return any(m in tail for m in tc.syntax_markers)


# ---- process execution shared by all backends ------------------------------------------------

@dataclass
class _Exec:
    returncode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    wall_s: float
    cpu_s: float
    timed_out: bool
    output_exceeded: bool


def _prlimit_prefix(limits: Limits) -> list[str]:
    prl = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if prl is None:
        return []
    cpu = int(max(1, round(limits.cpu_s)))
    mem = int(limits.mem_mb) * 1024 * 1024
    fsz = int(limits.fsize_mb) * 1024 * 1024
    nproc = int(limits.nproc)
    return [prl, f"--cpu={cpu}:{cpu + 1}", f"--as={mem}:{mem}", f"--fsize={fsz}:{fsz}",
            f"--nproc={nproc}:{nproc}", "--core=0:0", "--"]


def _preexec_limits(limits: Limits):
    """Only used when prlimit(1) is missing (preexec_fn is not thread-safe; prlimit is preferred)."""
    cpu = int(max(1, round(limits.cpu_s)))
    mem = int(limits.mem_mb) * 1024 * 1024
    fsz = int(limits.fsize_mb) * 1024 * 1024

    def fn():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsz, fsz))
        resource.setrlimit(resource.RLIMIT_NPROC, (int(limits.nproc), int(limits.nproc)))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return fn


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(argv: list[str], *, env: dict, cwd: str, limits: Limits, pass_fds=()) -> _Exec:
    """Run argv under `limits` in a new session; SIGKILL its process group on the wall limit or
    when a stream passes the output cap. Never blocks past the wall limit (plus kill latency)."""
    prefix = _prlimit_prefix(limits)
    start = time.monotonic()
    deadline = start + float(limits.wall_s)
    cap = int(limits.output_bytes)
    proc = subprocess.Popen(prefix + argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, start_new_session=True,
                            close_fds=True, pass_fds=pass_fds,
                            preexec_fn=None if prefix else _preexec_limits(limits))
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    timed_out = exceeded = False
    sel = selectors.DefaultSelector()
    try:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(bufs)
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                buf = bufs[fd]
                room = cap - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    exceeded = True
            if exceeded:
                break
        # Streams closed (or we gave up on them): wait for the process itself, still within the
        # wall limit, without reaping it, so its process group id stays ours while we kill it.
        while not (timed_out or exceeded):
            try:
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is not None and info.si_pid:
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.002)
        # the leader is running or a zombie: its pgid cannot have been recycled; kill stragglers
        _kill_group(proc.pid)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        if proc.returncode is None:  # an exception above: do not leave it running
            _kill_group(proc.pid)
            proc.wait()
    wall = time.monotonic() - start
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return _Exec(rc, sig, bytes(bufs[out_fd]), bytes(bufs[err_fd]), wall, ru.ru_utime + ru.ru_stime,
                 timed_out, exceeded)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


# ---- backends ---------------------------------------------------------------------------------

class Backend(abc.ABC):
    """Runs one program. Subclasses build the command line; limits, output capping, killing and
    classification are shared. `run` is thread-safe (one temporary directory per call).
    What each concrete backend protects and does not protect: see this module's docstring."""

    name: str = "?"
    isolation: str = "?"
    # True when the wrapper reports "killed by signal N" as exit status 128+N (bwrap, and the
    # /bin/sh that is PID 1 in unshare's namespace)
    signal_as_128_plus: bool = False

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this backend works on this machine (probed once, cached)."""

    def why_unavailable(self) -> str:
        return ""

    @abc.abstractmethod
    def _argv(self, cmd: list[str], workdir: Path, src: Path, limits: Limits) -> tuple[list[str], dict, str]:
        """(argv, env, cwd) running `cmd` (paths as the program sees them) in the sandbox."""

    def _program_dir(self, workdir: Path) -> str:
        """Where the source file is, as the program sees it."""
        return str(workdir)

    def _prepare(self, workdir: Path, src: Path) -> None:
        """Make the working directory usable by the sandbox uid (hook)."""

    def run(self, code: str | None, lang: str, limits: Limits | None = None) -> RunResult:
        limits = limits or Limits()
        if code is None or not code.strip():
            return RunResult("no_code", None, backend=self.name, detail="no code to run")
        clang = canonical_lang(lang)
        tc = LANGUAGES.get(clang)
        if tc is None:
            return RunResult("toolchain_missing", None, backend=self.name,
                             detail=f"no toolchain for language '{lang}' (have: {', '.join(LANGUAGES)})")
        workdir = Path(tempfile.mkdtemp(prefix="privcode-sbx-"))
        try:
            src = workdir / tc.filename
            src.write_text(code, encoding="utf-8")
            src.chmod(0o644)
            cmd = tc.argv(str(Path(self._program_dir(workdir)) / tc.filename))
            if cmd is None:
                return RunResult("toolchain_missing", None, backend=self.name,
                                 detail=f"none of {', '.join(tc.candidates)} exists for '{clang}'")
            self._prepare(workdir, src)
            argv, env, cwd = self._argv(cmd, workdir, src, limits)
            ex = execute(argv, env=env, cwd=cwd, limits=limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._classify(ex, limits)

    def _classify(self, ex: _Exec, limits: Limits) -> RunResult:
        stdout, stderr = _decode(ex.stdout), _decode(ex.stderr)
        sig, rc = ex.signal, ex.returncode
        if rc is not None and self.signal_as_128_plus and 128 < rc <= 128 + 64:
            sig, rc = rc - 128, None
        returncode = -sig if sig is not None else rc
        res = RunResult("ok", returncode, stdout, stderr, round(ex.wall_s, 4), self.name,
                        round(ex.cpu_s, 4), ex.output_exceeded)
        oom = any(m in stderr[-2000:] for m in _MEMORY_MARKERS)
        if ex.timed_out:
            res.status, res.detail = "timeout", f"wall-clock limit {limits.wall_s}s"
        elif ex.output_exceeded:
            res.status, res.detail = "killed", f"output over {limits.output_bytes} bytes"
        elif sig is not None:
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and ex.cpu_s >= limits.cpu_s - 0.25):
                res.status, res.detail = "timeout", f"cpu limit {limits.cpu_s}s"
            elif oom:
                res.status, res.detail = "oom", f"memory limit {limits.mem_mb} MiB"
            else:
                try:
                    name = signal.Signals(sig).name
                except ValueError:
                    name = str(sig)
                res.status, res.detail = "killed", f"killed by signal {name}"
        elif rc != 0:
            if oom:
                res.status, res.detail = "oom", f"memory limit {limits.mem_mb} MiB"
            else:
                res.status, res.detail = "error", f"exit status {rc}"
        return res

    def describe(self) -> dict:
        return {"name": self.name, "isolation": self.isolation}


# ---- probing and selection -------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[bool, str]] = {}


def probe(key: str, fn) -> tuple[bool, str]:
    """Run `fn() -> (ok, why)` once per process and cache it (thread-safe)."""
    with _probe_lock:
        if key not in _probe_cache:
            try:
                _probe_cache[key] = fn()
            except Exception as e:  # a probe must never crash selection
                _probe_cache[key] = (False, f"{type(e).__name__}: {e}")
        return _probe_cache[key]


def _registry() -> dict:
    from privcode.sandbox.bwrap import BwrapBackend
    from privcode.sandbox.rlimit import RlimitBackend, UnshareBackend
    return {"bwrap": BwrapBackend, "unshare": UnshareBackend, "rlimit": RlimitBackend}


BACKENDS = ("bwrap", "unshare", "rlimit")  # strongest first


def get_backend(name: str = "auto", *, require_isolation: bool = False) -> Backend:
    """A ready backend. `auto` = the strongest available (bwrap > unshare > rlimit).
    With `require_isolation`, a backend without namespaces (`rlimit`) is refused."""
    reg = _registry()
    if isinstance(name, Backend):
        b = name
    elif name == "auto":
        reasons = []
        b = None
        for n in BACKENDS:
            cand = reg[n]()
            if cand.available():
                b = cand
                break
            reasons.append(f"{n}: {cand.why_unavailable()}")
        if b is None:  # pragma: no cover - rlimit is always available on Linux
            raise PrivcodeError("no sandbox backend works here (" + "; ".join(reasons) + ")")
        if require_isolation and b.isolation == "rlimit":
            raise PrivcodeError("no isolating sandbox backend works here and isolation is required ("
                                + "; ".join(reasons) + "); install bubblewrap (apt-get install bubblewrap)"
                                " or run as root for unshare, or drop --require-isolation to use the"
                                " unisolated rlimit fallback")
        return b
    else:
        if name not in reg:
            raise PrivcodeError(f"unknown sandbox backend '{name}' (choose from auto, {', '.join(BACKENDS)})")
        b = reg[name]()
    if not b.available():
        raise PrivcodeError(f"sandbox backend '{b.name}' does not work here: {b.why_unavailable()}")
    if require_isolation and b.isolation == "rlimit":
        raise PrivcodeError(f"sandbox backend '{b.name}' has no namespace isolation and isolation is required")
    return b


def sandbox_env(home: str) -> dict:
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home}


def can_setuid() -> bool:
    return os.geteuid() == 0
