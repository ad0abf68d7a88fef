"""`privcode audit`: canaries, the one-run ε lower bound (Steinke et al. 2023), its power, exposure,
and a tiny end-to-end audit with teeth: a design whose highest ε_lb (2.78) is above the claim
(ε = 1), an honest DP run whose ε_lb must stay at or below the claim, a broken-mechanism control
(noise off, privacy.json still claiming ε = 1) whose ε_lb must exceed it, and a non-private control."""
import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from conftest import write_records
from privcode.audit import run as audit
from privcode.audit import scoring, stats
from privcode.audit.run import AuditConfig
from privcode.audit.stats import (audit_counts, audit_power, eps_lower_bound, group_privacy, guesses_from_scores,
                                  max_eps_lb, p_value)
from privcode.data.canaries import inject, make_canaries, secret_of
from privcode.errors import PrivcodeError

# ---------------------------------------------------------------------------------------------
# the bound


def test_bound_is_zero_without_evidence():
    assert eps_lower_bound(100, 0, 0, 1e-5) == 0.0          # no guesses
    assert eps_lower_bound(100, 40, 0, 1e-5) == 0.0         # all wrong
    assert eps_lower_bound(100, 40, 20, 1e-5) == 0.0        # chance level
    assert eps_lower_bound(1000, 1000, 520, 1e-5) == 0.0    # a bit above chance: not significant
    assert eps_lower_bound(20, 4, 4, 0.0) == 0.0            # 4 right guesses: 1/16 > β = 0.05


def test_bound_closed_form_without_delta():
    # δ = 0 and v = r: P[W ≥ r] = q^r, so ε_lb solves q^r = β, i.e. ε = log(q / (1 − q)) with q = β^(1/r)
    for r in (5, 10, 100, 1000):
        q = 0.05 ** (1 / r)
        assert eps_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-4)


def test_bound_monotone_in_correct_guesses_and_delta():
    for m, r, d in [(1000, 1000, 1e-5), (100, 30, 1e-3), (50, 50, 0.0)]:
        lbs = [eps_lower_bound(m, r, v, d) for v in range(r + 1)]
        assert all(b >= a for a, b in zip(lbs, lbs[1:]))
        assert lbs[r // 2] == 0.0 and lbs[-1] > 0
    lb_d = [eps_lower_bound(1000, 200, 190, d) for d in (0.0, 1e-6, 1e-4, 1e-3)]
    assert all(b <= a for a, b in zip(lb_d, lb_d[1:]))


def test_bound_large_for_perfect_guesses_and_never_nan():
    assert eps_lower_bound(1000, 1000, 1000, 1e-5) > 5.0
    assert eps_lower_bound(1000, 1000, 1000, 1e-5) < eps_lower_bound(1000, 1000, 1000, 0.0)
    for m, r, v, d in [(1, 1, 1, 0.0), (1, 1, 1, 1.0), (10 ** 5, 10 ** 4, 10 ** 4, 1e-6), (10, 10, 10, 0.5),
                       (1000, 1000, 999, 1e-5), (3, 3, 0, 0.0)]:
        lb = eps_lower_bound(m, r, v, d)
        assert not math.isnan(lb) and 0.0 <= lb <= stats.EPS_MAX
    with pytest.raises(ValueError):
        eps_lower_bound(10, 5, 6, 0.0)


def test_p_value_matches_binomial_and_is_valid():
    # ε = 0, δ = 0: guesses are fair coins
    assert p_value(100, 20, 15, 0.0, 0.0) == pytest.approx(binom.sf(14, 20, 0.5))
    ps = [p_value(100, 20, 15, e, 1e-3) for e in np.linspace(0, 5, 26)]
    assert all(b >= a for a, b in zip(ps, ps[1:]))
    # validity: an ε0-DP randomized-response auditor (each guess right w.p. e^ε0/(1+e^ε0)) makes the
    # bound exceed ε0 with probability ≤ β — computed exactly over all outcomes v
    for eps0, r in [(0.5, 50), (1.0, 100), (2.0, 30)]:
        q0 = 1 / (1 + math.exp(-eps0))
        lbs = np.array([eps_lower_bound(1000, r, v, 0.0) for v in range(r + 1)])
        assert binom.pmf(np.arange(r + 1), r, q0)[lbs > eps0].sum() <= 0.05


# ---------------------------------------------------------------------------------------------
# canaries and guesses


def test_canaries_format_and_injection():
    c = make_canaries(50, seed=3)
    assert c == make_canaries(50, seed=3) and c != make_canaries(50, seed=4)
    assert all(set(r) == {"id", "problem", "solution", "lang"} for r in c)
    assert len({r["id"] for r in c}) == len({r["problem"] for r in c}) == 50
    secrets = [secret_of(r) for r in c]
    assert all(len(s) == 6 and s.isdigit() for s in secrets) and len(set(secrets)) > 45
    assert all(f'API_KEY = "{s}"' in r["solution"] for s, r in zip(secrets, c))
    private = [{"id": f"r{i}", "problem": "p", "solution": "s", "lang": "python"} for i in range(5)]
    rows = inject(private, c[:3], copies=4, seed=0)
    assert len(rows) == 5 + 12 and sum(r["id"].startswith(c[0]["id"] + "#") for r in rows) == 4
    with pytest.raises(PrivcodeError):
        inject(private, c, copies=0)
    with pytest.raises(PrivcodeError):
        make_canaries(3, 0, kind="email")


def test_group_privacy_and_guesses():
    assert group_privacy(2.0, 1e-5, 1) == (2.0, 1e-5)
    e, d = group_privacy(1.0, 1e-6, 3)
    assert e == 3.0 and d == pytest.approx(3 * math.e ** 2 * 1e-6)
    assert group_privacy(4.0, 1e-3, 8)[1] == 1.0
    g = guesses_from_scores([0.9, 0.1, 0.5, 0.7, 0.2, float("nan")], k_pos=2, k_neg=2)
    assert list(g) == [1, -1, 0, 1, 0, -1]  # NaN scores rank lowest
    cnt = audit_counts(g, [True, False, True, False, False, False])
    assert cnt == {"guesses": 4, "correct": 3, "guesses_in": 2, "correct_in": 1, "guesses_out": 2, "correct_out": 2}


def test_config_validation():
    with pytest.raises(PrivcodeError, match="epsilon"):
        AuditConfig.from_dict({"steps": 3})
    with pytest.raises(PrivcodeError, match="unknown audit option"):
        AuditConfig.from_dict({"epsilon": 4, "canary": 3})
    cfg = AuditConfig.from_dict({"epsilon": "inf", "steps": 3, "lr": 0.1})
    assert cfg.control and cfg.train == {"steps": 3, "lr": 0.1}
    with pytest.raises(PrivcodeError, match="broken mechanism"):
        AuditConfig.from_dict({"epsilon": 4, "broken": "clip_x2"})
    with pytest.raises(PrivcodeError, match="finite 'epsilon'"):
        AuditConfig.from_dict({"epsilon": "inf", "broken": "noise_off"})
    with pytest.raises(PrivcodeError, match="score"):
        AuditConfig.from_dict({"epsilon": 4, "score": "rank"})


def test_power_of_a_design():
    """The highest ε_lb of a design is its all-right bound; the old sizes could never refute ε = 4,
    the defaults (1000 canaries, 500 guesses) can."""
    assert max_eps_lb(24, 12, 1e-3) == pytest.approx(1.175, abs=2e-3)     # the old CI audit
    assert max_eps_lb(100, 50, 1e-5) == pytest.approx(2.782, abs=2e-3)    # the old defaults
    p = audit_power(24, 12, 4.0, 1e-3, 0.05)
    assert not p["can_refute"] and p["eps_lb_max"] < 4
    d = AuditConfig.from_dict({"epsilon": 4})
    assert d.canaries == 1000 and audit_power(d.canaries, d.canaries // 2, 4.0, d.delta, d.beta)["can_refute"]
    assert max_eps_lb(1000, 500, 1e-5) == pytest.approx(5.088, abs=2e-3)
    # no outcome of a design exceeds its maximum
    assert all(eps_lower_bound(100, 50, v, 1e-5) <= max_eps_lb(100, 50, 1e-5) for v in range(51))


def test_a_design_that_cannot_refute_the_claim_is_refused_before_training(tmp_path):
    data = write_records(tmp_path / "p" / "r.jsonl", 4)
    weak = {"epsilon": 4, "delta": 1e-3, "canaries": 24, "k_pos": 6, "k_neg": 6, "steps": 3}
    with pytest.raises(PrivcodeError, match=r"cannot refute the claim: its highest ε_lb .* is 1\.175"):
        audit.run_audit("no-such-model", str(data), tmp_path / "o", AuditConfig.from_dict(weak))
    assert not (tmp_path / "o").exists()  # refused before anything was made or trained


# ---------------------------------------------------------------------------------------------
# end to end at tiny scale


@pytest.fixture(scope="module")
def audit_model(tmp_path_factory):
    """A 2-layer, hidden-128 Llama with a large init, whose tokenizer was trained on text in the
    canaries' format (other canaries, seed 987654), so that a canary is ~55 tokens and LoRA can
    memorize 50 of them within 80 steps — the non-private control does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from privcode import ledger
    from privcode.data.prompts import render_example
    from privcode.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("audit_model")
    recs = [json.loads(line) for line in write_records(out / "texts.jsonl", 12).read_text().splitlines()]
    texts = ["def add(a, b):\n    return a + b\n", "Question: Write a function.\n\nAnswer: Sure."] * 20
    texts += ["".join(render_example(r["problem"], r["solution"], "qa")) for r in recs + make_canaries(40, 987654)]
    (out / "texts.jsonl").unlink()
    tok = build_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    ledger.derive(out, stage="build_model", source="test")
    return out


CLAIM = 1.0  # the claimed ε of the CI audit: the design below reaches ε_lb 2.78 > CLAIM
# 12 private records + 100 audit canaries (≈50 included, one copy each): every canary is one record,
# so the DP claim tested by the one-run bound is the per-record (ε, δ) itself. 25 + 25 guesses.
PARAMS = dict(delta=1e-5, canaries=100, copies=1, seed=0, k_pos=25, k_neg=25, score_candidates=4, n_candidates=200,
              exposure_canaries=8, samples=4, temperature=0.5, steps=80, batch_size=16, micro_batch_size=16,
              max_length=160, lr=1e-2, fast=True, reproducible_seed=0,
              lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def audits(audit_model, tmp_path_factory):
    import torch

    from privcode import cli

    root = tmp_path_factory.mktemp("audit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:  # a module fixture runs before the per-test zone fixture
            mp.setenv("PRIVCODE_ZONE", str(root / "zone"))
            mp.setenv("PRIVCODE_BUDGET_DIR", str(root / "budget"))
            data = write_records(root / "private" / "records.jsonl", 12)
            # the control through the CLI registry, the DP runs through the Python API
            rc = cli.main(["audit", "--model", str(audit_model), "--data", str(data), "--out", str(root / "control"),
                           "--params", json.dumps({**PARAMS, "epsilon": "inf"})])
            assert rc == 0
            control = json.loads((root / "control" / "audit.json").read_text())
            dp = audit.run_audit(str(audit_model), str(data), root / "dp",
                                 AuditConfig.from_dict({**PARAMS, "epsilon": CLAIM}))
            broken = audit.run_audit(str(audit_model), str(data), root / "broken", AuditConfig.from_dict(
                {**PARAMS, "epsilon": CLAIM, "broken": "noise_off", "exposure_canaries": 2}))
    finally:
        torch.set_num_threads(threads)
    assert json.loads((root / "dp" / "audit.json").read_text())["eps_lb"] == dp["eps_lb"]
    print("\ncontrol:", _summary(control), "\ndp:     ", _summary(dp), "\nbroken: ", _summary(broken))
    return control, dp, broken, root


def _summary(r):
    return {"claimed": r["claimed"]["epsilon"], "eps_lb": r["eps_lb"], "eps_lb_max": r["eps_lb_max"],
            "correct": f'{r["one_run"]["correct"]}/{r["one_run"]["guesses"]}',
            "exposure_in": round(r["exposure"]["in"]["mean"] or 0, 2),
            "exposure_out": round(r["exposure"]["out"]["mean"] or 0, 2),
            "leakage": r["leakage"]["rate"], "seconds": round(r["seconds"], 1)}


def test_honest_at_most_the_claim_below_the_broken_control(audits):
    """The acceptance of #15: honest ε_lb ≤ claimed ε < broken-control ε_lb, with a design that can
    exceed the claim at all. (With the fixed seeds the outcome is deterministic; for any seeds the
    honest run's ε_lb exceeds its true ε with probability ≤ β = 0.05 by Steinke et al.'s theorem,
    and in practice black-box audits are far below it: here ε_lb ≈ 0.)"""
    control, dp, broken, _ = audits
    for r in (control, dp, broken):
        assert r["eps_lb_max"] == pytest.approx(max_eps_lb(100, 50, 1e-5)) and r["eps_lb_max"] > 2.7
    assert dp["claimed"]["epsilon"] <= CLAIM and broken["claimed"]["epsilon"] <= CLAIM
    assert dp["power"]["can_refute"] and broken["power"]["can_refute"] and dp["warnings"] == []
    assert 0.0 <= dp["eps_lb"] <= dp["claimed"]["epsilon"] < broken["eps_lb"], (dp["eps_lb"], broken["eps_lb"])
    assert dp["verdict"].startswith("consistent") and broken["verdict"].startswith("VIOLATION")
    assert dp["canary_unit"]["epsilon"] == dp["claimed"]["epsilon"]  # one copy: the per-record claim
    assert control["claimed"]["epsilon"] == "inf" and control["eps_lb"] > CLAIM
    assert control["one_run"]["correct"] > dp["one_run"]["correct"]


def test_broken_control_is_never_a_release(audits):
    from privcode import ledger

    _, _, broken, root = audits
    rec = ledger.read(root / "broken" / "adapter")
    assert rec["epsilon"] == math.inf and rec["dp_release"] is False and rec["mechanism"] == "non-private"
    assert broken["mode"] == "broken control (noise_off): not DP"
    assert broken["train"]["config"]["reproducible_seed"] is not None


def test_control_exposes_canaries_more_than_dp(audits):
    control, dp, _, _ = audits
    ci, di = control["exposure"]["in"]["mean"], dp["exposure"]["in"]["mean"]
    assert ci > di + 2.0, (ci, di)                                  # memorized vs hardly at all
    assert ci > control["exposure"]["out"]["mean"] + 2.0            # the control memorized what it saw
    assert control["exposure"]["in"]["max"] <= math.log2(200) + 1e-9
    assert control["leakage"]["rate"] >= dp["leakage"]["rate"]


def test_audit_output(audits):
    control, dp, broken, root = audits
    for r in (control, dp, broken):
        assert r["one_run"]["m"] == 100 and r["one_run"]["guesses"] == 50 and len(r["scores"]) == 100
        assert r["exposure"]["secret_space"] == 10 ** 6 and "sampled candidates" in r["exposure"]["method"]
        assert 0.0 <= r["leakage"]["rate"] <= 1.0
        assert "records" not in r["train"] and "final_loss" not in r["train"]  # no non-private statistics
    truth = json.loads((root / "dp" / "canaries.json").read_text())["canaries"]
    assert [t["included"] for t in truth] == [s["included"] for s in dp["scores"]]
    assert dp["mode"] == "dp" and (root / "dp" / "adapter" / "privacy.json").exists()
    assert not (root / "dp" / "train_data").exists()  # the private-data copy is removed by default
    assert not (root / "zone" / "dp" / "train_data").exists()


def test_weak_design_runs_with_a_loud_warning(audit_model, tmp_path, caplog):
    data = write_records(tmp_path / "p" / "r.jsonl", 4)
    params = {**PARAMS, "epsilon": 4, "delta": 1e-3, "canaries": 4, "k_pos": 1, "k_neg": 1, "steps": 2,
              "batch_size": 2, "micro_batch_size": 2,
              "exposure_canaries": 1, "n_candidates": 10, "samples": 1, "allow_weak": True}
    with caplog.at_level("WARNING", logger="privcode.audit.run"):
        r = audit.run_audit(str(audit_model), str(data), tmp_path / "o", AuditConfig.from_dict(params))
    assert not r["power"]["can_refute"] and r["warnings"] and "cannot refute" in r["warnings"][0]
    assert "AUDIT WITHOUT POWER" in caplog.text


def test_refuses_truncated_canaries(audit_model, tmp_path):
    data = write_records(tmp_path / "p" / "r.jsonl", 4)
    with pytest.raises(PrivcodeError, match="max_length"):
        audit.run_audit(str(audit_model), str(data), tmp_path / "o",
                        AuditConfig.from_dict({**PARAMS, "epsilon": "inf", "max_length": 12}))


def test_verbatim_leakage_counts_secrets_in_completions(audit_model):
    """A stand-in model that completes the prefix with the secret for the first canary only."""
    import torch

    from privcode.models import load_tokenizer

    tok = load_tokenizer(str(audit_model))
    c = make_canaries(3, seed=1)

    class Parrot(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, num_return_sequences=1, **kw):
            text = secret_of(c[0]) + '"' if tok.decode(input_ids[0]).count(c[0]["problem"]) else '123"'
            new = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            return torch.cat([input_ids, new], 1).repeat(num_return_sequences, 1)

    r = scoring.verbatim_leakage(Parrot(), tok, c, samples=3, temperature=1.0)
    assert r["rate"] == pytest.approx(1 / 3) and r["per_canary"][0]["hits"] == 3
    assert scoring.verbatim_leakage(Parrot(), tok, c[1:], temperature=0)["rate"] == 0.0
