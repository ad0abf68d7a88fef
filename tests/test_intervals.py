"""#18 item 3: pass@1 intervals over problems in table3/table5 and the paired comparison
(results/compare.csv), against hand-checked numbers, from the evaluators' own per-task files."""
import json
import math

import pandas as pd
import pytest

from conftest import fake_dp_release
from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.io import write_json
from privcode.report import compare, figures, stats, table3, table5

# Ten tasks, one greedy sample each. a passes 0-6 (7/10); b passes 0, 1 and 7 (3/10).
# Discordant pairs: only a passes tasks 2-6 (5), only b passes task 7 (1).
A = {f"t{i}": [int(i < 7)] for i in range(10)}
B = {f"t{i}": [int(i in (0, 1, 7))] for i in range(10)}


def test_wilson_interval_by_hand():
    # Wilson, k = 7 of n = 10, z = 1.959964 (z² = 3.841459): d = 1 + z²/n = 1.384146,
    # centre = (0.7 + z²/2n) / d = 0.892073 / 1.384146 = 0.644492,
    # half-width = z/d * sqrt(0.7 * 0.3 / n + z²/4n²) = 1.416010 * 0.174939 = 0.247714
    # -> [0.396778, 0.892206] (the textbook interval for 7/10: 0.3968-0.8922)
    p, lo, hi, how = stats.interval(A.values())
    assert p == 70.0 and lo == pytest.approx(39.6778, abs=2e-3) and hi == pytest.approx(89.2206, abs=2e-3)
    assert how == stats.WILSON
    # all-pass and all-fail stay inside [0, 100]: 3/3 -> [1 / (1 + z²/3), 1] = [43.85, 100]
    assert stats.interval([[1]] * 3)[1:3] == pytest.approx((100 / (1 + 1.959964 ** 2 / 3), 100.0), abs=1e-3)
    assert stats.interval([[0]] * 3)[1] == 0.0


def test_several_samples_per_task_bootstrap_over_problems():
    per = [[1, 1], [1, 0], [0, 0], [1, 1], [0, 0], [1, 0]]  # per-task rates 1, .5, 0, 1, 0, .5: mean 50
    p, lo, hi, how = stats.interval(per)
    assert p == 50.0 and how == stats.BOOTSTRAP
    # the rates' sd is 0.4472 (population), so a normal interval is 50 ± 1.96 * 44.72 / sqrt(6) = 50 ± 35.8;
    # the percentile bootstrap of a mean of six values lies close to it
    assert 5 <= lo <= 25 and 75 <= hi <= 95
    assert stats.interval([[1, 0]] * 4)[1:3] == (50.0, 50.0)  # no spread over problems: no width


def test_paired_comparison_by_hand():
    r = stats.paired(A, B)
    assert (r["n_tasks"], r["a"], r["b"], r["diff"]) == (10, 70.0, 30.0, 40.0)
    assert (r["only_a"], r["only_b"]) == (5, 1)
    # exact McNemar: 2 * P(X <= 1), X ~ Binomial(6, 1/2) = 2 * (1 + 6) / 64 = 0.21875
    assert r["p_mcnemar"] == pytest.approx(0.21875)
    # per-task differences: +1 five times, -1 once, 0 four times: mean 0.4, population sd sqrt(0.6 - 0.16) = 0.663;
    # a normal interval 40 ± 1.96 * 66.3 / sqrt(10) = 40 ± 41 -> [-1, 81]; the percentile bootstrap's ends are
    # multiples of 10 points next to it
    assert r["diff_lo"] in (-10.0, 0.0, 10.0) and r["diff_hi"] in (70.0, 80.0, 90.0)
    same = stats.paired(A, A)
    assert (same["diff"], same["diff_lo"], same["diff_hi"], same["p_mcnemar"]) == (0.0, 0.0, 0.0, 1.0)
    # only the tasks both were scored on are paired; several samples: no McNemar
    r2 = stats.paired({"t0": [1, 0], "t1": [1, 1], "x": [1, 1]}, {"t0": [0, 0], "t1": [1, 0]})
    assert r2["n_tasks"] == 2 and r2["diff"] == 50.0 and math.isnan(r2["p_mcnemar"])
    with pytest.raises(PrivcodeError, match="share no task"):
        stats.paired({"a": [1]}, {"b": [1]})


def _eval(root, model_dir, method, tag, per_task, bench="humaneval", plus=None):
    """An evaluation directory as `privcode evaluate` leaves it, with EvalPlus's per-sample file."""
    d = root / "results" / "eval" / "m" / method / tag / bench
    plus = plus or per_task
    rows = {t: [{"base_status": "pass" if ok else "fail", "plus_status": "pass" if pk else "fail"}
                for ok, pk in zip(per_task[t], plus[t])] for t in per_task}
    write_json(d / "evaluator" / "evalplus_eval_results.json", {"eval": rows})
    base = 100 * sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
    both = 100 * sum(sum(a and b for a, b in zip(per_task[t], plus[t])) / len(plus[t]) for t in per_task) / len(per_task)
    write_json(d / "scores.json", {"base_pass@1": base, "plus_pass@1": both, "prompt_format": "chat"})
    ledger.derive(d, stage="evaluate", parents=[str(model_dir)], benchmark=bench)
    return str(d)


@pytest.fixture
def evals(tmp_path):
    pub = tmp_path / "pre"
    ledger.derive(pub, stage="build_model")
    dp = tmp_path / "dp"
    fake_dp_release(dp, 4.0, 1e-5)
    plus_b = {t: [0] for t in B}
    return {"PrivCode": _eval(tmp_path, dp, "PrivCode", "eps4", A),
            "DPFT": _eval(tmp_path, dp, "DPFT", "eps4", B, plus=plus_b),
            "PreCode": _eval(tmp_path, pub, "PreCode", "base", B)}


def test_table3_and_table5_carry_the_intervals(evals, tmp_path):
    df = table3.build(list(evals.values()))
    assert list(df.columns) == ["model", "method", "epsilon", "delta", "prompt", "HumanEval", "HumanEval_lo",
                                "HumanEval_hi", "HumanEval+", "HumanEval+_lo", "HumanEval+_hi", "note"]
    pc = df.set_index("method").loc["PrivCode"]
    assert (pc["HumanEval"], pc["prompt"]) == (70.0, "chat")
    assert (pc["HumanEval_lo"], pc["HumanEval_hi"]) == pytest.approx((39.6778, 89.2206), abs=2e-3)
    dpft = df.set_index("method").loc["DPFT"]
    assert dpft["HumanEval+"] == 0.0 and dpft["HumanEval+_lo"] == 0.0 and dpft["HumanEval+_hi"] > 0
    t5 = table5.build([f"ablation=none:{evals['PrivCode']}", f"ablation=no_privsa:{evals['DPFT']}"])
    assert list(t5["value"]) == ["no_privsa", "none"] and "HumanEval_lo" in t5.columns
    assert t5.set_index("value").loc["none", "HumanEval_hi"] == pytest.approx(89.2206, abs=2e-3)
    # an evaluation without per-task results still has its score, with no interval
    bare = tmp_path / "results" / "eval" / "m" / "NonDPFT" / "inf" / "humaneval"
    write_json(bare / "scores.json", {"base_pass@1": 50.0, "plus_pass@1": 40.0})
    ledger.derive(bare, stage="evaluate")
    row = table3.build([str(bare)]).iloc[0]
    assert row["HumanEval"] == 50.0 and math.isnan(row["HumanEval_lo"])
    # the figure reads the interval columns as error bars, not as metrics of their own
    csv = tmp_path / "t3.csv"
    df.to_csv(csv, index=False)
    figures.privacy_utility(csv, tmp_path / "pu.png")
    assert (tmp_path / "pu.png").stat().st_size > 1000


def test_compare_pairs_privcode_with_dpft_and_precode(evals, tmp_path):
    out = tmp_path / "compare.csv"
    compare.main(["--out", str(out), *evals.values()])
    df = pd.read_csv(out)
    assert list(zip(df["baseline"], df["column"])) == [("DPFT", "HumanEval"), ("DPFT", "HumanEval+"),
                                                       ("PreCode", "HumanEval"), ("PreCode", "HumanEval+")]
    h = df[(df["baseline"] == "DPFT") & (df["column"] == "HumanEval")].iloc[0]
    assert (h["tag"], h["baseline_tag"], h["epsilon"], h["n_tasks"]) == ("eps4", "eps4", 4.0, 10)
    assert (h["privcode"], h["baseline_score"], h["diff"], h["only_privcode"], h["only_baseline"]) == \
        (70.0, 30.0, 40.0, 5, 1)
    assert h["p_mcnemar"] == pytest.approx(0.21875, rel=1e-3)  # the CSV keeps 4 significant digits
    plus = df[(df["baseline"] == "DPFT") & (df["column"] == "HumanEval+")].iloc[0]
    # DPFT passes no plus test: PrivCode alone solves its 7; 2 * 0.5^7 = 0.015625
    assert (plus["only_privcode"], plus["only_baseline"]) == (7, 0) and plus["p_mcnemar"] == pytest.approx(0.015625, rel=1e-3)
    with pytest.raises(PrivcodeError, match="no PrivCode evaluation"):
        compare.build([evals["DPFT"], evals["PreCode"]])


def test_outcomes_read_each_evaluators_own_file(tmp_path):
    d = tmp_path / "bcb"
    write_json(d / "evaluator" / "bigcodebench_eval_results.json",
               {"eval": {"B/0": [{"status": "pass"}, {"status": "fail"}], "B/1": [{"status": "fail"}]}})
    assert stats.outcomes(d) == {"pass": {"B/0": [1, 0], "B/1": [0]}}
    h = tmp_path / "he"
    write_json(h / "evaluator" / "humaneval_eval_results.json", {"eval": {"H/0": [{"base_status": "pass"}]}})
    assert stats.outcomes(h) == {"base": {"H/0": [1]}}
    assert stats.outcomes(tmp_path / "none") == {}
    bad = tmp_path / "bad"
    (bad / "evaluator").mkdir(parents=True)
    (bad / "evaluator" / "evalplus_eval_results.json").write_text(json.dumps({"no": 1}))
    with pytest.raises(PrivcodeError, match="evalplus_eval_results.json"):
        stats.outcomes(bad)
