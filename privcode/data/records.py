"""Load and validate instruction→code records from JSONL, Parquet or a Hugging Face dataset.

    privcode prepare-data --source results/data/taskgen/records.jsonl \
        --private private/data/private --public results/data/public --params '{"private_fraction": 0.5}'
    privcode prepare-data --source hf:ise-uiuc/Magicoder-OSS-Instruct-75K ...   # paper

The split is a seeded shuffle: `private_fraction` of the records become the private set (one
record = one privacy unit), written to the private zone; the rest lose their solutions and
become the prompts that the DP model answers. Those prompts are public only when `source` is
public data standing in for private data (`source_is_public: true`, the paper's setting) or when
they come from a separate `public_source`; otherwise they are private problem texts, and their
ledger (and everything built on them) says ε = inf.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, iter_jsonl, write_jsonl
from privcode.params import parse_params

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

        try:
            ds = load_dataset(name, split=hf_split)
        except (OSError, ConnectionError, ValueError) as e:  # offline, unknown name or split
            from privcode.models import hub_error

            raise hub_error(name, e, what="dataset") from None
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


def data_id_of(records: list[dict]) -> str:
    """Identity of a private data set for the budget registry (private zone only): a hash of its
    records, so the same source prepared again (another split seed, `-d` directory, `rm -rf
    results`) is the same data set."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.get("problem"), r.get("solution"), r.get("lang")], ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def prepare(source: str, private_dir: Path, public_dir: Path, *, private_fraction: float = 0.26, seed: int = 42,
            columns: dict | None = None, hf_split: str = "train", public_source: str | None = None,
            max_private: int | None = None, max_public: int | None = None, source_is_public: bool = False,
            delta: float | None = None, dataset_size=None) -> dict:
    """Split `source` into private records (private zone) and public prompts.

    The public prompts are public only if they come from a separate `public_source`, or if the
    whole `source` is public data standing in for private data (`source_is_public`, the paper's
    Magicoder setting). A split of a source that is not declared public leaves private problem
    texts in the "public" prompts: their ledger says ε = inf, and so does everything built on them."""
    from privcode import ledger

    recs = load_records(source, columns, hf_split)
    data_id = data_id_of(recs)  # the whole source: every split of it is one data set for the budget
    if public_source:
        priv = recs
        pub = load_records(public_source, columns, hf_split, need_solution=False)
    else:
        priv, pub = split(recs, private_fraction, seed)
    priv, pub = priv[:max_private] if max_private else priv, pub[:max_public] if max_public else pub
    if delta is not None:  # fail now, not after hours of upstream work when the DP job starts
        n_hat = len(priv) if dataset_size in (None, "public") else int(dataset_size)
        if not 0 < delta < 1 / n_hat:
            raise PrivcodeError(f"privacy.delta={delta} must be below 1/N = {1 / n_hat:.3g} (N = {n_hat}"
                                f"{' declared' if dataset_size not in (None, 'public') else ' private records'})",
                                field="privacy.delta")
    overlap = {r["problem"] for r in priv} & {r["problem"] for r in pub}
    if overlap:
        raise PrivcodeError(f"{len(overlap)} public prompts also appear in the private data; "
                            "public prompts must be disjoint from private records", path=public_source or source)
    with atomic_dir(private_dir, private=True) as tmp:
        write_jsonl(tmp / "records.jsonl", priv)
        ledger.private_source(tmp, stage="prepare_data", n_records=len(priv), data_id=data_id, source=source)
    with atomic_dir(public_dir) as tmp:
        write_jsonl(tmp / "prompts.jsonl", ({"id": r["id"], "problem": r["problem"], "lang": r["lang"]} for r in pub))
        if public_source or source_is_public:
            ledger.derive(tmp, stage="prepare_data", source=public_source or source,
                          note=None, public="a separate public source" if public_source
                          else "the source is declared public (data.source_is_public)")
        else:
            ledger.non_private(tmp, stage="prepare_data", source=source,
                               reason="public prompts split from a source not declared public: they are private "
                                      "records' problem texts",
                               note="public prompts split from private data (data.source_is_public is false)")
    return {"private": len(priv), "public": len(pub)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode prepare-data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="JSONL/Parquet path, or hf:<dataset name>")
    ap.add_argument("--private", required=True, type=Path, help="output directory of the private records")
    ap.add_argument("--public", required=True, type=Path, help="output directory of the public prompts")
    ap.add_argument("--params", default="{}", help="JSON: private_fraction, seed, columns, hf_split, "
                    "public_source, max_private, max_public, source_is_public, delta and dataset_size (checked: "
                    "δ < 1/N)")
    a = ap.parse_args(argv)
    params = parse_params(a.params, prepare, skip=3, what="prepare-data")
    counts = prepare(a.source, a.private, a.public, **params)
    print(json.dumps(counts))
