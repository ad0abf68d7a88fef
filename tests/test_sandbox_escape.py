"""The hostile suite as an attacker runs it: generated programs fed to `privcode exec-filter` (the
CLI, in a subprocess, exactly as the pipeline runs it) from a project directory OUTSIDE /tmp, with
the private zone beside results/ (0700, records 0600), world-readable project and result files,
a TCP listener on 127.0.0.1, a unix socket in the project, an abstract unix socket, a System V
segment of the host, a secret in the filter's environment and a host process with a marker in its
command line.

1. The isolation contract (base.py, docs/sandbox.md) is checked with a benign probe on every
   backend that works here; ISOLATING must be exactly the isolation levels that pass it.
2. Every backend that passes gets the attacks, through the exec filter, on fork-server workers
   and one sandbox per snippet. Denial-of-service programs run only there, with bounded sizes
   (a few hundred MiB over a 256 MiB limit, 32 processes, 16 MiB of tmpfs).
3. Afterwards the host must be unchanged: no file the programs wrote, no process of the sandbox
   uid or with the programs' marker, no connection to the listeners, no cgroup left behind, and
   no private or result content, and no secret, in anything the filter wrote.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from privcode import ledger
from privcode.filters import exec_filter
from privcode.io import read_json, read_jsonl, write_jsonl
import privcode.sandbox as sandbox
from privcode.sandbox import base as sb
from privcode.sandbox import cgroup
from privcode.sandbox.base import Limits
from privcode.sandbox.toolchains import world_reachable

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it

SHM_KEY = 0x50524956  # a System V segment of the host; no sandbox may see it
NR_ADD_KEY = {"x86_64": 248, "aarch64": 217}.get(platform.machine())
LIMITS = {"wall_s": 3, "cpu_s": 2, "mem_mb": 256, "fsize_mb": 4, "nproc": 32, "output_bytes": 20000, "compile_s": 30}
TOP = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc", "proc", "dev", "tmp", "opt"}


def _outside_tmp() -> Path:
    """A writable directory outside /tmp (and /var/tmp, /dev/shm, /usr) that uid 65534 could
    traverse: a sandbox that showed it would leak what is world-readable below it."""
    fallback = None
    for d in ("/srv", "/opt", "/var/lib", "/home", "/mnt", str(Path.home())):
        p = Path(d).resolve()
        if not p.is_dir() or not os.access(p, os.W_OK):
            continue
        if any(str(p) == t or str(p).startswith(t + "/") for t in ("/tmp", "/var/tmp", "/dev/shm", "/usr")):
            continue
        if world_reachable(str(p)):
            return p
        fallback = fallback or p
    if fallback is None:
        pytest.skip("no writable directory outside /tmp for the project")
    return fallback


class Host:
    """The attacked host: a project outside /tmp with its private zone, listeners, a secret."""

    def __init__(self):
        self.tok = uuid.uuid4().hex[:12]
        self.root = Path(tempfile.mkdtemp(prefix="privcode-hostile-", dir=_outside_tmp()))
        self.root.chmod(0o755)
        self.results = self.root / "results"
        self.private = self.root / "private"
        self.records = self.private / "data" / "private" / "records.jsonl"
        self.table = self.results / "table3.csv"
        self.canaries = {f"PROJECT-CANARY-{self.tok}", f"RESULTS-CANARY-{self.tok}", f"PRIVATE-CANARY-{self.tok}"}
        self.secret_parts = ("hostile-secret-", self.tok[::-1])
        self.secret = "".join(self.secret_parts)
        (self.root / "pyproject.toml").write_text(f"# PROJECT-CANARY-{self.tok}\n")
        self.results.mkdir(mode=0o755)
        self.table.write_text(f"RESULTS-CANARY-{self.tok}\n")
        for d in (self.private, self.private / "data", self.records.parent):
            d.mkdir(mode=0o700)
        self.records.write_text(json.dumps({"id": "r1", "solution": f"PRIVATE-CANARY-{self.tok}"}) + "\n")
        for p in (self.root / "pyproject.toml", self.table):
            p.chmod(0o644)
        self.records.chmod(0o600)
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(8)
        self.tcp.setblocking(False)
        self.port = self.tcp.getsockname()[1]
        self.sock_path = str(self.results / "host.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.sock_path)
        os.chmod(self.sock_path, 0o777)
        self.unix.listen(8)
        self.unix.setblocking(False)
        self.abstract_name = f"privcode-hostile-{self.tok}"
        self.abstract = socket.socket(socket.AF_UNIX)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen(8)
        self.abstract.setblocking(False)
        self.marker = f"7{uuid.uuid4().int % 10**6}.5"
        self.marker_proc = subprocess.Popen(["sleep", self.marker])
        self.sleep_token = f"8{uuid.uuid4().int % 10**6}.25"  # what the programs' own leftovers run
        libc = ctypes.CDLL(None, use_errno=True)
        self.shm_id = libc.shmget(SHM_KEY, 4096, 0o1600)
        self.nobody_before = self.nobody_pids()
        self.files_before = self.tree()

    def nobody_pids(self) -> set[int]:
        out = set()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == sb.SANDBOX_UID:
                        out.add(int(d))
                except OSError:
                    pass
        return out

    def tree(self) -> dict:
        out = {}
        for dirpath, dirs, files in os.walk(self.root):
            for n in dirs + files:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return out

    def with_token(self) -> list[str]:
        """Files on the host whose name holds the token (the programs wrote such names)."""
        hits = []
        for d in ("/tmp", "/var/tmp", "/dev/shm", str(Path.home()), "/home", "/", "/opt", "/srv", str(self.root),
                  str(self.results), str(self.private)):
            try:
                hits += [os.path.join(d, n) for n in os.listdir(d) if self.tok in n]
            except OSError:
                pass
        return hits

    def procs_with(self, token: str) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.marker_proc.pid:
                try:
                    if token.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                        out.append(int(d))
                except OSError:
                    pass
        return out

    def close(self):
        self.marker_proc.kill()
        self.marker_proc.wait()
        for s in (self.tcp, self.unix, self.abstract):
            s.close()
        if self.shm_id >= 0:
            ctypes.CDLL(None).shmctl(self.shm_id, 0, None)
        shutil.rmtree(self.root)


@pytest.fixture(scope="module")
def host():
    h = Host()
    yield h
    h.close()


def _backend(name):
    b = sandbox._registry()[name]()
    if not b.available():
        pytest.skip(f"backend {name} not available here: {b.why_unavailable()}")
    return b


# ---- 1. the contract ------------------------------------------------------------------------------

PROBE = r'''
import fcntl, json, os, socket, struct
host = json.loads(HOST)
f = {}
f["uid"] = os.getresuid() + os.getresgid()
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
f["caps"] = status.get("CapEff", "").strip()
f["no_new_privs"] = status.get("NoNewPrivs", "").strip()
f["seccomp"] = status.get("Seccomp", "").strip()
f["ns"] = {n: os.readlink("/proc/self/ns/" + n) for n in ("mnt", "pid", "ipc", "uts", "net")}
f["ifaces"] = [n for _, n in socket.if_nameindex()]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
f["lo_up"] = bool(struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1] & 1)
s.close()
cmdlines = ""
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            cmdlines += open("/proc/%s/cmdline" % p, "rb").read().decode("latin-1")
        except OSError:
            pass
f["host_marker_seen"] = host["marker"] in cmdlines
f["sysv_keys"] = [int(l.split()[0]) for l in open("/proc/sysvipc/shm").read().splitlines()[1:]]
f["root"] = sorted(os.listdir("/"))
f["etc"] = sorted(os.listdir("/etc"))
f["visible"] = [p for p in host["hidden"] if os.path.lexists(p)]
f["sockets"] = []
for top in f["root"]:  # the allowed entries (the rest is a violation anyway), four levels deep
    if top not in TOP or top in ("proc", "usr") or os.path.islink("/" + top):
        continue
    for dirpath, dirs, files in os.walk("/" + top):
        if dirpath.count("/") >= 4:
            dirs[:] = []
        for n in files:
            try:
                if stat_is_sock(os.lstat(os.path.join(dirpath, n)).st_mode):
                    f["sockets"].append(os.path.join(dirpath, n))
            except OSError:
                pass
mounts = {}
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    a, b = left.split(), right.split()
    mounts[a[4]] = (b[0], "ro" in a[5].split(","), a[3])
f["tmpfs"] = [mounts.get("/tmp", ("?",))[0], mounts.get("/dev/shm", ("?",))[0]]
f["rw"] = sorted(m for m, (_, ro, _) in mounts.items() if not ro)
f["rw_writable"] = sorted(m for m in f["rw"] if os.access(m, os.W_OK))
f["sysfs"] = sorted(m for m, (t, _, _) in mounts.items() if t == "sysfs")
f["binds"] = {m: r for m, (_, _, r) in mounts.items() if r != "/"}  # a subtree of another file system
f["host_tmp_files"] = [p for p in host["host_files"] if os.path.exists(p)]
f["fds"] = sorted(int(x) for x in os.listdir("/proc/self/fd"))
f["env"] = sorted(os.environ)
f["secret_seen"] = host["secret"] in repr(dict(os.environ))
print(json.dumps(f))
'''


def _probe_code(host: Host) -> str:
    hidden = [str(host.root), str(host.results), str(host.private), str(host.records), str(host.table),
              "/work", "/srv", "/root", "/home", "/run", "/var", "/sys", str(Path.home()), os.getcwd()]
    info = {"marker": host.marker, "hidden": hidden, "secret": host.secret,
            "host_files": [f"/tmp/probe-{host.tok}", f"/dev/shm/probe-{host.tok}"]}
    return (f"HOST = {json.dumps(json.dumps(info))}\nTOP = {sorted(TOP)!r}\nimport stat\n"
            "stat_is_sock = stat.S_ISSOCK\n" + PROBE)


# A container's root is its image's file system (containers/sandbox.Dockerfile: no project files), so the image's
# own /home, /var, /srv ... are there; what must not be: a bind of anything of the host but the engine's own
# generated files, the host's sysfs, a place the snippet can write outside /tmp and /dev/shm. The engine's cgroup
# mounts (podman, cgroup v1: a root-owned tmpfs holding the container's own cgroups, read-only) are its own too,
# and so are the masks over its own /proc and /dev (/proc/sys, /proc/keys ... bound read-only or to /dev/null).
IMAGE_DIRS = {"/srv", "/root", "/home", "/run", "/var", "/sys"}
ENGINE_FILES = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run/.containerenv"}


def contract_failures(facts: dict, isolation: str = "") -> list[str]:
    """What the probe's facts violate of the isolation contract (empty: it holds). `isolation` "container":
    the root may hold the image's own directories (IMAGE_DIRS, above)."""
    image = isolation == "container"
    own = {n: os.readlink(f"/proc/self/ns/{n}") for n in facts["ns"]}
    bad = []
    if 0 in facts["uid"]:
        bad.append(f"runs as root ({facts['uid']})")
    if facts["caps"] != "0000000000000000":
        bad.append(f"capabilities {facts['caps']}")
    bad += [f"shares the host's {n} namespace" for n, v in facts["ns"].items() if v == own[n]]
    if facts["ifaces"] != ["lo"]:  # its own loopback only (bwrap always brings it up: nothing is behind it)
        bad.append(f"network interfaces {facts['ifaces']}")
    if facts["host_marker_seen"]:
        bad.append("sees host processes")
    if SHM_KEY in facts["sysv_keys"]:
        bad.append("sees the host's System V IPC")
    if set(facts["root"]) - TOP and not image:
        bad.append(f"root holds {sorted(set(facts['root']) - TOP)}")
    visible = [p for p in facts["visible"] if not (image and p in IMAGE_DIRS)]
    if visible:
        bad.append(f"sees {visible}")
    if facts["sysfs"]:
        bad.append(f"sees the host's sysfs at {facts['sysfs']}")
    cgroup = lambda m: m == "/sys/fs/cgroup" or m.startswith("/sys/fs/cgroup/")  # noqa: E731
    masked = lambda m: any(m.startswith(d) for d in ("/proc/", "/dev/"))  # noqa: E731 - its own /proc's masks
    binds = sorted(m for m in facts["binds"] if image and not (m in ENGINE_FILES or cgroup(m) or masked(m)))
    if binds:
        bad.append(f"host file systems bound at {binds[:5]}")
    if facts["sockets"]:
        bad.append(f"sees sockets {facts['sockets'][:5]}")
    if facts["tmpfs"] != ["tmpfs", "tmpfs"] or facts["host_tmp_files"]:
        bad.append(f"/tmp, /dev/shm not private tmpfs ({facts['tmpfs']}, sees {facts['host_tmp_files']})")
    allowed_rw = ("/tmp", "/dev/shm", "/dev", "/proc")
    rw = [m for m in facts["rw"] if not any(m == a or m.startswith(a + "/") for a in allowed_rw)
          and not (image and cgroup(m) and m not in facts["rw_writable"])]
    if rw:
        bad.append(f"writable mounts {rw[:5]}")
    if [fd for fd in facts["fds"] if fd > 3]:
        bad.append(f"inherited descriptors {facts['fds']}")
    if set(facts["env"]) - {"PATH", "LANG", "HOME", "PWD", "SHLVL", "_", "OLDPWD"} or facts["secret_seen"]:
        bad.append(f"environment {facts['env']}")
    return bad


def _probe(backend, host: Host, fork_server: bool, exec_too: bool = True) -> dict:
    for p in (f"/tmp/probe-{host.tok}", f"/dev/shm/probe-{host.tok}"):
        Path(p).write_text("host")
    try:
        code = _probe_code(host)
        shell = f"cat > p.py <<'PRIVCODE_EOF'\n{code}PRIVCODE_EOF\nexec {backend.server_python()} p.py\n"
        todo = [(code, "python"), (shell, "shell")][:2 if exec_too else 1]
        if fork_server:
            with backend.pool(1) as pool:
                rs = [pool.run(c, lang) for c, lang in todo]
        else:
            rs = [backend.run(c, lang) for c, lang in todo]
    finally:
        for p in (f"/tmp/probe-{host.tok}", f"/dev/shm/probe-{host.tok}"):
            os.unlink(p)
    assert all(r.status == "ok" for r in rs), rs
    return dict(zip(("in-process python", "exec'd program"), (json.loads(r.stdout) for r in rs)))


@pytest.mark.parametrize("name", sandbox.BACKENDS)
def test_isolating_is_exactly_the_backends_that_meet_the_contract(host, name):
    b = _backend(name)
    for fork_server in (True, False):
        for how, facts in _probe(b, host, fork_server).items():
            bad = contract_failures(facts, b.isolation)
            assert (not bad) == (b.isolation in sb.ISOLATING), (name, how, fork_server, bad)
            if b.isolation in sb.ISOLATING:
                assert facts["seccomp"] == "2" and facts["no_new_privs"] == "1", facts


@pytest.mark.parametrize("name", ("bwrap", "unshare"))
def test_working_directory_below_a_bound_path_is_covered(name, monkeypatch):
    """A checkout under /usr/local would be visible through the /usr bind: the root covers the
    working directory (and the private zone, home, the checkout) with an empty tmpfs."""
    b = _backend(name)
    base = Path("/usr/local/share")
    if not os.access(base, os.W_OK):
        pytest.skip("/usr/local/share is not writable here")
    proj = Path(tempfile.mkdtemp(prefix="privcode-hide-", dir=base))
    try:
        proj.chmod(0o755)
        (proj / "results.csv").write_text("RESULTS-BELOW-USR\n")
        (proj / "results.csv").chmod(0o644)
        monkeypatch.chdir(proj)
        r = b.run(f"import os\nprint(os.listdir({str(proj)!r}))\n", "python", Limits(wall_s=10))
        assert (r.status, r.stdout) == ("ok", "[]\n"), r
    finally:
        shutil.rmtree(proj)


# ---- 2. the attacks, through `privcode exec-filter` ---------------------------------------------

LEAK = '''LEAKS = []
def leak(*a):
    LEAKS.append(" ".join(map(str, a)))
'''
END = '''if LEAKS:
    raise SystemExit("LEAK " + " | ".join(LEAKS))
'''


def memory_bound_mb(b) -> int | None:
    """What bounds a snippet's memory with all its processes: the step's mem_mb in the worker's cgroup; a
    docker/podman container's own limit (the engine's cgroup); None without a cgroup."""
    if b.name == "container" and (b.describe().get("engine") in ("docker", "podman")):
        return b.engine_memory_mb(Limits(**{k: v for k, v in LIMITS.items() if k != "output_bytes"}))
    return LIMITS["mem_mb"] if cgroup.mode() != "none" else None


def attacks(h: Host, have: dict, seccomp: bool, bound_mb: int | None = LIMITS["mem_mb"], image: bool = False) -> list:
    """(id, lang, code, expected reason: None = kept, a str, or a set of acceptable ones). `bound_mb`
    (memory_bound_mb): the memory attacks take a few hundred MiB more than it, and end as "oom". `image`: the
    root is a container image's, whose own IMAGE_DIRS are not the host's."""
    kids = 3 if bound_mb is None else bound_mb // 200 + 2       # children of 200 MiB
    memfds = 100 if bound_mb is None else bound_mb // 4 + 100   # memfds of 4 MiB
    # a container's OOM killer may take the server too, or reclaim stall it past the wall limit: never kept
    engine = bound_mb is not None and bound_mb != LIMITS["mem_mb"]
    memfd_oom = {None, "oom"} if bound_mb is None else {"oom", "killed", "timeout"} if engine else "oom"
    paths = [str(h.root), str(h.results), str(h.table), str(h.private), str(h.records), str(h.root / "pyproject.toml"),
             h.sock_path, "/work", "/srv", "/root", "/home", "/run", "/var", str(Path.home())]
    paths = [p for p in paths if not (image and p in IMAGE_DIRS)]
    targets = [str(h.root), str(h.results), str(h.private), str(Path.home()), "/home", "/dev/shm", "/tmp",
               "/var/tmp", "/", "/usr", "/etc", "/opt"]
    t, sl = h.tok, h.sleep_token
    out = [
        ("read_private", "python", LEAK + f"""import os
for p in {paths!r}:
    if os.path.lexists(p):
        leak("visible", p)
    try:
        leak("read", p, open(p).read(200))
    except OSError:
        pass
""" + END, None),
        ("write_outside", "python", f"""import os
for d in {targets!r}:
    try:
        open(os.path.join(d, "escape-{t}"), "w").write("x")
    except OSError:
        pass
""", None),
        ("connect", "python", LEAK + f"""import socket
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", {h.port}))
    leak("tcp connected")
except OSError:
    pass
for addr in ({h.sock_path!r}, "\\0{h.abstract_name}"):
    u = socket.socket(socket.AF_UNIX)
    u.settimeout(2)
    try:
        u.connect(addr)
        leak("unix connected", addr)
    except OSError:
        pass
""" + END, None),
        ("snoop", "python", LEAK + f"""import os
blob = repr(dict(os.environ))
for pid in os.listdir("/proc"):
    if pid.isdigit() or pid == "self":
        for what in ("environ", "cmdline"):
            try:
                blob += open("/proc/%s/%s" % (pid, what), "rb").read().decode("latin-1")
            except OSError:
                pass
if {h.secret_parts[0]!r} + {h.secret_parts[1]!r} in blob:
    leak("the filter's secret")
if {h.marker!r} in blob:
    leak("a host process")
""" + END, None),
        ("cross_a", "python", f"# SRCMARK-{t}\n" * 50 + f"""import ctypes
needle = "MEM" + "MARK-" + "{t}"
keep = [needle + str(i) for i in range(3000)]
print((needle + "\\n") * 300)
import os
for d in ("/tmp", "/dev/shm", ".", "/var/tmp", "/tmp/.privcode-tc", "/dev/shm/.privcode-tc", "/var/tmp/.privcode-tc",
          "/opt/privcode-tc", "/opt"):
    try:
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, "cross-{t}"), "w").write(needle)
    except OSError:
        pass
ctypes.CDLL(None).shmget(0x5052495A, 4096, 0o1666)
""", None),
        ("cross_b", "python", LEAK + f"""import os
needles = [(w + "MARK-" + "{t}").encode() for w in ("MEM", "SRC")]  # its output, its source
for top in ("/tmp", "/dev/shm", ".", "/var/tmp", "/opt"):
    for dirpath, dirs, files in os.walk(top):
        if dirpath.count("/") > 3:
            dirs[:] = []
        leak_files = [n for n in files if "cross-" in n]
        if leak_files:
            leak("file", dirpath, leak_files)
if str(0x5052495A) in open("/proc/sysvipc/shm").read():
    leak("System V segment")
n = [0, 0]
mem = open("/proc/self/mem", "rb", 0)
for line in open("/proc/self/maps").read().splitlines():
    f = line.split()
    if f[1].startswith("rw"):
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        try:
            mem.seek(lo)
            data = mem.read(hi - lo)
        except (OSError, OverflowError, ValueError):
            continue
        n = [c + data.count(x) for c, x in zip(n, needles)]
        del data
if max(n) > 10:  # its own needles: a few copies; the previous snippet's source held 50
    leak("copies of the previous snippet (output, source) in memory:", n)
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid(), os.getppid())]
if others:
    leak("processes", others)
""" + END, None),
        ("fork_bomb", "python", """import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", {"timeout", "killed"}),
        ("mem_big", "python", "x = bytearray(2 * 2**30)\n", "oom"),
        ("mem_children", "python", f"""import os, time
kids = []
for i in range({kids}):
    pid = os.fork()
    if pid == 0:
        b = bytearray(200 * 2**20)
        time.sleep(1)
        os._exit(0)
    kids.append(pid)
for k in kids:
    os.waitpid(k, 0)
""", "oom" if bound_mb is not None else {None, "oom"}),
        ("memfd", "python", f"""import os
chunk = b"1" * 2**20
fds = []
for i in range({memfds}):
    fd = os.memfd_create("m%d" % i)
    for j in range(4):
        os.write(fd, chunk)
    fds.append(fd)
""", memfd_oom),
        ("disk_fill", "python", """with open("/tmp/fill", "wb") as f:
    while True:
        f.write(b"0" * 2**20)
""", "disk_limit"),
        ("disk_fill_caught", "python", """n = 0
for d in ("/tmp", "/dev/shm"):
    try:
        while True:
            with open("%s/f%d" % (d, n), "wb") as f:
                f.write(b"1" * 3 * 2**20)
            n += 1
    except OSError:
        pass
print(n)
""", "disk_limit"),
        ("after_disk", "python", """import os
for d in ("/tmp", "/dev/shm"):
    for i in range(3):
        with open("%s/g%d" % (d, i), "wb") as f:
            f.write(b"2" * 3 * 2**20)
    for i in range(3):
        os.unlink("%s/g%d" % (d, i))
""", None),
        ("output_flood", "python", "while True:\n    print('x' * 1000)\n", "output_limit"),
        ("orphan", "python", f"import subprocess\nsubprocess.Popen(['sleep', '{sl}'])\nprint('bye')\n",
         "background_process"),
        ("daemon", "python", f"""import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{sl}"])
    os._exit(0)
""", "background_process"),
        ("shell_orphan", "shell", f"(sleep {sl} &)\necho ok\n", "background_process"),
        ("signals", "python", """import os, signal
for p in (1, -1, os.getppid()):
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
""", {None, "killed"}),
        ("after_signals", "python", "print('still served')\n", None),
    ]
    if seccomp and NR_ADD_KEY is not None:
        out.append(("keyring_renice", "python", LEAK + f"""import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.syscall({NR_ADD_KEY}, b"user", b"privcode-{t}", b"v", 1, ctypes.c_int(-4)) >= 0:
    leak("a key in the uid's keyring")
try:
    os.setpriority(os.PRIO_USER, 0, 19)
    leak("reniced every process of the uid")
except OSError:
    pass
""" + END, None))
    if have.get("cpp"):
        out += [(f"include_cpp_{n}", "cpp", f'#include "{p}"\nint main() {{ return 0; }}\n', "syntax_error")
                for n, p in (("private", h.records), ("results", h.table))]
    if have.get("rust"):
        out.append(("include_rust", "rust", f'fn main() {{ print!("{{}}", include_str!("{h.table}")); }}\n',
                    "syntax_error"))
    return out


def _exec_filter(h: Host, name: str, fork_server: bool, samples) -> tuple[Path, subprocess.CompletedProcess, int]:
    tag = f"{name}-{'fs' if fork_server else 'ps'}"
    gen = h.results / f"generated-{tag}"
    gen.mkdir()
    write_jsonl(gen / "samples.jsonl", [{"id": i, "problem": i, "lang": lang, "code": code} for i, lang, code, _ in samples])
    ledger.derive(gen, stage="generate")
    out = h.results / f"filtered-{tag}"
    cmd = [sys.executable, "-m", "privcode.cli", "exec-filter", "--input", str(gen / "samples.jsonl"), "--out", str(out),
           "--workers", "1", "--no-progress",
           "--params", json.dumps({"backend": name, "fork_server": fork_server, **LIMITS})]
    env = {**os.environ, "PRIVCODE_HOSTILE_SECRET": h.secret}
    env.pop("PRIVCODE_ZONE", None)  # the zone is ./private beside results/, as in a pipeline run
    proc = subprocess.Popen(cmd, cwd=h.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    return out, subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), proc.pid


# the fork server (the pipeline's default) on every backend; one sandbox per snippet on bwrap
# (the same code path on every backend, one more start per snippet)
@pytest.mark.parametrize("name, fork_server", [(n, True) for n in sandbox.BACKENDS] + [("bwrap", False)],
                         ids=lambda v: {True: "fork-server", False: "per-snippet"}.get(v, v))
def test_attacks_through_the_exec_filter(host, name, fork_server):
    b = _backend(name)
    facts = _probe(b, host, fork_server, exec_too=False)["in-process python"]
    bad = contract_failures(facts, b.isolation)
    if bad:  # never aim denial-of-service programs at a backend that has not shown it isolates
        assert b.isolation not in sb.ISOLATING, bad
        pytest.skip(f"{name} does not isolate ({bad[0]}): no attacks; the filter refuses it without the opt-in")
    have = {lang: not isinstance(b.plan(lang), str) for lang in ("cpp", "rust")}
    samples = attacks(host, have, facts["seccomp"] == "2", memory_bound_mb(b), b.isolation == "container")
    out, proc, cli_pid = _exec_filter(host, name, fork_server, samples)
    assert proc.returncode == 0, proc.stderr[-3000:]

    kept = {r["id"] for r in read_jsonl(out / "kept.jsonl")}
    dropped = {r["id"]: r for r in read_jsonl(out / "dropped.jsonl")}
    wrong = []
    for sid, _, _, want in samples:
        got = None if sid in kept else dropped[sid]["reason"]
        if not (got in want if isinstance(want, set) else got == want):
            wrong.append((sid, got, want, (dropped.get(sid) or {}).get("stderr_tail", "")[-300:]))
    assert not wrong, "\n".join(map(repr, wrong))
    assert set(r["reason"] for r in dropped.values()) <= set(exec_filter.DROP_REASONS)
    stats = read_json(out / "stats.json")
    assert stats["backend"] == name and stats["isolation"] in sb.ISOLATING

    # nothing private, no result, no secret in anything the filter wrote
    for p in out.iterdir():
        text = p.read_text(errors="replace")
        for secret in host.canaries | {host.secret}:
            assert secret not in text, (p.name, secret)
    assert host.secret not in proc.stdout + proc.stderr

    # the host is unchanged
    assert host.with_token() == []
    after = host.tree()
    new = [p for p in set(after) - set(host.files_before)
           if not any(f"/results/{d}-" in p for d in ("generated", "filtered"))]
    assert new == [], new
    changed = [p for p, v in host.files_before.items() if after.get(p) != v and p != str(host.results)]
    assert changed == [], changed
    assert host.procs_with(host.sleep_token) == []
    deadline = time.monotonic() + 5
    while host.nobody_pids() - host.nobody_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.nobody_pids() - host.nobody_before == set()
    for s in (host.tcp, host.unix, host.abstract):
        with pytest.raises(BlockingIOError):
            s.accept()  # nothing reached a listener of the host
    left = [os.path.join(os.path.dirname(d), f"privcode-{cli_pid}") for d in cgroup.layout().get("dirs", [])]
    assert [d for d in left if os.path.exists(d)] == []


def test_unisolated_backend_is_refused_without_the_opt_in(host):
    """rlimit (or any backend outside ISOLATING) is refused by the filter unless the user opts in."""
    b = _backend("rlimit")
    assert b.isolation not in sb.ISOLATING
    samples = [("ok", "python", "print(1)\n", None)]
    out, proc, _ = _exec_filter(host, "rlimit", True, samples)
    assert proc.returncode == 2 and not out.exists(), proc.stderr[-2000:]
    assert "isolat" in proc.stderr
