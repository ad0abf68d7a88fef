"""`privcode audit`: canaries, the one-run ε lower bound (Steinke et al. 2023), exposure, and a
tiny end-to-end audit (non-private control vs DP at ε = 4, same steps)."""
import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from conftest import write_records
from privcode.dp import audit
from privcode.dp.audit import (AuditConfig, audit_counts, eps_lower_bound, group_privacy, guesses_from_scores,
                               inject, make_canaries, p_value, secret_of)
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
        assert not math.isnan(lb) and 0.0 <= lb <= audit.EPS_MAX
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


# ---------------------------------------------------------------------------------------------
# end to end at tiny scale


@pytest.fixture(scope="module")
def audit_model(tmp_path_factory):
    """A 2-layer, hidden-32 Llama with a larger init than `tiny_model`, so that its (frozen, tied)
    output embedding lets LoRA fit digits within a few dozen steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from privcode.dp import ledger
    from privcode.tiny import build_tokenizer

    out = tmp_path_factory.mktemp("audit_model")
    texts = ["def add(a, b):\n    return a + b\n", "Question: Write a function.\n\nAnswer: Sure."] * 20
    tok = build_tokenizer(texts)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.3, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    ledger.derive(out, stage="build_model", source="test")
    return out


# 12 private records + 24 audit canaries (≈12 included, one copy each): every canary is one record,
# so the DP claim tested by the one-run bound is the per-record (ε, δ) itself.
PARAMS = dict(delta=1e-3, canaries=24, copies=1, seed=0, k_pos=6, k_neg=6, n_candidates=500, exposure_canaries=8,
              samples=4, temperature=0.5, steps=60, batch_size=8, micro_batch_size=8, max_length=160, lr=2e-2,
              lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def audits(audit_model, tmp_path_factory):
    import torch

    from privcode import cli

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit")
    data = write_records(root / "private" / "records.jsonl", 12)
    # the control through the CLI registry, the DP run through the Python API
    rc = cli.main(["audit", "--model", str(audit_model), "--data", str(data), "--out", str(root / "control"),
                   "--params", json.dumps({**PARAMS, "epsilon": "inf"})])
    assert rc == 0
    control = json.loads((root / "control" / "audit.json").read_text())
    dp = audit.run_audit(str(audit_model), str(data), root / "dp", AuditConfig.from_dict({**PARAMS, "epsilon": 4}))
    assert json.loads((root / "dp" / "audit.json").read_text())["eps_lb"] == dp["eps_lb"]
    print("\ncontrol:", _summary(control), "\ndp:     ", _summary(dp))
    return control, dp, root


def _summary(r):
    return {"claimed": r["claimed"]["epsilon"], "eps_lb": r["eps_lb"],
            "correct": f'{r["one_run"]["correct"]}/{r["one_run"]["guesses"]}',
            "exposure_in": round(r["exposure"]["in"]["mean"], 2), "exposure_out": round(r["exposure"]["out"]["mean"], 2),
            "exposure_in_extrap": round(r["exposure"]["in_extrapolated"]["mean"], 2),
            "leakage": r["leakage"]["rate"], "seconds": round(r["seconds"], 1)}


def test_control_exposes_canaries_more_than_dp(audits):
    control, dp, _ = audits
    ci, di = control["exposure"]["in"]["mean"], dp["exposure"]["in"]["mean"]
    assert ci > di + 2.5, (ci, di)                                  # memorized vs hardly at all
    assert ci > control["exposure"]["out"]["mean"] + 2.5            # the control memorized what it saw
    assert control["exposure"]["in"]["max"] <= math.log2(500) + 1e-9
    assert control["leakage"]["rate"] >= dp["leakage"]["rate"]


def test_lower_bound_below_the_claim(audits):
    control, dp, _ = audits
    assert dp["claimed"]["epsilon"] <= 4.0 and 0.0 <= dp["eps_lb"] <= dp["claimed"]["epsilon"]
    assert dp["canary_unit"]["epsilon"] == dp["claimed"]["epsilon"]  # one copy: the per-record claim
    assert control["claimed"]["epsilon"] == "inf"
    assert math.isfinite(control["eps_lb"]) and control["eps_lb"] >= 0.0
    assert control["one_run"]["correct"] >= dp["one_run"]["correct"]


def test_audit_output(audits):
    control, dp, root = audits
    for r in (control, dp):
        assert r["one_run"]["m"] == 24 and r["one_run"]["guesses"] == 12 and len(r["scores"]) == 24
        assert r["exposure"]["secret_space"] == 10 ** 6 and "sampled candidates" in r["exposure"]["method"]
        assert 0.0 <= r["leakage"]["rate"] <= 1.0
    truth = json.loads((root / "dp" / "canaries.json").read_text())["canaries"]
    assert [t["included"] for t in truth] == [s["included"] for s in dp["scores"]]
    assert dp["mode"] == "dp" and (root / "dp" / "adapter" / "privacy.json").exists()
    assert not (root / "dp" / "train_data").exists()  # the private-data copy is removed by default


def test_refuses_truncated_canaries(audit_model, tmp_path):
    data = write_records(tmp_path / "p" / "r.jsonl", 4)
    with pytest.raises(PrivcodeError, match="max_length"):
        audit.run_audit(str(audit_model), str(data), tmp_path / "o",
                        AuditConfig.from_dict({**PARAMS, "epsilon": "inf", "max_length": 32}))


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

    r = audit.verbatim_leakage(Parrot(), tok, c, samples=3, temperature=1.0)
    assert r["rate"] == pytest.approx(1 / 3) and r["per_canary"][0]["hits"] == 3
    assert audit.verbatim_leakage(Parrot(), tok, c[1:], temperature=0)["rate"] == 0.0
