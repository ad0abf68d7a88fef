"""Sandbox backends: limits, classification and isolation (each test runs on every backend that
works here and is skipped, with the reason, elsewhere)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import privcode
from privcode.errors import PrivcodeError
from privcode.sandbox import base as sb
from privcode.sandbox.base import Limits, get_backend, is_syntax_error

PROJECT = Path(privcode.__file__).resolve().parents[1]
FAST = Limits(wall_s=5, cpu_s=2)
NAMESPACED = ("bwrap", "unshare")


def _backend(name):
    b = sb._registry()[name]()
    if not b.available():
        pytest.skip(f"backend {name} not available here: {b.why_unavailable()}")
    return b


@pytest.fixture(params=sb.BACKENDS)
def backend(request):
    return _backend(request.param)


@pytest.fixture(params=NAMESPACED)
def ns_backend(request):
    return _backend(request.param)


# ---- basics -----------------------------------------------------------------------------------

def test_clean_program_ok(backend):
    r = backend.run("import sys\nprint('hello', sum(range(10)))\nprint('err', file=sys.stderr)\n", "python", FAST)
    assert r.status == "ok", r
    assert r.returncode == 0 and r.stdout == "hello 45\n" and r.stderr == "err\n"
    assert r.backend == backend.name and r.wall_s > 0 and not r.truncated


def test_shell_program(backend):
    r = backend.run("x=$((6*7))\necho \"$x\"\n", "shell", FAST)
    assert (r.status, r.stdout) == ("ok", "42\n"), r
    assert backend.run("echo hi\n", "bash", FAST).stdout == "hi\n"  # alias


def test_syntax_error(backend):
    r = backend.run("def f(:\n    pass\n", "python", FAST)
    assert r.status == "error" and r.returncode == 1
    assert "SyntaxError" in r.stderr and is_syntax_error(r, "python")
    r2 = backend.run("raise ValueError('boom')\n", "python", FAST)
    assert r2.status == "error" and not is_syntax_error(r2, "python")


def test_exit_codes_and_signals(backend):
    assert backend.run("import sys; sys.exit(3)\n", "python", FAST).returncode == 3
    r = backend.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", "python", FAST)
    assert (r.status, r.returncode) == ("killed", -9), r


def test_no_code_and_unknown_language(backend):
    assert backend.run("", "python", FAST).status == "no_code"
    assert backend.run(None, "python", FAST).status == "no_code"
    r = backend.run("int main(){}", "cobol", FAST)
    assert r.status == "toolchain_missing" and "cobol" in r.detail


# ---- limits -----------------------------------------------------------------------------------

def test_infinite_loop_hits_cpu_limit(backend):
    r = backend.run("while True:\n    pass\n", "python", Limits(wall_s=10, cpu_s=1))
    assert r.status == "timeout", r
    assert r.wall_s < 5


def test_sleep_past_wall_limit(backend):
    t = time.monotonic()
    r = backend.run("import time\ntime.sleep(60)\n", "python", Limits(wall_s=1, cpu_s=5))
    assert r.status == "timeout" and "wall" in r.detail, r
    assert time.monotonic() - t < 4


def test_huge_output_is_capped_not_hung(backend):
    lim = Limits(wall_s=10, cpu_s=5, output_bytes=10_000)
    t = time.monotonic()
    r = backend.run("while True:\n    print('x' * 1000)\n", "python", lim)
    assert time.monotonic() - t < 5
    assert r.status == "killed" and r.truncated and len(r.stdout) <= 10_000, r
    # a big write to stderr only is capped too
    r = backend.run("import sys\nsys.stderr.write('e' * 10**6)\n", "python", lim)
    assert r.truncated and len(r.stderr) <= 10_000


def test_memory_bomb_contained_by_rlimit_as(backend):
    r = backend.run("x = bytearray(4 * 1024**3)\nprint('allocated')\n", "python", FAST)
    assert r.status == "oom" and "allocated" not in r.stdout, r
    r = backend.run("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "python",
                    Limits(wall_s=10, cpu_s=5, mem_mb=256))
    assert r.status == "oom", r


def test_file_size_limit(backend):
    r = backend.run("with open('big', 'wb') as f:\n    f.write(b'0' * (3 * 1024 * 1024))\n", "python",
                    Limits(wall_s=5, cpu_s=2, fsize_mb=1))
    assert r.status != "ok", r


def test_concurrent_runs(backend):
    with cf.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda i: backend.run(f"print({i} * 2)\n", "python", FAST), range(8)))
    assert [r.stdout for r in rs] == [f"{i * 2}\n" for i in range(8)]


# ---- isolation --------------------------------------------------------------------------------

def test_environment_is_empty(backend, monkeypatch):
    monkeypatch.setenv("PRIVCODE_TEST_SECRET", "s3cr3t-value")
    r = backend.run("import os, json\nprint(json.dumps(dict(os.environ)))\n", "python", FAST)
    env = json.loads(r.stdout)
    assert "s3cr3t-value" not in r.stdout and "PRIVCODE_TEST_SECRET" not in env
    assert env["PATH"] == "/usr/bin:/bin" and env["LANG"] == "C.UTF-8"
    assert set(env) <= {"PATH", "LANG", "HOME", "PWD", "LC_CTYPE", "SHLVL", "OLDPWD"}


def test_runs_as_nobody_when_root(backend):
    if os.geteuid() != 0:
        pytest.skip("not root: the rlimit fallback keeps the caller's uid")
    r = backend.run("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n", "python", FAST)
    assert r.stdout.strip() == "65534 65534 [65534]" or r.stdout.strip() == "65534 65534 []", r


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


def test_network_is_isolated(ns_backend, listener):
    port = listener.getsockname()[1]
    r = ns_backend.run(_CONNECT.format(port=port), "python", FAST)
    assert r.status == "ok" and r.stdout.startswith("FAILED"), r
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's listener


def test_rlimit_fallback_does_not_isolate_network(listener):
    """Documents the fallback's weakness (the connection goes to our own listener only)."""
    b = _backend("rlimit")
    port = listener.getsockname()[1]
    r = b.run(_CONNECT.format(port=port), "python", FAST)
    assert r.stdout.startswith("CONNECTED"), r
    assert b.isolation == "rlimit"


def test_cannot_write_outside_sandbox_tmp(backend):
    if backend.name == "rlimit":
        pytest.skip("documented: the rlimit fallback does not protect world-writable directories")
    shared = Path(tempfile.mkdtemp(prefix="privcode-test-ww-"))
    try:
        shared.chmod(0o777)
        target = shared / "escaped.txt"
        proj_target = PROJECT / f".privcode-sandbox-escape-{uuid.uuid4().hex}"
        own = f"/tmp/privcode-own-{uuid.uuid4().hex}.txt"
        code = (f"for p in ({str(target)!r}, {str(proj_target)!r}, {own!r}):\n"
                "    try:\n"
                "        open(p, 'w').write('x')\n"
                "        print('WROTE', p)\n"
                "    except OSError as e:\n"
                "        print('DENIED', p, type(e).__name__)\n")
        r = backend.run(code, "python", FAST)
        assert r.status == "ok", r
        assert not target.exists() and not proj_target.exists()
        assert f"WROTE {own}" in r.stdout and not Path(own).exists()  # its own /tmp: writable, private
        assert f"DENIED {target}" in r.stdout and f"DENIED {proj_target}" in r.stdout
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_project_results_invisible_to_bwrap():
    b = _backend("bwrap")
    results = PROJECT / "results"
    created_dir = not results.exists()
    results.mkdir(exist_ok=True)
    secret = results / f".privcode-sandbox-secret-{uuid.uuid4().hex}.txt"
    try:
        secret.write_text("TOP-SECRET-TRAINING-RECORD\n")
        secret.chmod(0o644)
        code = (f"import os\nfor p in ({str(secret)!r}, {str(PROJECT / 'privcode' / '__init__.py')!r}):\n"
                "    try:\n"
                "        print(open(p).read())\n"
                "    except OSError as e:\n"
                "        print('NOPE', type(e).__name__)\n"
                f"print(os.path.exists({str(PROJECT)!r}), os.path.exists('/root'), os.path.exists('/home'))\n")
        r = b.run(code, "python", FAST)
        assert r.status == "ok", r
        assert "TOP-SECRET" not in r.stdout
        assert r.stdout.splitlines() == ["NOPE FileNotFoundError", "NOPE FileNotFoundError", "False False False"]
    finally:
        secret.unlink()
        if created_dir:
            results.rmdir()


def test_namespaced_kills_background_children_promptly(ns_backend):
    t = time.monotonic()
    r = ns_backend.run("(sleep 30 &)\nsleep 30 &\necho started\n", "shell", Limits(wall_s=8, cpu_s=2))
    assert (r.status, r.stdout) == ("ok", "started\n"), r
    assert time.monotonic() - t < 3  # PID namespace gone with its PID 1: nothing kept the pipes open


def _nobody_sleepers() -> int:
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}")
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if st.st_uid == 65534 and cmd.startswith(b"sleep\x0037"):
            n += 1
    return n


def test_fork_bomb_contained(ns_backend):
    lim = Limits(wall_s=10, cpu_s=5, nproc=32)
    probe = ns_backend.run(
        "import os, resource, json\n"
        "print(json.dumps({'uid': os.getuid(), 'nproc': resource.getrlimit(resource.RLIMIT_NPROC)[0],"
        " 'visible': sum(d.isdigit() for d in os.listdir('/proc'))}))\n", "python", lim)
    info = json.loads(probe.stdout) if probe.status == "ok" else {}
    if not (info.get("uid") == 65534 and 0 < info.get("nproc", -1) <= 32 and info.get("visible", 99) <= 5):
        pytest.skip(f"no PID namespace + uid 65534 + RLIMIT_NPROC confirmed ({probe.status}, {info})")
    code = ("import subprocess\nn = 0\nprocs = []\n"
            "for i in range(500):\n"
            "    try:\n"
            "        procs.append(subprocess.Popen(['sleep', '37']))\n"
            "        n += 1\n"
            "    except OSError:\n"
            "        break\n"
            "print(n)\n")
    t = time.monotonic()
    r = ns_backend.run(code, "python", lim)
    assert r.status == "ok", r
    assert int(r.stdout) < 32
    assert time.monotonic() - t < 8
    deadline = time.monotonic() + 3
    while _nobody_sleepers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _nobody_sleepers() == 0  # the namespace took them all down


# ---- selection --------------------------------------------------------------------------------

def test_get_backend_auto_and_errors(monkeypatch):
    b = get_backend("auto")
    assert b.name in sb.BACKENDS and b.available()
    avail = [n for n in sb.BACKENDS if sb._registry()[n]().available()]
    assert b.name == avail[0]  # strongest first
    with pytest.raises(PrivcodeError, match="unknown sandbox backend"):
        get_backend("docker")
    with pytest.raises(PrivcodeError, match="isolation"):
        get_backend("rlimit", require_isolation=True)
    # pretend only the fallback works
    monkeypatch.setitem(sb._probe_cache, "bwrap", (False, "pretend"))
    monkeypatch.setitem(sb._probe_cache, "unshare", (False, "pretend"))
    assert get_backend("auto").name == "rlimit"
    with pytest.raises(PrivcodeError, match="isolation is required"):
        get_backend("auto", require_isolation=True)
    with pytest.raises(PrivcodeError, match="pretend"):
        get_backend("bwrap")


def test_limits_validation_and_defaults():
    lim = Limits()
    assert (lim.wall_s, lim.cpu_s, lim.mem_mb, lim.fsize_mb, lim.nproc, lim.output_bytes) == \
        (sb.WALL_S, sb.CPU_S, sb.MEM_MB, sb.FSIZE_MB, sb.NPROC, sb.OUTPUT_BYTES) == (10, 10, 1024, 16, 64, 65536)
    with pytest.raises(PrivcodeError, match="wall_s"):
        Limits(wall_s=0)
    assert sb.canonical_lang("py") == "python" and sb.canonical_lang("Bash") == "shell"
