"""The fork server: runs INSIDE a sandbox under its system python, one long-lived process per worker.

    from privcode.sandbox.server import PROGRAM
    argv = [python, "-I", "-B", "-c", PROGRAM, json.dumps(cfg)]   # privcode.sandbox.forkserver

Its parts (common, seccomp, template, cleanup, main) are standalone: standard library only, Python
>= 3.7, and each other by relative import. The host sends their text as one program (PROGRAM: a
few lines that make each part a module of a package of its own, then call main.main()), so
nothing of the project has to be visible in the sandbox; the host imports the same files for
what it shares with them (common: the frame format, tree removal). This file is the host's only.

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
  server -> host  {"ready": true, "pid", "pid1", "python", "seccomp", "oom_counter" (it reads one of cfg
                   "oom_counters")}  once, at start
  host -> server  {"files": {name: text} (first step of a snippet), "env": {..}, "steps": [step],
                   "keep": bool}; step = {"name", "argv": [..] | "python": "<file>", "wall_s",
                   "cpu_s", "mem_mb", "fsize_mb", "nproc", "output_bytes", "env"}
  server -> host  {"steps": [{"name", "rc", "sig", "stdout", "stderr" (base64), "wall_s", "cpu_s",
                   "timed_out", "exceeded", "leftovers", "disk_full", "error"}], "tainted": "..",
                   "oom": bool (only with cfg "oom_counters": whether the container's own memory cgroup,
                   read from inside, OOM-killed during the request)}
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
from pathlib import Path

PARTS = ("common", "seccomp", "template", "cleanup", "main")  # each after the parts it imports
PACKAGE = "privcode_sandbox_server"  # the parts' package inside the sandbox

_LOADER = """import sys, types
package = types.ModuleType(%r)
package.__path__ = []
sys.modules[package.__name__] = package
for name, source in %r:
    module = types.ModuleType(package.__name__ + "." + name)
    module.__package__ = package.__name__
    sys.modules[module.__name__] = module
    setattr(package, name, module)
    exec(compile(source, "privcode/sandbox/server/" + name + ".py", "exec"), module.__dict__)
sys.modules[package.__name__ + ".main"].main()
"""


def program() -> str:
    """The text `python -c` runs in the sandbox: every part, loaded as a module, then main()."""
    here = Path(__file__).parent
    return _LOADER % (PACKAGE, [(p, (here / f"{p}.py").read_text(encoding="utf-8")) for p in PARTS])


PROGRAM = program()
