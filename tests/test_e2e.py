"""The whole DAG on a tiny config, then what a parameter change re-runs (snakemake -n reasons)."""
import csv
import json
import math
import shutil

import pytest
import yaml

from conftest import REPO
from privcode.dp import ledger
from test_workflow import jobs, snakemake

SNAKEFILE = str(REPO / "workflow" / "Snakefile")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cfg = work / "tiny.yaml"
    shutil.copy(REPO / "tests" / "configs" / "tiny.yaml", cfg)
    snakemake("-s", SNAKEFILE, "--directory", str(work), "--cores", "2", "--configfile", str(cfg), cwd=work)
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
    artifacts = ["models/smol/base", "models/tiny/base", "data/private", "data/public",
                 "dp/smol/privsa/eps8/adapter", "dp/smol/privsa/eps8/model", "dp/tiny/dpsgd/eps8/model",
                 "dp/tiny/jft/eps8/model", "data/private_canary", "data/private_masked",
                 "synth/smol/privsa/eps8/roundtrip-tau0.1",
                 "synth/smol/privsa/eps8/generated", "synth/smol/privsa/eps8/exec", "synth/smol/privsa/eps8/roundtrip",
                 "ft/tiny/NonDPFT/inf/model", "ft/tiny/PrivCode/eps8/model"]
    artifacts += [f"eval/tiny/{m}/{t}/humaneval" for m, t in
                  [("PreCode", "base"), ("NonDPFT", "inf"), ("DPFT", "eps8"), ("PrivCode", "eps8")]]
    for a in artifacts:
        assert (work / "results" / a / "privacy.json").exists(), a
    assert not list((work / "results").rglob("*.tmp")) and not list((work / "results").rglob(".*.progress.jsonl"))
    assert (work / "results/synth/smol/privsa/eps8/exec/kept.jsonl").stat().st_size > 0
    assert (work / "results/synth/smol/privsa/eps8/roundtrip/scores.jsonl").exists()
    assert (work / "results/eval/tiny/PrivCode/eps8/humaneval/evaluator").exists()
    # PrivSA ran for the junior only, and found syntax tokens to regularize
    stats = json.loads((work / "results/dp/smol/privsa/eps8/adapter/train_stats.json").read_text())
    assert stats["privsa_syntax_tokens"] > 0 and stats["config"]["privsa_lambda_max"] > 0
    assert ledger.read(work / "results/dp/tiny/dpsgd/eps8/adapter")["releases"][0]["privsa"] is False


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
    assert j["exec_filter"] == j["roundtrip_filter"] == j["rethreshold"] == 1
    assert j["finetune"] == j["merge_ft"] == 2 and j["evaluate"] == 2
    assert not {"dp_finetune", "generate", "merge_dp", "prepare_data", "build_model"} & set(j)
    assert "Params have changed since last execution" in out


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
