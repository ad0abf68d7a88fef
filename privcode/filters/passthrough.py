"""Ablation `no_exec_filter` / `no_filters`: every generated program kept without running it.

    privcode skip-exec-filter --input results/synth/smollm2/privsa/eps4/generated/samples.jsonl \
        --out results/synth/smollm2/privsa/eps4/noexec

The stand-in for the execution filter in PrivCode's "no post-processing" ablations: the same input
and the same output format as privcode.filters.exec_filter (kept.jsonl {id, problem, solution, code,
lang}, dropped.jsonl, stats.json, privacy.json), but nothing is executed: a sample is kept when code
can be taken from it at all (`privcode.data.prompts.extract_code`) and dropped as `no_code`
otherwise, since there is nothing to train on. Post-processing of the generation (same ε).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.filters.exec_filter import _code_of, _validated
from privcode.io import atomic_dir, write_json, write_jsonl
from privcode.langs import canonical_lang
from privcode.params import stage_parser

STAGE = "skip_exec_filter"


def run(in_path, out_dir, *, lang_field: str = "lang", code_field: str | None = None) -> dict:
    """Keep every sample with code; returns the stats (n_input, n_kept, n_dropped, by_lang, executed: 0)."""
    in_path, out_dir = Path(in_path), Path(out_dir)
    ledger.read(in_path.parent)
    kept, dropped, by_lang = [], [], Counter()
    for _, rec in _validated(in_path, lang_field, code_field):
        lang = canonical_lang(rec[lang_field])
        code = _code_of(rec, lang, code_field)
        if code is None or not code.strip():
            dropped.append({"id": rec["id"], "lang": lang, "reason": "no_code", "detail": "no code to keep"})
            continue
        by_lang[lang] += 1
        kept.append({"id": rec["id"], "problem": rec["problem"], "solution": f"```{lang}\n{code.rstrip()}\n```",
                     "code": code, "lang": lang})
    if not kept:
        raise PrivcodeError(f"no sample of {len(dropped)} has code", path=in_path)
    stats = {"stage": STAGE, "input": str(in_path), "n_input": len(kept) + len(dropped), "n_kept": len(kept),
             "n_dropped": len(dropped), "dropped_by_reason": {"no_code": len(dropped)} if dropped else {},
             "kept_by_lang": dict(sorted(by_lang.items())), "executed": 0}
    with atomic_dir(out_dir) as tmp:
        write_jsonl(tmp / "kept.jsonl", kept)
        write_jsonl(tmp / "dropped.jsonl", dropped)
        write_json(tmp / "stats.json", stats)
        ledger.derive(tmp, stage=STAGE, parents=[in_path.parent])
    return stats


def main(argv=None) -> int:
    a = stage_parser("skip-exec-filter", __doc__, {
        "input": "generated samples JSONL", "out": "output directory (created atomically)"}).parse_args(argv)
    s = run(a.input, a.out)
    print(json.dumps({k: s[k] for k in ("n_input", "n_kept", "n_dropped")}))
    return 0
