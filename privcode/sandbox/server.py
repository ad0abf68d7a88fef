"""The fork server: runs INSIDE a sandbox under its system python, one long-lived process per worker.

This file is standalone (standard library only, Python >= 3.7): the host passes its text with
`python3 -B -s -c <text> <config json>`, so nothing of the project has to be visible in the sandbox.

Protocol (stdin/stdout of the server; frames are a 4-byte big-endian length + UTF-8 JSON):
  server -> host  {"ready": true, "pid": .., "pid1": bool, "python": ".."}  once, at start
  host -> server  {"files": {name: text}, "env": {..}, "steps": [step, ..]}  one per snippet
                  step = {"name", "argv": [..] | "python": "<file>", "wall_s", "cpu_s", "mem_mb",
                          "fsize_mb", "nproc", "output_bytes"}
  server -> host  {"steps": [{"name", "rc", "sig", "stdout" (base64), "stderr" (base64), "wall_s",
                   "cpu_s", "timed_out", "exceeded", "error"}], "tainted": bool}
  Steps run in order in the same fresh directory and stop at the first that fails (a compile
  step, then the run step). EOF or {"op": "exit"} ends the server.

Per snippet: the directory `workdir` is created empty; each step is a forked child that calls
setsid(), gets /dev/null as stdin and fresh pipes as stdout/stderr, closes every other descriptor
(the protocol pipes included), sets RLIMIT_CPU/AS/FSIZE/NPROC/CORE, chdirs into the directory and
then either execs the program with the given environment or -- for Python -- compiles and
exec()s the source in a fresh `__main__` module (no interpreter start: the point of the server).
The server enforces the step's wall-clock limit and the output cap and SIGKILLs the child's
process group on either. After every step it kills whatever the step left behind (as PID 1 of a
PID namespace: kill(-1, SIGKILL), which reaches every process of the sandbox uid but itself;
otherwise, as a child subreaper, every process that was re-parented to it) and reaps it; after
every snippet it deletes the directory and, where /tmp (etc.) are the sandbox's own, everything
else in them, and (in its own IPC namespace) every System V IPC object. Anything it cannot
remove makes it report "tainted" and exit, and the host starts a fresh worker.

The server makes itself non-dumpable (PR_SET_DUMPABLE 0), so snippets -- same uid -- cannot
ptrace it or open its /proc/<pid>/fd. It exits at EOF on stdin; it asks for PR_SET_PDEATHSIG,
but as the init of a PID namespace the kernel does not deliver that to it, so the host kills a
worker by SIGKILLing the server itself (through a pidfd) as well as the wrapper.
"""
import atexit
import base64
import builtins
import gc
import json
import os
import resource
import selectors
import shutil
import signal
import stat
import struct
import sys
import time
import types

try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
except Exception:  # pragma: no cover - ctypes missing in a stripped image
    _libc = None

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36
MAX_FRAME = 256 * 1024 * 1024


def prctl(op, arg):
    if _libc is not None:
        _libc.prctl(op, arg, 0, 0, 0)


def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ValueError("frame too large")
    body = read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(fd, obj):
    data = json.dumps(obj).encode("utf-8")
    data = struct.pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---- in the child ------------------------------------------------------------------------------

def _set_limits(step):
    cpu = max(1, int(round(float(step["cpu_s"]))))
    mem = int(step["mem_mb"]) * 1024 * 1024
    fsz = int(step["fsize_mb"]) * 1024 * 1024
    nproc = int(step["nproc"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsz, fsz))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))


def _finish(code):
    """End a Python snippet the way the interpreter would (non-daemon threads joined, atexit
    handlers, streams flushed), then _exit without tearing down the server's copied state."""
    try:
        th = sys.modules.get("threading")
        if th is not None and hasattr(th, "_shutdown"):
            th._shutdown()
    except BaseException:
        pass
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            s.flush()
        except BaseException:
            pass
    os._exit(code & 0xFF)


def _exit_code(e):
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    try:
        sys.stderr.write(str(code) + "\n")
    except BaseException:
        pass
    return 1


def _run_python(name, workdir, env):
    if dict(os.environ) != env:  # usually equal already: the sandbox starts the server with it
        os.environ.clear()
        os.environ.update(env)
    prctl(PR_SET_DUMPABLE, 1)  # its own /proc/self is readable again (the server stays non-dumpable)
    path = os.path.join(workdir, name)
    sys.argv = [path]
    sys.path[0] = workdir
    mod = types.ModuleType("__main__")
    mod.__file__ = path
    mod.__builtins__ = builtins
    sys.modules["__main__"] = mod
    try:
        with open(name, "rb") as fh:  # relative: the absolute path may not be reachable (rlimit)
            src = fh.read()
        code = compile(src, path, "exec")
    except SystemExit as e:  # pragma: no cover
        _finish(_exit_code(e))
    except BaseException as e:  # SyntaxError & co: printed like the interpreter prints them
        sys.excepthook(type(e), e.with_traceback(None), None)
        _finish(1)
    try:
        exec(code, mod.__dict__)
    except SystemExit as e:
        _finish(_exit_code(e))
    except BaseException as e:
        tb = e.__traceback__
        tb = tb.tb_next if tb is not None else None  # not the server's own frame
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        _finish(1)
    _finish(0)


def _child(step, workdir, env, out_w, err_w):
    try:
        os.setsid()
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        os.chdir(workdir)
        workdir = os.getcwd()
        os.umask(0o022)
        _set_limits(step)
        if step.get("python"):
            _run_python(step["python"], workdir, env)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        argv = step["argv"]
        os.execve(argv[0], argv, env)
    except BaseException as e:
        try:
            what = step.get("argv") or step.get("python")
            os.write(2, ("privcode sandbox: cannot start %r: %s\n" % (what, e)).encode())
        except BaseException:
            pass
    os._exit(127)


# ---- in the server -----------------------------------------------------------------------------

class Server:
    def __init__(self, cfg):
        self.workdir = cfg["workdir"]
        # only directories that are mounts of their own (the sandbox's private tmpfs) and never as
        # root: a misconfigured sandbox must not be able to empty a shared /tmp
        self.wipe_dirs = [d for d in cfg.get("wipe", ()) if os.geteuid() != 0 and os.path.ismount(d)]
        self.keep = set(cfg.get("keep", ()))
        self.pid1 = os.getpid() == 1
        self.own_ipc = bool(cfg.get("own_ipc", self.pid1))
        self.tainted = ""

    # -- processes --
    def _children(self):
        me = str(os.getpid())
        try:  # CONFIG_PROC_CHILDREN (the server is single-threaded: its tid is its pid)
            with open("/proc/self/task/%s/children" % me) as fh:
                return [int(x) for x in fh.read().split()]
        except OSError:
            pass
        kids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % d, "rb") as fh:
                    st = fh.read().decode("ascii", "replace")
            except OSError:
                continue
            fields = st[st.rfind(")") + 2:].split()
            if len(fields) > 1 and fields[1] == me:
                kids.append(int(d))
        return kids

    def kill_leftovers(self):
        """Kill and reap every process the snippet left (never the server itself)."""
        deadline = time.monotonic() + 5
        if self.pid1:  # everything of our uid in the namespace, again until nothing is left
            while time.monotonic() < deadline:
                try:
                    os.kill(-1, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    time.sleep(0.001)
            self.tainted = self.tainted or "leftover processes would not die"
            return
        while time.monotonic() < deadline:
            kids = self._children()
            for k in kids:
                try:
                    os.kill(k, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                pid, _ = os.waitpid(-1, 0 if kids else os.WNOHANG)
            except ChildProcessError:
                return
            if not kids and pid == 0:
                time.sleep(0.001)
        self.tainted = self.tainted or "leftover processes would not die"

    # -- files --
    def _rm(self, path):
        """Remove `path` (ours: same uid); fixes permissions a snippet took away, below `path` only."""
        root = os.path.abspath(path)

        def onerror(fn, p, exc):
            if isinstance(exc[1], FileNotFoundError):
                return
            p = os.path.abspath(p)
            parent = os.path.dirname(p)
            try:
                if parent == root or parent.startswith(root + "/"):
                    os.chmod(parent, 0o700)
                if p != root and os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, 0o700)
                    shutil.rmtree(p)
                elif p != root:
                    os.unlink(p)
                else:
                    os.rmdir(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.tainted = self.tainted or ("cannot remove %s: %s" % (p, e))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            try:
                os.chmod(path, 0o700)
            except OSError:
                pass
            shutil.rmtree(path, onerror=onerror)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.tainted = self.tainted or ("cannot remove %s: %s" % (path, e))

    def wipe(self):
        self._rm(self.workdir)
        for d in self.wipe_dirs:
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name not in self.keep:
                    self._rm(os.path.join(d, name))
        if self.own_ipc:
            self._wipe_ipc()

    def _wipe_ipc(self):
        if _libc is None:
            return
        for kind in ("shm", "msg", "sem"):
            try:
                with open("/proc/sysvipc/" + kind) as fh:
                    lines = fh.read().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) < 2:
                    continue
                ident = int(f[1])
                if kind == "shm":
                    r = _libc.shmctl(ident, 0, None)
                elif kind == "msg":
                    r = _libc.msgctl(ident, 0, None)
                else:
                    r = _libc.semctl(ident, 0, 0)
                if r != 0:
                    self.tainted = self.tainted or "cannot remove System V %s %d" % (kind, ident)

    # -- one step --
    def run_step(self, step, env):
        cap = int(step["output_bytes"])
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.monotonic()
        deadline = t0 + float(step["wall_s"])
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as e:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            return {"name": step["name"], "rc": None, "sig": None, "stdout": "", "stderr": "",
                    "wall_s": 0.0, "cpu_s": 0.0, "timed_out": False, "exceeded": False,
                    "error": "fork failed: %s" % e}
        if pid == 0:
            _child(step, self.workdir, env, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        bufs = {out_r: bytearray(), err_r: bytearray()}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(pid)
                sel.register(pidfd, selectors.EVENT_READ)
            except OSError:
                pidfd = None
        timed_out = exceeded = exited = False
        open_fds = set(bufs)

        def drain(fd):
            nonlocal exceeded
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return True
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    return False
                buf = bufs[fd]
                room = cap - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    exceeded = True
                    return True

        while not exited or open_fds:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited:  # the program is gone: whatever still holds the pipes is a leftover
                break
            timeout = min(deadline - now, 0.5 if pidfd is not None else 0.002)
            for key, _ in sel.select(timeout):
                if key.fd == pidfd:
                    exited = True
                elif key.fd in open_fds:
                    drain(key.fd)
            if exceeded:
                break
            if pidfd is None and not exited:
                try:
                    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    info = None
                    exited = True
                if info is not None and info.si_pid:
                    exited = True
        # the child is running or a zombie (not reaped): its process group id is still ours
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _, status, ru = os.wait4(pid, 0)
        wall = time.monotonic() - t0
        self.kill_leftovers()
        for fd in list(open_fds):  # everything is dead now: the rest is buffered in the pipes
            if not exceeded:
                drain(fd)
        sel.close()
        for fd in (out_r, err_r):
            os.close(fd)
        if pidfd is not None:
            os.close(pidfd)
        return {"name": step["name"],
                "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "sig": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "stdout": base64.b64encode(bytes(bufs[out_r])).decode("ascii"),
                "stderr": base64.b64encode(bytes(bufs[err_r])).decode("ascii"),
                "wall_s": round(wall, 6), "cpu_s": round(ru.ru_utime + ru.ru_stime, 6),
                "timed_out": timed_out, "exceeded": exceeded, "error": ""}

    def handle(self, req):
        self.wipe()  # normally a no-op: the previous snippet's leftovers are already gone
        os.mkdir(self.workdir, 0o755)
        for name, text in (req.get("files") or {}).items():
            if "/" in name or name in (".", ".."):
                raise ValueError("bad file name %r" % name)
            with open(os.path.join(self.workdir, name), "w", encoding="utf-8", errors="replace") as fh:
                fh.write(text)
        env = dict(req.get("env") or {})
        results = []
        for step in req["steps"]:
            step_env = dict(env)
            step_env.update(step.get("env") or {})
            r = self.run_step(step, step_env)
            results.append(r)
            if r["error"] or r["timed_out"] or r["exceeded"] or r["rc"] != 0:
                break
        self.wipe()
        return {"steps": results, "tainted": self.tainted}


def main():
    cfg = json.loads(sys.argv[1])
    if cfg.get("pdeathsig", True):  # not where the parent is a thread of the host (it may end first)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_DUMPABLE, 0)
    if os.getpid() != 1:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    # protocol pipes away from 0/1; stray output of the server itself goes to stderr
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    srv = Server(cfg)
    gc.freeze()  # children do not copy-on-write the server's objects when their GC runs
    write_frame(wfd, {"ready": True, "pid": os.getpid(), "pid1": srv.pid1,
                      "python": "%d.%d.%d" % sys.version_info[:3]})
    while True:
        req = read_frame(rfd)
        if req is None or req.get("op") == "exit":
            break
        try:
            resp = srv.handle(req)
        except Exception as e:
            srv.kill_leftovers()
            resp = {"steps": [], "tainted": "server error: %s: %s" % (type(e).__name__, e)}
        write_frame(wfd, resp)
        if resp["tainted"]:
            break
    srv.kill_leftovers()
    srv.wipe()


if __name__ == "__main__":
    main()
