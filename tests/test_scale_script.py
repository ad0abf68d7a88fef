"""scripts/scale_gpus.sh — the one command a 4-GPU device call runs for issue #7 — end to end on
CPU: a tiny random model, torchrun with 1 and 2 processes (gloo), the same privcode commands as
the Snakemake GPU rules. A broken script would cost device time; this catches it here."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it


def _run(mode, tmp_path, **env):
    out = tmp_path / mode
    e = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OUT=str(out), NG="2",
             SHAPE="tiny", RECORDS="600", WORK=str(tmp_path / "work"), STEPS="2", OMP_NUM_THREADS="1", WHEELS="")
    e.update(env)
    p = subprocess.run(["bash", "scripts/scale_gpus.sh", mode], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return (out / "scaling.txt").read_text()


def test_scale_script_dp_runs_one_and_two_processes_with_the_same_epsilon(tmp_path):
    text = _run("dp", tmp_path, MB="16", MBT="2048")
    rows = re.findall(r"DP tiny x(\d) GPU \(fast path\): tokens/s (\d+)  peak GiB/rank \S+  eps (\S+)", text)
    assert [r[0] for r in rows] == ["1", "2"], text
    assert rows[0][2] == rows[1][2] and 0 < float(rows[0][2]) < 50  # ε from the accountant, same for 1 and 2
    assert all(int(r[1]) > 0 for r in rows)
    assert re.search(r"DP tiny speed-up vs 1 GPU: \{1: 1\.0, 2: [\d.]+\}", text), text


def test_scale_script_dpft_mode_runs_dp_sgd_with_its_own_micro_batches(tmp_path):
    text = _run("dpft", tmp_path, NG="1")
    assert re.search(r"DPFT tiny x1 GPU \(fast path\): tokens/s \d+ .* eps 3\.9", text), text
    stats = (tmp_path / "work" / "private" / "dpft1" / "train_stats.json").read_text()  # the private zone
    assert '"micro_batch_size": 64' in stats and '"micro_batch_tokens": 8192' in stats


def test_scale_script_rejects_an_unknown_mode(tmp_path):
    p = subprocess.run(["bash", "scripts/scale_gpus.sh", "nope"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, OUT=str(tmp_path)))
    assert p.returncode == 2 and "unknown mode" in p.stderr


def test_privsa_kl_floor_script_finds_zero_kl_before_the_first_update_on_cpu(tmp_path):
    """scripts/privsa_kl_floor.py (the docs/scaling.md check of the compiled teacher) on CPU, eager."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "scripts/privsa_kl_floor.py", "--shape", "tiny", "--work", str(tmp_path / "w"),
                        "--device", "cpu", "--modes", "eager", "--rows", "8", "--batches", "2"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = re.findall(r"eager mb(\d): CE mean ([\d.]+)  KL per syntax token mean (\S+) max (\S+)", p.stdout)
    assert [x[0] for x in lines] == ["0", "1"], p.stdout
    assert all(float(ce) > 1 and float(mx) <= 1e-6 for _, ce, _, mx in lines), p.stdout
