"""The `container` backend (isolation "container"): Docker, Podman or Apptainer/Singularity running
the sandbox image (containers/sandbox.Dockerfile, containers/sandbox.def).

Which engine: the first of ENGINES that is installed AND usable (docker/podman: `info` answers,
i.e. there is an engine, and the image PRIVCODE_SANDBOX_IMAGE (default "privcode-sandbox") exists;
apptainer/singularity: the image file PRIVCODE_SANDBOX_SIF (default
containers/privcode-sandbox.sif) exists), and a probe run in it works. Otherwise `available()` is
false and `why_unavailable()` says what is missing, per engine. Build the image with

    docker build -f containers/sandbox.Dockerfile -t privcode-sandbox containers
    apptainer build containers/privcode-sandbox.sif containers/sandbox.def

What it does (docker/podman): `run --rm -i --network none --user 65534:65534 --cap-drop ALL
--security-opt no-new-privileges --read-only --tmpfs /tmp (exec, size-limited) --pids-limit
--memory --ulimit core=0,fsize --ipc private` with the image's own root file system; the
engine's default seccomp profile applies. Every snippet goes through privcode.sandbox.server (the
image's /usr/bin/python3): one container per snippet (`fork_server: false`) or one long-lived
container per worker (the server is the container's PID 1). A container is killed with
`<engine> rm -f <name>` (the client alone is not the container). Its memory limit is the engine's
cgroup: the host reads that cgroup's OOM kills itself (`engine_oom_file`: the container's init pid from
`inspect`), the server inside too where it can see it (podman), and a container neither can watch is
refused.
Apptainer/Singularity: `exec --containall --net --network none --no-privs --uts` (PID, IPC,
mount, network and UTS namespaces, an empty private /tmp, a clean environment); as root the
server drops to uid 65534 with the image's setpriv. Limits: the server's rlimits and the
worker's cgroup of privcode.sandbox.cgroup (the apptainer process tree stays in it).
The contract test of tests/test_sandbox_escape.py runs on this backend only where an engine works
(docs/sandbox.md: runs with Docker and Podman).

Toolchains are the image's (probed once with `command -v`), not the host's.

Not protected: kernel exploits beyond what the seccomp profile blocks, and (apptainer without
root) the uid is the caller's.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.sandbox import cgroup
from privcode.sandbox.base import SANDBOX_DIR, SANDBOX_GID, SANDBOX_UID, Backend, Limits, probe
from privcode.sandbox.toolchains import COMPILE_MEM_MB, TOOLS, Resolved

ENGINES = ("docker", "podman", "apptainer", "singularity")
IMAGE = "privcode-sandbox"
PROJECT = Path(__file__).resolve().parents[2]
_SEARCH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
_TOOL_PROBE = r"""
for t in python3 bash sh g++ clang++ javac java rustc node nodejs tsc php mcs mono swiftc setpriv; do
  p=$(command -v "$t" 2>/dev/null) && echo "T $t $p $(readlink -f "$p")"
done
for d in /usr/lib/node_modules/@types/node /usr/local/lib/node_modules/@types/node; do
  [ -d "$d" ] && echo "D $d"
done
id -u
"""


def image_name() -> str:
    return os.environ.get("PRIVCODE_SANDBOX_IMAGE", IMAGE)


def sif_path() -> str:
    return os.environ.get("PRIVCODE_SANDBOX_SIF", str(PROJECT / "containers" / "privcode-sandbox.sif"))


def inside_apptainer() -> str | None:
    """The image this process runs in when it is inside Apptainer/Singularity (e.g. the exec_filter
    job under `snakemake --sdm apptainer`), else None. Both set APPTAINER_/SINGULARITY_CONTAINER."""
    return os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or None


def _quiet(argv, timeout=60) -> tuple[int, str]:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, f"{type(e).__name__}: {e}"
    return r.returncode, (r.stderr.strip() or r.stdout.strip())[-300:]


def engine_oom_file(exe: str, name: str, env: dict) -> str | None:
    """The host's path of the OOM counter of docker/podman container `name`'s memory cgroup (through its
    init's pid, `inspect`); None where the engine runs elsewhere (DOCKER_HOST) or the file is not readable."""
    try:
        r = subprocess.run([exe, "inspect", "--format", "{{.State.Pid}}", name], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    pid = r.stdout.strip()
    return cgroup.oom_file_of(int(pid)) if r.returncode == 0 and pid.isdigit() and int(pid) > 0 else None


class ContainerBackend(Backend):
    name = "container"
    isolation = "container"
    tool_mode = "image"

    def __init__(self, engine: str | None = None):
        self._forced = engine

    # ---- engine selection ----
    def _engine_state(self):
        """(engine name, engine path) of the first usable engine, or (None, reasons)."""
        reasons = []
        for eng in ((self._forced,) if self._forced else ENGINES):
            exe = shutil.which(eng, path=os.environ.get("PATH", "") + ":" + _SEARCH)
            if exe is None:
                reasons.append(f"{eng}: not installed")
                continue
            if eng in ("docker", "podman"):
                rc, msg = _quiet([exe, "info", "--format", "{{json .}}"], timeout=20)
                if rc != 0:
                    last = msg.splitlines()[-1] if msg else f"exit status {rc}"
                    reasons.append(f"{eng}: installed but not usable (no engine: {last})")
                    continue
                rc, msg = _quiet([exe, "image", "inspect", image_name()], timeout=20)
                if rc != 0:
                    reasons.append(f"{eng}: image '{image_name()}' missing (docker build -f "
                                   f"containers/sandbox.Dockerfile -t {image_name()} containers)")
                    continue
            else:
                if not os.path.isfile(sif_path()):
                    reasons.append(f"{eng}: image {sif_path()} missing (apptainer build {sif_path()} "
                                   "containers/sandbox.def)")
                    continue
            return eng, exe
        return None, "; ".join(reasons)

    def _key(self, what: str) -> str:
        return f"container:{self._forced or 'any'}:{what}"

    _engines_cache: dict = {}  # probe results (engine, image tools) shared by all instances

    def _probe_engine(self):
        eng, exe_or_why = self._engine_state()
        if eng is None:
            return False, exe_or_why
        ContainerBackend._engines_cache[self._key("engine")] = (eng, exe_or_why)
        return True, ""

    @property
    def _found_engine(self):
        return ContainerBackend._engines_cache.get(self._key("engine"))

    def available(self) -> bool:
        return probe(self._key("ok"), self._probe)[0]

    def why_unavailable(self) -> str:
        return probe(self._key("ok"), self._probe)[1]

    def _probe(self):
        ok, why = probe(self._key("engine"), self._probe_engine)
        if not ok:
            nested = inside_apptainer()
            hint = (f"; this process already runs inside the Apptainer image {nested}, which has no "
                    "engine: use backend auto or bwrap there (docs/sandbox.md)") if nested else ""
            return False, f"no usable container engine with the sandbox image ({why}){hint}"
        tools = self._image_tools()
        if "python3" not in tools:
            return False, "the sandbox image has no python3 (needed by privcode.sandbox.server)"
        try:
            r = self.run("id -u\n", "shell", Limits(wall_s=60))
        except PrivcodeError as e:  # the engine answers but cannot start the image (its runtime, its limits)
            return False, f"{self._found_engine[0]}: cannot run the sandbox image {image_name()}: {e}"
        if r.status != "ok" or r.stdout.strip() != str(SANDBOX_UID):
            return False, f"probe run failed ({r.status}: {(r.stderr or r.detail).strip()[-300:]})"
        return True, ""

    # ---- toolchains of the image ----
    def _image_tools(self) -> dict:
        ok, _ = probe(self._key("tools"), self._probe_tools)
        return ContainerBackend._engines_cache.get(self._key("tools"), {}) if ok else {}

    def _probe_tools(self):
        eng, exe = self._found_engine
        if eng in ("docker", "podman"):
            argv = [exe, "run", "--rm", "--network", "none", "--user", f"{SANDBOX_UID}:{SANDBOX_GID}",
                    "--log-driver", "none", image_name(), "/bin/sh", "-c", _TOOL_PROBE]
        else:
            argv = [exe, "exec", "--containall", "--cleanenv", sif_path(), "/bin/sh", "-c", _TOOL_PROBE]
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"tool probe failed: {e}"
        if r.returncode != 0:
            return False, f"tool probe failed: {r.stderr.strip()[-300:]}"
        tools, dirs = {}, set()
        for line in r.stdout.splitlines():
            f = line.split()
            if len(f) >= 4 and f[0] == "T":
                tools[f[1]] = (f[2], f[3])
            elif len(f) == 2 and f[0] == "D":
                dirs.add(f[1])
        tools["_dirs"] = dirs
        ContainerBackend._engines_cache[self._key("tools")] = tools
        return True, ""

    def _tool_lookup(self, tool: str):
        found = self._image_tools()
        for n in TOOLS[tool].names:
            hit = found.get(os.path.basename(n))
            if hit:
                path, real = hit
                # a script (mcs) or a JS file (tsc) is run by its real path; binaries likewise
                return Resolved(real if tool in ("tsc", "rustc", "java", "javac", "g++") else path)
        return f"'{TOOLS[tool].names[0]}' not in the image {image_name()}"

    def _tool_isdir(self, path: str) -> bool:
        return path in self._image_tools().get("_dirs", set())

    def oom_detail(self, step: dict) -> str:
        eng = (self._found_engine or (self._forced,))[0]
        if eng in ("docker", "podman"):
            return f"the container's memory limit ({eng}'s cgroup: the sandbox as a whole, engine_memory_mb)"
        return super().oom_detail(step)

    # ---- command lines ----
    @staticmethod
    def engine_memory_mb(limits: Limits) -> int:
        """docker/podman: the memory of a whole container, in the engine's cgroup (compile steps included: the
        per-step `mem_mb` bounds each process's address space only); apptainer stays in the worker's cgroup."""
        return max(COMPILE_MEM_MB, 2 * int(limits.mem_mb)) + 256

    def container_argv(self, limits: Limits, name: str, cmd: list[str]) -> list[str]:
        eng, exe = self._found_engine or (self._forced or "docker", self._forced or "docker")
        tmpfs = max(64, 4 * int(limits.fsize_mb)) * 1024 * 1024
        if eng in ("docker", "podman"):
            mem = self.engine_memory_mb(limits)
            fsz = max(int(limits.fsize_mb), 64) * 1024 * 1024
            # podman: its read-only root otherwise gets writable /run and /var/tmp (not wiped between
            # snippets), and a tmpfs starts as a copy of the image's directory (notmpcopyup: empty)
            own = ["--read-only-tmpfs=false"] if eng == "podman" else []
            copy = ",notmpcopyup" if eng == "podman" else ""
            return [exe, "run", "--rm", "-i", "--name", name, "--network", "none",
                    "--user", f"{SANDBOX_UID}:{SANDBOX_GID}", "--cap-drop", "ALL",
                    "--security-opt", "no-new-privileges", "--read-only", *own, "--ipc", "private",
                    "--tmpfs", f"/tmp:rw,exec,nosuid,nodev,size={tmpfs},mode=1777{copy}",
                    "--tmpfs", f"/sys:ro,nosuid,nodev,noexec,size=4k{copy}",  # the host's sysfs: hidden
                    "--shm-size", str(tmpfs),
                    "--pids-limit", str(int(limits.nproc) + 16),
                    "--memory", f"{mem}m", "--memory-swap", f"{mem}m",
                    "--ulimit", "core=0", "--ulimit", f"fsize={fsz}",
                    "--env", "LANG=C.UTF-8", "--env", "PATH=/usr/bin:/bin", "--env", f"HOME={SANDBOX_DIR}",
                    "--workdir", "/tmp", "--log-driver", "none", "--pull", "never",
                    image_name()] + cmd
        drop = []
        if os.geteuid() == 0:
            setpriv = self._image_tools().get("setpriv", ("/usr/bin/setpriv",))[0]
            drop = [setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
                    "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"]
        return [exe, "exec", "--containall", "--cleanenv", "--net", "--network", "none", "--no-privs", "--uts",
                "--env", "LANG=C.UTF-8", "--env", f"HOME={SANDBOX_DIR}", "--pwd", "/tmp",
                sif_path()] + drop + cmd

    def _server_spec(self, limits, langs=None):
        from privcode.sandbox.forkserver import ServerSpec, server_command
        eng, exe = self._found_engine or (self._forced or "docker", self._forced or "docker")
        cfg = {"workdir": SANDBOX_DIR, "wipe": ["/tmp", "/dev/shm"], "own_ipc": True}
        if eng in ("docker", "podman"):  # the engine's memory cgroup, seen from inside (v1, v2): its OOM kills
            cfg["oom_counters"] = ["/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"]
        name = f"privcode-sbx-{uuid.uuid4().hex[:16]}"
        argv = self.container_argv(limits, name, server_command(self.server_python(), cfg))
        # docker's rm -f kills at once; podman's stops first (SIGTERM, which the server as PID 1 ignores, then
        # 10 s) unless told -t 0
        kill = [exe, "rm", "-f", *(["-t", "0"] if eng == "podman" else []), name] if eng in ("docker", "podman") \
            else None
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "XDG_RUNTIME_DIR",
                                                            "CONTAINER_HOST", "APPTAINER_CACHEDIR")}
        # docker/podman: the engine's own cgroup (--memory, --pids-limit), whose OOM kills the host reads too
        # (docker mounts the container's cgroups under its /sys, which the --tmpfs /sys hides); apptainer: ours
        locate = (lambda: engine_oom_file(exe, name, env)) if kill is not None else None
        return ServerSpec(argv, env, "/", cfg, kill_argv=kill, cgroup=kill is None, engine_oom=locate)

    def describe(self) -> dict:
        eng = self._found_engine
        return {**super().describe(), "engine": eng[0] if eng else None, "image": image_name()}
