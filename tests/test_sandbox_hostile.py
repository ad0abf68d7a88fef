"""Hostile programs at the backend level, on every backend that works here, one sandbox per
snippet ("ps") and on fork-server workers ("fs"): resource bombs, leftovers, signals, output,
the fork server's own defences. Everything must be contained and nothing may hang. Reads of
private data, writes outside, network, environment and compile-time includes are attacked
through the exec filter from a project outside /tmp in test_sandbox_escape.py. Programs that could hurt the host (fork bomb, disk fill) run only where the test
has just confirmed the isolation (PID namespace, uid 65534, RLIMIT_NPROC, private /tmp); the
network test connects only to a listener this test opens on 127.0.0.1; signals are only sent to
processes this test started (its own fork-server workers).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

import privcode.sandbox as sandbox
from privcode.sandbox import base as sb
from privcode.sandbox.base import Limits
# the runners and their fixtures (one sandbox per snippet, fork-server workers) of test_sandbox.py
from test_sandbox import FAST, _backend, _runner, backend, confirm_isolation, ns_backend  # noqa: E402, F401, F811

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it


@pytest.fixture(params=[(b, "fs") for b in sandbox.BACKENDS], ids=lambda p: f"{p[0]}-fs")
def fs_backend(request):
    return _runner(request)


def _procs_with(token: bytes) -> list[int]:
    """Host pids whose command line contains `token` (processes this test's snippets started)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if token in Path(f"/proc/{d}/cmdline").read_bytes():
                out.append(int(d))
        except OSError:
            continue
    return out


def _wait_gone(token: bytes, seconds: float = 3) -> list[int]:
    deadline = time.monotonic() + seconds
    while _procs_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _procs_with(token)


# ---- network ------------------------------------------------------------------------------------

_CONNECT = """import socket
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", {port}))
    print("CONNECTED")
except OSError as e:
    print("FAILED", type(e).__name__)
"""


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    yield srv
    srv.close()


def test_rlimit_fallback_does_not_isolate_network(listener):
    """Documents the fallback's weakness (the connection goes to our own listener only)."""
    b = _backend("rlimit")
    port = listener.getsockname()[1]
    r = b.run(_CONNECT.format(port=port), "python", FAST)
    assert r.stdout.startswith("CONNECTED"), r
    assert b.isolation == "rlimit"


# ---- resource bombs (only where isolation is confirmed) -----------------------------------------

_FORK_BOMB = """import os, subprocess, time
subprocess.Popen(['sleep', '{token}'])
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.05)
"""

_SLEEPERS = """import subprocess
n = 0
procs = []
for i in range(500):
    try:
        procs.append(subprocess.Popen(['sleep', '{token}']))
        n += 1
    except OSError:
        break
print(n)
"""


def _bomb(backend, lim: Limits, program: str, fraction: str) -> tuple:
    """Run `program` under `lim` where the isolation is confirmed; its `{token}` (a `sleep` argument
    ending in `fraction`) marks the processes it starts for the host to look for afterwards.
    Returns (result, seconds the run took, token as bytes)."""
    confirm_isolation(backend, lim)
    token = f"3{uuid.uuid4().int % 10**6}{fraction}"
    t = time.monotonic()
    r = backend.run(program.format(token=token), "python", lim)
    return r, time.monotonic() - t, token.encode()


def test_fork_bomb_contained(ns_backend):
    r, took, token = _bomb(ns_backend, Limits(wall_s=1.5, cpu_s=2, nproc=16), _FORK_BOMB, ".25")
    assert r.status == "timeout", r
    assert took < 8
    assert _wait_gone(token) == []  # the namespace (or the server's kill(-1)) took them all
    r = ns_backend.run("import os\nprint(sorted(int(d) for d in os.listdir('/proc') if d.isdigit()))\n",
                       "python", FAST)
    assert r.status == "ok" and len(json.loads(r.stdout)) <= 3, r  # PID 1, the template, itself


def test_fork_bomb_with_subprocesses_capped_by_nproc(ns_backend):
    r, took, token = _bomb(ns_backend, Limits(wall_s=10, cpu_s=5, nproc=32), _SLEEPERS, ".5")
    assert r.status == "background_process", r  # it left its sleeps running: killed, and dropped
    assert int(r.stdout) < 32
    assert took < 8
    assert _wait_gone(token) == []


def test_memory_bomb_many_small_allocations(ns_backend):
    confirm_isolation(ns_backend, FAST)
    r = ns_backend.run("x = []\nwhile True:\n    x.append(' ' * 10**6)\n", "python",
                    Limits(wall_s=10, cpu_s=5, mem_mb=200))
    assert r.status == "oom", r


def test_disk_fill_contained(ns_backend):
    lim = Limits(wall_s=10, cpu_s=5, fsize_mb=4)
    info = confirm_isolation(ns_backend, lim)
    code = ("import errno, os\n"
            "n = 0\n"
            "try:\n"
            "    with open('big', 'wb') as f:\n"
            "        while True:\n"
            "            f.write(b'0' * 2**20)\n"
            "except OSError as e:\n"
            "    print('big', errno.errorcode[e.errno])\n"
            "try:\n"
            "    while True:\n"
            "        with open('/tmp/f%d' % n, 'wb') as f:\n"
            "            f.write(b'1' * (3 * 2**20))\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print('many', errno.errorcode[e.errno], n)\n")
    r = ns_backend.run(code, "python", lim)
    assert r.status == "disk_limit", r  # it caught ENOSPC and exited 0, but its tmpfs is full
    big, many = r.stdout.splitlines()
    assert big == "big EFBIG"  # RLIMIT_FSIZE
    assert many.startswith("many ENOSPC") and int(many.split()[2]) * 3 * 2**20 <= info["tmp_bytes"]
    if ns_backend.fork_server:  # the next snippet of the worker gets a clean, empty /tmp again
        r = ns_backend.run("import os\nst = os.statvfs('/tmp')\nprint(sorted(os.listdir('/tmp')), "
                           "st.f_bfree / st.f_blocks > 0.9)\n", "python", lim)
        assert r.stdout.strip() == "['sandbox'] True", r


# ---- environment, processes, signals -------------------------------------------------------------

def test_background_children_killed(backend):
    token = f"3{uuid.uuid4().int % 10**6}.75"
    code = ("import os, subprocess\n"
            f"subprocess.Popen(['sleep', '{token}'])\n"                              # plain child
            f"subprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"      # own session
            "if os.fork() == 0:\n"                                                   # double-fork daemon
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            f"        os.execvp('sleep', ['sleep', '{token}'])\n"
            "    os._exit(0)\n"
            "print('started')\n")
    t = time.monotonic()
    r = backend.run(code, "python", Limits(wall_s=8, cpu_s=2))
    assert (r.status, r.stdout) == ("background_process", "started\n"), r
    assert time.monotonic() - t < 4  # nothing kept the pipes open
    assert _wait_gone(token.encode()) == []
    if backend.fork_server and backend.isolation != "rlimit":  # and the next snippet sees nobody
        r = backend.run("import os\nprint(len([d for d in os.listdir('/proc') if d.isdigit()]))\n", "python", FAST)
        assert r.status == "ok" and int(r.stdout) <= 3, r  # the server (PID 1), the template and itself


def test_signals_to_parent_filter_survives(backend):
    """A snippet's parent is the template (same uid): killing it ends the snippet as "killed" and
    the worker is replaced; the server (PID 1, or the rlimit server) and the filter survive."""
    r = backend.run("import os, signal, time\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                    "except OSError as e:\n    print(type(e).__name__)\ntime.sleep(0.2)\nprint('alive')\n",
                    "python", FAST)
    assert r.status == "killed" and "template" in r.detail, r
    r = backend.run("print('next')\n", "python", FAST)  # a fresh worker serves
    assert (r.status, r.stdout) == ("ok", "next\n"), r
    if backend.isolation != "rlimit":  # PID 1 ignores signals from inside; kill(-1) reaches the template
        r = backend.run("import os, signal, time\nos.kill(1, signal.SIGKILL)\ntime.sleep(0.2)\nprint('alive')\n",
                        "python", FAST)
        assert (r.status, r.stdout) == ("ok", "alive\n"), r
        r = backend.run("import os, signal\nos.kill(-1, signal.SIGKILL)\n", "python", FAST)
        assert r.status == "killed", r
        r = backend.run("print('next')\n", "python", FAST)
        assert (r.status, r.stdout) == ("ok", "next\n"), r
    if backend.fork_server:
        assert backend.pool.restarts == (1 if backend.isolation == "rlimit" else 2)


def test_huge_single_line(backend):
    lim = Limits(wall_s=10, cpu_s=5, output_bytes=10_000)
    t = time.monotonic()
    r = backend.run("import sys\nsys.stdout.write('x' * 10**8)\n", "python", lim)
    assert r.status == "output_limit" and r.truncated and len(r.stdout) == 10_000, r
    r = backend.run("import sys\nsys.stderr.write('y' * 10**7)\nsys.stderr.flush()\nimport time\ntime.sleep(30)\n",
                    "python", lim)
    assert r.status == "output_limit" and r.truncated and len(r.stderr) <= 10_000, r
    # a huge single line of *code* (a 3 MB literal) goes in and runs
    r = backend.run("s = '" + "z" * 3_000_000 + "'\nprint(len(s))\n", "python", Limits(wall_s=10, cpu_s=5))
    assert (r.status, r.stdout) == ("ok", "3000000\n"), r
    assert time.monotonic() - t < 20


def test_infinite_output(backend):
    t = time.monotonic()
    r = backend.run("while True:\n    print('spam')\n", "python", Limits(wall_s=5, cpu_s=2, output_bytes=5000))
    assert r.status == "output_limit" and r.truncated, r
    r = backend.run("yes\n", "shell", Limits(wall_s=5, cpu_s=2, output_bytes=5000))
    assert r.status == "output_limit" and r.truncated, r
    assert time.monotonic() - t < 5
    # (infinite loops and sleeping past the limit: test_sandbox.py)


# ---- fork server: one snippet cannot affect the next ---------------------------------------------

def test_fork_server_snippets_do_not_see_each_other(fs_backend):
    first = ("import os, sys, json, random, ctypes\n"
             "open('/tmp/leftover', 'w').write('secret')\n"
             "open('here.txt', 'w').write('secret')\n"
             "os.environ['LEAK'] = '1'\n"
             "json.LEAK = 1\n"
             "sys.modules['leak_mod'] = json\n"
             "os.chdir('/')\n"
             "ok = 0\n"
             "try:\n"
             "    libc = ctypes.CDLL(None, use_errno=True)\n"
             "    ok = libc.shmget(0, 4096, 0o1666)\n"   # IPC_PRIVATE | IPC_CREAT | 0666: a SysV segment
             "except Exception:\n"
             "    pass\n"
             "print(random.random(), ok >= 0)\n")
    second = ("import os, sys, json, random\n"
              "print(json.dumps({'tmp': os.path.exists('/tmp/leftover'), 'here': os.path.exists('here.txt'),"
              " 'env': 'LEAK' in os.environ, 'mod': hasattr(json, 'LEAK') or 'leak_mod' in sys.modules,"
              " 'cwd': os.getcwd(), 'shm': open('/proc/sysvipc/shm').read().count(chr(10)) - 1"
              " if os.path.exists('/proc/sysvipc/shm') else 0, 'rand': random.random()}))\n")
    a = fs_backend.run(first, "python", FAST)
    assert a.status == "ok", a
    b = json.loads(fs_backend.run(second, "python", FAST).stdout)
    c = json.loads(fs_backend.run(second, "python", FAST).stdout)
    assert not (b["here"] or b["env"] or b["mod"]), b
    assert b["cwd"].endswith("sandbox")
    assert b["rand"] != c["rand"] and str(b["rand"]) != a.stdout.split()[0]  # fresh random state per snippet
    if fs_backend.isolation != "rlimit":  # private /tmp and IPC namespace, wiped after every snippet
        assert not b["tmp"] and b["shm"] == 0, b


_INSPECT = """import os
pid = {target}
for what in ('mem', 'environ', 'fd'):
    try:
        p = '/proc/%d/%s' % (pid, what)
        os.listdir(p) if what == 'fd' else open(p, 'rb').read(1)
        print(what, 'OPEN')
    except OSError as e:
        print(what, type(e).__name__)
"""


def test_fork_server_cannot_inspect_server(fs_backend):
    target = "os.getppid()" if fs_backend.isolation == "rlimit" else "1"
    r = fs_backend.run(_INSPECT.format(target=target), "python", FAST)
    assert r.status == "ok", r
    assert "OPEN" not in r.stdout, r  # the server is not dumpable: no ptrace, no /proc/<pid>/{mem,fd}


def _server_pid(worker) -> int:
    """Host pid of the python server inside a worker's sandbox (a descendant of the wrapper)."""
    todo = [worker.proc.pid]
    while todo:
        pid = todo.pop()
        try:
            if "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe")):
                return pid
        except OSError:
            pass
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    raise AssertionError("server process not found")


def test_crashed_and_hung_workers_are_replaced(monkeypatch):
    monkeypatch.setattr(sb, "HOST_MARGIN_S", 1.0)
    b = _backend("bwrap")
    lim = Limits(wall_s=1, cpu_s=1)
    with b.pool(1, lim) as pool:
        assert pool.run("print(1)\n", "python", lim).stdout == "1\n"
        w = pool._idle.queue[0]
        os.kill(_server_pid(w), signal.SIGKILL)  # our own worker: crashed
        time.sleep(0.2)
        r = pool.run("print(2)\n", "python", lim)
        assert (r.status, r.stdout, pool.restarts) == ("ok", "2\n", 1), r
        w = pool._idle.queue[0]
        hung = _server_pid(w)
        os.kill(hung, signal.SIGSTOP)  # hung: the host's own deadline (wall + margin) ends it
        t = time.monotonic()
        r = pool.run("print(3)\n", "python", lim)
        assert r.status == "timeout" and "did not answer" in r.detail, r
        assert time.monotonic() - t < 5
        assert _gone(hung)  # killed, although a stopped PID-namespace init ignores PR_SET_PDEATHSIG
        r = pool.run("print(4)\n", "python", lim)
        assert (r.status, r.stdout, pool.restarts) == ("ok", "4\n", 2), r
        last = _server_pid(pool._idle.queue[0])
    assert _gone(last)  # close() ends the servers


def _gone(pid: int, seconds: float = 3) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_workers_outlive_the_thread_that_started_them(fs_backend):
    """bwrap --die-with-parent and PR_SET_PDEATHSIG fire when the *thread* that started the
    wrapper ends: workers are started from one long-lived thread, not the caller's."""
    import threading
    t = threading.Thread(target=lambda: fs_backend.run("print(1)\n", "python", FAST))
    t.start()
    t.join()
    time.sleep(0.3)
    assert all(w.proc.poll() is None for w in list(fs_backend.pool._idle.queue))
    r = fs_backend.run("print(2)\n", "python", FAST)
    assert (r.stdout, fs_backend.pool.restarts) == ("2\n", 0)
