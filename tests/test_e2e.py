"""The whole DAG on a tiny config, then what a parameter change re-runs (snakemake -n reasons)."""
import csv
import json
import math
import re
import shutil

import pytest
import yaml

from conftest import REPO
from privcode import ledger
from privcode.train import RELEASE_FILES
from test_workflow import jobs, snakemake

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it

SNAKEFILE = str(REPO / "workflow" / "Snakefile")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cfg = work / "tiny.yaml"
    shutil.copy(REPO / "tests" / "configs" / "tiny.yaml", cfg)
    with pytest.MonkeyPatch.context() as mp:  # this run's budget registry (not ~/.privcode)
        mp.setenv("PRIVCODE_BUDGET_DIR", str(work / "budget"))
        out = snakemake("-s", SNAKEFILE, "--directory", str(work), "--cores", "2", "--configfile", str(cfg), cwd=work)
    (work / "snakemake.out").write_text(out)
    return work, cfg


def test_table3_from_the_whole_dag(tiny_run):
    work, _ = tiny_run
    rows = {r["method"]: r for r in csv.DictReader(open(work / "results" / "table3.csv"))}
    assert set(rows) == {"PreCode", "NonDPFT", "DPFT", "JFT", "PrivCode"}
    assert math.isinf(float(rows["JFT"]["epsilon"])) and rows["JFT"]["note"].startswith("selective DP")
    assert float(rows["PreCode"]["epsilon"]) == 0.0
    assert math.isinf(float(rows["NonDPFT"]["epsilon"]))
    for m in ("DPFT", "PrivCode"):
        assert 0 < float(rows[m]["epsilon"]) <= 8.0
    for r in rows.values():
        assert 0.0 <= float(r["HumanEval"]) <= 100.0 and 0.0 <= float(r["HumanEval+"]) <= 100.0
    # every artifact carries a ledger, and every filter kept something
    artifacts = ["models/smol/base", "models/tiny/base", "data/public",
                 "dp/smol/privsa/eps8/adapter", "dp/smol/privsa/eps8/model", "dp/tiny/dpsgd/eps8/model",
                 "dp/tiny/jft/eps8/model", "synth/smol/privsa/eps8/roundtrip-tau0.1",
                 "synth/smol/privsa/eps8/generated", "synth/smol/privsa/eps8/exec", "synth/smol/privsa/eps8/roundtrip",
                 "ft/tiny/NonDPFT/inf/model", "ft/tiny/PrivCode/eps8/model"]
    artifacts += [f"eval/tiny/{m}/{t}/humaneval" for m, t in
                  [("PreCode", "base"), ("NonDPFT", "inf"), ("DPFT", "eps8"), ("PrivCode", "eps8")]]
    for a in artifacts:
        assert (work / "results" / a / "privacy.json").exists(), a
    assert not list((work / "results").rglob("*.tmp")) and not list((work / "results").rglob(".*.progress.jsonl"))
    assert (work / "results/synth/smol/privsa/eps8/exec/kept.jsonl").stat().st_size > 0
    assert (work / "results/synth/smol/privsa/eps8/roundtrip/scores.jsonl").exists()
    assert (work / "results/synth/smol/privsa/eps8/roundtrip-scores/scores.jsonl").exists()
    assert (work / "results/eval/tiny/PrivCode/eps8/humaneval/evaluator").exists()
    # PrivSA ran for the junior only, and found syntax tokens to regularize
    stats = json.loads((work / "private/dp/smol/privsa/eps8/train_stats.json").read_text())
    assert stats["privsa_syntax_tokens"] > 0 and stats["config"]["privsa_lambda_max"] > 0
    assert ledger.read(work / "results/dp/tiny/dpsgd/eps8/adapter")["releases"][0]["privsa"] is False


def test_the_private_zone_holds_what_is_not_released(tiny_run):
    """Private records, training statistics and the logs of private rules are in private/ (dirs 0700,
    files 0600, checkpoints gone); the DP adapter that crosses holds weights, config, tokenizer and
    privacy.json only; no release-side file holds a record count, a loss or the data's identity."""
    work, _ = tiny_run
    zone = work / "private"
    for d in ("data/private", "data/private_canary", "data/private_masked"):
        assert (zone / d / "records.jsonl").exists() and (zone / d / "privacy.json").exists(), d
    assert (zone / "logs/dp_finetune").is_dir() and (zone / "benchmarks/dp_finetune").is_dir()
    modes = {p: p.stat().st_mode & 0o777 for p in [zone, *zone.rglob("*")]}
    assert all(m == (0o700 if p.is_dir() else 0o600) for p, m in modes.items()), \
        {str(p): oct(m) for p, m in modes.items() if m not in (0o700, 0o600)}
    assert not list(zone.rglob("ckpt")) and not (work / "results" / "data" / "private").exists()
    names = {f.name for f in (work / "results/dp/smol/privsa/eps8/adapter").iterdir()} - {".snakemake_timestamp"}
    assert {"adapter_model.safetensors", "adapter_config.json", "privacy.json"} <= names <= RELEASE_FILES
    assert not list((work / "results").rglob("train_stats.json")) and not (work / "logs" / "dp_finetune").exists()
    data_id = ledger.read(zone / "data/private")["data_id"]
    for p in (work / "results").rglob("privacy.json"):
        text = p.read_text()
        assert data_id not in text and '"n_records"' not in text and "sha256" not in text, p


def test_release_refuses_non_private_and_certifies_the_total(tiny_run, monkeypatch, tmp_path):
    """`privcode release` in the run's directory: NonDPFT (ε = inf) is refused; PrivCode's model goes
    out with a certificate whose total is the accountant's composition of its one DP release."""
    import subprocess
    import sys

    from privcode.dp import accountant

    work, _ = tiny_run
    env = dict(__import__("os").environ, PRIVCODE_BUDGET_DIR=str(work / "budget"))
    env.pop("PRIVCODE_ZONE")

    def release(out, *arts):
        return subprocess.run([sys.executable, "-m", "privcode.cli", "release", "--out", str(out), *arts],
                              cwd=work, env=env, capture_output=True, text=True)

    p = release(tmp_path / "r0", "results/ft/tiny/NonDPFT/inf/model")
    assert p.returncode == 2 and "ε = inf" in p.stderr and not (tmp_path / "r0").exists()
    p = release(tmp_path / "r1", "results/ft/tiny/PrivCode/eps8/model")
    assert p.returncode == 0, p.stderr[-2000:]
    cert = json.loads((tmp_path / "r1" / "CERTIFICATE.json").read_text())
    rel = ledger.read(work / "results/dp/smol/privsa/eps8/adapter")["releases"][0]
    total = cert["data_sets"][0]["released_total"]
    assert total["epsilon"] == pytest.approx(accountant.epsilon_from_history(rel["history"], rel["delta"]))
    assert (tmp_path / "r1" / "model" / "privacy.json").exists() or list((tmp_path / "r1").glob("*/privacy.json"))


def test_tables_4_5_vuln_and_figures(tiny_run):
    work, _ = tiny_run
    t4 = {r["method"]: r for r in csv.DictReader(open(work / "results" / "table4.csv"))}
    assert set(t4) == {"PreCode", "NonDPFT", "DPFT", "JFT", "PrivCode"} and "leak@k1" in t4["PreCode"]
    t5 = list(csv.DictReader(open(work / "results" / "table5.csv")))
    assert sorted(float(r["value"]) for r in t5) == [0.0, 0.1] and {r["sweep"] for r in t5} == {"tau"}
    assert len(list(csv.DictReader(open(work / "results" / "vuln.csv")))) == 5
    for png in ("privacy_utility.png", "funnel.png"):
        assert (work / "results" / "figures" / png).stat().st_size > 10_000


def test_changing_one_stage_reruns_only_it_and_what_follows(tiny_run):
    work, cfg = tiny_run
    assert "Nothing to be done" in snakemake("-n", "-s", SNAKEFILE, "--directory", str(work), "--configfile",
                                             str(cfg), cwd=work)
    c = yaml.safe_load(cfg.read_text())
    c["exec_filter"]["wall_s"] = 7
    changed = work / "changed.yaml"
    changed.write_text(yaml.safe_dump(c, sort_keys=True))  # key order must not matter
    out = snakemake("-n", "-s", SNAKEFILE, "--directory", str(work), "--configfile", str(changed), cwd=work)
    j = jobs(out)
    # PrivCode at the main τ and at the swept τ, with their leakage/vuln rows and the tables
    assert j["exec_filter"] == j["roundtrip_filter"] == j["roundtrip_threshold"] == j["rethreshold"] == 1
    assert j["finetune"] == j["merge_ft"] == 2 and j["evaluate"] == 2
    assert not {"dp_finetune", "generate", "merge_dp", "prepare_data", "build_model"} & set(j)
    assert "Params have changed since last execution" in out


def test_a_new_threshold_reapplies_the_stored_scores_only(tiny_run):
    """#16 item 7: τ is applied to the stored round-trip scores; the describer does not run again."""
    work, cfg = tiny_run
    c = yaml.safe_load(cfg.read_text())
    c["roundtrip"]["threshold"] = 0.05
    changed = work / "tau.yaml"
    changed.write_text(yaml.safe_dump(c, sort_keys=True))
    out = snakemake("-n", "-s", SNAKEFILE, "--directory", str(work), "--configfile", str(changed), cwd=work)
    j = jobs(out)
    assert j["roundtrip_threshold"] == 1 and "roundtrip_filter" not in j and "generate" not in j
    assert not {"dp_finetune", "exec_filter", "rethreshold"} & set(j)


def test_dp_outputs_are_protected_against_reruns(tiny_run):  # last: it may remove the old adapter
    work, cfg = tiny_run
    adapter = work / "results/dp/tiny/dpsgd/eps8/adapter"
    assert not any(p.stat().st_mode & 0o222 for p in [adapter, *adapter.iterdir()])
    c = yaml.safe_load(cfg.read_text())
    c["dp_finetune"]["lr"] = 2.0e-3
    changed = work / "dp_changed.yaml"
    changed.write_text(yaml.safe_dump(c, sort_keys=False))
    out = snakemake(str(adapter.relative_to(work)), "-s", SNAKEFILE, "--directory", str(work), "--cores", "1",
                    "--configfile", str(changed), cwd=work, check=False)
    # Snakemake's own protection (read-only outputs) stops non-root users; as root, Snakemake removes
    # the old output anyway, and privcode's spent-budget record refuses to train again
    assert "protected" in out.lower() or "already trained here" in out
    assert "Finished job" not in out.split("dp_finetune")[-1] or "already trained here" in out


def test_status_summarizes_the_results_tree_without_the_private_zone(tiny_run):
    import subprocess
    import sys

    work, _ = tiny_run
    shutil.copytree(work / "results", work.parent / "status-only" / "results", dirs_exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "privcode.cli", "status"], cwd=work.parent / "status-only",
                       capture_output=True, text=True)  # no private/ beside it: it is never read
    assert p.returncode == 0, p.stderr
    assert "dp/smol/privsa/eps8/adapter: ε=" in p.stdout and "synth/smol/privsa/eps8/exec: ε=" in p.stdout
    assert "kept " in p.stdout and "tables: table3.csv" in p.stdout and "missing" not in p.stdout
    # every finished job of the main stages printed its one line on the terminal (#16 item 8)
    run = (work / "snakemake.out").read_text()
    assert re.search(r"results/dp/smol/privsa/eps8/adapter: ε=[\d.]+ δ=1e-05\s+— DP-SGD, 2 steps", run), run[-3000:]
    assert re.search(r"results/synth/smol/privsa/eps8/exec: ε=\S+ .*— kept \d+/\d+", run)
    assert re.search(r"results/eval/tiny/PrivCode/eps8/humaneval: .*base_pass@1", run)
