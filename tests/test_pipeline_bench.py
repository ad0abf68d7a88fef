"""#17 item 3: `privcode bench pipeline` runs every unit on CPU (small shapes, tiny sizes) and its
projection is the arithmetic of paper.yaml's counts, the stated assumptions and the measured units."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO

slow = pytest.mark.slow  # the measuring run: over ~20 s on 2 cores, `pytest -m 'not slow'` skips it

PAPER = str(REPO / "config" / "paper.yaml")
STAGES = ["stage1", "generate", "exec", "roundtrip", "roundtrip_round", "stage6", "evaluate"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from privcode.bench import pipeline_bench

    out = tmp_path_factory.mktemp("pipe") / "p.json"
    pipeline_bench.main(["--shape", "small", "--device", "cpu", "--config", PAPER, "--out", str(out),
                         "--assume", "roundtrip_keep=0.4"])
    return json.loads(out.read_text()), out


@slow
def test_every_unit_measured_and_the_plan_read_from_the_config(result):
    import yaml

    res, _ = result
    cfg = yaml.safe_load(open(PAPER))
    assert list(res["units"]) == STAGES
    for stage, u in res["units"].items():
        assert "error" not in u, (stage, u)
    for stage in ("stage1", "stage6"):
        assert res["units"][stage]["s_per_token"] > 0 and res["units"][stage]["t_opt_s"] >= 0
    for stage in ("generate", "roundtrip", "roundtrip_round", "evaluate"):
        assert res["units"][stage]["tok_s"] > 0 and res["units"][stage]["backend"].startswith("fast")
    assert res["units"]["exec"]["ok"] == 4 and res["units"]["roundtrip"]["score_s_per_sentence"] > 0
    p = res["plan"]
    assert (p["dp_steps"], p["dp_batch"], p["n"], p["ft_epochs"]) == (
        cfg["dp_finetune"]["steps"], cfg["dp_finetune"]["batch_size"], cfg["roundtrip"]["n"], cfg["finetune"]["epochs"])
    assert p["benchmarks"] == cfg["evaluate"]["benchmarks"] and p["exec_workers"] == cfg["exec_filter"]["workers"]
    assert p["tau"] == cfg["roundtrip"]["threshold"]
    assert p["prompts"] == round(p["dataset_records"] * (1 - cfg["data"]["private_fraction"]))
    assert p["programs"] == round(p["prompts"] * p["exec_pass"]) and p["roundtrip_keep"] == 0.4
    assert p["sources"]["roundtrip_keep"].startswith("--assume") and set(p["sources"]) <= set(p)
    assert p["descriptions_per_program_early_stop"] < p["n"]
    assert res["targets"]["gpu_hours"]["met"] is None  # no verdict from a CPU run


@slow
def test_projection_is_the_arithmetic_of_counts_and_units(result):
    from privcode.filters.early_stop import expected_descriptions, reach_probabilities, round_sizes

    res, _ = result
    p, u, pr = res["plan"], res["units"], res["projection"]
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-9)  # noqa: E731
    s1 = p["dp_steps"] * (p["dp_batch"] * p["record_tokens"] * u["stage1"]["s_per_token"] + u["stage1"]["t_opt_s"])
    assert close(pr["stage1"]["seconds"], s1)
    assert close(pr["generate"]["seconds"], p["prompts"] * p["answer_tokens"] / u["generate"]["tok_s"])
    sc = u["roundtrip"]["score_s_per_sentence"]
    d = p["programs"] * p["n"]
    assert close(pr["roundtrip"]["seconds"],
                 d * p["description_tokens"] / u["roundtrip"]["tok_s"] + d * (1 + 1 / p["n"]) * sc)
    # early stop: each round reached costs a prefill, its decoding and its scoring; the two costs are the
    # line through the two measured round trips (all n in one round; the first round's size k)
    sizes, k = round_sizes(p["n"], p["early_stop_round"]), u["roundtrip_round"]["n"]
    assert sizes == [5, 15] and k == 5  # paper.yaml sets no early stop: a first round of n/4, then the rest
    rt = pr["roundtrip"]
    a, b = p["n"] * p["description_tokens"] / u["roundtrip"]["tok_s"], k * p["description_tokens"] / \
        u["roundtrip_round"]["tok_s"]
    fixed, per = rt["round_s_per_program"], rt["describe_s_per_description"]
    if fixed > 0:
        assert close(fixed + p["n"] * per, a) and close(fixed + k * per, b)
    else:  # a smaller round no cheaper per description: no fixed cost
        assert close(per, a / p["n"])
    reach = reach_probabilities(p["n"], sizes, p["roundtrip_keep"], p["stop_pass_p"])
    assert rt["early_stop_source"] == "model" and close(rt["rounds_per_program_early_stop"], sum(reach))
    assert close(rt["descriptions_per_program_early_stop"], p["descriptions_per_program_early_stop"])
    assert close(rt["descriptions_per_program_early_stop"], sum(q * m for q, m in zip(reach, sizes)))
    assert close(rt["seconds_early_stop"],
                 p["programs"] * sum(q * (fixed + m * per + (m + 1) * sc) for q, m in zip(reach, sizes)))
    assert close(rt["schedules"]["5+15"]["gpu_hours"], rt["gpu_hours_early_stop"])
    assert close(rt["schedules"]["rounds of 5"]["descriptions"], expected_descriptions(
        p["n"], 5, p["roundtrip_keep"], p["stop_pass_p"]))
    recs = p["ft_epochs"] * p["kept"]
    assert close(pr["stage6"]["seconds"], recs * p["record_tokens"] * u["stage6"]["s_per_token"]
                 + recs / p["ft_batch"] * u["stage6"]["t_opt_s"])
    assert close(pr["evaluate"]["seconds"], p["eval_tasks"] * p["eval_answer_tokens"] / u["evaluate"]["tok_s"])
    assert pr["exec"]["gpu_hours"] == 0
    assert close(pr["exec"]["cpu_core_hours"], p["prompts"] / u["exec"]["per_core"] / 3600)
    stages = [s for s in pr if s != "total"]
    assert all(close(pr[s]["gpu_hours"], pr[s]["seconds"] / 3600) for s in stages)
    t = pr["total"]
    assert close(t["gpu_hours"], sum(pr[s]["gpu_hours"] for s in stages))
    assert close(t["gpu_hours_early_stop"],
                 t["gpu_hours"] - pr["roundtrip"]["gpu_hours"] + pr["roundtrip"]["gpu_hours_early_stop"])


@slow
def test_assumptions_and_measured_saving_move_the_projection(result):
    from dataclasses import replace

    from privcode.bench.pipeline_plan import Plan, project

    res, _ = result
    a, b = Plan.from_config(PAPER, {"roundtrip_keep": "0.4"}), Plan.from_config(PAPER, {"roundtrip_keep": "0.2"})
    pa, pb = project(a, res["units"]), project(b, res["units"])
    assert math.isclose(pa["stage6"]["seconds"], res["projection"]["stage6"]["seconds"], rel_tol=1e-9)
    assert math.isclose(pb["stage6"]["seconds"] / pa["stage6"]["seconds"], b.kept / a.kept, rel_tol=1e-9)
    assert pb["roundtrip"]["seconds"] == pa["roundtrip"]["seconds"]  # every program is described n times
    assert pb["roundtrip"]["seconds_early_stop"] > pa["roundtrip"]["seconds_early_stop"]  # fewer stop early
    m = project(a, res["units"], early_stop_reach=[1.0, 1.0])  # a replay where nothing stopped
    assert m["roundtrip"]["early_stop_source"] == "measured"
    assert m["roundtrip"]["seconds_early_stop"] > pa["roundtrip"]["seconds_early_stop"]
    assert m["roundtrip"]["descriptions_per_program_early_stop"] == a.n
    # the other BERTScore precision: none measured on CPU; where measured, the column's other total
    assert "other_scorer" not in pa["total"] and res["units"]["roundtrip"]["score_s_per_sentence_tf32"] is None
    units = {**res["units"], "roundtrip": {**res["units"]["roundtrip"], "score_s_per_sentence_tf32":
                                           res["units"]["roundtrip"]["score_s_per_sentence"] / 4}}
    fast, tf = project(a, units)["total"], project(replace(a, scorer_tf32=True), units)
    assert fast["other_scorer"]["scorer_tf32"] is True
    assert math.isclose(fast["other_scorer"]["gpu_hours"], tf["total"]["gpu_hours"], rel_tol=1e-12)
    assert tf["total"]["gpu_hours"] < fast["gpu_hours"] and tf["total"]["other_scorer"]["scorer_tf32"] is False
    with pytest.raises(SystemExit, match="unknown"):
        Plan.from_config(PAPER, {"record_len": "3"})
    broken = {**res["units"], "generate": {"error": "OOM"}}
    q = project(a, broken)
    assert q["generate"]["gpu_hours"] is None and q["total"]["gpu_hours"] is None


@slow
def test_markdown_table_and_from_json(result, capsys):
    from privcode.bench import pipeline_bench
    from privcode.bench.pipeline_plan import table

    res, out = result
    md = table(res)
    for stage in [s for s in res["projection"] if s != "total"]:
        assert f"| {stage} | " in md
    t = res["projection"]["total"]
    assert f"**{t['gpu_hours']:.3f}**" in md and f"**{t['gpu_hours_early_stop']:.3f}**" in md
    assert "roundtrip_keep | 0.4 | --assume" in md
    for name, v in res["projection"]["roundtrip"]["schedules"].items():
        assert f"| {name} | {v['descriptions']:.2f} | {v['rounds_per_program']:.2f} | {v['gpu_hours']:.3f} |" in md
    capsys.readouterr()
    pipeline_bench.main(["--from", str(out)])
    assert capsys.readouterr().out.strip() == md.strip()


def test_what_a_config_leaves_out_is_what_the_workflow_and_the_stages_would_use(tmp_path):
    """The plan reads a config as the workflow does: the schema's defaults for the workflow's own keys
    (exec_filter.workers), each stage's option class (or prepare's arguments) for the stage's options."""
    import inspect

    import yaml

    from privcode.bench.pipeline_plan import Plan
    from privcode.data.records import prepare
    from privcode.errors import PrivcodeError
    from privcode.filters.roundtrip import RoundTripConfig
    from privcode.synth.generate import GenerateConfig

    cfg = yaml.safe_load(open(PAPER))
    full = Plan.from_config(PAPER)
    del cfg["exec_filter"]["workers"], cfg["generate"]["max_new_tokens"], cfg["generate"]["batch_size"]
    del cfg["data"]["private_fraction"]
    cfg["roundtrip"] = {"model": cfg["roundtrip"]["model"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = Plan.from_config(path)
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert p.exec_workers == schema["properties"]["exec_filter"]["properties"]["workers"]["default"] == 2
    gen, rt = GenerateConfig(), RoundTripConfig()
    assert (p.answer_cap, p.gen_batch, p.rt_batch) == (gen.max_new_tokens, gen.batch_size, rt.batch_size)
    assert (p.n, p.tau, p.temperature, p.top_p, p.scorer_batch, p.description_tokens, p.early_stop_round,
            p.scorer_tf32) == (rt.n, rt.threshold, rt.temperature, rt.top_p, rt.scorer_batch_size, rt.max_new_tokens,
                               [5, 15], rt.scorer_tf32)
    assert p.private_fraction == inspect.signature(prepare).parameters["private_fraction"].default
    assert (p.dp_steps, p.dp_batch, p.benchmarks) == (full.dp_steps, full.dp_batch, full.benchmarks)
    cfg["exec_filter"]["workerz"] = 3
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(PrivcodeError, match=r"c\.yaml.*field 'exec_filter'.*workerz"):
        Plan.from_config(path)


@slow
def test_with_units_takes_earlier_units_and_refuses_another_card(result, tmp_path, capsys):
    """--with-units: a projection measured over two runs of one card has the first run's units as they were
    (not measured again) and the second's; a JSON from another card is refused."""
    from privcode.bench import pipeline_bench

    res, out = result
    first = tmp_path / "first.json"
    units = {k: v for k, v in res["units"].items() if k in ("stage1", "exec", "roundtrip")}
    units["roundtrip"] = {**units["roundtrip"], "score_s_per_sentence_tf32": 1e-4}  # as a CUDA run records
    first.write_text(json.dumps({**res, "units": units}))
    both = tmp_path / "both.json"
    pipeline_bench.main(["--shape", "small", "--device", "cpu", "--config", PAPER, "--with-units", str(first),
                         "--stages", "generate", "--out", str(both)])
    got = json.loads(both.read_text())["units"]
    assert set(got) == {"stage1", "exec", "roundtrip", "generate"}
    assert got["stage1"] == res["units"]["stage1"] and got["exec"] == res["units"]["exec"]  # taken, not re-measured
    # units missing: no totals, and the other scorer's line says so instead of failing
    assert "with roundtrip.scorer_tf32 true: – GPU-h, – with early stop" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**res, "info": {**res["info"], "card": "NVIDIA H200"}}))
    with pytest.raises(SystemExit, match="measured on NVIDIA H200"):
        pipeline_bench.main(["--shape", "small", "--device", "cpu", "--with-units", str(other), "--out", str(both)])


def test_measured_early_stop_replays_each_rounds_share(tmp_path):
    """--early-stop-scores: each round's share of programs an early stop with the plan's rounds would
    have described, replayed on a full run's scores (first passing description index per program)."""
    from privcode.bench.pipeline_bench import measured_early_stop
    from privcode.bench.pipeline_plan import Plan
    from privcode.io import write_jsonl

    plan = Plan.from_config(PAPER)  # rounds 5+15, n = 20
    firsts = [0, 4, 5, 19, None, None, 2, 30]  # index of the first description >= τ (None: none; 30: past n)
    recs = [{"valid": [] if f is None else [{"index": i, "f1": 0.1} for i in range(min(f, 20))]
             + ([{"index": f, "f1": 0.95}] if f < 20 else [])} for f in firsts]
    write_jsonl(tmp_path / "s.jsonl", recs)
    assert measured_early_stop(tmp_path / "s.jsonl", plan, 0.9) == [1.0, 5 / 8]  # 5, 19, none x2, 30 go on
    plan.early_stop_round = 4  # rounds of 4: round r reached unless the first pass is below 4r
    want = [sum(f is None or f >= 4 * r for f in firsts) / 8 for r in range(5)]
    assert measured_early_stop(tmp_path / "s.jsonl", plan, 0.9) == want


def test_fit_pass_p_recovers_the_models_p_and_predicts_its_reach():
    """early_stop.fit_pass_p: first passes drawn from the projection's model (a share `keep` passes, the first
    pass geometric in p within n) give back p, and the model at that p predicts the reach replayed on the draws
    (what scripts/early_stop_reach.py compares with a real run); passes no earlier than uniform give p ~ 0,
    no pass at all 0."""
    import random

    from privcode.filters.early_stop import fit_pass_p, mean_descriptions, reach_probabilities, round_sizes

    rng, n, keep = random.Random(7), 20, 0.5
    for p in (0.05, 0.15, 0.3, 0.6):
        firsts = []
        for _ in range(20_000):
            f = None
            if rng.random() < keep:
                while f is None:  # a geometric first pass, conditioned on one within n
                    f = next((j for j in range(n) if rng.random() < p), None)
            firsts.append(f)
        got = fit_pass_p(firsts, n)
        assert abs(got - p) < 0.1 * p, (p, got)
        sizes = round_sizes(n, [5, 15])
        replay = [sum(f is None or f >= sum(sizes[:r]) for f in firsts) / len(firsts) for r in range(len(sizes))]
        model = reach_probabilities(n, [5, 15], keep, got)
        assert abs(mean_descriptions(n, [5, 15], model) - mean_descriptions(n, [5, 15], replay)) < 0.1
    assert fit_pass_p([j % n for j in range(1000)], n) < 0.01
    assert fit_pass_p([None, None], n) == 0.0


def test_candidate_schedules_scale_to_n_and_are_distinct():
    from privcode.bench.pipeline_plan import candidate_schedules, default_schedule
    from privcode.filters.early_stop import round_sizes

    for n in (4, 8, 20, 40):
        sizes = [round_sizes(n, k) for k in candidate_schedules(n)]
        assert all(sum(s) == n and len(s) >= 2 for s in sizes) and len(set(map(tuple, sizes))) == len(sizes)
        assert round_sizes(n, default_schedule(n)) in sizes
    assert candidate_schedules(20)[:5] == [1, 2, 4, 5, 10] and [5, 15] in candidate_schedules(20)


def test_round_trip_units_decode_the_configs_rows(tmp_path):
    """#17 item 4: the round-trip units decode roundtrip.batch_size rows (paper.yaml: 0, sized from the free
    memory as the stage sizes them; CPU_AUTO_ROWS whole prompts on CPU) unless --rt-rows says otherwise, in
    whole prompts of the unit's n; paper.yaml's generation stages all size their rows from memory."""
    import yaml

    from privcode.bench import pipeline_bench as pb
    from privcode.bench.pipeline_plan import Plan
    from privcode.synth.fast import CPU_AUTO_ROWS

    paper = Plan.from_config(PAPER)
    assert (paper.gen_batch, paper.rt_batch, paper.eval_batch) == (0, 0, 0)
    assert [pb.roundtrip_rows(paper, r, False) for r in (None, 0, 640)] == [0, 0, 640]
    assert pb.roundtrip_rows(paper, None, True) == paper.n  # small shapes on CPU: one program's n
    cfg = yaml.safe_load(open(PAPER))
    cfg["roundtrip"].update(n=4, early_stop_round=[3, 1], batch_size=512)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert pb.roundtrip_rows(Plan.from_config(path), None, False) == 512

    def rows(rt_rows):  # what the first-round unit decoded (its n: the schedule's first round, 3)
        out = tmp_path / "u.json"
        pb.main(["--shape", "small", "--device", "cpu", "--config", str(path), "--stages", "roundtrip_round",
                 "--rt-rows", str(rt_rows), "--out", str(out)])
        u = json.loads(out.read_text())["units"]["roundtrip_round"]
        assert u["n"] == 3 and "error" not in u, u
        return int(u["shape"].split(" rows")[0].rsplit(", ", 1)[1])

    assert rows(0) == CPU_AUTO_ROWS - CPU_AUTO_ROWS % 3 and rows(8) == 6
    assert [pb.whole_prompts(r, 20) for r in (0, 7, 20, 1030)] == [0, 20, 20, 1020]
