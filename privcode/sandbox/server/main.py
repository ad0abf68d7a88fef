"""The fork server's own process: starts the template, then serves the host's requests one by one.

    main()   # inside the sandbox, config JSON in sys.argv[1] (privcode/sandbox/server/__init__.py)
"""
import array
import binascii
import json
import marshal
import os
import selectors
import signal
import socket
import struct
import sys
import time

from .cleanup import Cleanup
from .common import PR_SET_CHILD_SUBREAPER, PR_SET_DUMPABLE, PR_SET_PDEATHSIG, _libc, prctl, read_frame, write_frame
from .seccomp import seccomp_installer, seccomp_program
from .template import attributes, template_main

T_WAIT_S = 5.0  # how long the server waits for the template to answer


class Server(Cleanup):
    def __init__(self, cfg):
        self.workdir = cfg["workdir"]
        # only directories that are mounts of their own (the sandbox's private tmpfs) and never as
        # root: a misconfigured sandbox must not be able to empty a shared /tmp
        self.wipe_dirs = [d for d in cfg.get("wipe", ()) if os.geteuid() != 0 and os.path.ismount(d)]
        self.pid1 = os.getpid() == 1
        self.own_ipc = bool(cfg.get("own_ipc", self.pid1))
        # a container's own memory cgroup (the engine's), read-only where the engine mounts it: its OOM kills
        self.oom_file = next((f for f in cfg.get("oom_counters", ()) if os.access(f, os.R_OK)), None)
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

    def oom_kills(self):
        """The OOM kills of the cgroup of `oom_file` (the line "oom_kill N" of memory.oom_control, v1, or of
        memory.events, v2); 0 without one."""
        try:
            with open(self.oom_file) as fh:
                return next((int(l.split()[1]) for l in fh if l.startswith("oom_kill ")), 0)
        except (OSError, TypeError, ValueError, IndexError):
            return 0

    def handle(self, req):
        ooms = self.oom_kills()
        resp = self._handle(req)
        if self.oom_file:
            resp["oom"] = self.oom_kills() > ooms
        return resp

    def _handle(self, req):
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
                      "oom_counter": srv.oom_file is not None, "python": "%d.%d.%d" % sys.version_info[:3]})
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
