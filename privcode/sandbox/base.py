"""Running untrusted generated code: limits, results, the backend interface and `get_backend`.

Backends, strongest first (`get_backend("auto")` picks the first that works on this machine):

- ``container`` (privcode.sandbox.container, isolation ``"container"``): Docker, Podman or
  Apptainer/Singularity running the image of containers/sandbox.Dockerfile (sandbox.def): the
  image's own root file system and toolchains, no network, uid 65534, all capabilities dropped,
  no_new_privs, the engine's seccomp profile and cgroup memory/pids limits (Docker/Podman).
  Available only when an engine is installed AND usable AND the image exists.
- ``bwrap`` (privcode.sandbox.bwrap, isolation ``"namespaces+fs"``): bubblewrap. New network, PID,
  IPC, UTS (and cgroup) namespaces; a new root file system that holds only read-only /usr (and the
  /bin, /lib symlinks), a few harmless files of /etc, the toolchains' directories (read-only), a
  fresh /proc, a minimal /dev and small size-limited tmpfs /tmp and /dev/shm. The project, the
  data and result directories, /home, /root are simply not there. The program runs as uid/gid
  65534 (nobody), no capabilities, no_new_privs.
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
  uid (it can kill its own server and other sandboxes of that uid). Leftover processes are killed
  by the server (a child subreaper). Use ``require_isolation=True`` to refuse it.

What every backend does: an empty environment (PATH=/usr/bin:/bin, LANG=C.UTF-8, HOME=the working
directory), stdin from /dev/null, a fresh temporary working directory removed afterwards, rlimits
(RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_CORE=0), a wall-clock limit after which
the whole process group (and with namespaces, the whole PID namespace) is SIGKILLed, and
stdout/stderr read incrementally and capped (the program is killed when either stream passes the
cap).

Two ways to run (same limits, same isolation): `Backend.run` starts one sandbox per snippet
(Python and shell: the interpreter directly; compiled languages and containers: a one-shot
privcode.sandbox.server doing the compile and run steps). `Backend.pool(workers)` keeps
`workers` long-lived sandboxes, each running the fork server (privcode.sandbox.server), which
forks one child per snippet -- no sandbox or interpreter start per snippet. What snippets of one
fork-server worker share, and how later snippets are protected: see docs/sandbox.md and the
server's docstring.

What NO backend protects against: kernel exploits (no seccomp filter, except the container
engine's), CPU/memory side channels, exhausting host RAM through tmpfs files or many concurrent
runs (RLIMIT_AS is per process), RLIMIT_NPROC being shared by all processes of uid 65534 on the
host (so concurrent sandboxes share it), and reading world-readable files (unshare/rlimit only).

Languages (privcode.sandbox.toolchains): python, shell, cpp, java, rust, javascript, typescript,
php, csharp, swift -- each where its toolchain exists (else status "toolchain_missing"). Python
code runs under the *system* interpreter (/usr/bin/python3, else /usr/local/bin/python3), never
the project's virtualenv; the program therefore sees only the system's site-packages. Compiled
languages are compiled inside the sandbox too, with their own limit (`Limits.compile_s`).
"""
from __future__ import annotations

import abc
import base64
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
from privcode.sandbox.toolchains import COMPILE_MEM_MB, LANGUAGES, TOOLS, Plan, plan_from, resolve_host_tool

# ---- default limits -------------------------------------------------------------------------
WALL_S = 10            # wall-clock seconds, sandbox start-up included (run step)
CPU_S = 10             # RLIMIT_CPU seconds (soft; SIGKILL one second later)
MEM_MB = 1024          # RLIMIT_AS, MiB of address space per process
FSIZE_MB = 16          # RLIMIT_FSIZE, MiB per written file (bwrap/unshare /tmp is 4x this)
NPROC = 64             # RLIMIT_NPROC, processes of the sandbox uid (65534) host-wide
OUTPUT_BYTES = 64 * 1024  # cap per stream (stdout, stderr); the program is killed beyond it
COMPILE_S = 30         # wall and CPU seconds of a compile step (javac, rustc, tsc are slow)
HOST_MARGIN_S = 5.0    # the host gives a fork-server worker the steps' wall limits + this to answer

STATUSES = ("ok", "error", "timeout", "oom", "killed", "toolchain_missing", "no_code")
ISOLATION_LEVELS = ("rlimit", "namespaces", "namespaces+fs", "container")  # weakest first

SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_PATH = "/usr/bin:/bin"

_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory",
                   "OutOfMemoryError", "memory allocation of", "Allowed memory size",
                   "Fatal process out of memory", "OutOfMemoryException")


@dataclass(frozen=True)
class Limits:
    wall_s: float = WALL_S
    cpu_s: int = CPU_S
    mem_mb: int = MEM_MB
    fsize_mb: int = FSIZE_MB
    nproc: int = NPROC
    output_bytes: int = OUTPUT_BYTES
    compile_s: float = COMPILE_S

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise PrivcodeError(f"sandbox limit {f.name} must be a positive number, got {v!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    status: str                 # one of STATUSES
    returncode: int | None      # exit code; -N when killed by signal N; None if never run
    stdout: str = ""            # decoded (utf-8, errors replaced), at most limits.output_bytes
    stderr: str = ""
    wall_s: float = 0.0         # of the run step (of the compile step when that failed)
    backend: str = ""
    cpu_s: float = 0.0          # user+sys CPU of the program tree (as far as the kernel reports)
    truncated: bool = False     # output passed the cap (and the program was killed)
    detail: str = ""            # why, in words: "wall-clock limit 10s", "cpu limit", ...
    phase: str = "run"          # "compile" when the compile step is what failed
    compile_s: float = 0.0      # wall seconds of the compile step (0 for interpreted languages)
    fork_server: bool = False   # ran on a fork-server worker

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def canonical_lang(lang: str | None) -> str:
    """'py' -> 'python', 'bash' -> 'shell' (the aliases of privcode.data.prompts); else lowercased."""
    lang = (lang or "").strip().lower()
    for name, aliases in LANG_ALIASES.items():
        if lang == name or lang in aliases:
            return name
    return lang


def is_syntax_error(result: RunResult, lang: str) -> bool:
    """The code does not even parse: a failed compile step, or an interpreter's syntax error."""
    if result.status != "error":
        return False
    if result.phase == "compile":
        return True
    tc = LANGUAGES.get(canonical_lang(lang))
    if tc is None:
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

_plan_lock = threading.Lock()
_plan_cache: dict = {}


class Backend(abc.ABC):
    """Runs one program. Subclasses build the command lines; toolchains, limits, output capping,
    killing and classification are shared. `run` is thread-safe (one temporary directory per call).
    What each concrete backend protects and does not protect: see this module's docstring."""

    name: str = "?"
    isolation: str = "?"
    # True when the wrapper reports "killed by signal N" as exit status 128+N (bwrap, and the
    # /bin/sh that is PID 1 in unshare's namespace)
    signal_as_128_plus: bool = False
    # languages `run` starts directly (one interpreter per sandbox); the rest go through a
    # one-shot fork server (compile + run steps)
    direct_langs: tuple[str, ...] = ("python", "shell")
    # how toolchains are found: "bind" (host tools, bound into the sandbox), "host", "image"
    tool_mode: str = "bind"

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether this backend works on this machine (probed once, cached)."""

    def why_unavailable(self) -> str:
        return ""

    @abc.abstractmethod
    def _argv(self, cmd: list[str], workdir: Path, src: Path, limits: Limits) -> tuple[list[str], dict, str]:
        """(argv, env, cwd) running `cmd` (paths as the program sees them) in the sandbox."""

    def _server_spec(self, limits: Limits):
        """How to start privcode.sandbox.server in this sandbox (a forkserver.ServerSpec)."""
        raise PrivcodeError(f"backend {self.name} has no fork server")

    def _program_dir(self, workdir: Path) -> str:
        """Where the source file is, as the program sees it."""
        return str(workdir)

    def _prepare(self, workdir: Path, src: Path) -> None:
        """Make the working directory usable by the sandbox uid (hook)."""

    def _tmp_root(self) -> str | None:
        """Where host-side working directories go (None: tempfile's default)."""
        return None

    # ---- toolchains ----
    def _tool_lookup(self, tool: str):
        """Resolved | str for one tool (see privcode.sandbox.toolchains)."""
        return resolve_host_tool(TOOLS[tool], self.tool_mode)

    def _tool_isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def plan(self, lang: str) -> Plan | str:
        """The language made concrete here (tool paths, binds), or why it cannot run. Cached."""
        clang = canonical_lang(lang)
        key = (self.name, self.tool_mode, clang)
        with _plan_lock:
            if key in _plan_cache:
                return _plan_cache[key]
        spec = LANGUAGES.get(clang)
        if spec is None:
            p = f"no toolchain for language '{lang}' (have: {', '.join(LANGUAGES)})"
        else:
            try:
                p = plan_from(spec, self._tool_lookup, self._tool_isdir)
            except Exception as e:  # a lookup must never crash a run
                p = f"toolchain lookup for '{clang}' failed: {type(e).__name__}: {e}"
        with _plan_lock:
            _plan_cache[key] = p
        return p

    def toolchains(self) -> dict:
        """{language: "ok" or why not} for every known language."""
        return {n: ("ok" if isinstance(self.plan(n), Plan) else self.plan(n)) for n in LANGUAGES}

    def sandbox_binds(self) -> tuple[list, list]:
        """(binds, etc paths) of every language that can run here: what a worker that serves any
        language must see."""
        binds, etc = [], []
        for n in LANGUAGES:
            p = self.plan(n)
            if isinstance(p, Plan):
                binds += [b for b in p.binds if b not in binds]
                etc += [e for e in p.etc if e not in etc]
        return binds, etc

    def server_python(self) -> str:
        p = self.plan("python")
        if not isinstance(p, Plan):
            raise PrivcodeError(f"the fork server needs a system python in the sandbox: {p}")
        return p.tools["python"]

    # ---- running ----
    def run(self, code: str | None, lang: str, limits: Limits | None = None) -> RunResult:
        """One snippet in a sandbox of its own."""
        limits = limits or Limits()
        prepared = self._prepare_request(code, lang, limits)
        if not isinstance(prepared, tuple):
            return prepared
        plan = prepared[0]
        if plan.lang.name in self.direct_langs or (
                plan.lang.name == "shell" and not isinstance(self.plan("python"), Plan) and self.tool_mode != "image"):
            return self._run_direct(code, plan, limits)  # (shell without a python for the server)
        from privcode.sandbox.forkserver import Worker
        w = Worker(self, limits)
        try:
            return self._run_request(w, prepared, limits, fork_server=False)
        finally:
            w.close()

    def pool(self, workers: int = 1, limits: Limits | None = None):
        """`workers` fork-server sandboxes (privcode.sandbox.forkserver.WorkerPool); close it."""
        from privcode.sandbox.forkserver import WorkerPool
        self.server_python()  # fail now if there is no interpreter for the server
        return WorkerPool(self, workers, limits)

    def _run_direct(self, code: str, plan: Plan, limits: Limits) -> RunResult:
        workdir = Path(tempfile.mkdtemp(prefix="privcode-sbx-", dir=self._tmp_root()))
        try:
            name, _ = plan.source_name(code)
            src = workdir / name
            src.write_text(code, encoding="utf-8", errors="replace")
            src.chmod(0o644)
            cmd = plan.argv(plan.lang.run, str(Path(self._program_dir(workdir)) / name), {})
            self._prepare(workdir, src)
            argv, env, cwd = self._argv(cmd, workdir, src, limits)
            ex = execute(argv, env=env, cwd=cwd, limits=limits)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return self._classify(ex, limits)

    def _prepare_request(self, code, lang, limits: Limits):
        """(plan, request, host timeout) for the fork server, or the RunResult that needs no run."""
        if code is None or not code.strip():
            return RunResult("no_code", None, backend=self.name, detail="no code to run")
        plan = self.plan(lang)
        if not isinstance(plan, Plan):
            return RunResult("toolchain_missing", None, backend=self.name, detail=plan)
        spec = plan.lang
        name, subst = plan.source_name(code)
        run_mem = max(int(limits.mem_mb), spec.min_mem_mb)
        subst["heap"] = max(32, run_mem // 4)  # JVM heap: a quarter of the address space
        base = {"nproc": int(limits.nproc), "output_bytes": int(limits.output_bytes), "env": dict(spec.env)}
        steps = []
        if spec.compiled:
            steps.append(dict(base, name="compile", argv=plan.argv(spec.compile, name, subst),
                              wall_s=float(limits.compile_s), cpu_s=float(limits.compile_s),
                              mem_mb=max(int(limits.mem_mb), COMPILE_MEM_MB),
                              fsize_mb=max(int(limits.fsize_mb), 64)))
        run = dict(base, name="run", wall_s=float(limits.wall_s), cpu_s=float(limits.cpu_s), mem_mb=run_mem,
                   fsize_mb=int(limits.fsize_mb))
        if spec.inproc_python:
            run["python"] = name
        else:
            run["argv"] = plan.argv(spec.run, name, subst)
        steps.append(run)
        req = {"files": {name: code}, "steps": steps}
        timeout = sum(st["wall_s"] for st in steps) + HOST_MARGIN_S
        return plan, req, timeout

    def _run_request(self, worker, prepared, limits: Limits, *, fork_server: bool) -> RunResult:
        from privcode.sandbox.forkserver import WorkerError
        plan, req, timeout = prepared
        req = dict(req, env=self._server_env(worker))
        try:
            resp = worker.call(req, timeout)
        except WorkerError as e:
            tail = worker.stderr_tail(300)
            status = "timeout" if e.timeout else "killed"
            return RunResult(status, None, backend=self.name, fork_server=fork_server,
                             detail=f"sandbox worker {e} (killed and replaced)" + (f": {tail}" if tail else ""))
        return self._from_response(resp, req, limits, fork_server)

    def _server_env(self, worker) -> dict:
        return sandbox_env(worker.spec.cfg.get("home") or worker.spec.cfg["workdir"])

    def _from_response(self, resp: dict, req: dict, limits: Limits, fork_server: bool) -> RunResult:
        steps = resp.get("steps") or []
        if not steps:
            return RunResult("killed", None, backend=self.name, fork_server=fork_server,
                             detail=f"sandbox worker failed: {resp.get('tainted') or 'no result'}")
        compile_s = 0.0
        res = None
        for st, spec in zip(steps, req["steps"]):
            if st.get("error"):
                return RunResult("error", None, backend=self.name, fork_server=fork_server, phase=st["name"],
                                 detail=f"sandbox: {st['error']}")
            ex = _Exec(st["rc"], st["sig"], base64.b64decode(st["stdout"]), base64.b64decode(st["stderr"]),
                       float(st["wall_s"]), float(st["cpu_s"]), bool(st["timed_out"]), bool(st["exceeded"]))
            if st["name"] == "compile":
                compile_s = ex.wall_s
                clim = Limits(wall_s=spec["wall_s"], cpu_s=spec["cpu_s"], mem_mb=spec["mem_mb"],
                              fsize_mb=spec["fsize_mb"], nproc=spec["nproc"], output_bytes=spec["output_bytes"])
                res = self._classify(ex, clim, raw=True)
                if res.status != "ok":
                    res.phase = "compile"
                    res.detail = f"compile step: {res.detail}"
                    res.stderr = (res.stdout + res.stderr)[-int(limits.output_bytes):]  # tsc reports on stdout
                    res.stdout = ""
                    break
            else:
                res = self._classify(ex, Limits(**{**limits.as_dict(), "mem_mb": spec["mem_mb"]}), raw=True)
        res.compile_s = round(compile_s, 4)
        res.fork_server = fork_server
        return res

    def _classify(self, ex: _Exec, limits: Limits, raw: bool = False) -> RunResult:
        stdout, stderr = _decode(ex.stdout), _decode(ex.stderr)
        sig, rc = ex.signal, ex.returncode
        if not raw and rc is not None and self.signal_as_128_plus and 128 < rc <= 128 + 64:
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

_probe_lock = threading.RLock()  # probes may nest (container: engine, tools, run)
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
    from privcode.sandbox.container import ContainerBackend
    from privcode.sandbox.rlimit import RlimitBackend, UnshareBackend
    return {"container": ContainerBackend, "bwrap": BwrapBackend, "unshare": UnshareBackend,
            "rlimit": RlimitBackend}


BACKENDS = ("container", "bwrap", "unshare", "rlimit")  # strongest first
ISOLATING = ("container", "namespaces+fs", "namespaces")


def get_backend(name: str = "auto", *, require_isolation: bool = False) -> Backend:
    """A ready backend. `auto` = the strongest available (container > bwrap > unshare > rlimit).
    With `require_isolation`, a backend without namespaces or a container (`rlimit`) is refused."""
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
        if require_isolation and b.isolation not in ISOLATING:
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
    if require_isolation and b.isolation not in ISOLATING:
        raise PrivcodeError(f"sandbox backend '{b.name}' has no namespace isolation and isolation is required")
    return b


def sandbox_env(home: str) -> dict:
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home}


def can_setuid() -> bool:
    return os.geteuid() == 0


def server_prlimit_prefix(limits: Limits) -> list[str]:
    """rlimits of a fork-server wrapper: no core files and the file size limit; CPU, address space
    and process count are set per snippet by the server (a long-lived server must not run out of
    CPU seconds, and must be able to fork while a fork bomb elsewhere holds the uid's quota)."""
    prl = shutil.which("prlimit", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if prl is None:
        return []
    fsz = max(int(limits.fsize_mb), 64) * 1024 * 1024
    return [prl, "--core=0:0", f"--fsize={fsz}:{fsz}", "--"]
