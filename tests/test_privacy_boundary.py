"""#13: the printed ε is true for everything released — secret randomness, no private metadata on
the release side, the private zone, releases with a composed total, users' own data."""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import mark_private, write_records
from privcode import budget, ledger, release
from privcode.dp import accountant, engine, noise
from privcode.errors import PrivcodeError
from privcode.train import RELEASE_FILES, TrainConfig, build_lora_model, train_dp

DP = dict(epsilon=6.0, delta=1e-3, steps=8, batch_size=5, max_length=48, lr=1e-2, prompt_format="qa",
          lora_targets=["q_proj", "v_proj"], dataset_size="public")


def _stats(priv):
    return json.loads((priv / "train_stats.json").read_text())


def _weights(d):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


# --- 1. secret randomness ---------------------------------------------------------------------

def test_two_runs_of_one_config_differ_and_no_seed_is_written(tiny_model, private_data, tmp_path, monkeypatch,
                                                              caplog):
    drawn = []
    real = noise.secret_seed
    monkeypatch.setattr(noise, "secret_seed", lambda: drawn.append(real()) or drawn[-1])
    caplog.set_level("DEBUG")
    for name in ("a", "b"):
        train_dp(str(tiny_model), str(private_data), tmp_path / name, TrainConfig(**DP),
                 private_dir=tmp_path / "private" / name)
    assert len(drawn) == 6 and len(set(drawn)) == 6  # noise, init, sampling: fresh for every run
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = _stats(tmp_path / "private" / "a"), _stats(tmp_path / "private" / "b")
    assert sa["batch_sizes"] != sb["batch_sizes"]  # 8 Poisson steps: equal by chance with p < 1e-5
    outside = [p for p in _files(tmp_path) if not p.is_relative_to(tmp_path / "private")]
    assert outside and all(ledger.read(tmp_path / n)["dp_release"] for n in "ab")
    for p in outside:
        blob = p.read_bytes()
        for s in drawn:
            assert str(s).encode() not in blob and s.to_bytes(8, "little") not in blob, p
    for s in drawn:
        assert str(s) not in caplog.text


def test_reproducible_seed_replays_and_is_never_a_dp_release(tiny_model, private_data, tmp_path):
    from privcode.report.table3 import build

    cfg = TrainConfig(**{**DP, "reproducible_seed": 123})
    for name in ("a", "b"):
        train_dp(str(tiny_model), str(private_data), tmp_path / name, cfg, private_dir=tmp_path / "private" / name)
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rec = ledger.read(tmp_path / "a")
    assert not rec["dp_release"] and rec["notes"] == [ledger.REPRODUCIBLE_NOTE]
    ev = tmp_path / "results" / "eval" / "m" / "PrivCode" / "eps6" / "humaneval"
    derived = ledger.derive(ev, stage="evaluate", parents=[tmp_path / "a"])
    assert not derived["dp_release"]
    (ev / "scores.json").write_text(json.dumps({"base_pass@1": 1.0, "plus_pass@1": 1.0}))
    assert build([str(ev)])["note"][0].startswith("not a DP release")
    with pytest.raises(PrivcodeError, match="not a DP release"):
        release.release([tmp_path / "a"], tmp_path / "rel")


def test_independent_noise_defeats_the_two_sigma_attack(tiny_model, tmp_path):
    """Two releases with different σ on the same data: with shared noise (what a public seed gave)
    their difference recovers the noise and so the noise-free sum; with fresh secret noise the noise
    recovered from two runs is uncorrelated with any other run's noise and is not either run's.
    Zero gradients and SGD with lr 1: each step's update is -noise / E[B] (tiny model)."""
    cfg = TrainConfig(lora_targets=["q_proj", "v_proj"], max_length=48, lora_r=16)
    C, B = 0.5, 5.0

    def noise_of(sigma, seed=None):
        torch.manual_seed(0)  # the same LoRA init: only the noise differs
        model = build_lora_model(str(tiny_model), cfg, "cpu")
        dp = engine.DPSGD(model, n_records=10, sample_rate=0.5, noise_multiplier=sigma, max_grad_norm=C,
                          expected_batch_size=B, lr=1.0, weight_decay=0.0, steps=1, device="cpu", seed=seed,
                          optimizer="sgd")
        before = torch.cat([p.detach().flatten().clone() for p in dp.params])
        dp.step([None], lambda m, b: None)
        u = torch.cat([p.detach().flatten() for p in dp.params]) - before
        return (-u * B / (sigma * C)).double()  # the standard-normal noise this run drew

    def corr(x, y):
        return float(torch.corrcoef(torch.stack([x, y]))[0, 1])

    def attack(z1, z2, s1, s2):  # the difference of the two releases over (σ1 − σ2): their shared noise
        return (s1 * z1 - s2 * z2) / (s1 - s2)

    s1, s2 = 1.0, 3.0
    z1, z2, z3 = noise_of(s1), noise_of(s2), noise_of(2.0)
    bound = 6 / math.sqrt(z1.numel())  # |corr| of independent vectors: > 6 sd with p < 1e-8
    assert z1.numel() > 3000 and abs(corr(z1, z2)) < bound
    w = attack(z1, z2, s1, s2)
    assert abs(corr(w, z3)) < bound and corr(w, z1) < 0.9 and corr(w, z2) < 0.99
    # control: the old behaviour (one public seed for every run) hands the attack the noise
    r1, r2, r3 = noise_of(s1, seed=0), noise_of(s2, seed=0), noise_of(2.0, seed=0)
    assert corr(attack(r1, r2, s1, s2), r3) > 0.999


# --- 3. neighbouring data sets write the same privacy.json ------------------------------------

def _strip(rec):
    rec = {k: v for k, v in rec.items() if k not in ("created", "_path")}
    rec["releases"] = [{k: v for k, v in r.items() if k != "id"} for r in rec["releases"]]
    return rec


def _pipeline(tiny_model, work, records, bench, dataset_size):
    """DP fine-tune -> merge -> generate -> evaluate in `work` (relative paths, as Snakemake runs)."""
    from privcode.evaluate.run import EvalConfig
    from privcode.evaluate.run import run as evaluate
    from privcode.io import write_jsonl
    from privcode.merge import merge
    from privcode.synth.generate import GenerateConfig
    from privcode.synth.generate import run as generate

    cwd = os.getcwd()
    work.mkdir()
    os.chdir(work)
    try:
        os.environ["PRIVCODE_ZONE"] = "private"
        data = write_records(work / "private" / "data" / "records.jsonl", 0)
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        mark_private(data.parent)
        train_dp(str(tiny_model), "private/data/records.jsonl", Path("results/dp/adapter"),
                 TrainConfig(**{**DP, "steps": 2, "dataset_size": dataset_size}))
        merge(str(tiny_model), "results/dp/adapter", "results/dp/model")
        write_jsonl("results/data/public/prompts.jsonl", [{"id": "p0", "problem": "Write f.", "lang": "python"}])
        ledger.derive("results/data/public", stage="prepare_data")
        generate("results/dp/model", "results/data/public/prompts.jsonl", Path("results/synth/generated"),
                 GenerateConfig(max_new_tokens=4, batch_size=1))
        evaluate("results/dp/model", "humaneval", Path("results/eval/humaneval"),
                 EvalConfig(override=str(bench), max_new_tokens=4, limit=2))
        return {a: _strip(ledger.read(a)) for a in ("results/dp/adapter", "results/synth/generated",
                                                    "results/eval/humaneval")}
    finally:
        os.chdir(cwd)


@pytest.fixture
def neighbours(tmp_path):
    from privcode.data.taskgen import generate_tasks, to_humaneval

    bench = tmp_path / "humaneval.jsonl"
    bench.write_text("".join(json.dumps(to_humaneval(t, i)) + "\n"
                             for i, t in enumerate(generate_tasks(3, 2, salt="benchmark"))))
    recs = [json.loads(x) for x in write_records(tmp_path / "all.jsonl", 21).read_text().splitlines()]
    other = {**recs[0], "problem": "Write `g(s)` that reverses the string s.",
             "solution": "```python\ndef g(s):\n    return s[::-1]\n```"}
    return bench, {"D": recs[:20], "replaced": [other] + recs[1:20], "removed": recs[1:20]}


def test_neighbouring_data_sets_give_the_same_privacy_json(tiny_model, tmp_path, neighbours):
    bench, sets = neighbours
    got = {k: _pipeline(tiny_model, tmp_path / k, v, bench, 20) for k, v in sets.items()}
    assert got["D"] == got["replaced"] == got["removed"]
    rel = got["D"]["results/dp/adapter"]["releases"][0]
    assert rel["size"] == "declared" and rel["declared_size"] == 20 and "not released" in rel["assumption"]
    assert got["D"]["results/eval/humaneval"]["releases"] == got["D"]["results/dp/adapter"]["releases"]


def test_with_n_declared_public_removal_shows_and_privacy_json_says_so(tiny_model, tmp_path, neighbours):
    bench, sets = neighbours
    d = _pipeline(tiny_model, tmp_path / "D", sets["D"], bench, "public")
    r = _pipeline(tiny_model, tmp_path / "removed", sets["removed"], bench, "public")
    a, b = d["results/dp/adapter"], r["results/dp/adapter"]
    assert a != b and a["releases"][0]["public_n"] == 20 and b["releases"][0]["public_n"] == 19
    assert a["assumptions"] == ["N = 20 records, declared public by the data owner"]


# --- 4. the boundary: what the adapter directory holds, the zone's modes, checkpoints ---------

def test_released_adapter_holds_weights_config_tokenizer_and_privacy_json_only(tiny_model, private_data, tmp_path):
    priv = tmp_path / "private" / "run"
    train_dp(str(tiny_model), str(private_data), tmp_path / "adapter", TrainConfig(**{**DP, "checkpoint_every": 2}),
             private_dir=priv)
    names = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "privacy.json", "tokenizer.json"} <= names
    assert names <= RELEASE_FILES, names  # nothing else: no model card, no statistics
    assert not engine.ckpt_path(priv, 0).parent.exists()  # checkpoints vanish after success
    assert sorted(p.name for p in priv.iterdir()) == ["train_stats.json", "trained.json"]
    for p in [priv, *priv.rglob("*")]:
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p


# --- 5. releasing: refused artifacts, the certificate's total, the cap, a registry that stays --

def test_release_composes_every_release_from_the_data_and_the_cap_refuses(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVCODE_BUDGET_DIR", str(tmp_path / "registry"))
    recs = json.loads("[" + ",".join(write_records(tmp_path / "all.jsonl", 20).read_text().splitlines()) + "]")

    def run_in(work, name, eps, cap=None):
        monkeypatch.chdir(work)
        monkeypatch.setenv("PRIVCODE_ZONE", str(work / "private"))
        data = work / "private" / "data" / "records.jsonl"
        if not data.exists():
            write_records(data, 0).write_text("".join(json.dumps(r) + "\n" for r in recs))
            mark_private(data.parent)
        out = work / "results" / name
        train_dp(str(tiny_model), str(data), out, TrainConfig(**{**DP, "steps": 2, "epsilon": eps,
                                                                 "total_epsilon_cap": cap}))
        return out, ledger.read(out)["releases"][0]

    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    out1, r1 = run_in(a, "m1", 2.0)
    c1 = release.release([out1], tmp_path / "rel1")
    assert c1["data_sets"][0]["released_total"]["epsilon"] == pytest.approx(
        accountant.epsilon_from_history(r1["history"], 1e-3))
    shutil.rmtree(a / "results")  # neither `rm -rf results` nor another working directory resets it
    out2, r2 = run_in(b, "m2", 3.0)
    c2 = release.release([out2], tmp_path / "rel2")
    tot = c2["data_sets"][0]
    assert tot["earlier_release_ids"] == [r1["id"]] and tot["new_release_ids"] == [r2["id"]]
    assert tot["released_total"]["epsilon"] == pytest.approx(
        accountant.epsilon_from_history(r1["history"] + r2["history"], 1e-3))
    assert "this release included" in (tmp_path / "rel2" / "CERTIFICATE.md").read_text()
    assert (tmp_path / "rel2" / "m2" / "privacy.json").exists()
    cap = tot["released_total"]["epsilon"] + 0.5  # a third ε = 3 run would take the total past it
    with pytest.raises(PrivcodeError, match="total_epsilon_cap"):
        run_in(b, "m3", 3.0, cap=cap)
    assert not (b / "results" / "m3").exists()
    data_id = ledger.read(b / "private" / "data")["data_id"]
    assert budget.spent(data_id)["runs"] == 2
    with pytest.raises(PrivcodeError, match="written once"):
        release.release([out2], tmp_path / "rel2")
    with pytest.raises(PrivcodeError, match="private zone"):
        release.release([b / "private" / "data"], tmp_path / "rel3")


def test_own_data_without_a_public_source_makes_privcode_inf_and_unreleasable(tiny_model, tmp_path):
    """README's wrong recipe: a split of private data whose other side is used as 'public' prompts."""
    from privcode.data.records import prepare
    from privcode.report.table3 import build

    src = write_records(tmp_path / "own.jsonl", 12)
    prepare(str(src), tmp_path / "private" / "data" / "private", tmp_path / "results" / "data" / "public",
            private_fraction=0.5, seed=0)
    train_dp(str(tiny_model), str(tmp_path / "private" / "data" / "private" / "records.jsonl"),
             tmp_path / "results" / "dp", TrainConfig(**{**DP, "steps": 2}))
    gen = tmp_path / "results" / "synth" / "generated"
    ledger.derive(gen, stage="generate", parents=[tmp_path / "results" / "dp", tmp_path / "results" / "data" / "public"])
    ev = tmp_path / "results" / "eval" / "m" / "PrivCode" / "eps6" / "humaneval"
    ledger.derive(ev, stage="evaluate", parents=[gen])
    (ev / "scores.json").write_text(json.dumps({"base_pass@1": 1.0, "plus_pass@1": 1.0}))
    row = build([str(ev)]).iloc[0]
    assert math.isinf(row["epsilon"]) and "source_is_public" in row["note"]
    with pytest.raises(PrivcodeError, match="ε = inf"):
        release.release([gen], tmp_path / "rel")
    assert ledger.read(tmp_path / "results" / "dp")["dp_release"]  # the DP model itself stays releasable
