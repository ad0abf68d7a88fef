"""The sandbox interface: limits, results, the `Backend` base class and the isolation contract.

    from privcode.sandbox.base import Backend, Limits, RunResult   # what a backend implements
    from privcode.sandbox import get_backend                        # how a caller gets one

The isolation contract (docs/sandbox.md): a backend whose `isolation` is in ISOLATING runs every
program -- compile steps included -- in its own mount namespace whose root is an allow-list of
system paths (toolchains and their libraries, read-only) with private tmpfs /tmp and /dev/shm and
no view of the project, results/, the private zone, /work, /srv, home directories or host
sockets; in its own PID, IPC, UTS and network namespaces (only a loopback, down); as a non-root
uid, with no inherited descriptor and an environment of PATH, LANG and HOME only.

Every backend runs every snippet through the fork server (privcode.sandbox.server): `run` starts
a one-shot sandbox per snippet, `pool(workers)` keeps long-lived ones. Limits per step: rlimits
(CPU, address space, file size, processes, no core, no POSIX message queues), a wall clock, an
output cap, a seccomp filter, and -- where the host offers one -- a cgroup per worker bounding
memory (memfds, tmpfs and every process included) and process count (privcode.sandbox.cgroup).
Nothing crosses snippets: no process (killed after every step), no file (the tmpfs are emptied
and checked), no memory (children fork from a template that never saw a snippet).

Not protected anywhere: kernel exploits beyond the small seccomp filter, CPU/memory side
channels, and what is readable in /usr (or the container image).
"""
from __future__ import annotations

import abc
import base64
import dataclasses
import os
import shutil
import threading
from dataclasses import dataclass

from privcode.errors import PrivcodeError
from privcode.langs import canonical_lang
from privcode.sandbox.classify import STATUSES, classify  # noqa: F401 (STATUSES: re-exported)
from privcode.sandbox.toolchains import COMPILE_MEM_MB, LANGUAGES, TOOLS, Plan, plan_from, resolve_host_tool

# ---- default limits -------------------------------------------------------------------------
WALL_S = 10            # wall-clock seconds, sandbox start-up included (run step)
CPU_S = 10             # RLIMIT_CPU seconds (soft; SIGKILL one second later)
MEM_MB = 1024          # RLIMIT_AS per process, and the cgroup limit of the sandbox as a whole
FSIZE_MB = 16          # RLIMIT_FSIZE, MiB per written file (the sandbox's /tmp and /dev/shm: 4x this)
NPROC = 64             # RLIMIT_NPROC (processes of the sandbox uid) and the cgroup's pids limit
OUTPUT_BYTES = 64 * 1024  # cap per stream (stdout, stderr); the program is killed beyond it
COMPILE_S = 30         # wall and CPU seconds of a compile step (javac, rustc, tsc are slow)
HOST_MARGIN_S = 5.0    # the host gives a fork-server worker the steps' wall limits + this to answer

ISOLATION_LEVELS = ("rlimit", "namespaces+fs", "container")  # weakest first
# the isolation levels that meet the contract of this module's docstring (and docs/sandbox.md);
# tests/test_sandbox_escape.py checks every backend that works here against it
ISOLATING = ("container", "namespaces+fs")

SANDBOX_UID = 65534
SANDBOX_GID = 65534
SANDBOX_PATH = "/usr/bin:/bin"
SANDBOX_DIR = "/tmp/sandbox"  # the program's working directory inside the namespaced backends and containers
_SYS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"


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


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


# ---- backends ---------------------------------------------------------------------------------

_plan_lock = threading.Lock()
_plan_cache: dict = {}


class Backend(abc.ABC):
    """Runs one program. Subclasses say how to start the fork server in their sandbox
    (`_server_spec`) and how toolchains are found; requests, limits and classification are shared.
    `run` is thread-safe. What each backend protects: see its module's docstring."""

    name: str = "?"
    isolation: str = "?"
    # how toolchains are found: "bind" (host tools, bound into the sandbox), "host", "image"
    tool_mode: str = "bind"

    def available(self) -> bool:
        """Whether this backend works on this machine (`_probe`, run once per process)."""
        return probe(self.name, self._probe)[0]

    def why_unavailable(self) -> str:
        return probe(self.name, self._probe)[1]

    @abc.abstractmethod
    def _probe(self) -> tuple[bool, str]:
        """(works here, why not): checks and one probe run."""

    @abc.abstractmethod
    def _server_spec(self, limits: Limits, langs=None):
        """How to start privcode.sandbox.server in this sandbox (a forkserver.ServerSpec), for
        `langs` (None: every language that can run here)."""

    def oom_detail(self, step: dict) -> str:
        """The detail of an `oom` result: what bounds the sandbox's memory as a whole (the worker's cgroup gets
        each step's mem_mb)."""
        return f"memory limit {step['mem_mb']} MiB (cgroup: the sandbox as a whole)"

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

    def sandbox_binds(self, langs=None) -> tuple[list, list]:
        """(binds, etc paths) of `langs` (None: every language that can run here): what a worker
        that serves them must see."""
        binds, etc = [], []
        for n in (LANGUAGES if langs is None else langs):
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
        """One snippet in a sandbox of its own (a one-shot fork server)."""
        from privcode.sandbox.forkserver import Worker
        limits = limits or Limits()
        prepared = self._prepare_request(code, lang, limits)
        if not isinstance(prepared, tuple):
            return prepared
        w = Worker(self, limits, langs=[canonical_lang(lang)])  # only its toolchain: a faster start
        try:
            return self._run_request(w, prepared, limits, fork_server=False)
        finally:
            w.kill()  # the server has already wiped; the namespace and its tmpfs go with it

    def pool(self, workers: int = 1, limits: Limits | None = None):
        """`workers` fork-server sandboxes (privcode.sandbox.forkserver.WorkerPool); close it."""
        from privcode.sandbox.forkserver import WorkerPool
        self.server_python()  # fail now if there is no interpreter for the server
        return WorkerPool(self, workers, limits or Limits())

    def _prepare_request(self, code, lang, limits: Limits):
        """(files, steps) for the fork server, or the RunResult that needs no run."""
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
        return {name: code}, steps

    def _run_request(self, worker, prepared, limits: Limits, *, fork_server: bool) -> RunResult:
        """One request per step (the worker's cgroup gets each step's memory limit)."""
        from privcode.sandbox.forkserver import WorkerError
        files, steps = prepared
        env = sandbox_env(worker.spec.cfg.get("home") or worker.spec.cfg["workdir"])
        compile_s, res = 0.0, None
        for i, step in enumerate(steps):
            req = {"env": env, "steps": [step], "keep": i < len(steps) - 1}
            if i == 0:
                req["files"] = files
            try:
                resp = worker.call(req, step["wall_s"] + HOST_MARGIN_S, mem_mb=step["mem_mb"])
            except WorkerError as e:
                tail = worker.stderr_tail(300)
                status = "oom" if e.oom else "timeout" if e.timeout else "killed"
                return RunResult(status, None, backend=self.name, fork_server=fork_server, phase=step["name"],
                                 detail=f"sandbox worker {e} (killed and replaced)" + (f": {tail}" if tail else ""))
            res = self._from_step(resp, step, fork_server)
            if step["name"] == "compile":
                compile_s = res.wall_s
                if res.status != "ok":
                    res.phase, res.detail = "compile", f"compile step: {res.detail}"
                    res.stderr = (res.stdout + res.stderr)[-int(limits.output_bytes):]  # tsc reports on stdout
                    res.stdout = ""
                    break
            elif res.status != "ok":
                break
        res.compile_s = round(compile_s, 4)
        return res

    def _from_step(self, resp: dict, step: dict, fork_server: bool) -> RunResult:
        sts = resp.get("steps") or []
        if not sts:
            return RunResult("killed", None, backend=self.name, fork_server=fork_server, phase=step["name"],
                             detail=f"sandbox worker failed: {resp.get('tainted') or 'no result'}")
        st = sts[0]
        if st.get("error") and st.get("rc") is None and st.get("sig") is None:
            oom = bool(resp.get("oom"))
            return RunResult("oom" if oom else "killed", None, backend=self.name, fork_server=fork_server,
                             phase=step["name"], detail=(f"{self.oom_detail(step)}; " if oom else "")
                             + f"sandbox: {st['error']}")
        stdout, stderr = _decode(base64.b64decode(st["stdout"])), _decode(base64.b64decode(st["stderr"]))
        status, detail = classify(st, step, stderr, bool(resp.get("oom")), self.oom_detail(step))
        sig, rc = st.get("sig"), st.get("rc")
        return RunResult(status, -sig if sig is not None else rc, stdout, stderr, round(float(st["wall_s"]), 4),
                         self.name, round(float(st["cpu_s"]), 4), bool(st["exceeded"]), detail,
                         fork_server=fork_server)

    def describe(self) -> dict:
        from privcode.sandbox import cgroup
        return {"name": self.name, "isolation": self.isolation, "cgroup": cgroup.mode()}


# ---- probing, and helpers of the backends ------------------------------------------------------

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


def sandbox_env(home: str) -> dict:
    return {"PATH": SANDBOX_PATH, "LANG": "C.UTF-8", "HOME": home}


def server_prlimit_prefix(limits: Limits) -> list[str]:
    """rlimits of a fork-server wrapper: no core files and the file size limit; CPU, address space
    and process count are set per snippet by the server (a long-lived server must not run out of
    CPU seconds, and must be able to fork while a fork bomb elsewhere holds the uid's quota)."""
    prl = sys_which("prlimit")
    if prl is None:
        return []
    fsz = max(int(limits.fsize_mb), 64) * 1024 * 1024
    return [prl, "--core=0:0", f"--fsize={fsz}:{fsz}", "--"]


def sys_which(name: str) -> str | None:
    """`name` on the system path only (never a user's PATH)."""
    return shutil.which(name, path=_SYS_PATH)


def setpriv_argv() -> list[str]:
    """Drop to nobody: no supplementary groups, no capabilities (also none inheritable or in the
    bounding set), no_new_privs so setuid binaries cannot give root back."""
    return [sys_which("setpriv") or "/usr/bin/setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}",
            "--clear-groups", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]


def tmpfs_bytes(limits: Limits) -> int:
    """Size of a sandbox's private /tmp and /dev/shm: 4x the file size limit (at least 8 MiB)."""
    return max(8, 4 * int(limits.fsize_mb)) * 1024 * 1024
