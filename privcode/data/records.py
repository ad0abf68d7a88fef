"""Load and validate instruction→code records from JSONL, Parquet or a Hugging Face dataset.

    privcode prepare-data --source results/data/taskgen/records.jsonl \
        --private results/data/private --public results/data/public --params '{"private_fraction": 0.5}'
    privcode prepare-data --source hf:ise-uiuc/Magicoder-OSS-Instruct-75K ...   # paper

The split is a seeded shuffle: `private_fraction` of the records become the private set (one
record = one privacy unit); the rest lose their solutions and become the public prompts that the
DP model answers. Public prompts are *assumed public* (they are never trained on under DP).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, iter_jsonl, write_jsonl

DEFAULT_COLUMNS = {"problem": "problem", "solution": "solution", "lang": "lang"}


def load_records(source: str, columns: dict | None = None, hf_split: str = "train",
                 need_solution: bool = True, default_lang: str = "python") -> list[dict]:
    """Records as {id, problem, solution, lang}; bad rows raise PrivcodeError naming file/line/field."""
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    need = [cols["problem"]] + ([cols["solution"]] if need_solution else [])
    rows: list[tuple[str, int, dict]] = []
    p = Path(source)
    if source.startswith("hf:") or (not p.exists() and source.count("/") == 1 and not source.startswith((".", "/"))):
        name = source[3:] if source.startswith("hf:") else source
        from datasets import load_dataset

        ds = load_dataset(name, split=hf_split)
        rows = [(f"{name}[{hf_split}]", i + 1, r) for i, r in enumerate(ds)]
    elif not p.exists():
        raise PrivcodeError("data file does not exist", path=p)
    elif p.suffix == ".parquet":
        import pandas as pd

        df = pd.read_parquet(p)
        for c in need:
            if c not in df.columns:
                raise PrivcodeError(f"column missing (columns: {list(df.columns)})", path=p, field=c)
        rows = [(str(p), i + 1, r) for i, r in enumerate(df.to_dict("records"))]
    else:
        rows = [(str(p), ln, r) for ln, r in iter_jsonl(p)]
    out = []
    for where, line, r in rows:
        for c in need:
            v = r.get(c)
            if v is None:
                raise PrivcodeError("missing required field", path=where, line=line, field=c)
            if not isinstance(v, str) or not v.strip():
                raise PrivcodeError("expected a non-empty string", path=where, line=line, field=c)
        lang = r.get(cols["lang"])
        if not isinstance(lang, str) or not lang.strip():  # absent, None or a pandas NaN
            lang = default_lang
        rec = {"id": str(r.get("id", f"r{line}")), "problem": r[cols["problem"]], "lang": str(lang).lower()}
        if need_solution:
            rec["solution"] = r[cols["solution"]]
        out.append(rec)
    if not out:
        raise PrivcodeError("no records", path=source)
    ids = [r["id"] for r in out]
    if len(set(ids)) != len(ids):
        raise PrivcodeError("record ids are not unique", path=source, field="id")
    return out


def split(records: list[dict], private_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not (0 < private_fraction < 1):
        raise PrivcodeError(f"private_fraction={private_fraction} must be in (0, 1)")
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    k = int(round(private_fraction * len(records)))
    priv = [records[i] for i in sorted(idx[:k])]
    pub = [records[i] for i in sorted(idx[k:])]
    return priv, pub


def prepare(source: str, private_dir: Path, public_dir: Path, *, private_fraction: float = 0.26, seed: int = 42,
            columns: dict | None = None, hf_split: str = "train", public_source: str | None = None,
            max_private: int | None = None, max_public: int | None = None) -> dict:
    from privcode.dp import ledger

    recs = load_records(source, columns, hf_split)
    if public_source:
        priv = recs
        pub = load_records(public_source, columns, hf_split, need_solution=False)
    else:
        priv, pub = split(recs, private_fraction, seed)
    priv, pub = priv[:max_private] if max_private else priv, pub[:max_public] if max_public else pub
    overlap = {r["problem"] for r in priv} & {r["problem"] for r in pub}
    if overlap:
        raise PrivcodeError(f"{len(overlap)} public prompts also appear in the private data; "
                            "public prompts must be disjoint from private records", path=public_source or source)
    with atomic_dir(private_dir) as tmp:
        write_jsonl(tmp / "records.jsonl", priv)
        ledger.private_source(tmp, stage="prepare_data", private_data=str(tmp / "records.jsonl"),
                              n_records=len(priv), source=source)
    with atomic_dir(public_dir) as tmp:
        write_jsonl(tmp / "prompts.jsonl", ({"id": r["id"], "problem": r["problem"], "lang": r["lang"]} for r in pub))
        ledger.derive(tmp, stage="prepare_data", source=public_source or source,
                      note="public prompts (assumed public; disjoint from the private records)")
    return {"private": len(priv), "public": len(pub)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode prepare-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="JSONL/Parquet path, or hf:<dataset name>")
    ap.add_argument("--private", required=True, type=Path, help="output directory of the private records")
    ap.add_argument("--public", required=True, type=Path, help="output directory of the public prompts")
    ap.add_argument("--params", default="{}", help="JSON: private_fraction, seed, columns, hf_split, "
                    "public_source, max_private, max_public")
    a = ap.parse_args(argv)
    counts = prepare(a.source, a.private, a.public, **json.loads(a.params))
    print(json.dumps(counts))
