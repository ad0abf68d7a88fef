"""What the fork server does after a step and after a snippet: kill what the snippet left, delete
what it wrote, check the sandbox's tmpfs and System V IPC are empty again.

    class Server(Cleanup): ...   # the server (privcode/sandbox/server/main.py) has these methods

The methods use the server's workdir, wipe_dirs, own_ipc, pid1, tpid and tainted.
"""
import os
import signal
import time

from .common import _libc, remove_tree


class Cleanup:
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


def _stat(pid):
    """(state, ppid) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid, "rb") as fh:
            st = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = st[st.rfind(")") + 2:].split()
    return (fields[0], fields[1]) if len(fields) > 1 else None
