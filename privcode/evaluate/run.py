"""Stage 7: greedy pass@1 of one model on one benchmark, scored by the benchmark's own evaluator.

    privcode evaluate --model results/ft/smollm2/PrivCode/eps4/model --benchmark humaneval \
        --out results/eval/smollm2/PrivCode/eps4/humaneval \
        --params '{"override": "results/data/taskgen/humaneval.jsonl", "prompt_format": "chat"}'

Benchmarks: humaneval, mbpp (EvalPlus: base and plus tests), bigcodebench-{complete,instruct}-{full,hard}
(BigCodeBench, local execution). The prompt follows EvalPlus's instruction/response-prefix format,
rendered in the model's prompt format. Raw generations are kept beside the extracted samples.
The evaluator executes model-written code: EvalPlus/BigCodeBench apply their own rlimits but no
namespace isolation, so run evaluation on a machine that holds no secrets (never the private data).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.params import Params
from privcode.io import atomic_dir, iter_jsonl, write_json, write_jsonl

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
EVALPLUS = ("humaneval", "mbpp")


@dataclass
class EvalConfig(Params):
    _what = "evaluate"
    override: str | None = None    # EvalPlus-format dataset file (HUMANEVAL/MBPP_OVERRIDE_PATH) or BigCodeBench file
    prompt_format: str = "qa"
    backend: str = "hf"
    batch_size: int = 16
    max_new_tokens: int = 384
    limit: int | None = None       # first `limit` tasks only (smoke runs); None = the whole benchmark
    dtype: str = "float32"
    parallel: int | None = None    # evaluator worker processes



def load_tasks(benchmark: str, override: str | None) -> list[dict]:
    """[{task_id, prompt, entry_point}] of an EvalPlus benchmark (override file or EvalPlus's data)."""
    if override:
        return [r for _, r in iter_jsonl(override, required=("task_id", "prompt", "entry_point"))]
    if benchmark == "humaneval":
        from evalplus.data import get_human_eval_plus as get
    else:
        from evalplus.data import get_mbpp_plus as get
    return list(get().values())


def task_prompt(task_prompt_text: str, fmt: str, tok) -> str:
    from privcode.data.prompts import render_prompt

    instr = f"{INSTRUCTION}\n```\n{task_prompt_text.strip()}\n```\n"
    return render_prompt(instr, fmt, tok) + (" " if fmt == "qa" else "") + f"{RESPONSE}\n```python\n"


def to_solution(completion: str, task: dict) -> str:
    code = completion.split("```")[0]
    if f"def {task['entry_point']}" not in code:  # a body completion: append it to the signature prompt
        code = task["prompt"] + code
    return code


def run(model_ref: str, benchmark: str, out: Path, cfg: EvalConfig) -> dict:
    from privcode import ledger

    if benchmark.startswith("bigcodebench"):
        from privcode.evaluate.bigcodebench_eval import run as bcb_run

        return bcb_run(model_ref, benchmark, out, cfg)
    if benchmark not in EVALPLUS:
        raise PrivcodeError(f"unknown benchmark '{benchmark}'")
    from tqdm import tqdm

    from privcode.evaluate.evalplus_eval import score
    from privcode.synth.base import SamplingParams, get_backend

    tasks = load_tasks(benchmark, cfg.override)[: cfg.limit or None]
    t0 = time.time()
    backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype)
    prompts = [task_prompt(t["prompt"], cfg.prompt_format, getattr(backend, "tokenizer", None)) for t in tasks]
    bar = tqdm(total=len(prompts), desc=f"evaluate {benchmark}", unit="task")
    outs = backend.generate(prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens), progress=bar.update)
    bar.close()
    gen_s = time.time() - t0
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "raw.jsonl", ({"task_id": t["task_id"], "raw": o[0]} for t, o in zip(tasks, outs)))
        write_jsonl(tmp / "samples.jsonl",
                    ({"task_id": t["task_id"], "solution": to_solution(o[0], t)} for t, o in zip(tasks, outs)))
        scores = score(tmp / "samples.jsonl", benchmark, cfg.override, tmp / "evaluator", parallel=cfg.parallel)
        result = {"benchmark": benchmark, "model": model_ref, **scores, "generation_seconds": gen_s,
                  "seconds": time.time() - t0, "config": cfg.__dict__}
        write_json(tmp / "scores.json", result)
        ledger.derive(tmp, stage="evaluate", parents=ledger.model_parents(model_ref), benchmark=benchmark)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--benchmark", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON object of EvalConfig fields")
    a = ap.parse_args(argv)
    r = run(a.model, a.benchmark, a.out, EvalConfig.from_dict(json.loads(a.params)))
    print(json.dumps({k: v for k, v in r.items() if k.endswith("pass@1")}))
