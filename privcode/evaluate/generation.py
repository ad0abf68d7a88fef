"""Greedy completions of benchmark tasks, shared by every benchmark of `privcode evaluate`: the
prompts, where a completion stops, completion -> solution, resumable (and sharded) generation and
writing an evaluation directory.

    prompt = task_prompt(task["prompt"], "chat", tokenizer)               # what the model is asked
    outs = completions(model_ref, "humaneval", tasks, "prompt", out, cfg)  # one per task, resumable
    write_results(out, model_ref, "humaneval", cfg, tasks, outs, solutions, score, t0, gen_s)

`cfg` is the stage's EvalConfig (privcode.evaluate.run); the benchmarks (privcode.evaluate.run for
EvalPlus, bigcodebench_eval, openai_humaneval) import this module, never one another.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from privcode import shard
from privcode.errors import PrivcodeError
from privcode.io import ResumableJsonl, atomic_dir, write_json, write_jsonl

INSTRUCTION = "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
STOP = ("```",)  # the response prefix opens the code block; to_solution keeps only what precedes its close
RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:"
BASE = "base"  # a base (non-instruct) model: prompted as EvalPlus's --force-base-prompt does
PROMPT_STYLES = {
    "chat": "instruct: chat template + EvalPlus instruction/response prefixes",
    "qa": "qa: privcode Question/Answer + EvalPlus instruction/response prefixes",
    BASE: "base: the task prompt continued (EvalPlus --force-base-prompt)",
}


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


def _answer(todo, key, done, model_ref, cfg, gen, total, what):
    """Complete `todo` ([(index in the benchmark, task)]) into `done`, one checkpoint per backend call
    (privcode.synth.calls: calls of several batches; batch_size 0: rows from the free GPU memory, fast)."""
    from tqdm import tqdm

    from privcode.synth import SamplingParams, get_backend
    from privcode.synth.calls import in_calls

    backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype,
                          compile_layers=cfg.compile_layers)
    tok = getattr(backend, "tokenizer", None)
    bar = tqdm(total=total, initial=total - len(todo), desc=f"evaluate {what}", unit="task")
    prompts = [task_prompt(t[key], cfg.prompt_format, tok) for _, t in todo]
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop=tuple(gen["stop"]))
    for s, outs in in_calls(backend, prompts, sp, batch_size=cfg.batch_size, streams=[i for i, _ in todo],
                            progress=bar.update):
        for (_, t), o in zip(todo[s:s + len(outs)], outs):
            done.add({"id": t["task_id"], "gen": gen, "raw": o[0]})
    bar.close()


def completions(model_ref: str, benchmark: str, tasks: list[dict], key: str, out: Path, cfg,
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
            todo = [(i, t) for i, t in shard.part(list(enumerate(tasks)), me)
                    if t["task_id"] not in done and t["task_id"] not in seen]
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
        todo = [(i, t) for i, t in enumerate(tasks) if t["task_id"] not in done]
        if todo:
            _answer(todo, key, done, model_ref, cfg, gen, len(tasks), benchmark)
        return [done.done[t["task_id"]]["raw"] for t in tasks]


def write_results(out: Path, model_ref: str, benchmark: str, cfg, tasks: list[dict], outs: list[str],
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
