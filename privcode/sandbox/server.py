"""The fork server: runs INSIDE a sandbox under its system python, one long-lived process per worker.

This file is standalone (standard library only, Python >= 3.7): the host passes its text with
`python3 -I -B -c <text> <config json>`, so nothing of the project has to be visible in the sandbox.

Three kinds of process, all of the sandbox uid:
  server    PID 1 of the sandbox's PID namespace (where there is one). Talks to the host, writes
            the snippet's files, reads its output, enforces the limits, kills what a step left
            behind, empties the sandbox's /tmp and /dev/shm. It holds every snippet's code and
            output, so nothing is ever forked from it after the start.
  template  forked by the server at start, before any request. It never reads a request, a file
            or an output: on the server's word it forks one child per step, reports the child's
            pid and, when it ends, its exit status and CPU time.
  child     forked by the template. It reads its step (argv, environment, limits) from a pipe only
            after the fork, then runs it. A snippet's memory therefore holds the template's state
            from the start and the snippet's own data, never an earlier snippet's.

Protocol (stdin/stdout of the server; frames are a 4-byte big-endian length + UTF-8 JSON):
  server -> host  {"ready": true, "pid", "pid1", "python", "seccomp"}  once, at start
  host -> server  {"files": {name: text} (first step of a snippet), "env": {..}, "steps": [step],
                   "keep": bool}; step = {"name", "argv": [..] | "python": "<file>", "wall_s",
                   "cpu_s", "mem_mb", "fsize_mb", "nproc", "output_bytes", "env"}
  server -> host  {"steps": [{"name", "rc", "sig", "stdout", "stderr" (base64), "wall_s", "cpu_s",
                   "timed_out", "exceeded", "leftovers", "disk_full", "error"}], "tainted": ".."}
  "files" starts a snippet in a fresh, empty directory `workdir`; "keep" leaves it for the next
  step of the same snippet (compile, then run); otherwise -- or when a step fails -- everything
  the snippet wrote is deleted. EOF or {"op": "exit"} ends the server.

The template, once, before its first fork: installs a seccomp filter, sets RLIMIT_MSGQUEUE=0 (no
POSIX message queue can be created) and raises its oom_score_adj to 1000 (the OOM killer takes
snippets first); every child inherits all three. The seccomp filter refuses the kernel keyring
calls (a keyring outlives every process), setpriority/ioprio_set aimed at a process group or a
user (PRIO_USER would reach every process of the uid on the host) and every syscall of a foreign
ABI (x32, i386). A child calls setsid(), takes /dev/null as stdin and fresh pipes as
stdout/stderr, closes every other descriptor, sets RLIMIT_CPU/AS/FSIZE/NPROC/CORE, then execs
the program or -- Python -- exec()s the source in a fresh `__main__` module.

After every step the server notes whether processes are left (a background process, reported as
`leftovers`) and kills them all; after every snippet it deletes what the snippet wrote and
checks that /tmp and /dev/shm (where they are the sandbox's own) are empty again, that no System V
IPC object is left and that the template's rlimits, nice value, scheduling policy, CPU affinity
and I/O priority are unchanged (a snippet may change them -- same uid -- and its children would
inherit them).
Anything else makes it answer "tainted" and exit; the host then starts a fresh worker.

The server and the template are non-dumpable (PR_SET_DUMPABLE 0): snippets -- same uid -- cannot
ptrace them or open their /proc/<pid>/{mem,fd,environ}. As PID 1 the server ignores signals
sent from inside the namespace. The template can be killed or stopped by a snippet (it is the
snippet's parent): that snippet is then reported killed and the worker replaced.
"""
import array
import atexit
import binascii
import builtins
import gc
import json
import marshal
import os
import resource
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import time
import types

try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
except Exception:  # pragma: no cover - ctypes missing in a stripped image
    ctypes = _libc = None

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
MAX_FRAME = 256 * 1024 * 1024
T_WAIT_S = 5.0  # how long the server waits for the template to answer


def prctl(op, arg, arg2=0):
    if _libc is None:
        return -1
    return _libc.prctl(op, arg, arg2, 0, 0)


def read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def frame_length(head):
    """The body length a frame's 4-byte head announces; ValueError beyond MAX_FRAME (the host's
    reader, privcode.sandbox.forkserver, uses it too)."""
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ValueError("frame too large")
    return n


def pack_frame(obj):
    """One frame: a 4-byte big-endian length + UTF-8 JSON."""
    data = json.dumps(obj).encode("utf-8")
    return struct.pack(">I", len(data)) + data


def read_frame(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    body = read_exact(fd, frame_length(head))
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(fd, obj):
    view = memoryview(pack_frame(obj))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def remove_tree(path):
    """Remove `path` (a file or a whole tree; a missing one is fine), fixing permissions that a
    snippet took away -- below `path` only, never its parent. Returns the first failure in words, or
    None. The host removes a worker's directory with it too (privcode.sandbox.forkserver)."""
    root = os.path.abspath(path)
    errors = []

    def attempt(fn, p):
        try:
            fn(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append("cannot remove %s: %s" % (p, e))

    def fix_and_remove(p):
        parent = os.path.dirname(p)
        if parent == root or parent.startswith(root + "/"):
            os.chmod(parent, 0o700)
        if p != root and os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
            shutil.rmtree(p)
        else:
            (os.unlink if p != root else os.rmdir)(p)

    def onerror(fn, p, exc):
        if not isinstance(exc[1], FileNotFoundError):
            attempt(fix_and_remove, os.path.abspath(p))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        shutil.rmtree(path, onerror=onerror)
    else:
        attempt(os.unlink, path)
    return errors[0] if errors else None


# ---- seccomp -------------------------------------------------------------------------------------

# audit arch, first foreign-ABI syscall number (x32) or None, syscall numbers
_ARCH = {
    "x86_64": (0xC000003E, 0x40000000, dict(add_key=248, request_key=249, keyctl=250, setpriority=141,
                                            ioprio_set=251, ioprio_get=252)),
    "aarch64": (0xC00000B7, None, dict(add_key=217, request_key=218, keyctl=219, setpriority=140,
                                       ioprio_set=30, ioprio_get=31)),
}
_DENY = ("add_key", "request_key", "keyctl")
# allowed only when these (argument, value) pairs hold: aimed at one process (or thread), not at a
# process group or at every process of the uid (PRIO_USER / IOPRIO_WHO_USER reach the whole host)
_ONLY = {"setpriority": ((0, 0),),  # PRIO_PROCESS
         "ioprio_set": ((0, 1),)}   # IOPRIO_WHO_PROCESS


def seccomp_program():
    """The BPF filter (bytes) for this machine, or None where the architecture is unknown."""
    arch = _ARCH.get(os.uname().machine)
    if arch is None:
        return None
    audit, x32, nr = arch
    LD, JEQ, JGE, RET = 0x20, 0x15, 0x35, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    prog = []  # (code, jt, jf, k); jt/jf may be the labels "eperm"/"nosys"

    def ld(off):
        prog.append((LD, 0, 0, off))
    ld(4)
    prog.append((JEQ, 0, "nosys", audit))
    ld(0)
    if x32 is not None:
        prog.append((JGE, "nosys", 0, x32))
    for name in _DENY:
        prog.append((JEQ, "eperm", 0, nr[name]))
    for name, conds in _ONLY.items():
        prog.append((JEQ, 0, 2 * len(conds) + 1, nr[name]))  # not this syscall: skip its block
        for arg, value in conds:
            ld(16 + 8 * arg)  # low 32 bits of the argument (little endian)
            prog.append((JEQ, 0, "eperm", value))
        prog.append((RET, 0, 0, ALLOW))
    prog.append((RET, 0, 0, ALLOW))
    labels = {"eperm": len(prog), "nosys": len(prog) + 1}
    prog += [(RET, 0, 0, EPERM), (RET, 0, 0, ENOSYS)]
    out = b""
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("HBBI", code, jt, jf, k)
    return out


def seccomp_installer(prog):
    """A function that installs `prog` in the calling process; everything it needs is built now,
    before the template forks (a child then touches as little of the template's memory as it can)."""
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(prog)
    ref = ctypes.byref(Fprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p)))
    call, get_errno = _libc.prctl, ctypes.get_errno

    def install():
        call(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if call(PR_SET_SECCOMP, 2, ref, 0, 0) != 0:
            raise OSError(get_errno(), "seccomp: " + os.strerror(get_errno()))
    install.keep = (buf, ref)
    return install


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


# ---- in the server -----------------------------------------------------------------------------

class Server:
    def __init__(self, cfg):
        self.workdir = cfg["workdir"]
        # only directories that are mounts of their own (the sandbox's private tmpfs) and never as
        # root: a misconfigured sandbox must not be able to empty a shared /tmp
        self.wipe_dirs = [d for d in cfg.get("wipe", ()) if os.geteuid() != 0 and os.path.ismount(d)]
        self.pid1 = os.getpid() == 1
        self.own_ipc = bool(cfg.get("own_ipc", self.pid1))
        self.tainted = ""
        prog = seccomp_program() if _libc is not None and cfg.get("seccomp", True) else None
        self.seccomp = seccomp_installer(prog) if prog else None
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the template: nothing but this socket
            a.close()
            template_main(b, self.seccomp, not self.pid1)
        b.close()
        self.tpid, self.tsock = pid, a
        self.tsock.setblocking(False)
        self.tsel = selectors.DefaultSelector()  # the template alone
        self.tsel.register(a, selectors.EVENT_READ)
        self.sel = selectors.DefaultSelector()   # the template and a step's output pipes
        self.sel.register(a, selectors.EVENT_READ)
        if not self.tsel.select(T_WAIT_S * 4) or self.tsock.recv(8) != b"R":
            raise RuntimeError("the template did not start")
        self.t_attrs = attributes(pid)

    # -- the template --
    def _from_template(self, deadline):
        """The template's next message: (b"P", pid) or (b"X", pid, status, utime, stime); None
        when it is gone or did not answer in time."""
        while True:
            try:
                data = self.tsock.recv(64)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.tsel.select(remaining)
                continue
            except OSError:
                return None
            fmt = {5: "=ci", 25: "=ciidd"}.get(len(data))
            if fmt is None or data[:1] not in (b"P", b"X"):
                return None
            return struct.unpack(fmt, data)

    def template_ok(self):
        try:
            pid, _ = os.waitpid(self.tpid, os.WNOHANG)
        except ChildProcessError:
            pid = self.tpid
        if pid == self.tpid:
            return "the template process died"
        if attributes(self.tpid) != self.t_attrs:
            return "the template's rlimits, priority, policy or affinity were changed"
        return ""

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
            st = _stat(d) if d.isdigit() else None
            if st is not None and st[1] == me:
                kids.append(int(d))
        return kids

    def others(self):
        """Processes of the snippet that are still alive (not zombies): every process of the
        namespace but the server and the template; without a PID namespace, the server's children."""
        me = os.getpid()
        if self.pid1:
            pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        else:
            pids = self._children()
        out = []
        for p in pids:
            if p in (me, self.tpid):
                continue
            st = _stat(str(p))
            if st is not None and st[0] not in ("Z", "X"):
                out.append(p)
        return out

    def _reap(self):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.tpid:
                self.tainted = self.tainted or "the template process died"

    def kill_leftovers(self, child=None):
        """Kill and reap every process the snippet left (never the server or the template)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pids = self.others()
            if child is not None:
                pids.append(child)
                child = None
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._reap()
            if not pids:
                return
            time.sleep(0.0005)
        self.tainted = self.tainted or "leftover processes would not die"

    # -- files --
    def _rm(self, path):
        err = remove_tree(path)
        if err:
            self.tainted = self.tainted or err

    def wipe(self):
        """Delete everything the snippet wrote; taint unless the sandbox's tmpfs are empty again."""
        self._rm(self.workdir)
        for d in self.wipe_dirs:
            try:
                for name in os.listdir(d):
                    self._rm(os.path.join(d, name))
                st = os.statvfs(d)
                if os.listdir(d) or st.f_bfree != st.f_blocks:
                    self.tainted = self.tainted or "%s is not empty after the wipe" % d
            except OSError as e:
                self.tainted = self.tainted or "cannot empty %s: %s" % (d, e)
        if self.own_ipc:
            self._wipe_ipc()

    def disk_full(self):
        for d in self.wipe_dirs:
            try:
                st = os.statvfs(d)
            except OSError:
                continue
            if st.f_bavail * st.f_frsize < max(64 * 1024, st.f_blocks * st.f_frsize // 100):
                return True
        return False

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
    def _start(self, step, env):
        """Have the template fork the step's child: (out_r, err_r), or an error string. The step
        is in the child's pipe before the fork is asked for: the server does not wait for it."""
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        req_r, req_w = os.pipe()
        data = marshal.dumps({"step": step, "env": env, "workdir": os.path.abspath(self.workdir)})
        os.set_blocking(req_w, False)
        try:
            n = os.write(req_w, data)
        except BlockingIOError:
            n = 0
        try:
            self.tsock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [req_r, out_w, err_w]))])
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            return "template gone: %s" % e
        finally:
            for fd in (req_r, out_w, err_w):
                os.close(fd)
            if n < len(data):  # a step larger than the pipe: the rest once the child reads
                os.set_blocking(req_w, True)
                try:
                    view = memoryview(data)[n:]
                    while view:
                        view = view[os.write(req_w, view):]
                except OSError:
                    pass
            os.close(req_w)
        return out_r, err_r

    def run_step(self, step, env):
        cap = int(step["output_bytes"])
        t0 = time.monotonic()
        deadline = t0 + float(step["wall_s"])
        res = {"name": step["name"], "rc": None, "sig": None, "stdout": "", "stderr": "", "wall_s": 0.0,
               "cpu_s": 0.0, "timed_out": False, "exceeded": False, "leftovers": 0, "disk_full": False,
               "error": ""}
        started = self._start(step, env)
        if isinstance(started, str):
            self.tainted = self.tainted or started
            res["error"] = started
            return res
        out_r, err_r = started
        pid = None
        bufs = {out_r: bytearray(), err_r: bytearray()}
        sel = self.sel
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(bufs)
        exit_info = None  # (status, utime, stime)
        t_gone = False

        def drain(fd):
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    return
                buf = bufs[fd]
                room = cap - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    res["exceeded"] = True
                    return

        def template_says(deadline):
            nonlocal pid, exit_info, t_gone
            got = self._from_template(deadline)
            if got is None:
                t_gone = True  # the snippet killed or broke the template: the worker is done
                self.tainted = self.tainted or "the template process died"
                sel.unregister(self.tsock)
            elif got[0] == b"P":
                pid = got[1]
            else:
                pid, exit_info = got[1], got[2:]

        while exit_info is None:
            now = time.monotonic()
            if now >= deadline:
                res["timed_out"] = True
                break
            for key, _ in sel.select(min(deadline - now, 0.5)):
                if key.fd == self.tsock.fileno():
                    template_says(time.monotonic())
                elif key.fd in open_fds:
                    drain(key.fd)
            if res["exceeded"] or t_gone:  # t_gone: the snippet killed its template; it is killed too
                break
        if exit_info is None and not t_gone:
            if self.pid1:  # the child is one of the namespace's processes: kill them all
                self.kill_leftovers()
            else:
                while pid is None and not t_gone:
                    template_says(time.monotonic() + T_WAIT_S)
                for target in ((-pid, pid) if pid is not None else ()):  # its group (setsid), itself
                    try:
                        os.kill(target, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            while exit_info is None and not t_gone:
                template_says(time.monotonic() + T_WAIT_S)
            if exit_info is None:
                self.tainted = self.tainted or "the template did not report its child"
        wall = time.monotonic() - t0
        left = self.others()
        if exit_info is not None and not (res["timed_out"] or res["exceeded"]):
            res["leftovers"] = len(left)
        if left or exit_info is None:
            self.kill_leftovers(pid if exit_info is None and pid is not None else None)
        else:
            self._reap()
        for fd in list(open_fds):  # everything is dead now: the rest is buffered in the pipes
            if not res["exceeded"]:
                drain(fd)
        for fd in open_fds:
            sel.unregister(fd)
        for fd in (out_r, err_r):
            os.close(fd)
        if exit_info is None:
            res["error"] = "the snippet killed or stopped the sandbox's template process (worker replaced)"
        else:
            status, ut, st = exit_info
            res["rc"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            res["sig"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            res["cpu_s"] = round(ut + st, 6)
        res["stdout"] = binascii.b2a_base64(bytes(bufs[out_r]), newline=False).decode("ascii")
        res["stderr"] = binascii.b2a_base64(bytes(bufs[err_r]), newline=False).decode("ascii")
        res["wall_s"] = round(wall, 6)
        res["disk_full"] = self.disk_full()
        return res

    def handle(self, req):
        if "files" in req:  # a new snippet: a fresh, empty directory
            self.wipe()
            os.mkdir(self.workdir, 0o755)
            for name, text in (req.get("files") or {}).items():
                if "/" in name or name in (".", ".."):
                    raise ValueError("bad file name %r" % name)
                with open(os.path.join(self.workdir, name), "w", encoding="utf-8", errors="replace") as fh:
                    fh.write(text)
        env = dict(req.get("env") or {})
        results = []
        failed = False
        for step in req["steps"]:
            step_env = dict(env)
            step_env.update(step.get("env") or {})
            r = self.run_step(step, step_env)
            results.append(r)
            failed = bool(r["error"] or r["timed_out"] or r["exceeded"] or r["rc"] != 0)
            if failed:
                break
        if failed or not req.get("keep"):
            self.wipe()
            self.tainted = self.tainted or self.template_ok()
        return {"steps": results, "tainted": self.tainted}


def _stat(pid):
    """(state, ppid) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as fh:
            st = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = st[st.rfind(")") + 2:].split()
    return (fields[0], fields[1]) if len(fields) > 1 else None


def main():
    cfg = json.loads(sys.argv[1])
    if cfg.get("pdeathsig", True):  # not where the parent is a thread of the host (it may end first)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    prctl(PR_SET_DUMPABLE, 0)
    if os.getpid() != 1:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    # protocol pipes away from 0/1; stray output of the server itself goes to stderr
    rfd, wfd = os.dup(0), os.dup(1)
    os.set_inheritable(rfd, False)
    os.set_inheritable(wfd, False)
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    srv = Server(cfg)  # forks the template first (it inherits no protocol descriptor)
    write_frame(wfd, {"ready": True, "pid": os.getpid(), "pid1": srv.pid1, "seccomp": srv.seccomp is not None,
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
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown (the template dies with the server: PR_SET_PDEATHSIG)


if __name__ == "__main__":
    main()
