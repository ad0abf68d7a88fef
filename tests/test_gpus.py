"""#16 item 1: concurrent GPU jobs get disjoint devices (fake device ids), also after a job is killed."""
import os
import signal
import subprocess
import sys
import time

import pytest

from privcode.errors import PrivcodeError
from privcode.gpus import acquire


def _job(tmp_path, env, n, name, sleep=30):
    code = (f"import os, time; open({str(tmp_path / name)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES']); "
            f"time.sleep({sleep})")
    return subprocess.Popen([sys.executable, "-m", "privcode.cli", "gpu-run", "--gpus", str(n), "--",
                             sys.executable, "-c", code], env=env)


def _wait_for(path, timeout=60):
    t0 = time.time()
    while not (path.exists() and path.read_text()):
        assert time.time() - t0 < timeout, f"{path.name} never started"
        time.sleep(0.05)
    return path.read_text().split(",")


def test_concurrent_jobs_hold_disjoint_devices_and_a_killed_job_frees_its_own(tmp_path):
    env = dict(os.environ, PRIVCODE_GPUS="0,1,2,3", PRIVCODE_GPU_LOCKS=str(tmp_path / "locks"))
    jobs = {"a": _job(tmp_path, env, 1, "a"), "b": _job(tmp_path, env, 1, "b"), "c": _job(tmp_path, env, 2, "c")}
    try:
        got = {k: _wait_for(tmp_path / k) for k in jobs}
        assert sorted(d for v in got.values() for d in v) == ["0", "1", "2", "3"]  # disjoint, pool used up
        jobs["d"] = _job(tmp_path, env, 1, "d")
        time.sleep(1.0)
        assert not (tmp_path / "d").exists()  # every device is held: it waits
        jobs["a"].send_signal(signal.SIGKILL)  # a killed job leaks no reservation
        jobs["a"].wait()
        assert _wait_for(tmp_path / "d") == got["a"]
    finally:
        for p in jobs.values():
            p.kill()
            p.wait()


def test_a_request_larger_than_the_pool_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVCODE_GPUS", "0,1")
    monkeypatch.setenv("PRIVCODE_GPU_LOCKS", str(tmp_path))
    with pytest.raises(PrivcodeError, match="needs 4 GPU"):
        acquire(4)
    devs, fhs = acquire(2)
    assert devs == ["0", "1"]
    with pytest.raises(PrivcodeError, match="no 1 free GPU"):
        acquire(1, timeout_s=0.3)
    for fh in fhs:
        fh.close()
    monkeypatch.delenv("PRIVCODE_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # SLURM's allocation is the pool
    assert acquire(1)[0] == ["5"]
