"""Stage options: each stage's config dataclass inherits `Params` to read its `--params` JSON."""
from __future__ import annotations

import json
from dataclasses import fields

from privcode.errors import PrivcodeError


class Params:
    """Mixin for option dataclasses: unknown keys are an error that names them and the known ones."""

    _what = "stage"  # the noun used in error messages ("unknown <what> option(s)")

    @classmethod
    def from_dict(cls, d, where: str = "--params"):
        if not isinstance(d, dict):
            raise PrivcodeError(f"expected a JSON object of {cls._what} options", path=where)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise PrivcodeError(f"unknown {cls._what} option(s) {bad}; known: {sorted(known)}", path=where)
        return cls(**d)

    @classmethod
    def from_json(cls, text: str, where: str = "--params"):
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as e:
            raise PrivcodeError(f"not valid JSON: {e.msg}", path=where) from None
