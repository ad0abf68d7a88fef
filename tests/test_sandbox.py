"""Sandbox backends: limits, classification and isolation. Each test runs on every backend that
works here (skipped, with the reason, elsewhere), both one sandbox per snippet ("ps") and on
fork-server workers ("fs"). The hostile suite is in test_sandbox_hostile.py, languages in
test_sandbox_langs.py."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
from pathlib import Path

import pytest

import privcode
import privcode.sandbox as sandbox
from privcode.errors import PrivcodeError
from privcode.langs import canonical_lang
from privcode.sandbox import base as sb
from privcode.sandbox import cgroup
from privcode.sandbox import get_backend
from privcode.sandbox.base import Limits, is_syntax_error

PROJECT = Path(privcode.__file__).resolve().parents[1]
FAST = Limits(wall_s=5, cpu_s=2)
NAMESPACED = ("bwrap", "unshare")


def _backend(name):
    b = sandbox._registry()[name]()
    if not b.available():
        pytest.skip(f"backend {name} not available here: {b.why_unavailable()}")
    return b


class Runner:
    """A backend run one sandbox per snippet (`fork_server=False`) or on a 2-worker pool."""

    def __init__(self, backend, fork_server: bool):
        self.backend, self.fork_server = backend, fork_server
        self.name, self.isolation = backend.name, backend.isolation
        self.pool = backend.pool(2) if fork_server else None

    def run(self, code, lang, limits=None):
        return (self.pool.run if self.pool else self.backend.run)(code, lang, limits)

    def close(self):
        if self.pool:
            self.pool.close()


def _runner(request):
    name, mode = request.param
    r = Runner(_backend(name), mode == "fs")
    request.addfinalizer(r.close)
    return r


MODES = ("ps", "fs")


def confirm_isolation(runner, lim: Limits) -> dict:
    """Skip unless the program provably runs in its own PID namespace, as uid 65534, under
    RLIMIT_NPROC <= lim.nproc, with a private size-limited /tmp: the precondition for running a
    fork bomb, memory bomb or disk fill."""
    probe = runner.run(
        "import os, resource, json\n"
        "st = os.statvfs('/tmp')\n"
        "print(json.dumps({'uid': os.getuid(), 'nproc': resource.getrlimit(resource.RLIMIT_NPROC)[0],"
        " 'visible': sum(d.isdigit() for d in os.listdir('/proc')), 'tmp_bytes': st.f_blocks * st.f_frsize}))\n",
        "python", lim)
    info = json.loads(probe.stdout) if probe.status == "ok" else {}
    if not (info.get("uid") == 65534 and 0 < info.get("nproc", -1) <= lim.nproc and info.get("visible", 99) <= 5
            and 0 < info.get("tmp_bytes", 0) <= 1024 ** 3):
        pytest.skip(f"isolation not confirmed ({probe.status}, {info})")
    return info


@pytest.fixture(params=[(b, m) for b in sandbox.BACKENDS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def backend(request):
    return _runner(request)


@pytest.fixture(params=[(b, m) for b in NAMESPACED for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def ns_backend(request):
    return _runner(request)


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
    assert r.status == "output_limit" and r.truncated and len(r.stdout) <= 10_000, r
    # a big write to stderr only is capped too
    r = backend.run("import sys\nsys.stderr.write('e' * 10**6)\n", "python", lim)
    assert r.status == "output_limit" and r.truncated and len(r.stderr) <= 10_000


def test_memory_bomb_contained_by_rlimit_as(ns_backend):
    backend = ns_backend  # hostile: only where the isolation has just been confirmed
    confirm_isolation(backend, FAST)
    r = backend.run("x = bytearray(4 * 1024**3)\nprint('allocated')\n", "python", FAST)
    assert r.status == "oom" and "allocated" not in r.stdout, r
    r = backend.run("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "python",
                    Limits(wall_s=10, cpu_s=5, mem_mb=256))
    assert r.status == "oom", r


def test_file_size_limit(backend):
    r = backend.run("with open('big', 'wb') as f:\n    f.write(b'0' * (3 * 1024 * 1024))\n", "python",
                    Limits(wall_s=5, cpu_s=2, fsize_mb=1))
    assert r.status == "disk_limit" and "File too large" in r.stderr, r
    r = backend.run("head -c 3000000 /dev/zero > big\n", "shell", Limits(wall_s=5, cpu_s=2, fsize_mb=1))
    assert r.status == "disk_limit", r  # SIGXFSZ


def test_concurrent_runs(backend):
    with cf.ThreadPoolExecutor(4) as ex:
        rs = list(ex.map(lambda i: backend.run(f"print({i} * 2)\n", "python", FAST), range(8)))
    assert [r.stdout for r in rs] == [f"{i * 2}\n" for i in range(8)]


def test_pool_keeps_its_worker(ns_backend):
    """Benign snippets never taint a worker: one sandbox serves them all (no restart)."""
    if not ns_backend.fork_server:
        pytest.skip("fork server only")
    rs = [ns_backend.run(f"print({i})\n", "python", FAST) for i in range(20)]
    assert [r.stdout for r in rs] == [f"{i}\n" for i in range(20)]
    assert (ns_backend.pool.restarts, ns_backend.pool.started) == (0, 1)


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


# ---- selection --------------------------------------------------------------------------------

def test_get_backend_auto_and_errors(monkeypatch):
    b = get_backend("auto")
    assert b.name in sandbox.BACKENDS and b.available()
    avail = [n for n in sandbox.BACKENDS if sandbox._registry()[n]().available()]
    assert b.name == avail[0]  # strongest first
    with pytest.raises(PrivcodeError, match="unknown sandbox backend"):
        get_backend("docker")  # the engine is chosen by the container backend
    with pytest.raises(PrivcodeError, match="isolation"):
        get_backend("rlimit", require_isolation=True)
    # pretend only the fallback works
    for key in [k for k in sb._probe_cache if k.startswith("container:")] or ["container:any:ok"]:
        monkeypatch.setitem(sb._probe_cache, key, (False, "pretend"))
    monkeypatch.setitem(sb._probe_cache, "bwrap", (False, "pretend"))
    monkeypatch.setitem(sb._probe_cache, "unshare", (False, "pretend"))
    assert get_backend("auto").name == "rlimit"
    with pytest.raises(PrivcodeError, match="isolation is required"):
        get_backend("auto", require_isolation=True)
    with pytest.raises(PrivcodeError, match="pretend"):
        get_backend("bwrap")


def test_drop_reasons_are_the_statuses():
    """Every status a run can end in is a documented drop reason of the filter (or "ok")."""
    from privcode.filters.exec_filter import DROP_REASONS
    assert set(DROP_REASONS) == (set(sb.STATUSES) - {"ok"}) | {"syntax_error"}


def test_limits_validation_and_defaults():
    lim = Limits()
    assert (lim.wall_s, lim.cpu_s, lim.mem_mb, lim.fsize_mb, lim.nproc, lim.output_bytes, lim.compile_s) == \
        (sb.WALL_S, sb.CPU_S, sb.MEM_MB, sb.FSIZE_MB, sb.NPROC, sb.OUTPUT_BYTES, sb.COMPILE_S) == \
        (10, 10, 1024, 16, 64, 65536, 30)
    with pytest.raises(PrivcodeError, match="wall_s"):
        Limits(wall_s=0)
    assert canonical_lang("py") == "python" and canonical_lang("Bash") == "shell"


# ---- container backend (no engine is usable on most CI machines: command lines are checked) ------

def test_container_unavailable_says_why():
    b = sandbox._registry()["container"]()
    if b.available():
        pytest.skip("a container engine with the sandbox image works here")
    why = b.why_unavailable()
    if b._found_engine:  # an engine answers but cannot start the image (e.g. its runtime refuses the limits)
        assert why.startswith(f"{b._found_engine[0]}: cannot run the sandbox image "), why
    else:
        assert "container engine" in why and all(e in why for e in ("docker", "podman", "apptainer"))
    with pytest.raises(PrivcodeError, match="container"):
        get_backend("container")


@pytest.fixture
def fake_engine(monkeypatch):
    from privcode.sandbox.container import ContainerBackend

    def make(engine):
        b = ContainerBackend(engine=engine)
        monkeypatch.setitem(ContainerBackend._engines_cache, b._key("engine"), (engine, f"/usr/bin/{engine}"))
        monkeypatch.setitem(ContainerBackend._engines_cache, b._key("tools"), {
            "python3": ("/usr/bin/python3", "/usr/bin/python3.11"), "g++": ("/usr/bin/g++", "/usr/bin/g++-12"),
            "tsc": ("/usr/local/bin/tsc", "/usr/local/lib/node_modules/typescript/bin/tsc"),
            "node": ("/usr/bin/node", "/usr/bin/node"), "setpriv": ("/usr/bin/setpriv", "/usr/bin/setpriv"),
            "_dirs": {"/usr/local/lib/node_modules/@types/node"}})
        monkeypatch.setitem(sb._probe_cache, b._key("tools"), (True, ""))
        monkeypatch.setattr(sb, "_plan_cache", {})
        return b
    return make


def test_container_command_line_docker(fake_engine):
    b = fake_engine("docker")
    spec = b._server_spec(Limits(nproc=32, mem_mb=512))
    a = spec.argv
    assert a[:4] == ["/usr/bin/docker", "run", "--rm", "-i"]
    opt = {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("--")}
    assert opt["--network"] == "none" and opt["--user"] == "65534:65534" and opt["--cap-drop"] == "ALL"
    assert opt["--security-opt"] == "no-new-privileges" and "--read-only" in a and opt["--pids-limit"] == "48"
    tmpfs = [a[i + 1] for i in range(len(a) - 1) if a[i] == "--tmpfs"]
    assert tmpfs[0].startswith("/tmp:rw,exec,nosuid,nodev,size=") and tmpfs[1].startswith("/sys:ro,")  # no sysfs
    assert not any("notmpcopyup" in t for t in tmpfs) and "--read-only-tmpfs=false" not in a  # podman's only
    img = a.index("privcode-sandbox")
    assert a[img + 1:img + 5] == ["/usr/bin/python3", "-I", "-B", "-c"]  # the server, from the image
    assert json.loads(a[-1])["workdir"] == "/tmp/sandbox"
    assert spec.kill_argv == ["/usr/bin/docker", "rm", "-f", opt["--name"]]
    assert spec.engine_oom is not None and not spec.cgroup  # the engine's cgroup, watched from the host
    # toolchains are the image's
    assert b.plan("cpp").tools == {"g++": "/usr/bin/g++-12"}
    assert isinstance(b.plan("java"), str) and "not in the image" in b.plan("java")
    ts = b.plan("typescript")
    assert ts.tools["tsc"] == "/usr/local/lib/node_modules/typescript/bin/tsc"
    assert ts.extra["types"] == ("--typeRoots", "/usr/local/lib/node_modules/@types", "--types", "node")


def test_container_command_line_podman(fake_engine):
    """podman differs from docker where it would break the contract or the fork server (found running it): its
    read-only root gets writable /run and /var/tmp unless --read-only-tmpfs=false; a tmpfs starts as a copy of
    the image's directory unless notmpcopyup (root-owned leftovers the server cannot wipe taint every worker);
    `rm -f` waits 10 s for the server (PID 1 ignores SIGTERM) unless -t 0."""
    spec = fake_engine("podman")._server_spec(Limits(nproc=32, mem_mb=512))
    a = spec.argv
    assert a[:4] == ["/usr/bin/podman", "run", "--rm", "-i"] and "--read-only-tmpfs=false" in a
    tmpfs = [a[i + 1] for i in range(len(a) - 1) if a[i] == "--tmpfs"]
    assert [t.split(":")[0] for t in tmpfs] == ["/tmp", "/sys"] and all(t.endswith(",notmpcopyup") for t in tmpfs)
    assert spec.kill_argv == ["/usr/bin/podman", "rm", "-f", "-t", "0", a[a.index("--name") + 1]]


def test_container_command_line_apptainer(fake_engine, monkeypatch):
    b = fake_engine("apptainer")
    a = b._server_spec(Limits()).argv
    assert a[:2] == ["/usr/bin/apptainer", "exec"] and "--containall" in a and "--no-privs" in a
    assert a[a.index("--network") + 1] == "none"
    if os.geteuid() == 0:
        assert "/usr/bin/setpriv" in a and "--reuid=65534" in a


def test_require_isolation_accepts_container(fake_engine, monkeypatch):
    b = fake_engine("docker")
    monkeypatch.setitem(sb._probe_cache, b._key("ok"), (True, ""))
    assert get_backend(b, require_isolation=True) is b


def test_server_reports_the_oom_kills_of_a_counter_it_is_given(monkeypatch):
    """A docker/podman container's memory cgroup is the engine's: the server reads its `oom_kill` count
    (cfg "oom_counters") before and after each request, and a request during which it grew is `oom` --
    children the engine's OOM killer takes would otherwise leave a snippet that exits 0 (kept). Here the
    counter is a file the snippet itself bumps, on the rlimit backend (no engine needed): the first
    request grows it (oom), the second leaves it (ok), a v1 memory.oom_control file is read the same way."""
    import tempfile

    from privcode.sandbox import forkserver

    d = Path(tempfile.mkdtemp(prefix="privcode-oomctr-", dir="/tmp"))
    d.chmod(0o755)
    try:
        v2, v1 = d / "memory.events", d / "memory.oom_control"
        v2.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
        for f in (v2, v1):
            f.chmod(0o666)
        plain = forkserver.server_command
        monkeypatch.setattr(forkserver, "server_command",
                            lambda py, cfg: plain(py, dict(cfg, oom_counters=[str(d / "absent"), str(v2)])))
        b = _backend("rlimit")
        bump = f"open({str(v2)!r}, 'w').write('oom 2\\noom_kill 2\\n')\n"
        with b.pool(1) as pool:
            got = [pool.run(code, "python", FAST) for code in (bump, "print(1)\n", bump)]
        assert [r.status for r in got] == ["oom", "ok", "ok"], got  # 1 -> 2, then 2 stays 2 (twice)
        monkeypatch.setattr(forkserver, "server_command",
                            lambda py, cfg: plain(py, dict(cfg, oom_counters=[str(v1)])))
        bump = f"open({str(v1)!r}, 'w').write('oom_kill_disable 0\\noom_kill 5\\n')\n"
        with b.pool(1) as pool:
            assert [pool.run(c, "python", FAST).status for c in (bump, "print(2)\n")] == ["oom", "ok"]
    finally:
        import shutil
        shutil.rmtree(d)


def test_host_reads_the_engine_oom_counter_and_refuses_a_container_nobody_watches(monkeypatch):
    """docker/podman: the host reads the OOM counter of the engine's cgroup of each container itself
    (ServerSpec.engine_oom: docker hides the container's cgroups under the --tmpfs /sys, so the server inside
    cannot). Here, on the rlimit backend, the counter is a file the snippet bumps and the server is given none:
    the request that grows it is `oom`, the next `ok`. A worker whose counter neither the host finds nor the
    server reads is refused at start; one the server can watch (hello "oom_counter") starts."""
    import dataclasses
    import shutil
    import tempfile

    from privcode.sandbox import forkserver

    d = Path(tempfile.mkdtemp(prefix="privcode-oomctr-", dir="/tmp"))  # the sandbox uid can reach it
    d.chmod(0o755)
    ctr = d / "memory.oom_control"
    ctr.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    ctr.chmod(0o666)
    try:
        b = _backend("rlimit")
        plain_spec, plain_cmd = b._server_spec, forkserver.server_command

        def spec(locate, counters=()):  # the host's locator, and the counters the server is given
            monkeypatch.setattr(b, "_server_spec", lambda limits, langs=None: dataclasses.replace(
                plain_spec(limits, langs), engine_oom=locate))
            monkeypatch.setattr(forkserver, "server_command",
                                lambda py, cfg: plain_cmd(py, dict(cfg, oom_counters=list(counters))))

        spec(lambda: str(ctr))
        bump = f"open({str(ctr)!r}, 'w').write('oom_kill_disable 0\\noom_kill 8\\n')\n"
        with b.pool(1) as pool:
            assert [pool.run(c, "python", FAST).status for c in (bump, "print(1)\n")] == ["oom", "ok"]
        spec(lambda: None)
        with pytest.raises(PrivcodeError, match="would go unseen"):
            forkserver.Worker(b, FAST)
        spec(lambda: None, counters=[str(ctr)])
        w = forkserver.Worker(b, FAST)
        try:
            assert w.hello["oom_counter"] is True and w._engine_fd is None
        finally:
            w.close()
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(cgroup.mode() == "none", reason="no cgroup memory controller here")
def test_oom_file_of_finds_the_memory_cgroup_of_another_process(tmp_path):
    """cgroup.oom_file_of(pid): the OOM counter of the memory cgroup another process is in (how the host finds
    a docker/podman container's, through its init's pid): for a process put into a worker cgroup, that cgroup's
    own file; None for a process that does not exist."""
    import subprocess

    g = cgroup.create(64, 8)
    assert g is not None
    try:
        p = subprocess.Popen(g.wrap(["sleep", "30"]))
        try:
            deadline = time.monotonic() + 10
            while p.pid not in g.pids() and time.monotonic() < deadline:
                time.sleep(0.01)
            name = "memory.events" if g.mode == "v2" else "memory.oom_control"
            assert os.path.realpath(cgroup.oom_file_of(p.pid)) == os.path.realpath(g.file("memory", name))
            # how the container backend finds it: the engine's `inspect` gives the container's init pid
            from privcode.sandbox.container import engine_oom_file

            fake = tmp_path / "docker"
            want = "inspect --format {{.State.Pid}} c1"
            fake.write_text(f'#!/bin/sh\n[ "$1 $2 $3 $4" = "{want}" ] && echo {p.pid} || exit 1\n')
            fake.chmod(0o755)
            assert engine_oom_file(str(fake), "c1", {}) == cgroup.oom_file_of(p.pid)
            assert engine_oom_file(str(fake), "c2", {}) is None  # no such container
        finally:
            p.kill()
            p.wait()
    finally:
        g.remove()
    assert cgroup.oom_file_of(2**22 + 12345) is None
