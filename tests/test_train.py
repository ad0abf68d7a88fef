"""DP and non-DP training on a tiny random model: the mechanism, its checks and its ledger."""
import json
import math

import pytest
import torch

from conftest import write_records
from privcode.dp import accountant, ledger
from privcode.errors import PrivcodeError
from privcode.train import TrainConfig, build_lora_model, collate, load_rows, per_record_loss, train_dp, train_nondp

DP = dict(epsilon=8.0, delta=1e-3, steps=3, batch_size=5, micro_batch_size=2, max_length=64, lr=1e-2,
          lora_targets=["q_proj", "v_proj"], prompt_format="qa")


def test_dp_run_ledger_and_adapter(tiny_model, private_data, tmp_path):
    out = tmp_path / "adapter"
    stats = train_dp(str(tiny_model), str(private_data), out, TrainConfig(**DP))
    priv = ledger.read(out)
    rel = priv["releases"][0]
    # ε is recomputed from what ran: same σ, q, T through the accountant, and within the target
    assert rel["sampler"] == "poisson" and rel["unit"] == "record" and rel["steps"] == 3
    assert rel["sample_rate"] == pytest.approx(5 / 20)
    assert priv["epsilon"] == pytest.approx(accountant.epsilon(0.25, rel["noise_multiplier"], 3, 1e-3), rel=1e-9)
    assert priv["epsilon"] <= 8.0 and priv["epsilon"] > 7.5
    assert rel["epsilon_rdp"] >= priv["epsilon"]
    assert len(stats["batch_sizes"]) == 3 and stats["lora_max_abs_delta"] > 0
    assert (out / "adapter_config.json").exists() and (out / "train_stats.json").exists()


def test_dp_refuses_inputs_the_accountant_does_not_cover(tiny_model, private_data, tmp_path):
    with pytest.raises(PrivcodeError, match="1/N"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "a", TrainConfig(**{**DP, "delta": 0.1}))
    with pytest.raises(PrivcodeError, match="expected batch size"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "a", TrainConfig(**{**DP, "batch_size": 50}))
    with pytest.raises(PrivcodeError, match="dropout"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "a", TrainConfig(**{**DP, "lora_dropout": 0.1}))
    assert not (tmp_path / "a").exists()


def test_one_record_is_one_row(tiny_model, tmp_path):
    from privcode.models import load_tokenizer

    p = write_records(tmp_path / "r.jsonl", 6, long=400)
    rows, st = load_rows(p, load_tokenizer(str(tiny_model)), TrainConfig(max_length=64))
    assert len(rows) == 6 and st["truncated"] == 1
    assert all(len(r["input_ids"]) <= 64 for r in rows)


def test_per_record_gradients_match_batch_of_one(tiny_model, tmp_path):
    """Opacus's per-sample gradients of a padded micro-batch equal each record's own gradient."""
    from opacus import GradSampleModule

    from privcode.models import load_tokenizer

    cfg = TrainConfig(max_length=64, lora_targets=["q_proj", "v_proj"])
    tok = load_tokenizer(str(tiny_model))
    rows, _ = load_rows(write_records(tmp_path / "r.jsonl", 3, long=8), tok, cfg)
    torch.manual_seed(0)
    model = build_lora_model(str(tiny_model), cfg, "cpu")
    for n, p in model.named_parameters():  # LoRA B starts at 0; make both factors non-trivial
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    per_record_loss(gsm, collate(rows, tok.pad_token_id, "cpu")).sum().backward()
    params = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    batched = {n: p.grad_sample.detach().clone() for n, p in params}
    for i, r in enumerate(rows):
        gsm.zero_grad(set_to_none=True)
        for _, p in params:
            p.grad_sample = None
        per_record_loss(gsm, collate([r], tok.pad_token_id, "cpu")).sum().backward()
        for n, p in params:
            torch.testing.assert_close(batched[n][i], p.grad.detach(), rtol=1e-5, atol=1e-7)


def test_nondp_on_private_data_is_inf(tiny_model, private_data, tmp_path):
    out = tmp_path / "ft"
    stats = train_nondp(str(tiny_model), str(private_data), out,
                        TrainConfig(steps=2, batch_size=4, max_length=64, prompt_format="qa"))
    assert math.isinf(ledger.read(out)["epsilon"]) and stats["lora_max_abs_delta"] > 0
    assert json.loads((out / "train_stats.json").read_text())["mode"] == "non-dp"


def test_unknown_option_is_an_error():
    with pytest.raises(PrivcodeError, match="unknown training option"):
        TrainConfig.from_dict({"epsilonn": 3})
