"""BigCodeBench pass@1 (greedy) with BigCodeBench's own evaluator and local execution.

    privcode evaluate --model Qwen/Qwen2.5-Coder-7B --benchmark bigcodebench-instruct-hard --out DIR

Install: `pip install --no-deps bigcodebench==0.2.5` plus its light deps (see envs/eval.yaml);
its data is downloaded by BigCodeBench itself unless BIGCODEBENCH_OVERRIDE_PATH names a local
file. Execution is `--execution local`: BigCodeBench's rlimits only, so run it on a machine that
holds no private data.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, write_json, write_jsonl

SPLITS = ("complete", "instruct")
SUBSETS = ("full", "hard")


def parse_name(benchmark: str) -> tuple[str, str]:
    parts = benchmark.split("-")
    if len(parts) != 3 or parts[1] not in SPLITS or parts[2] not in SUBSETS:
        raise PrivcodeError(f"benchmark '{benchmark}' must be bigcodebench-<complete|instruct>-<full|hard>")
    return parts[1], parts[2]


def load_tasks(subset: str, override: str | None) -> dict:
    if override:
        os.environ["BIGCODEBENCH_OVERRIDE_PATH"] = override  # read by bigcodebench.data at import
    try:
        from bigcodebench.data import get_bigcodebench
    except ImportError as e:
        raise PrivcodeError("BigCodeBench is not installed: pip install --no-deps bigcodebench==0.2.5") from e
    return get_bigcodebench(subset=subset)


def run(model_ref: str, benchmark: str, out: Path, cfg) -> dict:
    from privcode.dp import ledger
    from privcode.evaluate.run import task_prompt
    from privcode.synth.base import SamplingParams, get_backend

    split, subset = parse_name(benchmark)
    tasks = list(load_tasks(subset, cfg.override).values())[: cfg.limit or None]
    t0 = time.time()
    backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype)
    key = f"{split}_prompt"
    prompts = [task_prompt(t[key], cfg.prompt_format, getattr(backend, "tokenizer", None)) for t in tasks]
    outs = backend.generate(prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens))
    sols = []
    for t, o in zip(tasks, outs):
        code = o[0].split("```")[0]
        if split == "complete" and f"def {t['entry_point']}" not in code:
            code = t["complete_prompt"] + code
        sols.append({"task_id": t["task_id"], "solution": code})
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "raw.jsonl", ({"task_id": t["task_id"], "raw": o[0]} for t, o in zip(tasks, outs)))
        write_jsonl(tmp / "samples.jsonl", sols)
        env = dict(os.environ, **({"BIGCODEBENCH_OVERRIDE_PATH": cfg.override} if cfg.override else {}))
        cmd = [sys.executable, "-m", "bigcodebench.evaluate", "--split", split, "--subset", subset,
               "--samples", str(tmp / "samples.jsonl"), "--execution", "local", "--pass_k", "1"]
        if cfg.parallel:
            cmd += ["--parallel", str(cfg.parallel)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        (tmp / "evaluator.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise PrivcodeError(f"bigcodebench.evaluate failed (exit {proc.returncode}); see evaluator.log", path=out)
        pk = next(tmp.glob("*pass_at_k.json"), None)
        if pk is None:
            raise PrivcodeError("bigcodebench wrote no pass_at_k.json", path=out)
        pass1 = 100.0 * float(json.loads(pk.read_text())["pass@1"])
        result = {"benchmark": benchmark, "model": model_ref, "pass@1": pass1, "n_tasks": len(tasks),
                  "seconds": time.time() - t0, "config": cfg.__dict__}
        write_json(tmp / "scores.json", result)
        ledger.derive(tmp, stage="evaluate", parents=ledger.model_parents(model_ref), benchmark=benchmark)
    return result
