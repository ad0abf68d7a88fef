"""DP and non-DP training on a tiny random model: the mechanism, its checks and its ledger."""
import json
import math

import pytest
import torch

from conftest import write_records
from privcode import ledger
from privcode.dp import accountant
from privcode.errors import PrivcodeError
from privcode.train import TrainConfig, build_lora_model, collate, load_rows, per_record_loss, train_dp, train_nondp

DP = dict(epsilon=8.0, delta=1e-3, steps=3, batch_size=5, micro_batch_size=2, max_length=64, lr=1e-2,
          lora_targets=["q_proj", "v_proj"], prompt_format="qa", dataset_size="public")


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
    assert (out / "adapter_config.json").exists() and not (out / "train_stats.json").exists()


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
    out, priv = tmp_path / "ft", tmp_path / "private" / "ft"
    stats = train_nondp(str(tiny_model), str(private_data), out,
                        TrainConfig(steps=2, batch_size=4, max_length=64, prompt_format="qa"), private_dir=priv)
    assert math.isinf(ledger.read(out)["epsilon"]) and stats["lora_max_abs_delta"] > 0
    assert json.loads((priv / "train_stats.json").read_text())["mode"] == "non-dp"  # statistics: the zone
    assert not (out / "train_stats.json").exists()


def test_unknown_option_is_an_error():
    with pytest.raises(PrivcodeError, match="unknown training option"):
        TrainConfig.from_dict({"epsilonn": 3})


def test_micro_batch_grouping_does_not_change_the_dp_model(tiny_model, private_data, tmp_path):
    """Rows per micro-batch (micro_batch_size, micro_batch_tokens) are a memory/speed knob: the same
    Poisson samples, the same clipped sums and the same noise give the same adapter."""
    from safetensors.torch import load_file

    runs = {}
    for name, knobs in {"one": {"micro_batch_size": 1}, "tok": {"micro_batch_size": 8, "micro_batch_tokens": 256}}.items():
        out = tmp_path / name
        cfg = TrainConfig(**{**DP, **knobs, "reproducible_seed": 3})  # the same noise and samples in both
        stats = train_dp(str(tiny_model), str(private_data), out, cfg)
        runs[name] = (load_file(out / "adapter_model.safetensors"), stats["batch_sizes"])
    (a, sa), (b, sb) = runs["one"], runs["tok"]  # rows <= max_length 64: "tok" packs >= 4 rows a batch
    assert sa == sb and sum(sa) > 0
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_training_on_cuda_turns_cudnn_attention_off_unless_asked():
    from privcode.train import set_attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        set_attention_backends(TrainConfig(), "cuda:0")
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        set_attention_backends(TrainConfig(cudnn_attention=True), "cuda")
        assert torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        set_attention_backends(TrainConfig(), "cpu")  # CPU runs leave the process setting alone
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_profile_env_writes_a_per_rank_table(tiny_model, private_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVCODE_PROFILE", str(tmp_path / "prof"))
    train_dp(str(tiny_model), str(private_data), tmp_path / "a", TrainConfig(**{**DP, "steps": 6}))
    text = (tmp_path / "prof" / "profile_rank0.txt").read_text()
    assert text.startswith("rank 0, steps 2..4") and "aten::" in text and "sorted by self_cpu_time_total" in text
