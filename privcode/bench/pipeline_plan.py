"""The work of one PrivCode column of a config, and its GPU-hours from measured unit costs.

    from privcode.bench.pipeline_plan import Plan, project, table
    plan = Plan.from_config("config/paper.yaml", {"roundtrip_keep": 0.4})
    proj = project(plan, units)     # units: what privcode.bench.pipeline_bench measures
    print(table({"plan": plan.describe(), "units": units, "projection": proj}))

Counts come from the config (steps, batch sizes, n, token caps, benchmarks, workers); what a config
cannot say (data sizes, mean lengths, pass and keep rates) is an assumption with its source, each
overridable (`privcode bench pipeline --assume key=value`). One column = stage 1 (DP + PrivSA on
the junior), generation, the exec filter, the round trip, stage 6 (one premium model) and its
evaluation. GPU-hours are one card's seconds of work; a job on N GPUs costs its scaling loss on top
(measured per stage in docs/scaling.md). Merges, model loads and the tests' execution inside the
evaluations are not counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from privcode.filters.early_stop import mean_descriptions, reach_probabilities, round_sizes, schedule_name

# task counts of the benchmarks (EvalPlus HumanEval+ / MBPP+ v0.2, BigCodeBench v0.1 full / hard)
TASKS = {"humaneval": 164, "mbpp": 378, "bigcodebench-complete-full": 1140, "bigcodebench-complete-hard": 148,
         "bigcodebench-instruct-full": 1140, "bigcodebench-instruct-hard": 148}
SOURCES = {  # where each assumption comes from (printed with it)
    "dataset_records": "Magicoder-OSS-Instruct-75K (Hugging Face dataset card: 75,197 rows)",
    "exec_pass": "issue #17: ~39k of ~55.6k generated programs run cleanly",
    "roundtrip_keep": "guess: share of programs whose best description reaches τ (and τ_s)",
    "stop_pass_p": "guess: chance that one description of a kept program reaches τ_s (measured 0.09 at keep 0.5 "
                   "for SmolLM2-135M on HumanEval, scripts/early_stop_reach.py: --assume stop_pass_p=0.09)",
    "record_tokens": "estimate: Magicoder problem + solution in the Qwen tokenizer (stage 1 and 6 rows)",
    "prompt_tokens": "estimate: a public prompt in the generation format",
    "answer_tokens": "estimate: mean junior answer (the config's max_new_tokens caps it; EOS ends it)",
    "describe_prompt_tokens": "issue #17's measurement shape: describe prompt with the program's code",
    "description_tokens": "config roundtrip.max_new_tokens: every description runs to the cap (upper bound)",
    "eval_prompt_tokens": "estimate: EvalPlus / BigCodeBench prompt",
    "eval_answer_tokens": "estimate: greedy completion stopped at the closing code fence",
}


# early-stop schedules the projection compares (n = 20; others scale): even rounds, and a first round
# then the rest in one (each round prefills the program's prompt again, privcode.filters.early_stop)
SCHEDULES = (1, 2, 4, 5, 10, (2, 18), (4, 16), (5, 15), (10, 10), (5, 5, 10), (2, 4, 14))


def default_schedule(n: int):
    """The projection's early stop where the config sets none: a first round of n/4, then the rest
    (fewest prefills for the share that passes early; the candidates' table shows the others)."""
    first = max(1, n // 4)
    return [first, n - first] if first < n else n


def candidate_schedules(n: int) -> list:
    """SCHEDULES scaled to n (round sizes x n/20, summing to n), each once."""
    out = []
    for k in SCHEDULES:
        if isinstance(k, int):
            c = max(1, round(k * n / 20))
            c = c if c < n else None
        else:
            c = [max(1, round(m * n / 20)) for m in k[:-1]]
            c = c + [n - sum(c)] if sum(c) < n else None
        if c is not None and round_sizes(n, c) not in [round_sizes(n, x) for x in out]:
            out.append(c)
    return out


@dataclass
class Plan:
    dp_steps: int
    dp_batch: int                # expected (Poisson) batch of stage 1
    ft_epochs: float
    ft_batch: int
    n: int                       # descriptions per program
    early_stop_round: int | list  # the early-stop projection's rounds (config, else default_schedule)
    tau: float                   # roundtrip.threshold (a measured early stop replays at it)
    benchmarks: list
    exec_workers: int
    private_fraction: float
    answer_cap: int              # generate.max_new_tokens
    dp_micro_batch: int          # junior's rows cap per DP micro-batch
    dp_micro_tokens: int         # junior's padded-token budget per DP micro-batch (0: none)
    ft_micro_batch: int
    gen_batch: int               # rows per batch of each generation stage (0: the backend sizes them from memory)
    eval_batch: int
    rt_batch: int
    temperature: float
    top_p: float
    scorer_batch: int
    scorer_tf32: bool            # roundtrip.scorer_tf32: which measured BERTScore cost the projection takes
    dataset_records: int = 75_197
    exec_pass: float = 0.70
    roundtrip_keep: float = 0.5
    stop_pass_p: float = 0.3
    record_tokens: int = 450
    prompt_tokens: int = 160
    answer_tokens: int = 400
    describe_prompt_tokens: int = 400
    description_tokens: int = 200
    eval_prompt_tokens: int = 200
    eval_answer_tokens: int = 300
    overridden: list = field(default_factory=list)

    @classmethod
    def from_config(cls, path, assume: dict | None = None) -> "Plan":
        """The counts of the config at `path` as the workflow reads them (privcode.config): each
        stage's section over its option class's defaults, the schema's defaults for the workflow's keys."""
        from privcode.config import load_config, stage_options
        from privcode.data.records import prepare
        from privcode.evaluate.run import EvalConfig
        from privcode.filters.roundtrip import RoundTripConfig
        from privcode.synth.generate import GenerateConfig
        from privcode.train import TrainConfig

        c = load_config(path)
        dp = stage_options(TrainConfig, c["dp_finetune"], c["models"][c["junior"]].get("dp_finetune", {}))
        ft = stage_options(TrainConfig, c["finetune"])
        rt, gen = stage_options(RoundTripConfig, c["roundtrip"]), stage_options(GenerateConfig, c["generate"])
        data = {**prepare.__kwdefaults__, **c["data"]}  # prepare-data's options: its keyword arguments
        plan = cls(dp_steps=dp.steps, dp_batch=dp.batch_size, ft_epochs=ft.epochs, ft_batch=ft.batch_size,
                   n=rt.n, early_stop_round=rt.early_stop_round or default_schedule(rt.n), tau=rt.threshold,
                   benchmarks=list(c["evaluate"]["benchmarks"]), exec_workers=c["exec_filter"]["workers"],
                   private_fraction=data["private_fraction"], answer_cap=gen.max_new_tokens,
                   dp_micro_batch=dp.micro_batch_size, dp_micro_tokens=dp.micro_batch_tokens,
                   ft_micro_batch=ft.micro_batch_size, gen_batch=gen.batch_size,
                   eval_batch=stage_options(EvalConfig, c["evaluate"]).batch_size, rt_batch=rt.batch_size,
                   temperature=rt.temperature, top_p=rt.top_p, scorer_batch=rt.scorer_batch_size,
                   scorer_tf32=rt.scorer_tf32, description_tokens=rt.max_new_tokens)
        plan.answer_tokens = min(plan.answer_tokens, plan.answer_cap)
        for k, v in (assume or {}).items():
            if k not in SOURCES:
                raise SystemExit(f"--assume {k}: unknown (choose from {sorted(SOURCES)})")
            setattr(plan, k, type(getattr(plan, k))(v))
            plan.overridden.append(k)
        return plan

    # derived counts
    @property
    def dp_rows(self) -> int:
        """Rows of `record_tokens` in one stage-1 micro-batch (token budget, then the row cap)."""
        cap = self.dp_micro_tokens // self.record_tokens if self.dp_micro_tokens else self.dp_micro_batch
        return max(1, min(self.dp_micro_batch, cap))

    @property
    def prompts(self) -> int:
        return round(self.dataset_records * (1 - self.private_fraction))

    @property
    def programs(self) -> int:
        return round(self.prompts * self.exec_pass)

    @property
    def kept(self) -> int:
        return round(self.programs * self.roundtrip_keep)

    @property
    def eval_tasks(self) -> int:
        return sum(TASKS.get(b, 0) for b in self.benchmarks)

    def reach(self, schedule=None) -> list[float]:
        """Chance that a program gets each round of `schedule` (default the plan's), under the model."""
        k = self.early_stop_round if schedule is None else schedule
        return reach_probabilities(self.n, k, self.roundtrip_keep, self.stop_pass_p)

    def descriptions_early_stop(self) -> float:
        return mean_descriptions(self.n, self.early_stop_round, self.reach())

    def describe(self) -> dict:
        d = asdict(self)
        d.update(prompts=self.prompts, programs=self.programs, kept=self.kept, eval_tasks=self.eval_tasks,
                 descriptions_per_program_early_stop=self.descriptions_early_stop(),
                 sources={k: ("--assume " if k in self.overridden else "") + SOURCES[k] for k in SOURCES})
        return d


def round_cost(plan: Plan, units: dict) -> tuple[float, float] | None:
    """(seconds per round, seconds per description) of the describer for one program: a line through
    the two measured round trips (all n at once, and the first round's size), exact at both — the
    first term is the round's fixed cost (its prompt's prefill), the second the decoding; the fixed
    cost is clamped at 0 (noise). None without both units."""
    full, part = units.get("roundtrip") or {}, units.get("roundtrip_round") or {}
    if not full.get("tok_s") or not part.get("tok_s"):
        return None
    n, k, tok = plan.n, part.get("n", round_sizes(plan.n, plan.early_stop_round)[0]), plan.description_tokens
    a, b = n * tok / full["tok_s"], k * tok / part["tok_s"]  # seconds per program, round of n / of k
    if k == n:
        return 0.0, a / n
    per = (a - b) / (n - k)
    fixed = a - n * per
    return (fixed, per) if fixed >= 0 else (0.0, a / n)


def score_cost(plan: Plan, units: dict) -> float | None:
    """BERTScore seconds per sentence at the plan's scorer precision (None: not measured)."""
    return (units.get("roundtrip") or {}).get("score_s_per_sentence_tf32" if plan.scorer_tf32 else
                                              "score_s_per_sentence")


def early_stop_seconds(plan: Plan, units: dict, schedule=None, reach: list | None = None) -> float | None:
    """Round-trip seconds for all programs with early stop in rounds of `schedule` (default the plan's):
    each round reached costs its prefill, its decoding and its scoring (its descriptions and the
    problem once). `reach`: each round's share of programs (default the plan's model)."""
    cost, sc = round_cost(plan, units), score_cost(plan, units)
    if cost is None or sc is None:
        return None
    sizes = round_sizes(plan.n, plan.early_stop_round if schedule is None else schedule)
    reach = plan.reach(schedule) if reach is None else reach
    return plan.programs * sum(q * (cost[0] + m * cost[1] + (m + 1) * sc) for q, m in zip(reach, sizes))


def project(plan: Plan, units: dict, early_stop_reach: list | None = None, alternatives: bool = True) -> dict:
    """Seconds of one card per stage ({stage: {"work", "seconds", "gpu_hours"[, early stop]}}) from
    `units` (privcode.bench.pipeline_bench); None where a unit failed. `early_stop_reach`: each round's
    measured share of programs (a replay, `measured_early_stop`; else the plan's model). With
    `alternatives`, total["other_scorer"] is the column with the other BERTScore precision where measured."""
    out: dict = {}

    def get(stage, key):
        return (units.get(stage) or {}).get(key)

    def put(stage, work, seconds, **extra):
        out[stage] = {"work": work, "seconds": seconds,
                      "gpu_hours": None if seconds is None else seconds / 3600, **extra}

    s = get("stage1", "s_per_token")
    put("stage1", f"{plan.dp_steps} DP steps x {plan.dp_batch} records x {plan.record_tokens} tokens",
        None if s is None else plan.dp_steps * (plan.dp_batch * plan.record_tokens * s + get("stage1", "t_opt_s")))
    t = get("generate", "tok_s")
    put("generate", f"{plan.prompts} prompts x {plan.answer_tokens} new tokens",
        None if not t else plan.prompts * plan.answer_tokens / t)
    r = get("exec", "per_core")
    cpu = None if not r else plan.prompts / r
    out["exec"] = {"work": f"{plan.prompts} programs in the sandbox", "seconds": 0.0, "gpu_hours": 0.0,
                   "cpu_core_hours": None if cpu is None else cpu / 3600,
                   "wall_hours": None if cpu is None else cpu / plan.exec_workers / 3600}
    t, sc = get("roundtrip", "tok_s"), score_cost(plan, units)
    desc = plan.programs * plan.n
    put("roundtrip", f"{plan.programs} programs x {plan.n} x {plan.description_tokens} tokens",
        None if not t or sc is None else desc * plan.description_tokens / t + desc * (1 + 1 / plan.n) * sc)
    reach = plan.reach() if early_stop_reach is None else early_stop_reach
    es = early_stop_seconds(plan, units, reach=reach)
    cost = round_cost(plan, units)
    out["roundtrip"].update(
        early_stop_schedule=schedule_name(plan.n, plan.early_stop_round),
        descriptions_per_program_early_stop=mean_descriptions(plan.n, plan.early_stop_round, reach),
        rounds_per_program_early_stop=sum(reach),
        early_stop_source="measured" if early_stop_reach is not None else "model",
        seconds_early_stop=es, gpu_hours_early_stop=None if es is None else es / 3600,
        round_s_per_program=None if cost is None else cost[0], describe_s_per_description=None if cost is None
        else cost[1],
        schedules={schedule_name(plan.n, k): {
            "rounds": k, "descriptions": mean_descriptions(plan.n, k, plan.reach(k)),
            "rounds_per_program": sum(plan.reach(k)),
            "gpu_hours": None if (x := early_stop_seconds(plan, units, k)) is None else x / 3600}
            for k in candidate_schedules(plan.n)})
    s = get("stage6", "s_per_token")
    recs = plan.ft_epochs * plan.kept
    put("stage6", f"{plan.ft_epochs:g} epochs x {plan.kept} records x {plan.record_tokens} tokens",
        None if s is None else recs * plan.record_tokens * s + recs / plan.ft_batch * get("stage6", "t_opt_s"))
    t = get("evaluate", "tok_s")
    put("evaluate", f"{plan.eval_tasks} tasks x {plan.eval_answer_tokens} new tokens",
        None if not t else plan.eval_tasks * plan.eval_answer_tokens / t)
    gpu = [v["gpu_hours"] for v in out.values()]
    full = None if None in gpu else sum(gpu)
    es_total = None if full is None or out["roundtrip"]["gpu_hours_early_stop"] is None else \
        full - out["roundtrip"]["gpu_hours"] + out["roundtrip"]["gpu_hours_early_stop"]
    out["total"] = {"gpu_hours": full, "gpu_hours_early_stop": es_total,
                    "cpu_core_hours": out["exec"]["cpu_core_hours"]}
    other = replace(plan, scorer_tf32=not plan.scorer_tf32)
    if alternatives and score_cost(other, units) is not None:  # the same column with the other scorer precision
        t = project(other, units, early_stop_reach, alternatives=False)["total"]
        out["total"]["other_scorer"] = {"scorer_tf32": other.scorer_tf32, "gpu_hours": t["gpu_hours"],
                                        "gpu_hours_early_stop": t["gpu_hours_early_stop"]}
    return out


def _h(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def table(res: dict) -> str:
    """Markdown: assumptions, measured units, GPU-hours per stage with and without early stop."""
    p, u, pr = res["plan"], res["units"], res["projection"]
    lines = [f"One PrivCode column of `{res.get('config', '?')}` on {res.get('info', {}).get('card', '?')} "
             f"({res.get('info', {}).get('date', '')}; shapes: {res.get('shapes', '?')})", "",
             "| assumption | value | source |", "|---|---:|---|"]
    lines += [f"| {k} | {p[k]} | {src} |" for k, src in p["sources"].items()]
    lines += [f"| prompts / programs / kept | {p['prompts']} / {p['programs']} / {p['kept']} | derived: "
              f"records x (1 - private_fraction {p['private_fraction']}), x exec_pass, x roundtrip_keep |",
              f"| early stop: descriptions per program | {p['descriptions_per_program_early_stop']:.2f} of {p['n']} "
              f"| model: {schedule_name(p['n'], p['early_stop_round'])}, keep x pass chance (filters.early_stop) |",
              "", "| unit | measured | shape |", "|---|---:|---|"]
    for stage, v in u.items():
        if v.get("error"):
            lines.append(f"| {stage} | failed | {v['error'][:120]} |")
            continue
        val = {k: v[k] for k in ("s_per_token", "t_opt_s", "tok_s", "per_core", "score_s_per_sentence",
                                 "score_s_per_sentence_tf32") if v.get(k) is not None}
        lines.append(f"| {stage} | {', '.join(f'{k} {x:.4g}' for k, x in val.items())} | {v.get('shape', '')} |")
    lines += ["", "| stage | work | GPU-hours | with early stop |", "|---|---|---:|---:|"]
    for stage, v in pr.items():
        if stage == "total":
            continue
        es = v.get("gpu_hours_early_stop", v["gpu_hours"])
        extra = f" (CPU: {_h(v['cpu_core_hours'])} core-hours, {_h(v['wall_hours'])} h on {p['exec_workers']} " \
                "workers)" if stage == "exec" else ""
        lines.append(f"| {stage} | {v['work']}{extra} | {_h(v['gpu_hours'])} | {_h(es)} |")
    t = pr["total"]
    lines.append(f"| **total** | one card | **{_h(t['gpu_hours'])}** | **{_h(t['gpu_hours_early_stop'])}** |")
    if t.get("other_scorer"):
        o = t["other_scorer"]
        lines.append(f"| total, `roundtrip.scorer_tf32: {str(o['scorer_tf32']).lower()}` | BERTScore in "
                     f"{'TF32' if o['scorer_tf32'] else 'fp32'} | {_h(o['gpu_hours'])} | "
                     f"{_h(o['gpu_hours_early_stop'])} |")
    rt = pr["roundtrip"]
    if rt.get("round_s_per_program") is not None:
        lines += ["", f"Round trip with early stop ({rt['early_stop_source']}: {rt['early_stop_schedule']}, "
                  f"{rt['rounds_per_program_early_stop']:.2f} rounds and "
                  f"{rt['descriptions_per_program_early_stop']:.2f} descriptions per program): each round costs "
                  f"{1e3 * rt['round_s_per_program']:.1f} ms per program (its prompt's prefill) + "
                  f"{1e3 * rt['describe_s_per_description']:.1f} ms per description (decoding), "
                  "fitted to the two measured round trips; other schedules under the model:", "",
                  "| schedule | descriptions per program | rounds per program | round trip GPU-hours |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {v['descriptions']:.2f} | {v['rounds_per_program']:.2f} | {_h(v['gpu_hours'])} |"
                  for name, v in rt["schedules"].items()]
    return "\n".join(lines)
