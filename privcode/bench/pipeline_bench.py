"""`privcode bench pipeline`: unit costs of every stage on this card, and the GPU-hours of one
PrivCode column of a config (privcode.bench.pipeline_plan: counts, assumptions, projection).

    privcode bench pipeline --out benchmarks/bench_pipeline.json                  # GPU: paper shapes
    privcode bench pipeline --assume roundtrip_keep=0.4 --assume answer_tokens=350 --compile
    privcode bench pipeline --early-stop-scores results/.../roundtrip-scores/scores.jsonl  # measured saving
    privcode bench pipeline --shape small --device cpu                             # every code path, CPU
    privcode bench pipeline --from benchmarks/bench_pipeline.json                 # the markdown table again
    privcode bench pipeline --stages stage1,stage6 --out a.json                    # over two runs of one card:
    privcode bench pipeline --with-units a.json --out b.json                       # b: a's units + the others

Units, each measured with the other benches' own machinery (random weights in the published shapes:
junior Qwen2.5-Coder-1.5B, describer Llama-3.1-8B, premium Qwen2.5-Coder-7B; `small` on CPU):

  stage1     one DP step with PrivSA (train_bench `privcode-dp-privsa-eager`, the default since
             privsa_compile is off) on the junior's micro-batch of rows of `record_tokens`:
             seconds per token and per optimizer step, from steps of 1 and K micro-batches
  generate   FastHFBackend greedy tok/s (generate_bench) at generate.batch_size rows (0: the rows the stage
             would size from this card's free memory, as every generation unit with a batch_size of 0)
  exec       sandbox snippets per second per core on realistic snippets (exec_bench, strongest backend)
  roundtrip  FastHFBackend sampling tok/s with the config's n (rows = prompts x n, roundtrip.batch_size
             unless --rt-rows), T and top-p;
             `roundtrip_round` the same with n = the early-stop schedule's first round (one prefill per
             round; pipeline_plan.round_cost fits a round's fixed and per-description cost to the two);
             BERTScore: a random 17-layer roberta-large encoder, seconds per sentence in fp32 and
             (CUDA) with TF32 matmuls; the projection takes roundtrip.scorer_tf32's and shows the other
  stage6     one non-DP LoRA step (`privcode-nondp`) of the premium at finetune.micro_batch_size rows
  evaluate   FastHFBackend greedy tok/s of the premium at evaluate.batch_size rows

Every figure is tagged with its card; on CPU the projection only checks the arithmetic.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from privcode.bench import parser, save_result
from privcode.bench.pipeline_plan import Plan, _h, project, table
from privcode.filters.early_stop import round_sizes

SHAPES = {"paper": {"junior": "1.5b", "describer": "8b", "premium": "7b"},
          "small": {"junior": "small", "describer": "small", "premium": "small"}}
TARGETS = {"gpu_hours": 3.0, "gpu_hours_early_stop": 2.0}  # issue #17, one H200


def _free(device):
    """A unit's GPU memory back before the next: compiled code (dynamo's caches) keeps a runner's buffers
    alive, and a runner and its compiled sampler are a reference cycle."""
    if str(device).startswith("cuda"):
        import torch

        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect()


def train_unit(shape_name, device, variant, seq_len, rows, steps=3, warmup=2, accum=3) -> dict:
    """Seconds per token of micro-batch work and per optimizer step: t(K) = K·t_micro + t_opt."""
    import torch

    from privcode.bench.shapes import get_shape
    from privcode.bench.train_bench import Bench, _time

    shape = replace(get_shape(shape_name), seq_len=seq_len, micro_batch=rows)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    bench = Bench(shape, device, dtype)
    step, cleanup = bench.variant(variant)
    try:
        t1, _ = _time(step, device, warmup, steps, 1)
        tk, _ = _time(step, device, 1, steps, accum)
    finally:
        step = None
        cleanup()
        del bench
        _free(device)
    t_micro = (tk - t1) / (accum - 1)
    if t_micro <= 0:  # timing noise (tiny CPU shapes): all of it micro-batch work
        t_micro = tk / accum
    return {"variant": variant, "shape": f"{shape.name}, {rows} rows x {seq_len} tokens", "t_micro_s": t_micro,
            "t_opt_s": max(0.0, t1 - t_micro), "s_per_token": t_micro / (rows * seq_len)}


def gen_unit(shape_name, device, rows, prompt_len, new, n=1, temperature=0.0, top_p=1.0, compile=False,
             attention="auto") -> dict:
    """FastHFBackend tok/s through `privcode bench generate` (its best backend at `rows` rows)."""
    from privcode.bench import generate_bench

    with tempfile.TemporaryDirectory() as d:
        args = ["--shape", shape_name, "--device", device, "--batches", str(rows), "--peers", "",
                "--prompt-len", str(prompt_len), "--new-tokens", str(new), "--attention", attention,
                "--out", f"{d}/g.json"]
        if temperature > 0:
            args += ["--n", str(n), "--temperature", str(temperature), "--top-p", str(top_p)]
        if compile:  # the compiled backend only: the one a long GPU job would run
            args += ["--compile", "--compiled-only"]
        generate_bench.main(args)
        res = json.loads(Path(d, "g.json").read_text())
    _free(device)
    ok = [r for r in res["results"] if "tok_s" in r]
    if not ok:
        return {"error": next((r["error"] for r in res["results"] if "error" in r), "no result")}
    best = max(ok, key=lambda r: r["tok_s"])
    mode = f"n={n}, T={temperature}, top-p {top_p}" if temperature > 0 else "greedy"
    return {"tok_s": best["tok_s"], "backend": best["backend"], "seconds": best["seconds"],
            "attention": best.get("attention", attention),
            "shape": f"{res['shape']}, {best['batch']} rows, prompt {prompt_len}, {new} new, {mode}"}


def exec_unit(n_snippets, workers) -> dict:
    from privcode.bench import exec_bench
    import privcode.sandbox as sb

    name = sb.get_backend("auto").name
    res = exec_bench.bench([name], workers, 0, n_snippets, False, log=lambda *a: None, modes=("fork-server",),
                           peer=False)
    row = next(r for r in res["rows"] if r["workload"] == "realistic")
    return {"per_core": row["per_core"], "snippets_per_s": row["snippets_per_s"], "ok": row["ok"],
            "shape": f"{name} fork server, {row['n']} taskgen snippets, {workers} workers"}


def score_unit(small, device, batch, tokens, reps=5) -> dict:
    """BERTScore's cost per sentence: the scorer's encoder (roberta-large up to layer 17) in fp32, and on
    CUDA with TF32 matmuls too (roundtrip.scorer_tf32)."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    from privcode.filters.bertscore import matmul_precision

    dims = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=512) if small else \
        dict(hidden_size=1024, num_hidden_layers=17, num_attention_heads=16, intermediate_size=4096, vocab_size=50265)
    cfg = RobertaConfig(max_position_embeddings=tokens + 2 + 1, **dims)
    with torch.device(device):
        model = RobertaModel(cfg).eval()
        ids = torch.randint(3, cfg.vocab_size, (batch, tokens))
    out = {}
    for name, level in (("s_per_sentence", "highest"), ("s_per_sentence_tf32", "high")):
        if level == "high" and not str(device).startswith("cuda"):
            out[name] = None  # no TF32 on CPU
            continue
        with torch.inference_mode(), matmul_precision(level):
            model(input_ids=ids)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                model(input_ids=ids)
            _sync(device)
        out[name] = (time.perf_counter() - t0) / reps / batch
    del model
    _free(device)
    return {**out, "shape": f"{cfg.num_hidden_layers} layers x {cfg.hidden_size}, {batch} sentences x {tokens} tokens"}


def _sync(device):
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def roundtrip_rows(plan: Plan, rt_rows: int | None, small: bool) -> int:
    """The round-trip units' rows: --rt-rows, else the config's roundtrip.batch_size (small shapes on CPU: n)."""
    return rt_rows if rt_rows is not None else (plan.n if small else plan.rt_batch)


def whole_prompts(rows: int, k: int) -> int:
    """`rows` as a stage decodes them with k samples per prompt: whole prompts (at least one); 0 stays 0
    (the backend sizes the rows from the free memory, whole prompts too)."""
    return rows and max(1, rows // k) * k


def _measure(plan: Plan, shapes: dict, device: str, small: bool, a) -> dict:
    """{stage: unit} — a failing unit is recorded, not fatal."""
    rec = 16 if small else plan.record_tokens
    cap = (lambda paper, tiny: tiny) if small else (lambda paper, tiny: paper)  # tiny sizes on CPU
    k = round_sizes(plan.n, plan.early_stop_round)[0]  # the first round's size (round_cost fits the rest)
    rows = roundtrip_rows(plan, a.rt_rows, small)
    jobs = {
        "stage1": lambda: train_unit(shapes["junior"], device, "privcode-dp-privsa-eager", rec,
                                     cap(plan.dp_rows, 2)),
        "generate": lambda: gen_unit(shapes["junior"], device, cap(plan.gen_batch, 2), cap(plan.prompt_tokens, 8),
                                     cap(plan.answer_tokens, 8), compile=a.compile, attention=a.attention),
        "exec": lambda: exec_unit(cap(200, 4), min(plan.exec_workers, os.cpu_count() or 1)),
        "roundtrip": lambda: {**gen_unit(shapes["describer"], device, whole_prompts(rows, plan.n),
                                         cap(plan.describe_prompt_tokens, 8), cap(plan.description_tokens, 8),
                                         plan.n, plan.temperature, plan.top_p, compile=a.compile,
                                         attention=a.attention),
                              **{key.replace("s_per", "score_s_per"): v for key, v in score_unit(
                                  small, device, cap(plan.scorer_batch, 2), cap(min(plan.description_tokens, 510), 8),
                                  cap(5, 1)).items() if key.startswith("s_per")}},
        "roundtrip_round": lambda: {**gen_unit(shapes["describer"], device, whole_prompts(rows, k),
                                               cap(plan.describe_prompt_tokens, 8), cap(plan.description_tokens, 8),
                                               k, plan.temperature, plan.top_p, compile=a.compile,
                                               attention=a.attention), "n": k},
        "stage6": lambda: train_unit(shapes["premium"], device, "privcode-nondp", rec, cap(plan.ft_micro_batch, 2)),
        "evaluate": lambda: gen_unit(shapes["premium"], device, cap(plan.eval_batch, 2),
                                     cap(plan.eval_prompt_tokens, 8), cap(plan.eval_answer_tokens, 8),
                                     compile=a.compile, attention=a.attention),
    }
    units = dict(a.units)
    for stage, job in jobs.items():
        if (a.stages and stage not in a.stages) or stage in units:
            continue
        t0 = time.perf_counter()
        try:
            units[stage] = job()
        except Exception as e:  # noqa: BLE001 - one failing unit must not lose the others
            units[stage] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            _free(device)
        units[stage]["bench_s"] = time.perf_counter() - t0
        print(f"[pipeline] {stage}: {units[stage]}", flush=True)
    return units


def measured_early_stop(scores_path, plan: Plan, tau: float) -> list[float]:
    """Each round's share of programs that an early stop at τ_s with the plan's rounds would have
    described, replayed on a full-n run's scores.jsonl."""
    from privcode.filters.early_stop import rounds_needed
    from privcode.io import read_jsonl

    recs = read_jsonl(scores_path)
    got = [rounds_needed(r, tau, plan.n, plan.early_stop_round) for r in recs]
    return [sum(g > r for g in got) / len(got) for r in range(len(round_sizes(plan.n, plan.early_stop_round)))]


def earlier_units(paths: str | None, device: str) -> dict:
    """The units of earlier `bench pipeline` JSONs (later files win), refused unless they were measured on
    this device's card."""
    from privcode.bench.shapes import device_info

    units, card = {}, device_info(device).get("card")
    for path in filter(None, (paths or "").split(",")):
        try:
            res = json.loads(Path(path).read_text())
            got = res["info"].get("card")
            units.update({k: v for k, v in res["units"].items() if "error" not in v})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"privcode bench pipeline: --with-units {path}: not a bench pipeline JSON ({e})")
        if got != card:
            raise SystemExit(f"privcode bench pipeline: --with-units {path} was measured on {got}, this is {card}")
    return units


def run(a) -> dict:
    from privcode.bench.shapes import device_info

    assume = dict(kv.split("=", 1) for kv in a.assume)
    plan = Plan.from_config(a.config, assume)
    small = a.shape == "small"
    units = _measure(plan, SHAPES[a.shape], a.device, small, a)
    early = None
    if a.early_stop_scores:
        early = measured_early_stop(a.early_stop_scores, plan, plan.tau)
    proj = project(plan, units, early)
    gpu = a.device.startswith("cuda")
    targets = {k: {"value": proj["total"][k], "target": f"<= {v}",
                   "met": None if not gpu or proj["total"][k] is None else proj["total"][k] <= v}
               for k, v in TARGETS.items()}
    return {"info": device_info(a.device), "command": "privcode bench pipeline " + " ".join(a.argv),
            "config": str(a.config), "shapes": SHAPES[a.shape], "plan": plan.describe(), "units": units,
            "projection": proj, "targets": targets}


def main(argv=None) -> None:
    from privcode.synth.decoder import ATTENTION

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("pipeline", __doc__)
    ap.add_argument("--config", default="config/paper.yaml", help="the column's config (counts)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="paper (GPU default) | small (CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                    help="override an assumption (see the table's sources)")
    ap.add_argument("--rt-rows", type=int, default=None, help="round-trip rows per batch (default: the config's "
                    "roundtrip.batch_size, 0 sizing them from the free memory as the stage does; small: n)")
    ap.add_argument("--stages", default=None, help="comma list: measure only these units")
    ap.add_argument("--early-stop-scores", default=None, help="a full-n round-trip scores.jsonl: measure the "
                    "early-stop saving on it instead of the model")
    ap.add_argument("--compile", action="store_true", help="generation units with compiled decode layers (only)")
    ap.add_argument("--attention", default="auto", choices=ATTENTION, help="the generation units' decode "
                    "attention (FastHFBackend's `attention`; auto: its default)")
    ap.add_argument("--with-units", default=None, help="comma list of earlier JSONs of this command on the same "
                    "card: their units are taken, not measured again (a projection measured over several runs)")
    ap.add_argument("--from", dest="src", default=None, help="print the table of an earlier JSON and exit")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_pipeline_<shape>.json)")
    a = ap.parse_args(argv)
    if a.src:
        print(table(json.loads(Path(a.src).read_text())))
        return
    import torch

    a.argv = argv
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.shape = a.shape or ("paper" if a.device.startswith("cuda") else "small")
    a.stages = set(a.stages.split(",")) if a.stages else None
    a.units = earlier_units(a.with_units, a.device)
    res = run(a)
    print("\n" + table(res))
    for k, t in res["targets"].items():
        print(f"target {k} {t['target']}: {t['value']} {'' if t['met'] is None else ('MET' if t['met'] else 'MISSED')}")
    other = res["projection"]["total"].get("other_scorer")
    if other:
        print(f"  with roundtrip.scorer_tf32 {str(other['scorer_tf32']).lower()}: {_h(other['gpu_hours'])} GPU-h, "
              f"{_h(other['gpu_hours_early_stop'])} with early stop")
    save_result(res, a.out or f"benchmarks/bench_pipeline_{a.shape}.json")


if __name__ == "__main__":
    main()
