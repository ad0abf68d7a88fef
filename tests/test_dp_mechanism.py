"""DP-SGD mechanism checks (#3): noise scale, single vs. several processes, PrivSA gradients,
checkpoint/resume, and the accountant against Google's dp-accounting (PLD) as the oracle."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, mark_private, write_records
from privcode import budget, ledger
from privcode.dp import accountant, engine
from privcode.models import load_tokenizer
from privcode.train import TrainConfig, build_lora_model, collate, load_rows, train_dp

SIGMA, C, Q = 2.0, 0.5, 0.5


def _env():
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1")


def _worker(tiny_model, tmp_path, nproc, mode="noise"):
    data = write_records(tmp_path / f"d{nproc}.jsonl", 40)
    out = tmp_path / f"u{nproc}{mode}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "dist_worker.py"), str(tiny_model), str(out), str(data), mode]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out)


def _noise_update(tiny_model, tmp_path, nproc):
    return _worker(tiny_model, tmp_path, nproc)["update"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_noise_is_added_once_with_the_single_process_std(tiny_model, tmp_path, nproc):
    """Zero gradients: the update is the noise alone, with std σ·C / (q·N) whatever the number
    of processes (noise added on every rank would give √world times that)."""
    u = _noise_update(tiny_model, tmp_path, nproc)
    expected = SIGMA * C / (Q * 40)
    assert u.numel() > 3000
    assert abs(float(u.mean())) < 0.1 * expected
    assert float(u.std()) == pytest.approx(expected, rel=0.08)


def test_clipped_sum_does_not_depend_on_the_number_of_processes(tiny_model, tmp_path):
    """σ = 0: the update is the sum of clipped per-record gradients / (qN). Two processes draw the
    same global Poisson sample as one and split it by tokens, so the update is the same."""
    one, two = _worker(tiny_model, tmp_path, 1, "signal"), _worker(tiny_model, tmp_path, 2, "signal")
    assert one["global_batch"] == two["global_batch"] > 0
    assert 0 < two["local_batch"] < two["global_batch"]  # rank 0 computed only its share
    assert float(one["update"].abs().max()) > 0
    torch.testing.assert_close(two["update"], one["update"], rtol=1e-4, atol=1e-7)


def test_process_group_is_torn_down_at_exit(tmp_path):
    """engine.init_distributed registers the process group's teardown at exit: every rank of a 2-process gloo
    run finds the group destroyed once its program ends (a handler registered before init runs after it; atexit
    is last-in first-out). Without the teardown gloo's threads may abort a finished rank at finalization."""
    script = tmp_path / "w.py"
    script.write_text("import atexit, torch\n"
                      "from privcode.dp import engine\n"
                      "atexit.register(lambda: print('initialized at exit:', torch.distributed.is_initialized()))\n"
                      "rank, world = engine.init_distributed()\n"
                      "torch.distributed.barrier()\n"
                      "print('rank', rank, 'of', world)\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--tee=1", str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "rank 0 of 2" in out and "rank 1 of 2" in out, out[-2000:]
    assert out.count("initialized at exit: False") == 2 and "initialized at exit: True" not in out, out[-2000:]


def test_same_epsilon_on_one_and_two_processes(tiny_model, tmp_path):
    data = mark_private(write_records(tmp_path / "private" / "d40" / "records.jsonl", 40).parent)
    params = json.dumps({"epsilon": 3.0, "delta": 1e-3, "steps": 2, "batch_size": 10, "max_length": 48,
                         "lora_targets": ["q_proj", "v_proj"], "prompt_format": "qa", "dataset_size": "public"})
    eps = {}
    for n in (1, 2):
        out, priv = tmp_path / f"a{n}", tmp_path / "private" / f"a{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "privcode.cli", "dp-finetune", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
               "--private-dir", str(priv), "--params", params]
        p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        rec = ledger.read(out)
        eps[n] = rec["epsilon"]
        assert rec["releases"][0]["processes"] == n
        assert json.loads((priv / "train_stats.json").read_text())["world_size"] == n
    assert eps[1] == eps[2] <= 3.0


def _rows_with_syntax(tiny_model, tmp_path, n=3):
    cfg = TrainConfig(max_length=64, lora_targets=["q_proj", "v_proj"])
    tok = load_tokenizer(str(tiny_model))
    rows, _ = load_rows(write_records(tmp_path / "r.jsonl", n, long=6), tok, cfg)
    for r in rows:  # a fixed syntax mask: every other answer token (the mechanism, not the parser)
        r["syntax"] = [lab != -100 and i % 2 == 0 for i, lab in enumerate(r["labels"])]
    return cfg, tok, rows


def _random_lora(tiny_model, cfg):
    torch.manual_seed(0)
    model = build_lora_model(str(tiny_model), cfg, "cpu")
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    return model


def test_kl_term_has_per_record_gradients_equal_to_batch_of_one(tiny_model, tmp_path):
    from opacus import GradSampleModule

    cfg, tok, rows = _rows_with_syntax(tiny_model, tmp_path)
    model = _random_lora(tiny_model, cfg)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    loss = lambda b: engine.per_record_loss(gsm, b, lam=0.7, peft_model=model)  # noqa: E731
    loss(collate(rows, tok.pad_token_id, "cpu")).sum().backward()
    batched = {n: p.grad_sample.detach().clone() for n, p in params}
    for i, r in enumerate(rows):
        gsm.zero_grad(set_to_none=True)
        for _, p in params:
            p.grad_sample = None
        loss(collate([r], tok.pad_token_id, "cpu")).sum().backward()
        for n, p in params:
            torch.testing.assert_close(batched[n][i], p.grad.detach(), rtol=1e-5, atol=1e-7)


def test_kl_alone_moves_the_lora_weights(tiny_model, tmp_path):
    cfg, tok, rows = _rows_with_syntax(tiny_model, tmp_path)
    model = _random_lora(tiny_model, cfg)
    batch = collate(rows, tok.pad_token_id, "cpu")
    kl = engine.per_record_loss(model, batch, lam=1.0, ce_weight=0.0, peft_model=model)
    assert (kl > 0).all()
    kl.sum().backward()
    g = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(x is not None for x in g) and max(float(x.abs().max()) for x in g) > 0
    # without syntax positions the KL term is exactly zero
    batch["syntax"][:] = False
    assert float(engine.per_record_loss(model, batch, lam=1.0, ce_weight=0.0, peft_model=model).abs().max()) == 0.0


def test_privsa_schedule():
    assert engine.privsa_lambda(0, 1.0, 0.1, 0.5) == pytest.approx(1.0)
    assert engine.privsa_lambda(1000, 1.0, 0.1, 0.5) == pytest.approx(0.1)
    assert engine.privsa_lambda(3, 1.0, 0.1, 0.5, interval=2) == engine.privsa_lambda(2, 1.0, 0.1, 0.5)


def _lora_tensors(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_model_and_epsilon(tiny_model, private_data, tmp_path):
    """A reproducible seed makes the killed-and-resumed run comparable to an uninterrupted one; the
    checkpoint (RNG state included) is a private-zone file and is deleted once the run succeeds."""
    params = {"epsilon": 6.0, "delta": 1e-3, "steps": 40, "batch_size": 5, "max_length": 48, "lr": 1e-2,
              "lora_targets": ["q_proj", "v_proj"], "prompt_format": "qa", "checkpoint_every": 5,
              "dataset_size": "public", "reproducible_seed": 11}
    ref = tmp_path / "ref"
    train_dp(str(tiny_model), str(private_data), ref, TrainConfig(**{**params, "checkpoint_every": 0}))
    out, priv = tmp_path / "run", tmp_path / "private" / "run"
    cmd = [sys.executable, "-m", "privcode.cli", "dp-finetune", "--model", str(tiny_model), "--data",
           str(private_data), "--out", str(out), "--private-dir", str(priv), "--params", json.dumps(params)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = engine.ckpt_path(priv, 0)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not out.exists(), "the run should have been killed after a checkpoint"
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < killed_at < 40 and oct(ckpt.stat().st_mode & 0o777) == oct(0o600)
    stats = train_dp(str(tiny_model), str(private_data), out, TrainConfig(**params), private_dir=priv)
    assert stats["resumed_at"] == killed_at and not ckpt.parent.exists()
    assert ledger.read(out)["releases"][0]["steps"] == stats["noisy_updates"] + killed_at == 40
    assert ledger.read(out)["epsilon"] == ledger.read(ref)["epsilon"]
    a, b = _lora_tensors(out), _lora_tensors(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_run_that_would_exceed_its_target_stops(tiny_model, private_data, tmp_path):
    from privcode.errors import PrivcodeError

    cfg = TrainConfig(epsilon=1.0, delta=1e-3, steps=5, batch_size=5, noise_multiplier=0.5, max_length=48,
                      lora_targets=["q_proj"], prompt_format="qa", dataset_size="public")
    with pytest.raises(PrivcodeError, match="ε=.*> target"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "x", cfg)
    assert not (tmp_path / "x").exists()


def test_non_poisson_sampler_is_refused(tiny_model, private_data, tmp_path):
    from privcode.errors import PrivcodeError

    cfg = TrainConfig(epsilon=4, delta=1e-3, steps=2, batch_size=5, sampler="shuffle", prompt_format="qa",
                      dataset_size="public")
    with pytest.raises(PrivcodeError, match="poisson"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "x", cfg)


# --- the accountant against Google's dp-accounting PLD accountant ----------------------------

def _pld_epsilon(q, sigma, steps, delta):
    from dp_accounting import dp_event, pld

    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,sigma,steps,delta,eps_rdp", [
    (256 / 19000, 0.8, 100, 1e-5, 2.560),
    (0.04, 1.5, 2250, 1e-5, 7.329),
])
def test_accountant_matches_the_pld_oracle(q, sigma, steps, delta, eps_rdp):
    pytest.importorskip("dp_accounting")
    oracle = _pld_epsilon(q, sigma, steps, delta)
    ours = accountant.epsilon(q, sigma, steps, delta, "prv")
    assert oracle <= ours * 1.001 and ours == pytest.approx(oracle, rel=0.01)  # PRV: an upper bound
    assert accountant.epsilon(q, sigma, steps, delta, "rdp") == pytest.approx(eps_rdp, rel=0.01)


def test_calibrated_sigma_reproduces_the_target():
    sigma = accountant.calibrate_sigma(4.0, 1e-5, 256 / 19000, 100)
    eps = accountant.epsilon(256 / 19000, sigma, 100, 1e-5)
    assert 3.96 <= eps <= 4.0


def test_privsa_run_uses_real_syntax_positions(tiny_model, private_data, tmp_path):
    """End to end through load_rows: tree-sitter positions -> KL on them -> a DP release."""
    from privcode.train import train_dp

    cfg = TrainConfig(epsilon=6.0, delta=1e-3, steps=2, batch_size=5, max_length=64, prompt_format="qa",
                      lora_targets=["q_proj", "v_proj"], privsa_lambda_max=10.0, privsa_lambda_min=0.1,
                      privsa_alpha=0.5, dataset_size="public")
    stats = train_dp(str(tiny_model), str(private_data), tmp_path / "a", cfg)
    assert stats["privsa_syntax_tokens"] > 0 and stats["privsa_unparsed_records"] == 0
    rel = ledger.read(tmp_path / "a")["releases"][0]
    assert rel["privsa"] is True and rel["epsilon"] <= 6.0
    tok = load_tokenizer(str(tiny_model))
    rows, _ = load_rows(private_data, tok, cfg, syntax=True)
    for r in rows:  # syntax positions lie inside the answer (never the prompt) and hit "def"/"return"
        assert not any(s and lab == -100 for s, lab in zip(r["syntax"], r["labels"]))
        text = tok.decode([t for t, s in zip(r["input_ids"], r["syntax"]) if s])
        assert "def" in text and "return" in text


def test_resume_whose_history_would_exceed_the_target_stops(tiny_model, private_data, tmp_path):
    """A checkpoint's accountant history counts: a resumed run that could not finish within the
    target ε refuses to take another step."""
    from privcode.errors import PrivcodeError

    params = dict(epsilon=6.0, delta=1e-3, steps=4, batch_size=5, max_length=48, prompt_format="qa",
                  lora_targets=["q_proj"], checkpoint_every=2, dataset_size="public")
    model = build_lora_model(str(tiny_model), TrainConfig(**params), "cpu")
    dp = engine.DPSGD(model, n_records=20, sample_rate=0.25, noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=5, lr=1e-3, weight_decay=0, steps=4, device="cpu")
    out, priv = tmp_path / "a", tmp_path / "private" / "a"
    engine.save_ckpt(priv, 0, dp.state([(0.3, 0.25, 50)], [0.0] * 2, 2))  # a history far past ε=6
    with pytest.raises(PrivcodeError, match="would spend"):
        train_dp(str(tiny_model), str(private_data), out, TrainConfig(**params), private_dir=priv)
    assert not out.exists()


def test_training_again_into_a_spent_output_is_refused(tiny_model, private_data, tmp_path, monkeypatch):
    from privcode.errors import PrivcodeError

    cfg = TrainConfig(epsilon=6.0, delta=1e-3, steps=1, batch_size=5, max_length=48, prompt_format="qa",
                      lora_targets=["q_proj"], dataset_size="public")
    out = tmp_path / "adapter"
    train_dp(str(tiny_model), str(private_data), out, cfg)
    import shutil

    shutil.rmtree(out)  # what Snakemake does before re-running a job
    with pytest.raises(PrivcodeError, match="already trained here"):
        train_dp(str(tiny_model), str(private_data), out, cfg)
    monkeypatch.setenv("PRIVCODE_ALLOW_RETRAIN", "1")
    train_dp(str(tiny_model), str(private_data), out, cfg)
    data_id, _ = ledger.data_identity(private_data.parent)
    assert budget.spent(data_id)["runs"] == 2  # both runs count against the data set's budget


def test_fast_path_trains_the_same_model(tiny_model, private_data, tmp_path):
    """The GPU speed path (lean LoRA, chunked loss, hook-free per-record gradients, flat clipping)
    is the same mechanism: same σ, same sampled batches, same noise, the same adapter."""
    params = dict(epsilon=6.0, delta=1e-3, steps=3, batch_size=5, max_length=48, prompt_format="qa", lr=1e-2,
                  lora_targets=["q_proj", "v_proj"], privsa_lambda_max=5.0, privsa_lambda_min=0.1,
                  dataset_size="public", reproducible_seed=5)  # the same streams for both paths
    ref = train_dp(str(tiny_model), str(private_data), tmp_path / "ref", TrainConfig(**params))
    stats = train_dp(str(tiny_model), str(private_data), tmp_path / "fast", TrainConfig(**params, fast=True))
    assert ledger.read(tmp_path / "fast")["epsilon"] == ledger.read(tmp_path / "ref")["epsilon"]
    assert stats["batch_sizes"] == ref["batch_sizes"]
    a, b = _lora_tensors(tmp_path / "fast"), _lora_tensors(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
