"""Stage 3: the DP model answers public prompts (resumable; raw text kept beside the code).

    privcode generate --model results/dp/smollm2/privsa/eps4/model --prompts results/data/public/prompts.jsonl \
        --out results/synth/smollm2/privsa/eps4/generated --params '{"max_new_tokens": 256, "batch_size": 16}'

Post-processing only: the inputs are a DP model and public prompts, so the output inherits the
model's (ε, δ). Progress is appended to a sibling `.<out>.progress.jsonl` after every backend call
(privcode.synth.calls: calls of several batches, `batch_size: 0` sizes a batch from the free GPU memory
with backend fast); a killed run resumes. With `temperature` > 0 prompt i of the input samples from its
own random stream (seed, i): with backend fast the answers for a seed do not depend on the calls, on
resuming or on sharding.
With several GPUs in CUDA_VISIBLE_DEVICES (`privcode gpu-run --gpus N`), one process per GPU answers its
slice of the prompts and the results are merged in prompt order (privcode.shard; `shards` below).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from privcode import shard
from privcode.data.prompts import extract_code, render_prompt
from privcode.errors import PrivcodeError
from privcode.params import Params, parse_params
from privcode.io import ResumableJsonl, atomic_dir, iter_jsonl, write_json, write_jsonl


@dataclass
class GenerateConfig(Params):
    _what = "generate"
    backend: str = "hf"            # hf | fast | vllm | auto
    batch_size: int = 16           # rows per batch (CPU: ~90 tok/s at 32 for 135M); 0: from GPU memory (fast)
    max_new_tokens: int = 256
    temperature: float = 0.0       # greedy by default: one answer per prompt
    prompt_format: str = "qa"
    limit: int | None = None       # answer only the first `limit` prompts (demo budget)
    dtype: str = "float32"
    seed: int = 0
    shards: int = 0                # processes, one per GPU: 0 = one per device in CUDA_VISIBLE_DEVICES
    compile_layers: bool = False   # backend fast: torch.compile of the decoder layers, shared by all of them (others refuse it)



def _answer(todo: list[tuple[int, dict]], done: ResumableJsonl, model_ref: str, cfg: GenerateConfig,
            total: int) -> None:
    """Answer `todo` ([(index in the input, prompt record)]) into `done`, one checkpoint per call."""
    from tqdm import tqdm

    from privcode.synth import SamplingParams, get_backend
    from privcode.synth.calls import in_calls

    backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype,
                          compile_layers=cfg.compile_layers)
    tok = getattr(backend, "tokenizer", None)
    sp = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    bar = tqdm(total=total, initial=total - len(todo), desc="generate", unit="prompt")
    prompts = [render_prompt(r["problem"], cfg.prompt_format, tok) for _, r in todo]
    for s, texts in in_calls(backend, prompts, sp, batch_size=cfg.batch_size, streams=[i for i, _ in todo],
                             progress=bar.update):
        for (_, r), t in zip(todo[s:s + len(texts)], texts):
            done.add({"id": r["id"], "problem": r["problem"], "lang": r.get("lang", "python"), "raw": t[0]})
    bar.close()


def run(model_ref: str, prompts_path: str, out: Path, cfg: GenerateConfig, shard_spec: str | None = None) -> dict:
    from privcode import ledger

    prompts = [r for _, r in iter_jsonl(prompts_path, required=("id", "problem"))]
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise PrivcodeError("no prompts", path=prompts_path)
    t0 = time.time()
    me = shard.parse(shard_spec)
    if me is not None:  # a child: answer this slice into its own progress file, write no output
        mine, seen = shard.child_progress(out, me)
        with ResumableJsonl(mine, key="id") as done:
            todo = [(i, r) for i, r in shard.part(list(enumerate(prompts)), me)
                    if r["id"] not in done and r["id"] not in seen]
            if todo:
                _answer(todo, done, model_ref, cfg, len(todo))
        return {"prompts": len(todo), "shard": shard_spec}
    progress = out.parent / f".{out.name}.progress.jsonl"
    n = shard.count(cfg.shards)
    if n > 1:
        shard.spawn("generate", ["--model", model_ref, "--prompts", str(prompts_path), "--out", str(out),
                                 "--params", json.dumps(cfg.__dict__)], n)
    with ResumableJsonl(progress, key="id") as done:
        for f in shard.progress_files(out):
            if f != progress:
                with ResumableJsonl(f, key="id") as other:
                    done.done.update(other.done)
        todo = [(i, r) for i, r in enumerate(prompts) if r["id"] not in done]
        if todo:
            _answer(todo, done, model_ref, cfg, len(prompts))
        results = [done.done[r["id"]] for r in prompts]
    samples = [{**r, "code": extract_code(r["raw"], r["lang"])} for r in results]
    seconds = time.time() - t0
    stats = {"prompts": len(prompts), "with_code": sum(s["code"] is not None for s in samples),
             "seconds": seconds, "processes": n, "config": cfg.__dict__, "model": model_ref}
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "raw.jsonl", results)
        write_jsonl(tmp / "samples.jsonl", samples)
        write_json(tmp / "stats.json", stats)
        ledger.derive(tmp, stage="generate", parents=ledger.model_parents(model_ref) + [str(Path(prompts_path).parent)])
    shard.remove_progress(out)
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="public prompts JSONL (id, problem, lang)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON object of GenerateConfig fields")
    ap.add_argument("--shard", help="i/n: answer prompts i, i+n, ... into a progress file (what `shards` starts)")
    a = ap.parse_args(argv)
    stats = run(a.model, a.prompts, a.out, parse_params(a.params, GenerateConfig), a.shard)
    if a.shard is None:
        print(json.dumps({k: stats[k] for k in ("prompts", "with_code", "processes")}))
