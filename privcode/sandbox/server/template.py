"""The template process (forks one child per step) and the child (runs the step), inside the sandbox.

    template_main(sock, seccomp, report_pid)   # in the process the server forks at its start
    attributes(pid)                            # what the server checks the template still has

See privcode/sandbox/server/__init__.py for the three kinds of process.
"""
import array
import atexit
import builtins
import gc
import marshal
import os
import resource
import signal
import socket
import struct
import sys
import types

from .common import PR_SET_DUMPABLE, PR_SET_PDEATHSIG, _libc, prctl
from .seccomp import _ARCH

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
    handlers, streams flushed), then _exit without tearing down the copied interpreter state."""
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
    if dict(os.environ) != env:
        os.environ.clear()
        os.environ.update(env)
    prctl(PR_SET_DUMPABLE, 1)  # its own /proc/self is readable again (server and template stay non-dumpable)
    path = os.path.join(workdir, name)
    sys.argv = [path]
    sys.path[0:0] = [workdir]  # like `python3 main.py` (the server runs with -I: no cwd entry to replace)
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


def _child(req_r, out_w, err_w):
    step = None
    try:
        os.setsid()
        chunks = []
        while True:  # the step arrives only now, after the fork
            chunk = os.read(req_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        req = marshal.loads(b"".join(chunks))
        step, env, workdir = req["step"], req["env"], req["workdir"]
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, max(1 << 16, min(1 << 20, resource.getrlimit(resource.RLIMIT_NOFILE)[0])))
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
            what = (step.get("argv") or step.get("python")) if isinstance(step, dict) else "step"
            os.write(2, ("privcode sandbox: cannot start %r: %s\n" % (what, e)).encode())
        except BaseException:
            pass
    os._exit(127)


# ---- the template -------------------------------------------------------------------------------

def _recv_fds(sock, n):
    msg, anc, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(n * 4))
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % 4])
    return msg, list(fds)


def template_main(sock, seccomp, report_pid):
    """Fork one child per b"F" message (its three descriptors attached); report its end (and,
    with `report_pid`, its pid right after the fork: where the server is not PID 1 it cannot kill
    a child it does not know).
    What every child shares is set here, once: the seccomp filter, RLIMIT_MSGQUEUE=0 and an
    oom_score_adj of 1000 (the OOM killer takes snippets first)."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        keep = sock.fileno()  # nothing of the server's but this socket (no protocol pipe)
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 16)
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))
        try:
            with open("/proc/self/oom_score_adj", "w") as fh:
                fh.write("1000")
        except OSError:
            pass
        if seccomp:
            seccomp()
        gc.freeze()
        sock.send(b"R")  # set up: the server may now take note of its attributes
        while True:
            msg, fds = _recv_fds(sock, 3)
            if not msg or len(fds) != 3:
                break
            pid = os.fork()
            if pid == 0:
                sock.close()
                _child(fds[0], fds[1], fds[2])
            for fd in fds:
                os.close(fd)
            if report_pid:
                sock.send(struct.pack("=ci", b"P", pid))
            _, status, ru = os.wait4(pid, 0)
            sock.send(struct.pack("=ciidd", b"X", pid, status, ru.ru_utime, ru.ru_stime))
    except BaseException as e:
        try:
            os.write(2, ("privcode sandbox: template: %s: %s\n" % (type(e).__name__, e)).encode())
        except BaseException:
            pass
    os._exit(0)


_RLIMITS = [getattr(resource, n) for n in sorted(dir(resource)) if n.startswith("RLIMIT_")]


def attributes(pid):
    """What a child inherits from the template that another process of the uid could change."""
    out = []
    for res in _RLIMITS:
        try:
            out.append(resource.prlimit(pid, res))
        except (OSError, ValueError):
            out.append(None)
    arch = _ARCH.get(os.uname().machine)
    for fn in (lambda: os.getpriority(os.PRIO_PROCESS, pid), lambda: sorted(os.sched_getaffinity(pid)),
               lambda: os.sched_getscheduler(pid), lambda: os.sched_getparam(pid).sched_priority,
               lambda: _libc.syscall(arch[2]["ioprio_get"], 1, pid) if arch and _libc else None):
        try:
            out.append(fn())
        except (OSError, AttributeError):
            out.append(None)
    return out
