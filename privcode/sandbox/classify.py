"""A step's outcome, in words: the status of a RunResult (and so the exec filter's drop reason).

STATUSES, each checked in this order (the first that applies wins):
  timeout             the wall-clock limit
  output_limit        stdout or stderr passed `output_bytes` (the program was killed)
  oom                 the worker's cgroup OOM-killed a process of the snippet
  timeout             killed at the CPU limit
  oom                 the program died with a memory error (RLIMIT_AS: MemoryError, bad_alloc, ...)
  disk_limit          the sandbox's /tmp or /dev/shm is full, SIGXFSZ (RLIMIT_FSIZE), or the
                      program failed with ENOSPC / EFBIG / EDQUOT
  background_process  processes of the snippet were still running when its program ended
  killed              died of a signal (or its sandbox worker died)
  error               any other non-zero exit status
  ok                  exit status 0, nothing of the above
and, without running anything: no_code (nothing to run), toolchain_missing (not here).
"""
from __future__ import annotations

import signal

STATUSES = ("ok", "error", "timeout", "output_limit", "oom", "disk_limit", "background_process", "killed",
            "toolchain_missing", "no_code")

MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory",
                  "OutOfMemoryError", "memory allocation of", "Allowed memory size",
                  "Fatal process out of memory", "OutOfMemoryException")
DISK_MARKERS = ("No space left on device", "File too large", "File size limit exceeded", "Disk quota exceeded",
                "ENOSPC", "EFBIG")


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def classify(st: dict, step: dict, stderr: str, oom_killed: bool, oom_detail: str | None = None) -> tuple[str, str]:
    """(status, detail) of one step: `st` is the server's result, `step` what was asked; `oom_detail`: what
    bounded the sandbox's memory as a whole when a cgroup OOM-killed (default: the step's mem_mb)."""
    sig, rc = st.get("sig"), st.get("rc")
    failed = sig is not None or rc != 0
    tail = stderr[-2000:]
    if st.get("timed_out"):
        return "timeout", f"wall-clock limit {step['wall_s']}s"
    if st.get("exceeded"):
        return "output_limit", f"output over {step['output_bytes']} bytes"
    if oom_killed:
        return "oom", oom_detail or f"memory limit {step['mem_mb']} MiB (cgroup: the sandbox as a whole)"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and st.get("cpu_s", 0) >= step["cpu_s"] - 0.25):
        return "timeout", f"cpu limit {step['cpu_s']}s"
    if failed and any(m in tail for m in MEMORY_MARKERS):
        return "oom", f"memory limit {step['mem_mb']} MiB"
    if st.get("disk_full"):
        return "disk_limit", f"the sandbox's tmpfs is full ({step['fsize_mb']} MiB per file, 4x that in all)"
    if sig == signal.SIGXFSZ or (failed and any(m in tail for m in DISK_MARKERS)):
        return "disk_limit", f"file size limit {step['fsize_mb']} MiB"
    if st.get("leftovers"):
        return "background_process", f"{st['leftovers']} process(es) still running when the program ended (killed)"
    if sig is not None:
        return "killed", f"killed by signal {_signame(sig)}"
    if rc != 0:
        return "error", f"exit status {rc}"
    return "ok", ""
