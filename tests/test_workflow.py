"""The Snakemake workflow: configs validate, both configs and the slurm profile dry-run, lint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CONFIGS = sorted((REPO / "config").glob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))


def snakemake(*args, cwd=REPO, check=True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p.stdout + p.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    from snakemake.utils import validate

    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    for role in [cfg["junior"], cfg["roundtrip"]["model"], *cfg["premium"]]:
        assert role in cfg["models"], f"{path.name}: '{role}' is not a key of models"


def test_schema_rejects_bad_config():
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["privacy"]["delta"] = 2
    with pytest.raises(Exception, match="delta|maximum"):
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def jobs(out: str) -> dict:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = out.split("Job stats:")[1].splitlines()[3:]
    res = {}
    for ln in lines:
        parts = ln.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        res[parts[0]] = int(parts[1])
    return res


def test_dry_run_demo_config():
    out = snakemake("-n", "--forceall")
    j = jobs(out)
    # DP runs: junior with PrivSA (PrivCode), premium with plain DP-SGD (DPFT), JFT's DP stage
    assert j["dp_finetune"] == 3 and j["finetune"] == 4  # NonDPFT, JFTmask, PrivCode, PrivCode at τ'
    assert j["evaluate"] == 6 and j["leakage"] == 5 and j["vuln"] == 5 and j["rethreshold"] == 1
    for rule in ("table3", "table4", "table5", "vulntable", "figures", "inject_canaries", "mask_pii"):
        assert j[rule] == 1, rule


def test_dry_run_paper_config_plans_full_grid():
    out = snakemake("-n", "results/table3.csv", "--configfile", "config/paper.yaml")
    j = jobs(out)
    # 4 premium models x 5 methods x 6 benchmarks; DP runs: junior + 4 DPFT + 4 JFT
    assert j["evaluate"] == 4 * 5 * 6 and j["dp_finetune"] == 9 and j["finetune"] == 12
    assert "build_model" not in j and "make_data" not in j  # hub names: nothing to build, no network
    assert "torchrun --standalone --nproc_per_node 4" in out


def test_slurm_profile_dry_run_requests_gpus():
    out = snakemake("-n", "results/table3.csv", "--configfile", "config/paper.yaml",
                    "--profile", "workflow/profiles/slurm")
    assert "gpu=1" in out and "gpu=4" in out


def test_lint_clean():
    out = snakemake("--lint")
    assert "Congratulations, your workflow is in a good condition!" in out


def test_dry_run_paper_sweeps_and_tables():
    out = snakemake("-n", "--configfile", "config/paper.yaml")
    j = jobs(out)
    # τ sweep re-uses the round-trip scores (3 rethresholds, no new generation per τ);
    # ε sweep: 3 more junior DP runs + synthesis; λmax sweep: 3 more junior DP runs + synthesis
    assert j["rethreshold"] == 3 and j["generate"] == 1 + 3 + 3
    assert j["table4"] == j["table5"] == j["vulntable"] == j["figures"] == 1
