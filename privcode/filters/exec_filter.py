"""Execution filter: keep only generated samples whose code runs to exit status 0 in the sandbox.

    privcode exec-filter --input results/synth/smollm2/privsa/eps4/generated/samples.jsonl \
        --out results/synth/smollm2/privsa/eps4/exec --workers 2 --params '{"backend": "auto", "wall_s": 10}'
    privcode exec-filter --help                     # every option (ExecFilterConfig fields in --params)

Input: JSONL of generated samples, each with `id` (string or integer, unique), `problem`, `lang`
(field name `lang_field`) and either ready `code` (field `code_field`, default "code") or the model
output `raw`, from which the code is taken with `privcode.data.prompts.extract_code`.

Output directory (appears atomically, complete or not at all):
  kept.jsonl     {id, problem, solution ("```lang\\n<code>\\n```"), code, lang}
  dropped.jsonl  {id, lang, reason, detail, returncode, phase, stderr_tail}; reason is one of
                 DROP_REASONS: no_code, syntax_error (does not parse / compile), error (other
                 non-zero exit), timeout (wall or CPU limit), output_limit, oom (memory limit: the
                 sandbox's cgroup or RLIMIT_AS), disk_limit (tmpfs full, file size limit),
                 background_process (processes left running when the program ended), killed (a
                 signal, or the sandbox worker died), toolchain_missing (privcode.sandbox.classify)
  stats.json     counts per reason, per language and per (language, reason), throughput, backend,
                 isolation level, cgroup (what bounds a sandbox as a whole: v1, v2 or none), fork
                 server (on/off, worker restarts), the toolchains seen
  privacy.json   post-processing of the input directory's artifact (ledger.derive) when the sandbox
                 is certified (`certify`); ε = inf when an unisolated backend was accepted

Resumable: per-sample results go to `<out>.progress.jsonl` beside the output directory (keyed by
id, with a fingerprint of code, language, limits and backend, so changed inputs are re-run) and
the file is deleted on success. If no sample is kept, `<out>.dropped.jsonl` and `<out>.stats.json`
are written beside the (not created) output directory and PrivcodeError is raised.

Speed: by default (`fork_server=True`) `workers` long-lived sandboxes each run a fork server
(privcode.sandbox.server) that forks one child per sample -- no sandbox or interpreter start per
sample; `fork_server=False` starts one sandbox per sample (see docs/sandbox.md for both).
The language of a sample is its record's `lang` field (aliases such as py, c++, ts, c# accepted).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import json
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, fields
from pathlib import Path

from tqdm import tqdm

from privcode.data.prompts import extract_code
from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.io import ResumableJsonl, atomic_dir, iter_jsonl, write_json, write_jsonl
from privcode.params import Params, parse_params
from privcode.langs import canonical_lang
from privcode.sandbox import BACKENDS, get_backend
from privcode.sandbox import base as sb
from privcode.sandbox.base import Backend, Limits, RunResult, is_syntax_error

STAGE = "exec_filter"
STDERR_TAIL = 1000
# results that say something about this machine rather than the sample: never cached for resume
_NOT_CACHED = {"toolchain_missing"}


def sibling(out_dir: Path, suffix: str) -> Path:
    return out_dir.parent / (out_dir.name + suffix)


DROP_REASONS = ("no_code", "syntax_error", "error", "timeout", "output_limit", "oom", "disk_limit",
                "background_process", "killed", "toolchain_missing")


def reason_for(result: RunResult, lang: str) -> str | None:
    """None for a kept sample, else the drop reason (one of DROP_REASONS)."""
    if result.status == "ok":
        return None
    if result.status == "error":
        return "syntax_error" if is_syntax_error(result, lang) else "error"
    return result.status


def _fingerprint(code, lang: str, limits: Limits, backend: Backend) -> str:
    blob = json.dumps([code, lang, limits.as_dict(), backend.name], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _code_of(rec: dict, lang: str, code_field: str | None):
    cf_name = code_field or "code"
    code = rec.get(cf_name)
    if isinstance(code, str):
        return code if code.endswith("\n") or not code else code + "\n"
    return extract_code(rec.get("raw"), lang)


def _validated(in_path: Path, lang_field: str, code_field: str | None):
    """Yield (lineno, record) after checking fields; raises PrivcodeError on the first bad line."""
    seen = set()
    for lineno, rec in iter_jsonl(in_path, required=("problem", lang_field)):
        rid = rec.get("id")
        if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise PrivcodeError("missing or invalid id (need a string or an integer)", path=in_path,
                                line=lineno, field="id")
        if rid in seen:
            raise PrivcodeError(f"duplicate id {rid!r}", path=in_path, line=lineno, field="id")
        seen.add(rid)
        if not isinstance(rec.get(code_field or "code"), str) and not isinstance(rec.get("raw"), str):
            raise PrivcodeError(f"needs a string 'raw' (model output) or '{code_field or 'code'}'",
                                path=in_path, line=lineno, field="raw")
        yield lineno, rec


def run(in_path, out_dir, *, backend="auto", require_isolation: bool = False, limits: Limits | None = None,
        workers: int = 2, lang_field: str = "lang", code_field: str | None = None,
        progress: bool = True, fork_server: bool = True, accept_unisolated: bool = False) -> dict:
    """Run every sample in the sandbox and keep those that exit 0. Returns the stats dict.
    `fork_server`: run on `workers` fork-server sandboxes (falls back, with a note on stderr, to
    one sandbox per sample where the sandbox has no python for the server).

    Privacy: the output is post-processing of the input (same ε) only when the sandbox cannot
    reach private data — an isolating backend (`sb.ISOLATING`) and a private zone the sandbox
    uid cannot enter. A backend that does not isolate is refused, unless `accept_unisolated`:
    then the output is recorded as a non-private function of whatever the programs could read
    (ε = inf) and the tables say so."""
    in_path, out_dir = Path(in_path), Path(out_dir)
    limits = limits or Limits()
    if int(workers) < 1:
        raise PrivcodeError(f"workers must be at least 1, got {workers}")
    ledger.read(in_path.parent)  # fail now, not after hours of execution, if the input has no ledger
    be, certified, why = sandbox_for(backend, require_isolation, accept_unisolated, "the exec filter's output",
                                     "exec_filter.accept_unisolated: true (--accept-unisolated), which makes its "
                                     "output and everything built on it ε = inf")

    tasks = []  # (id, lang, code, fingerprint)
    for _, rec in _validated(in_path, lang_field, code_field):
        lang = canonical_lang(rec[lang_field])
        code = _code_of(rec, lang, code_field)
        tasks.append((rec["id"], lang, code, _fingerprint(code, lang, limits, be)))
    n = len(tasks)

    prog_path = sibling(out_dir, ".progress.jsonl")
    results: dict = {}
    executed = 0
    t0 = time.monotonic()
    pool = None
    runner = be.run
    if fork_server:
        try:
            pool = be.pool(int(workers), limits)
            runner = pool.run
        except PrivcodeError as e:
            print(f"privcode: note: no fork server ({e}); one sandbox per sample", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        if pool is not None:
            stack.callback(pool.close)
        prog = stack.enter_context(ResumableJsonl(prog_path, key="id"))
        todo = []
        for rid, lang, code, fp in tasks:
            old = prog.done.get(rid)
            if old is not None and old.get("fingerprint") == fp:
                results[rid] = old
            else:
                todo.append((rid, lang, code, fp))
        resumed = len(results)
        bar = tqdm(total=n, initial=resumed, desc="exec filter", unit="sample",
                   disable=None if progress else True, file=sys.stderr)
        try:
            with cf.ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="sandbox") as ex:
                window = max(4, 4 * int(workers))
                pending: dict = {}
                it = iter(todo)
                exhausted = False
                while pending or not exhausted:
                    while not exhausted and len(pending) < window:
                        try:
                            rid, lang, code, fp = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[ex.submit(runner, code, lang, limits)] = (rid, lang, fp)
                    if not pending:
                        break
                    done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    errors = []
                    for fut in done:
                        rid, lang, fp = pending.pop(fut)
                        if fut.exception() is not None:  # record the finished ones first, then raise
                            errors.append(fut.exception())
                            continue
                        r = fut.result()
                        rec = {"id": rid, "fingerprint": fp, "status": r.status, "reason": reason_for(r, lang),
                               "detail": r.detail, "returncode": r.returncode, "phase": r.phase,
                               "stderr_tail": r.stderr[-STDERR_TAIL:], "wall_s": r.wall_s,
                               "compile_s": r.compile_s}
                        results[rid] = rec
                        if r.status not in _NOT_CACHED:
                            prog.add(rec)
                        executed += 1
                        bar.update(1)
                    if errors:
                        for fut in pending:
                            fut.cancel()
                        raise errors[0]
        finally:
            bar.close()
    elapsed = time.monotonic() - t0

    kept, dropped = [], []
    by_lang: dict = defaultdict(lambda: {"input": 0, "kept": 0, "dropped": 0})
    reasons: Counter = Counter()
    lang_reasons: dict = defaultdict(Counter)
    toolchains: dict = {}
    langs = {rid: (lang, code) for rid, lang, code, _ in tasks}
    for _, rec in iter_jsonl(in_path):
        rid = rec["id"]
        lang, code = langs[rid]
        res = results[rid]
        by_lang[lang]["input"] += 1
        if lang not in toolchains:
            plan = be.plan(lang)
            toolchains[lang] = "ok" if not isinstance(plan, str) else plan
        if res["reason"] is None:
            by_lang[lang]["kept"] += 1
            kept.append({"id": rid, "problem": rec["problem"],
                         "solution": f"```{lang}\n{code.rstrip()}\n```", "code": code, "lang": lang})
        else:
            by_lang[lang]["dropped"] += 1
            reasons[res["reason"]] += 1
            lang_reasons[lang][res["reason"]] += 1
            dropped.append({"id": rid, "lang": lang, "reason": res["reason"], "detail": res.get("detail", ""),
                            "returncode": res.get("returncode"), "phase": res.get("phase", "run"),
                            "stderr_tail": res.get("stderr_tail", "")})

    stats = {
        "stage": STAGE,
        "input": str(in_path),
        "n_input": n,
        "n_kept": len(kept),
        "n_dropped": len(dropped),
        "dropped_by_reason": dict(sorted(reasons.items())),
        "by_lang": {k: by_lang[k] for k in sorted(by_lang)},
        "dropped_by_lang_reason": {k: dict(sorted(lang_reasons[k].items())) for k in sorted(lang_reasons)},
        "toolchains": dict(sorted(toolchains.items())),
        "backend": be.name,
        "isolation": be.isolation,
        "cgroup": be.describe().get("cgroup", "none"),
        "fork_server": pool is not None,
        "worker_restarts": pool.restarts if pool is not None else 0,
        "limits": limits.as_dict(),
        "workers": int(workers),
        "executed": executed,
        "resumed": resumed,
        "elapsed_s": round(elapsed, 3),
        "throughput_samples_per_s": round(executed / elapsed, 2) if executed and elapsed > 0 else None,
        "cpu_count": os.cpu_count(),
    }

    side_dropped, side_stats = sibling(out_dir, ".dropped.jsonl"), sibling(out_dir, ".stats.json")
    if not kept:
        write_jsonl(side_dropped, dropped)
        write_json(side_stats, stats)
        raise PrivcodeError(f"exec filter kept 0 of {n} samples; see {side_dropped}")

    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_json(tmp / "stats.json", stats)
        sandbox = {"backend": be.name, "isolation": be.isolation, "certified": certified, "why": why}
        if certified:
            ledger.derive(tmp, stage=STAGE, parents=[in_path.parent], sandbox=sandbox)
        else:
            ledger.non_private(tmp, stage=STAGE, parents=[in_path.parent], sandbox=sandbox,
                               reason=f"generated programs ran where they could reach private data: {why}",
                               note=f"exec filter ran on the unisolated '{be.name}' sandbox")
    for p in (prog_path, side_dropped, side_stats):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stats


def sandbox_for(backend, require_isolation: bool, accept_unisolated: bool, what: str, opt_in: str):
    """(backend, certified, why): the sandbox `backend` (a name or a Backend), refused when it could reach
    private data (`certify`) unless `accept_unisolated`; `what` runs on it, `opt_in` says how to accept."""
    be = backend if isinstance(backend, Backend) else get_backend(backend, require_isolation=require_isolation)
    certified, why = certify(be)
    if not certified and not accept_unisolated:
        raise PrivcodeError(f"{what} is post-processing only when its sandbox cannot reach private data, and {why}; "
                            f"use an isolating backend (bwrap: apt-get install bubblewrap) or set {opt_in}",
                            field="backend")
    return be, certified, why


def certify(be: Backend) -> tuple[bool, str]:
    """Whether programs run on `be` cannot reach private data: its isolation meets the sandbox
    contract (docs/sandbox.md) and the private zone is closed to the sandbox uid."""
    from privcode import zone

    if be.isolation not in sb.ISOLATING:
        return False, f"sandbox backend '{be.name}' (isolation '{be.isolation}') does not isolate"
    ok, why = zone.unreadable_by(sb.SANDBOX_UID)
    if not ok:
        return False, why
    return True, f"backend '{be.name}' (isolation '{be.isolation}'); {why}"


@dataclass(frozen=True)
class ExecFilterConfig(Limits, Params):
    """Options of `privcode exec-filter --params`: the config's exec_filter section but `workers` (the
    job's threads: --workers) and `container_image` (the rule's container); the limits are Limits'.
    `accept_unisolated` overrides `require_isolation` (the opt-in is the more specific choice)."""
    _what = "exec-filter"
    backend: str = "auto"             # auto | container | bwrap | unshare | rlimit (docs/sandbox.md)
    require_isolation: bool = True    # refuse the unisolated rlimit fallback
    accept_unisolated: bool = False   # run on a backend that does not isolate: the output is then ε = inf
    fork_server: bool = True          # long-lived sandboxes forking one child per sample; false: one sandbox each
    lang_field: str = "lang"
    code_field: str | None = None

    def __post_init__(self):
        if self.backend not in ("auto",) + BACKENDS:
            raise PrivcodeError(f"must be one of {('auto',) + BACKENDS}", path="--params", field="backend")
        try:
            self.limits
        except PrivcodeError as e:
            raise PrivcodeError(str(e), path="--params") from None

    @property
    def limits(self) -> Limits:
        return Limits(**{f.name: getattr(self, f.name) for f in fields(Limits)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="privcode exec-filter",
                                description="Keep generated samples whose code runs cleanly in a sandbox.")
    p.add_argument("--input", required=True, help="generated samples JSONL")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--params", default="{}", help="JSON object of ExecFilterConfig fields: backend, "
                   "require_isolation, accept_unisolated, fork_server, lang_field, code_field and the sandbox "
                   "limits wall_s, cpu_s, mem_mb, fsize_mb, nproc, output_bytes, compile_s")
    p.add_argument("--workers", type=int, default=2, help="sandboxes running at once (the job's threads)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        c = parse_params(a.params, ExecFilterConfig)
        stats = run(a.input, a.out, backend=c.backend, limits=c.limits,
                    require_isolation=c.require_isolation and not c.accept_unisolated,
                    workers=a.workers, lang_field=c.lang_field, code_field=c.code_field,
                    progress=not a.no_progress, fork_server=c.fork_server, accept_unisolated=c.accept_unisolated)
    except PrivcodeError as e:
        print(f"privcode exec-filter: error: {e}", file=sys.stderr)
        return 2
    print(f"exec filter: kept {stats['n_kept']} of {stats['n_input']} "
          f"(backend {stats['backend']}, isolation {stats['isolation']}, "
          f"fork server {'on' if stats['fork_server'] else 'off'}) -> {a.out}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
