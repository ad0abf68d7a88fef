"""Stage options: the one `--params` path of every stage.

    cfg = parse_params('{"steps": 4}', TrainConfig)       # a Params dataclass -> an instance
    kw = parse_params('{"seed": 1}', prepare, skip=3, what="prepare-data")   # a function -> its checked kwargs

Every error is one PrivcodeError that names `--params`, the field and the problem (malformed JSON,
not an object, an unknown key, a value of the wrong type), e.g.
`--params, field 'stepz': unknown training option; known: [...]`.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import fields, is_dataclass

from privcode.errors import PrivcodeError

WHERE = "--params"


def parse_params(text: str, target, *, skip: int = 0, what: str | None = None):
    """`text` (a JSON object) as options of `target`: a class with `from_dict` (a Params dataclass,
    or one with its own checks) gives its instance; a function gives the checked keyword arguments
    of its signature (after its first `skip` parameters; `what` names its options in errors)."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"not valid JSON: {e.msg} (line {e.lineno} column {e.colno})", path=WHERE) from None
    if not isinstance(d, dict):
        raise PrivcodeError(f"expected a JSON object of options, got {type(d).__name__}", path=WHERE)
    if hasattr(target, "from_dict"):
        return target.from_dict(d, WHERE)
    sig = list(inspect.signature(target).parameters.values())[skip:]
    check_options(d, [p.name for p in sig], what or target.__name__, WHERE, typing.get_type_hints(target))
    return d


def check_options(d: dict, known, what: str, where: str = WHERE, hints: dict | None = None) -> None:
    """Refuse keys of `d` not in `known` and values whose type contradicts `hints` (name -> type)."""
    bad = sorted(set(d) - set(known))
    if bad:
        raise PrivcodeError(f"unknown {what} option; known: {sorted(known)}", path=where, field=", ".join(bad))
    for k, v in d.items():
        want = (hints or {}).get(k)
        if want is not None and not _fits(v, want):
            raise PrivcodeError(f"expected {_name(want)}, got {type(v).__name__} {v!r}", path=where, field=k)


def _args(t) -> tuple:
    return typing.get_args(t) if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union else (t,)


def _fits(v, t) -> bool:
    """Whether a JSON value can stand for type `t` (an int is a float; a bool is neither)."""
    for a in _args(t):
        a = typing.get_origin(a) or a
        if a is typing.Any or a is inspect.Parameter.empty:
            return True
        if a is type(None) and v is None:
            return True
        if a is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return True
        if a is int and isinstance(v, int) and not isinstance(v, bool):
            return True
        if a in (bool, str, list, dict) and isinstance(v, a):
            return True
        if not isinstance(a, type):  # a type this check does not know: left to the stage's own checks
            return True
    return False


def _name(t) -> str:
    names = {type(None): "null", float: "a number", int: "an integer", bool: "true/false", str: "a string",
             list: "a list", dict: "an object"}
    return " or ".join(names.get(typing.get_origin(a) or a, str(a)) for a in _args(t))


class Params:
    """Mixin for option dataclasses: `from_dict` refuses unknown keys and values of the wrong type,
    naming them (and the known ones); the dataclass's `__post_init__` checks the values."""

    _what = "stage"  # the noun used in error messages ("unknown <what> option")

    @classmethod
    def from_dict(cls, d, where: str = WHERE):
        if not isinstance(d, dict):
            raise PrivcodeError(f"expected a JSON object of {cls._what} options", path=where)
        assert is_dataclass(cls)
        check_options(d, [f.name for f in fields(cls)], cls._what, where, typing.get_type_hints(cls))
        return cls(**d)


def stage_parser(prog: str, doc: str, options: dict, params=None, shard: str | None = None):
    """The argument parser every stage's `main` starts from: `privcode <prog>`, the module docstring
    as its description (kept as written), one required `--NAME` per `options` item (NAME: its help,
    or (help, type)), with `params` (the stage's Params class) `--params`, a JSON object of its
    fields read by `parse_params`, and with `shard` (what a shard does, e.g. "describe programs")
    `--shard i/n`, what `privcode.shard` starts. Other optional flags are added by the caller."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"privcode {prog}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, spec in options.items():
        help_, type_ = spec if isinstance(spec, tuple) else (spec, str)
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, type=type_, help=help_)
    if params is not None:
        ap.add_argument("--params", default="{}", help=f"JSON object of {params.__name__} fields")
    if shard is not None:
        ap.add_argument("--shard", help=f"i/n: {shard} i, i+n, ... into a progress file (what `shards` starts)")
    return ap
