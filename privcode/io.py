"""Atomic outputs and validated JSONL.

Every artifact is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written file or directory that Snakemake would take as done.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from privcode.errors import PrivcodeError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path, mode: str = "w", encoding: str | None = "utf-8", private: bool = False):
    """Yield a handle to a temp file beside `path`; rename it onto `path` only on success.
    `private`: a private-zone file (0600), else the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o600 if private else 0o666 & ~_UMASK)  # mkstemp makes 0600
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, private: bool = False):
    """Yield a temp directory beside `path`; it replaces `path` only when the block succeeds.
    `private`: a private-zone directory — it and everything written into it become 0700/0600."""
    from privcode import zone

    path = Path(path)
    if private:
        zone.mkdir(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o700 if private else 0o777 & ~_UMASK)
    try:
        yield tmp
        if private:
            zone.harden(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path, obj, private: bool = False) -> None:
    with atomic_file(path, private=private) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PrivcodeError("file does not exist", path=path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"malformed JSON: {e.msg}", path=path, line=e.lineno) from None


def iter_jsonl(path, required: Iterable[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line; bad lines raise PrivcodeError.

    `required` names fields that must be present, non-null strings. A `.gz` file is read through
    gzip (benchmark files such as HumanEval.jsonl.gz ship compressed)."""
    path = Path(path)
    if not path.exists():
        raise PrivcodeError("file does not exist", path=path)
    if path.is_dir():
        raise PrivcodeError("is a directory, not a JSONL file", path=path)
    required = tuple(required)
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.strip():
                    yield lineno, _record(raw, path, lineno, required)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        hint = "" if path.suffix == ".gz" else " (a gzip file? its name must end in .gz)"
        raise PrivcodeError(f"not UTF-8 JSON lines{hint}: {e}", path=path, line=lineno + 1) from None


def _record(raw: str, path: Path, lineno: int, required: tuple) -> dict:
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"malformed JSON ({e.msg}, column {e.colno})", path=path, line=lineno) from None
    if not isinstance(rec, dict):
        raise PrivcodeError(f"expected a JSON object, got {type(rec).__name__}", path=path, line=lineno)
    for f in required:
        if f not in rec or rec[f] is None:
            raise PrivcodeError("missing required field", path=path, line=lineno, field=f)
        if not isinstance(rec[f], str):
            raise PrivcodeError(f"expected a string, got {type(rec[f]).__name__}", path=path, line=lineno, field=f)
    return rec


def read_jsonl(path, required: Iterable[str] = ()) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path, required)]


def write_jsonl(path, records: Iterable[dict]) -> int:
    n = 0
    with atomic_file(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


class ResumableJsonl:
    """Append-only JSONL keyed by a field, for long stages that must survive a kill.

    Completed keys are read back on open (a torn last line from a crash is dropped), so a
    re-run skips work already done. Each appended line is flushed at once."""

    def __init__(self, path, key: str = "id"):
        self.path, self.key = Path(path), key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict = {}
        if self.path.exists():
            good = []
            with open(self.path, encoding="utf-8") as fh:
                for raw in fh:
                    try:
                        rec = json.loads(raw)
                    except json.JSONDecodeError:
                        break  # torn write at the end of a killed run
                    self.done[rec[key]] = rec
                    good.append(raw if raw.endswith("\n") else raw + "\n")
            with atomic_file(self.path) as fh:
                fh.writelines(good)
        self._fh = open(self.path, "a", encoding="utf-8")

    def __contains__(self, k) -> bool:
        return k in self.done

    def add(self, rec: dict) -> None:
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        self.done[rec[self.key]] = rec

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
