"""Host side of the fork server (see privcode.sandbox.server for the part inside the sandbox).

`Worker`: one sandbox (of any backend) running the server; requests go in over its stdin, results
come back over its stdout. The host keeps its own deadline per request (the steps' wall limits +
a margin): a worker that does not answer in time, dies, or reports itself "tainted" is killed
(its whole sandbox) and not reused.

Each worker has a cgroup of its own where the host offers one (privcode.sandbox.cgroup): the
wrapper joins it before it execs, each request sets its memory limit (the step's mem_mb), a
cgroup OOM kill during a request is reported (`resp["oom"]`, `WorkerError.oom`), and killing the
worker kills everything in it.

`WorkerPool`: `workers` such sandboxes, each serving one snippet at a time; `pool.run(code, lang,
limits)` is thread-safe and blocks while all workers are busy. A dead worker is replaced by a
fresh one on the next request (`pool.restarts` counts them).

The same Worker in one-shot use (start, one request, close) is how the per-snippet path
(`fork_server: false`) runs compiled languages and every language in a container.
"""
from __future__ import annotations

import json
import os
import queue
import selectors
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from privcode.errors import PrivcodeError
from privcode.sandbox import cgroup
from privcode.sandbox.server import PROGRAM, common  # common: the server's framing and tree removal

START_TIMEOUT_S = 60.0   # sandbox + interpreter start (first start may page in a lot)


class WorkerError(Exception):
    def __init__(self, msg: str, *, timeout: bool = False):
        super().__init__(msg)
        self.timeout = timeout
        self.oom = False


@dataclass
class ServerSpec:
    """How a backend starts the server: argv/env/cwd of the wrapper, the server's config, host
    directories to delete afterwards and an optional command that kills the sandbox (containers
    run under a daemon, so killing the client is not enough)."""
    argv: list[str]
    env: dict
    cwd: str
    cfg: dict
    cleanup: list[str] = field(default_factory=list)
    kill_argv: list[str] | None = None
    cgroup: bool = True  # put the wrapper (and so the sandbox) into a cgroup of its own
    # docker/podman: once the server answers, the host's path of the file counting the OOM kills of the
    # engine's cgroup for this container (None: not readable from here); a worker whose OOM kills neither
    # the host nor the server (hello "oom_counter") can see is refused
    engine_oom: Callable[[], str | None] | None = None


def server_command(python: str, cfg: dict) -> list[str]:
    # -I: no current directory or user site on sys.path, no PYTHON* variables -- a snippet's file
    # in /tmp can never be imported by the server or the template
    return [python, "-I", "-B", "-c", PROGRAM, json.dumps(cfg)]


_spawner = None
_spawner_lock = threading.Lock()


def _spawn(argv, **kw) -> subprocess.Popen:
    """Popen from one long-lived thread. Wrappers die with the *thread* that started them
    (bwrap --die-with-parent and the server's own PR_SET_PDEATHSIG are per thread): a worker
    started from a short-lived thread (a ThreadPoolExecutor that is shut down) would be killed."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            import concurrent.futures as cf
            _spawner = cf.ThreadPoolExecutor(1, thread_name_prefix="privcode-sandbox-spawner")
    return _spawner.submit(subprocess.Popen, argv, **kw).result()


class Worker:
    def __init__(self, backend, limits, langs=None):
        self.backend = backend
        self.spec: ServerSpec = backend._server_spec(limits, langs)
        self._err = tempfile.TemporaryFile(prefix="privcode-worker-")
        self.served = 0
        self.dead = False
        self.cg = cgroup.create(limits.mem_mb, limits.nproc) if self.spec.cgroup else None
        argv = self.cg.wrap(self.spec.argv) if self.cg is not None else self.spec.argv
        try:
            self.proc = _spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                               cwd=self.spec.cwd, env=self.spec.env, start_new_session=True, close_fds=True)
        except BaseException:
            if self.cg is not None:
                self.cg.remove()
            raise
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._rbuf = bytearray()
        self._rsel = selectors.DefaultSelector()
        self._rsel.register(self._out, selectors.EVENT_READ)
        self._wsel = selectors.DefaultSelector()
        self._wsel.register(self._in, selectors.EVENT_WRITE)
        try:
            hello = self._read_frame(time.monotonic() + START_TIMEOUT_S)
        except WorkerError as e:
            tail = self.stderr_tail()
            self.kill()
            raise PrivcodeError(f"the {backend.name} sandbox worker did not start: {e}"
                                + (f" ({tail})" if tail else "")) from None
        if not hello.get("ready"):
            self.kill()
            raise PrivcodeError(f"the {backend.name} sandbox worker did not start: {hello}")
        self.hello = hello
        self._engine_fd = self._open_engine_counter()
        self._ooms = self._oom_count()

    def _open_engine_counter(self) -> int | None:
        """An open descriptor of the engine cgroup's OOM counter (ServerSpec.engine_oom), or None; refuses a
        container whose OOM kills nobody sees (a snippet's child killed, the snippet itself exiting 0: kept)."""
        if self.spec.engine_oom is None:
            return None
        path = self.spec.engine_oom()
        if path is not None:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        if not self.hello.get("oom_counter"):
            self.kill()
            raise PrivcodeError(f"the {self.backend.name} sandbox worker: neither this host nor the server inside "
                                "can read the container's memory cgroup, so an OOM kill inside it would go unseen "
                                "(a snippet whose child is killed could be kept); run the engine on this host")
        return None

    # ---- framing with deadlines (never blocks past them) ----
    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._in, view)  # usually all at once: no select needed
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise WorkerError(f"is gone ({e})") from None
            view = view[n:]
            if view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WorkerError("did not take the request in time", timeout=True)
                self._wsel.select(min(remaining, 1.0))

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self._rbuf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError("did not answer in time", timeout=True)
            if not self._rsel.select(min(remaining, 1.0)):
                continue
            try:
                chunk = os.read(self._out, max(65536, n - len(self._rbuf)))
            except BlockingIOError:
                continue
            if not chunk:
                raise WorkerError("exited")
            self._rbuf += chunk
        data = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return data

    def _read_frame(self, deadline: float) -> dict:
        try:
            n = common.frame_length(self._read_exact(4, deadline))
        except ValueError as e:
            raise WorkerError(f"sent a bad frame ({e})") from None
        return json.loads(self._read_exact(n, deadline).decode("utf-8"))

    def call(self, req: dict, timeout: float, mem_mb: int | None = None) -> dict:
        """One request (`mem_mb`: the cgroup's memory limit for it); on any failure the worker is
        killed and WorkerError raised. resp["oom"]: the cgroup OOM-killed during the request."""
        if self.dead:
            raise WorkerError("is dead")
        deadline = time.monotonic() + timeout
        try:
            if self.cg is not None:
                try:
                    self.cg.set_memory(mem_mb or self.cg.mem_mb)
                except OSError as e:
                    raise WorkerError(f"cannot set its cgroup memory limit ({e})") from None
            self._write(common.pack_frame(req), deadline)
            resp = self._read_frame(deadline)
        except WorkerError as e:
            e.oom = self._oom_since_last()
            self.kill()
            raise
        self.served += 1
        resp["oom"] = self._oom_since_last() or bool(resp.get("oom"))  # ours, the engine's, or the server's count
        if resp.get("tainted"):
            self.kill()
        return resp

    def _oom_count(self) -> int:
        """OOM kills so far in the worker's cgroup and in the engine's cgroup of its container."""
        n = self.cg.oom_kills() if self.cg is not None else 0
        if getattr(self, "_engine_fd", None) is not None:
            try:
                n += cgroup.read_oom_kills(self._engine_fd)
            except (OSError, ValueError):
                pass
        return n

    def _oom_since_last(self) -> bool:
        """Whether a cgroup of the worker OOM-killed since the previous request ended."""
        n = self._oom_count()
        seen, self._ooms = getattr(self, "_ooms", 0), n
        return n > seen

    def stderr_tail(self, n: int = 600) -> str:
        try:
            self._err.seek(0, os.SEEK_END)
            size = self._err.tell()
            self._err.seek(max(0, size - n))
            return self._err.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def _kill_children(self) -> None:
        """SIGKILL the wrapper's own children (the server, PID 1 of its namespace). Needed: an init
        of a PID namespace ignores its PR_SET_PDEATHSIG, and with `bwrap --new-session` it is
        not in the wrapper's process group. A pidfd pins each process, and it is signalled only
        if it is still the wrapper's child (no pid-reuse race)."""
        pid = self.proc.pid
        try:
            kids = [int(k) for t in os.listdir(f"/proc/{pid}/task")
                    for k in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            return
        for k in kids:
            fd = None
            try:
                fd = os.pidfd_open(k) if hasattr(os, "pidfd_open") else None
                st = Path(f"/proc/{k}/stat").read_text()
                if int(st[st.rfind(")") + 2:].split()[1]) != pid:
                    continue
                if fd is not None:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                else:  # pragma: no cover - kernels before 5.3
                    os.kill(k, signal.SIGKILL)
            except (OSError, ValueError):
                pass
            finally:
                if fd is not None:
                    os.close(fd)

    def kill(self) -> None:
        if self.dead:
            return
        self.dead = True
        self._kill_children()
        if self.spec.kill_argv:
            try:
                subprocess.run(self.spec.kill_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.cg is not None:
            self.cg.kill()
        self._reap()

    def close(self) -> None:
        """Ask the server to exit (it kills and wipes what is left), then make sure."""
        if not self.dead:
            try:
                self.proc.stdin.close()  # EOF: the server exits
            except OSError:
                pass
            self._wait_exit(5)
            self.kill()
        self._reap()

    def _wait_exit(self, seconds: float) -> None:
        """Wait (without polling) until the wrapper has exited, at most `seconds`."""
        try:
            fd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            try:
                self.proc.wait(timeout=seconds)
            except subprocess.TimeoutExpired:
                pass
            return
        try:
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            sel.select(seconds)
            sel.close()
        finally:
            os.close(fd)

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed group always ends
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        for closable in (self._err, self._rsel, self._wsel):
            try:
                closable.close()
            except (OSError, ValueError):
                pass
        cleanup, self.spec.cleanup = self.spec.cleanup, []
        for d in cleanup:
            common.remove_tree(d)  # a directory it cannot remove is left (the server's own wipe ran)
        cg, self.cg = self.cg, None
        if cg is not None:
            cg.remove()
        fd, self._engine_fd = getattr(self, "_engine_fd", None), None
        if fd is not None:
            os.close(fd)


class WorkerPool:
    """`workers` fork-server sandboxes of one backend; thread-safe `run`."""

    def __init__(self, backend, workers: int, limits):
        if int(workers) < 1:
            raise PrivcodeError(f"workers must be at least 1, got {workers}")
        self.backend = backend
        self.limits = limits
        self.size = int(workers)
        self._slots = threading.BoundedSemaphore(self.size)
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._lock = threading.Lock()
        self._all: set = set()
        self.started = 0
        self.restarts = 0
        self.closed = False

    def _take(self) -> Worker:
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                break
            if w.proc.poll() is None:
                return w
            w.kill()  # died while idle (killed from outside): clean up, replace it
            self._give(w)
        w = Worker(self.backend, self.limits)
        with self._lock:
            self._all.add(w)
            self.started += 1
        return w

    def _give(self, w: Worker) -> None:
        if w.dead or self.closed:
            with self._lock:
                self._all.discard(w)
                if w.dead and not self.closed:
                    self.restarts += 1
            w.close()
        else:
            self._idle.put(w)

    def run(self, code, lang, limits=None):
        """Like Backend.run, on a fork-server worker."""
        if self.closed:
            raise PrivcodeError("worker pool is closed")
        limits = limits or self.limits
        prepared = self.backend._prepare_request(code, lang, limits)
        if not isinstance(prepared, tuple):
            return prepared  # no_code / toolchain_missing
        with self._slots:
            w = self._take()
            try:
                return self.backend._run_request(w, prepared, limits, fork_server=True)
            finally:
                self._give(w)

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self._all.discard(w)
            w.close()
        with self._lock:
            rest = list(self._all)
        for w in rest:  # busy ones (an exception elsewhere): kill
            w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        return {"workers": self.size, "started": self.started, "restarts": self.restarts}
