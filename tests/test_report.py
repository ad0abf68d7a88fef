"""Report stages: table4 / vulntable / table5 from constructed artifact directories (ε from
privacy.json), rethreshold (= apply_threshold, ledger kept), and the figures."""
import json
import math
import struct

import pandas as pd
import pytest

from conftest import fake_dp_release
from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.evaluate.leakage import summarize
from privcode.filters import threshold
from privcode.filters.threshold import apply_threshold
from privcode.io import write_json, write_jsonl
from privcode.report import figures, table4, table5


@pytest.fixture
def models(tmp_path):
    """Ledger entries of three models: public (ε = 0), DP (ε = 4), non-private (ε = inf)."""
    pub = tmp_path / "m" / "pre"
    ledger.derive(pub, stage="build_model")
    dp = tmp_path / "m" / "dp"
    fake_dp_release(dp, 4.0, 1e-5)
    nondp = tmp_path / "m" / "nondp"
    ledger.non_private(nondp, stage="finetune", reason="trained on the private records")
    return {"PreCode": pub, "PrivCode": dp, "NonDPFT": nondp}


def _leak_dir(root, model_dir, method, tag, per):
    d = root / "leakage" / "tiny" / method / tag
    write_json(d / "leakage.json", {**summarize(per), "pii": {"total": 7, "other": 3}})
    ledger.derive(d, stage="leakage", parents=[str(model_dir)])
    return d


def _per(copies_leaked_exposure):
    return [{"id": f"c{i}", "kind": "email", "copies": k, "leaked": lk, "hits": int(lk), "samples": 4, "exposure": e}
            for i, (k, lk, e) in enumerate(copies_leaked_exposure)]


def test_table4(tmp_path, models):
    d1 = _leak_dir(tmp_path, models["PrivCode"], "PrivCode", "eps4",
                   _per([(0, False, 0.5), (5, False, 1.0), (5, False, 2.0), (100, True, 4.0), (100, False, 3.0)]))
    d2 = _leak_dir(tmp_path, models["NonDPFT"], "NonDPFT", "inf",
                   _per([(0, False, 1.0), (5, True, 3.0), (5, False, 2.0), (100, True, 4.0), (100, True, 4.0)]))
    out = tmp_path / "table4.csv"
    table4.main(["--out", str(out), str(d1), str(d2)])
    df = pd.read_csv(out)
    assert list(df.columns) == ["model", "method", "epsilon", "delta", "leak@k0", "leak@k5", "leak@k100", "leak",
                                "exposure", "exp@k0", "exp@k5", "exp@k100", "pii", "pii_other", "note"]
    assert list(df["method"]) == ["NonDPFT", "PrivCode"]           # table3's method order
    nd, pc = df.iloc[0], df.iloc[1]
    assert math.isinf(nd["epsilon"]) and pc["epsilon"] == pytest.approx(4.0) and pc["delta"] == pytest.approx(1e-5)
    assert (pc["leak@k0"], pc["leak@k5"], pc["leak@k100"], pc["leak"]) == (0.0, 0.0, 0.5, 0.25)
    assert (nd["leak@k5"], nd["leak@k100"], nd["leak"]) == (0.5, 1.0, 0.75)
    assert pc["exposure"] == pytest.approx(2.5) and pc["exp@k100"] == pytest.approx(3.5)
    assert pc["pii"] == 7 and pc["pii_other"] == 3
    with pytest.raises(PrivcodeError, match="privacy.json"):
        (tmp_path / "nol" / "a" / "b" / "c").mkdir(parents=True)
        table4.build([str(tmp_path / "nol" / "a" / "b" / "c")])


def test_vulntable(tmp_path, models):
    dirs = []
    for method, safe in (("PrivCode", 0.75), ("PreCode", 0.5)):
        d = tmp_path / "vuln" / "tiny" / method / "t"
        write_json(d / "vuln.json", {"safe_rate": safe, "safe_rate_relevant": 0.9, "flagged": 1, "analyzed": 4,
                                     "no_code": 0, "syntax_error": 1, "severity": "medium",
                                     "codeql": {"status": "not installed"}})
        ledger.derive(d, stage="vuln", parents=[str(models[method])])
        dirs.append(str(d))
    out = tmp_path / "vuln.csv"
    table4.vuln_main(["--out", str(out), *dirs])
    df = pd.read_csv(out)
    assert list(df["method"]) == ["PreCode", "PrivCode"]
    assert list(df["epsilon"]) == [0.0, pytest.approx(4.0)] and list(df["safe_rate"]) == [0.5, 0.75]
    assert set(df["codeql"]) == {"not installed"}


def _eval_dir(root, model_dir, method, tag, bench, base, plus):
    d = root / "eval" / "tiny" / method / tag / bench
    write_json(d / "scores.json", {"base_pass@1": base, "plus_pass@1": plus})
    ledger.derive(d, stage="evaluate", parents=[str(model_dir)], benchmark=bench)
    return d


def test_table5(tmp_path, models):
    a = _eval_dir(tmp_path, models["PrivCode"], "PrivCode", "eps4", "humaneval", 10.0, 8.0)
    b = _eval_dir(tmp_path, models["PrivCode"], "PrivCode", "eps4", "mbpp", 20.0, 18.0)
    c = _eval_dir(tmp_path, models["PrivCode"], "PrivCode", "eps4-tau0.5", "humaneval", 12.0, 9.0)
    d = _eval_dir(tmp_path, models["PrivCode"], "PrivCode", "lm1000", "humaneval", 11.0, 7.0)
    out = tmp_path / "table5.csv"
    # the sweep value is a label only: ε comes from privacy.json (4.0), not from "epsilon=8"
    table5.main(["--out", str(out), f"tau=0.8:{a}", f"tau=0.8:{b}", f"tau=0.5:{c}", f"lambda_max=1000:{d}",
                 f"epsilon=8:{a}"])
    df = pd.read_csv(out)
    assert list(df.columns[:7]) == ["sweep", "value", "model", "method", "tag", "epsilon", "delta"]
    assert list(zip(df["sweep"], df["value"])) == [("epsilon", 8), ("lambda_max", 1000), ("tau", 0.5), ("tau", 0.8)]
    assert (df["epsilon"] == 4.0).all()
    tau08 = df[(df["sweep"] == "tau") & (df["value"] == 0.8)].iloc[0]
    assert (tau08["HumanEval"], tau08["HumanEval+"], tau08["MBPP"], tau08["MBPP+"]) == (10, 8, 20, 18)
    assert math.isnan(df[df["sweep"] == "lambda_max"].iloc[0]["MBPP"])
    assert table5.parse_row("epsilon=inf:x/y") == ("epsilon", math.inf, table5.Path("x/y"))
    for bad in ("tau0.8:x", "tau=0.8", "=1:x"):
        with pytest.raises(PrivcodeError):
            table5.parse_row(bad)


def _roundtrip_dir(root, parent):
    recs = []
    for i, f1 in enumerate([0.2, 0.5, 0.7, None, 0.9]):
        valid = [] if f1 is None else [{"index": 0, "text": f"You are tasked with t{i}", "f1": f1}]
        recs.append({"id": f"s{i}", "problem": f"p{i}", "solution": f"```python\nx = {i}\n```", "lang": "python",
                     "descriptions": ["..."], "valid": valid, "best": valid[0] if valid else None,
                     "kept": bool(f1 and f1 >= 0.45)})
    d = root / "synth" / "tiny" / "eps4" / "roundtrip"
    write_jsonl(d / "scores.jsonl", recs)
    write_json(d / "stats.json", {"samples": 5, "kept": 3, "threshold": 0.45, "scorer": {"model": "m"}})
    ledger.derive(d, stage="roundtrip_filter", parents=[str(parent)])
    return d


def test_rethreshold_equals_apply_threshold(tmp_path, models):
    src = _roundtrip_dir(tmp_path, models["PrivCode"])
    for tau in (0.45, 0.6, 0.85):
        out = tmp_path / f"rt-{tau}"
        stats = threshold.rethreshold(src, tau, out)
        kept, dropped = apply_threshold(src / "scores.jsonl", tau)
        assert [json.loads(x) for x in (out / "kept.jsonl").read_text().splitlines()] == kept
        assert [json.loads(x) for x in (out / "dropped.jsonl").read_text().splitlines()] == dropped
        assert stats["kept"] == len(kept) and stats["samples"] == 5 and stats["threshold"] == tau
        assert stats["no_valid"] == 1
        # the written scores re-threshold to the same result (chains of rethreshold work)
        assert apply_threshold(out / "scores.jsonl", tau) == (kept, dropped)
        priv = ledger.read(out)
        assert priv["epsilon"] == pytest.approx(4.0) and priv["parents"] == [str(src)] and priv["threshold"] == tau
    assert [k["id"] for k in apply_threshold(src / "scores.jsonl", 0.6)[0]] == ["s2", "s4"]
    with pytest.raises(PrivcodeError, match="keeps none"):
        threshold.rethreshold(src, 0.95, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    threshold.main(["--roundtrip", str(src), "--tau", "0.6", "--out", str(tmp_path / "cli")])
    assert len((tmp_path / "cli" / "kept.jsonl").read_text().splitlines()) == 2


def _png_size(p):
    b = p.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", b[16:24])


def test_figures(tmp_path):
    t3 = tmp_path / "table3.csv"
    t3.write_text("model,method,epsilon,delta,HumanEval,HumanEval+\n"
                  "tiny,PreCode,0,0,5,4\ntiny,NonDPFT,inf,0,12,10\n"
                  "tiny,DPFT,1,1e-05,5,5\ntiny,DPFT,4,1e-05,6,5\ntiny,PrivCode,1,1e-05,8,7\ntiny,PrivCode,4,1e-05,10,9\n")
    synth = tmp_path / "synth"
    for tag, (n, wc, ex, rt) in {"eps1": (32, 30, 25, 20), "eps4": (32, 32, 31, 28)}.items():
        write_json(synth / "tiny" / tag / "generated" / "stats.json", {"prompts": n, "with_code": wc})
        write_json(synth / "tiny" / tag / "exec" / "stats.json", {"n_input": wc, "n_kept": ex})
        if tag == "eps4":  # a run whose round trip is not done yet: its last bar is left out
            write_json(synth / "tiny" / tag / "roundtrip" / "stats.json", {"samples": ex, "kept": rt})
    assert figures.funnel_counts(synth / "tiny" / "eps1") == {"generated": 32, "with code": 30, "executed OK": 25}
    figures.main(["--table3", str(t3), "--synth", str(synth), "--out", str(tmp_path / "fig")])
    for name in ("privacy_utility.png", "funnel.png"):
        w, h = _png_size(tmp_path / "fig" / name)
        assert w > 400 and h > 300
    with pytest.raises(PrivcodeError):
        figures.main(["--synth", str(tmp_path / "empty"), "--out", str(tmp_path / "fig2")])


def test_utility_points_take_table5_epsilon_sweep(tmp_path):
    """table5's ε-sweep rows become more points of their method; table3's row wins at a shared ε; the
    τ sweep (same ε as table3's PrivCode) adds nothing."""
    t3 = tmp_path / "table3.csv"
    t3.write_text("model,method,epsilon,delta,HumanEval\ntiny,DPFT,3.998,1e-05,7.5\ntiny,PrivCode,3.998,1e-05,6\n"
                  "tiny,NonDPFT,inf,0,22\n")
    t5 = tmp_path / "table5.csv"
    t5.write_text("sweep,value,model,method,tag,epsilon,delta,HumanEval\n"
                  "epsilon,1,tiny,PrivCode,eps1,0.9939,1e-05,5\nepsilon,4,tiny,PrivCode,eps4,3.998,1e-05,99\n"
                  "epsilon,8,tiny,PrivCode,eps8,8,1e-05,5.5\ntau,0.55,tiny,PrivCode,eps4-tau0.55,3.998,1e-05,7.5\n")
    df = figures.utility_points(t3, t5)
    priv = df[df["method"] == "PrivCode"].sort_values("epsilon")
    assert list(priv["epsilon"]) == [0.9939, 3.998, 8.0]
    assert list(priv["HumanEval"]) == [5, 6, 5.5]
    assert len(df[df["method"] == "DPFT"]) == 1 and len(df) == 5
    figures.main(["--table3", str(t3), "--table5", str(t5), "--out", str(tmp_path / "fig")])
    assert _png_size(tmp_path / "fig" / "privacy_utility.png")[0] > 400
    with pytest.raises(PrivcodeError, match="table5"):
        figures.utility_points(t3, t3)
