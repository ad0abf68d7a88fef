"""GPU assignment for concurrent jobs: each GPU job runs on devices no other running job holds.

    privcode gpu-run --gpus 2 -- torchrun --standalone --nproc_per_node 2 -m privcode.cli dp-finetune ...
    PRIVCODE_GPUS=0,1,2,3 privcode gpu-run --gpus 1 -- python -c 'import os; print(os.environ["CUDA_VISIBLE_DEVICES"])'

Snakemake's `--resources gpu=N` only counts GPUs; it does not say which. `gpu-run` picks them:
- the pool is $PRIVCODE_GPUS (a comma-separated list, e.g. fake ids in tests), else the job's
  $CUDA_VISIBLE_DEVICES (SLURM sets it to the job's allocation), else every GPU nvidia-smi lists;
- a device is held through an exclusive `flock` on its lock file in $PRIVCODE_GPU_LOCKS (default
  /tmp/privcode-gpu-locks-<uid>); `gpu-run` then *becomes* the command (exec), which keeps the
  locks; the kernel drops them when it dies, so a killed job leaks no reservation;
- the child (and everything it starts: torchrun ranks, DeepSpeed, vLLM) sees only its devices via
  CUDA_VISIBLE_DEVICES; the chosen devices are printed to stderr (the job's log).
A job waits while fewer than N devices of the pool are free (Snakemake's resource count makes
that short); a request larger than the pool is an error.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from privcode.errors import PrivcodeError

POLL_S = 0.2


def pool() -> list[str]:
    for var in ("PRIVCODE_GPUS", "CUDA_VISIBLE_DEVICES"):
        v = os.environ.get(var)
        if v is not None and v.strip() not in ("", "-1"):
            return [d.strip() for d in v.split(",") if d.strip()]
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
        if out.returncode == 0:
            return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return []


def lock_dir() -> Path:
    d = Path(os.environ.get("PRIVCODE_GPU_LOCKS") or f"/tmp/privcode-gpu-locks-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def acquire(n: int, timeout_s: float | None = None) -> tuple[list[str], list]:
    """(devices, open lock files) for `n` free devices of the pool; keep the files open to hold them."""
    devices = pool()
    if n > len(devices):
        raise PrivcodeError(f"this job needs {n} GPU(s) but the pool has {len(devices)} ({','.join(devices) or 'none'}; "
                            "set CUDA_VISIBLE_DEVICES or PRIVCODE_GPUS)")
    d = lock_dir()
    t0 = time.monotonic()
    while True:
        held, fhs = [], []
        for dev in devices:
            fh = open(d / f"gpu-{dev.replace('/', '_')}.lock", "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            held.append(dev)
            fhs.append(fh)
            if len(held) == n:
                return held, fhs
        for fh in fhs:  # not enough free: let go of the partial set (no hold-and-wait deadlock)
            fh.close()
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise PrivcodeError(f"no {n} free GPU(s) of {','.join(devices)} within {timeout_s:g} s")
        time.sleep(POLL_S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="privcode gpu-run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, required=True, help="devices this job needs")
    ap.add_argument("--timeout", type=float, default=None, help="give up after this many seconds of waiting")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command to run on them")
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        raise PrivcodeError("gpu-run needs a command after --")
    if a.gpus < 1:
        return subprocess.call(cmd)
    devices, fhs = acquire(a.gpus, a.timeout)
    print(f"privcode gpu-run: CUDA_VISIBLE_DEVICES={','.join(devices)}", file=sys.stderr, flush=True)
    for fh in fhs:  # the command inherits the locks: they go when it (and what kept them) ends
        os.set_inheritable(fh.fileno(), True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(devices)}
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    if exe is None:
        raise PrivcodeError(f"command not found: {cmd[0]}")
    os.execve(exe, cmd, env)
