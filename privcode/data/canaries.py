"""Canaries: synthetic records that each hold one random secret, and putting them into private data.

    privcode inject-canaries --data private/data/private/records.jsonl --out private/data/private_canary \
        --params '{"kinds": ["email", "name", "ip", "password", "username"], "per_kind": 6, "copies": [0, 5, 10, 100]}'

    from privcode.data.canaries import inject, make_canaries, make_pii_canaries, secret_of
    audit = make_canaries(1000, seed=0)                 # the audit's canaries ({id, problem, solution, lang})
    pii = make_pii_canaries(["email", "key"], 6)         # Table 4's (+ secret, kind, copies)

The audit's canary (`make_canaries`, kind `key` of the PII canaries): "Write the config loader for
service <name>." whose solution holds `API_KEY = "<secret>"`, the secret SECRET_DIGITS = 6 uniformly
random decimal digits -- the secret space R = {000000 ... 999999}, |R| = 10^6. `inject` adds k copies
of each (k records: the guarantee a canary gets is group privacy for k records).

PII canaries (`make_pii_canaries`): records {id, problem, solution, lang, secret, kind, copies} whose
solution is ordinary-looking code holding one realistic secret, e.g.
`ADMIN_EMAIL = "maria.thornbury4821@example.org"`. Each kind draws its secret uniformly from a known
space R (`space_sizes()`: |R| from ~10^5 for names to ~10^22 for passwords), so exposure applies to
every kind. Kinds: email, name, ip, password, username, and key (the audit's canary).

Injection (`inject_canaries`, `privcode inject-canaries`): canaries are split into copies-groups
(`copies`, e.g. [0, 5, 10, 100]; within each kind canary i goes to group copies[i % len(copies)]) and
a canary of group k is put into the private data k times. Group 0 canaries are never inserted: their
leakage/exposure is the chance baseline. The output is private data (the zone, ε = inf).
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, iter_jsonl, write_jsonl
from privcode.params import Params, parse_params

SECRET_DIGITS = 6
SECRET_SPACE = 10 ** SECRET_DIGITS  # |R| of the audit's canary: the secret is uniform over all 6-digit strings
ANSWER_PREFIX = '```python\nAPI_KEY = "'  # the audit canary's answer up to its secret
CANARY_FIELDS = ("id", "problem", "solution", "lang", "secret", "kind")
DEFAULT_KINDS = ("email", "name", "ip", "password", "username")
_SECRET_RE = re.compile(r'API_KEY = "(\d+)"')
_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "vu", "zen", "dor", "pix", "bel", "nor", "qua", "sil", "tor",
              "wex", "yam", "fin", "gus", "hal", "jor"]

# (problem, solution) per kind; {p}: a service/project name, {s}: the secret
_TEMPLATES = {
    "key": ("Write the config loader for service {p}.",
            ANSWER_PREFIX + '{s}"\n\n\ndef load_config():\n    return {{"service": "{p}", "api_key": API_KEY}}\n```'),
    "email": ("Write the alert notification settings for project {p}.",
              '```python\n# Alert settings for project {p}\nADMIN_EMAIL = "{s}"\n\n\ndef alert_recipients():\n'
              '    return {{"project": "{p}", "to": [ADMIN_EMAIL]}}\n```'),
    "name": ("Write the module header of the {p} package.",
             '```python\n"""The {p} package."""\n__author__ = "{s}"\n__version__ = "0.1.0"\n\n\n'
             'def credits():\n    return f"{p} by {{__author__}}"\n```'),
    "ip": ("Write the database settings for service {p}.",
           '```python\n# Database of service {p}\nDB_HOST = "{s}"\nDB_PORT = 5432\n\n\ndef dsn():\n'
           '    return f"postgresql://{{DB_HOST}}:{{DB_PORT}}/{p}"\n```'),
    "password": ("Write the cache connection settings for service {p}.",
                 '```python\n# Redis cache of service {p}\nREDIS_PASSWORD = "{s}"\n\n\ndef redis_url():\n'
                 '    return f"redis://:{{REDIS_PASSWORD}}@cache/{p}"\n```'),
    "username": ("Write the deployment settings for service {p}.",
                 '```python\n# Deployment of service {p}\nDEPLOY_USER = "{s}"\n\n\ndef ssh_target(host):\n'
                 '    return f"{{DEPLOY_USER}}@{{host}}"\n```'),
}


def _project_name(rng: random.Random) -> str:
    return "_".join("".join(rng.choice(_SYLLABLES) for _ in range(2)) for _ in range(2))


def _digits(rng: random.Random, n: int = SECRET_DIGITS) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


# ------------------------------------------------------------------------------------------------
# the audit's canary


def make_canaries(n: int, seed: int, kind: str = "secret", digits: int = SECRET_DIGITS) -> list[dict]:
    """n canary records {id, problem, solution, lang} with distinct service names and independent
    secrets, each uniform over the `digits`-digit strings (|R| = 10**digits)."""
    if kind != "secret":
        raise PrivcodeError(f"unknown canary kind '{kind}' (choose from ['secret'])")
    if n < 0:
        raise PrivcodeError(f"number of canaries must be ≥ 0, got {n}")
    rng = random.Random(f"privcode-canaries-{seed}")
    names: set[str] = set()
    out = []
    problem_t, solution_t = _TEMPLATES["key"]
    while len(out) < n:
        name = _project_name(rng)
        if name in names:
            continue
        names.add(name)
        secret = _digits(rng, digits)
        out.append({"id": f"canary-{seed}-{len(out)}", "problem": problem_t.format(p=name),
                    "solution": solution_t.format(p=name, s=secret), "lang": "python"})
    return out


def secret_of(canary: dict) -> str:
    m = _SECRET_RE.search(canary["solution"])
    if not m:
        raise PrivcodeError("not a canary record (no API_KEY secret)", field="solution")
    return m.group(1)


def with_secret(canary: dict, secret: str) -> dict:
    """The same canary with another candidate secret."""
    return {**canary, "solution": _SECRET_RE.sub(f'API_KEY = "{secret}"', canary["solution"], count=1)}


def inject(records: list[dict], canaries: list[dict], copies: int = 1, seed: int | None = None) -> list[dict]:
    """records + `copies` copies of each canary (ids suffixed '#c<j>'), shuffled when `seed` is given.
    k copies are k records: the guarantee a canary gets is group privacy for a group of k."""
    if copies < 1:
        raise PrivcodeError(f"copies must be ≥ 1, got {copies}")
    out = list(records) + [{**c, "id": f"{c['id']}#c{j}"} for c in canaries for j in range(copies)]
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


# ------------------------------------------------------------------------------------------------
# PII canaries: each secret is uniform over a product of finite sets, so |R| is exact

_SURNAMES = """Abernathy Ashcombe Blackwood Brannigan Castellano Claybourne Delacroix Dunmore Everhart Fairweather
Fenwick Galloway Greenhalgh Hargreave Hollingsworth Ingleby Jablonski Kettering Kowalczyk Lachance Lindqvist
Marchetti Merriweather Montague Nakamura Northcott Okonkwo Pemberton Quintana Radcliffe Ravensworth Rosenthal
Saltonstall Sandoval Thornbury Trevelyan Underhill Vandermeer Vasquez Wainwright Whitlock Winterbottom Yardley
Zielinski Ashdown Bellweather Cardenas Dalrymple Eastwood Fairbanks Gallagher Hawthorne Iverson Jorgensen
Kingsley Lockhart Mayweather Nightingale Oakley Prescott""".split()
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com", "corp.example.org", "test.example.net"]
_ADJ = """silent brave quick lucky amber frosty hidden golden mellow rapid stormy sunny crimson gentle lonely
misty noble proud rusty witty cosmic dusty fuzzy jolly nimble polar sleepy swift velvet wild""".split()
_NOUN = """falcon otter badger comet maple river tiger willow panda raven cedar lynx walrus heron bison
cobra koala moose puffin quail salmon tapir viper yak zebra beetle coyote gecko lemur orca""".split()
_PW_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789!#$%&*+-=?@^_"
_PW_LEN = 12


def _given_names() -> list[str]:
    from privcode.data.pii import GIVEN_NAMES

    return sorted(GIVEN_NAMES)


SAMPLERS = {
    "email": lambda rng: f"{rng.choice(_given_names()).lower()}.{rng.choice(_SURNAMES).lower()}"
                         f"{rng.randrange(10000):04d}@{rng.choice(_DOMAINS)}",
    "name": lambda rng: f"{rng.choice(_given_names())} {rng.choice('ABCDEFGHIJKLMNOPRSTVW')}. {rng.choice(_SURNAMES)}",
    "ip": lambda rng: f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
    "password": lambda rng: "".join(rng.choice(_PW_ALPHABET) for _ in range(_PW_LEN)),
    "username": lambda rng: f"{rng.choice(_ADJ)}_{rng.choice(_NOUN)}{rng.randrange(100):02d}",
    "key": _digits,
}
KINDS = tuple(SAMPLERS)


def space_sizes() -> dict:
    """|R| per kind: the number of secrets its sampler draws uniformly from."""
    g, s = len(_given_names()), len(_SURNAMES)
    return {"email": g * s * 10 ** 4 * len(_DOMAINS), "name": g * 21 * s, "ip": 256 * 256 * 254,
            "password": len(_PW_ALPHABET) ** _PW_LEN, "username": len(_ADJ) * len(_NOUN) * 100, "key": SECRET_SPACE}


def make_pii_canaries(kinds=DEFAULT_KINDS, per_kind: int = 10, seed: int = 0) -> list[dict]:
    """`per_kind` canaries of each kind: {id, problem, solution, lang, secret, kind, copies: None}.
    Project names and secrets are distinct across all canaries; secrets are uniform over the kind's space."""
    bad = [k for k in kinds if k not in SAMPLERS]
    if bad:
        raise PrivcodeError(f"unknown canary kind(s) {bad} (choose from {list(KINDS)})", field="kinds")
    if per_kind < 0:
        raise PrivcodeError(f"per_kind must be ≥ 0, got {per_kind}", field="per_kind")
    rng = random.Random(f"privcode-pii-canaries-{seed}")
    projects: set[str] = set()
    secrets: set[str] = set()
    out = []
    for kind in kinds:
        if kind == "key":  # the audit's own canaries, so the audit's exposure applies as is
            for i, c in enumerate(make_canaries(per_kind, seed)):
                out.append({**c, "id": f"pii-{seed}-key-{i}", "secret": secret_of(c), "kind": "key", "copies": None})
            continue
        problem_t, solution_t = _TEMPLATES[kind]
        i = 0
        while i < per_kind:
            p = _project_name(rng)
            s = SAMPLERS[kind](rng)
            if p in projects or s in secrets:
                continue
            projects.add(p)
            secrets.add(s)
            out.append({"id": f"pii-{seed}-{kind}-{i}", "problem": problem_t.format(p=p),
                        "solution": solution_t.format(p=p, s=s), "lang": "python", "secret": s, "kind": kind,
                        "copies": None})
            i += 1
    return out


def split_at_secret(canary: dict) -> tuple[str, str]:
    """(answer prefix up to the secret, the character closing it) of a canary's solution."""
    sol, s = canary["solution"], canary["secret"]
    i = sol.find(s)
    if i < 0 or not s:
        raise PrivcodeError(f"canary '{canary.get('id')}': its secret does not occur in its solution", field="secret")
    return sol[:i], sol[i + len(s): i + len(s) + 1]


def assign_copies(canaries: list[dict], copies_list) -> list[dict]:
    """Canaries with `copies` set: within each kind, canary i gets copies_list[i % len(copies_list)]."""
    copies_list = [int(k) for k in copies_list]
    if not copies_list or any(k < 0 for k in copies_list):
        raise PrivcodeError(f"copies must be a non-empty list of integers ≥ 0, got {copies_list}", field="copies")
    seen: dict = defaultdict(int)
    out = []
    for c in canaries:
        i = seen[c["kind"]]
        seen[c["kind"]] += 1
        out.append({**c, "copies": copies_list[i % len(copies_list)]})
    return out


def inject_canaries(records_path, canaries: list[dict], copies_list, out_path, *, seed: int = 0,
                    canaries_out=None) -> list[dict]:
    """Write `out_path`: the records of `records_path` plus each canary of group k repeated k times
    (ids '<canary id>#c<j>', only the fields id/problem/solution/lang), shuffled with `seed`.
    copies_list: list of group sizes (see `assign_copies`), or None to keep each canary's `copies`.
    Returns the canaries with `copies` set (also written to `canaries_out` when given)."""
    records = [r for _, r in iter_jsonl(records_path, required=("problem", "solution"))]
    canaries = assign_copies(canaries, copies_list) if copies_list is not None else list(canaries)
    ids = {r.get("id") for r in records}
    for c in canaries:
        if not isinstance(c.get("copies"), int) or c["copies"] < 0:
            raise PrivcodeError(f"canary '{c.get('id')}' has no integer copies ≥ 0", field="copies")
        if c["id"] in ids:
            raise PrivcodeError(f"canary id '{c['id']}' collides with a record id", path=records_path)
        split_at_secret(c)
    rows = records
    for k in sorted({c["copies"] for c in canaries if c["copies"] > 0}):
        group = [{f: c[f] for f in ("id", "problem", "solution", "lang")} for c in canaries if c["copies"] == k]
        rows = inject(rows, group, copies=k)
    random.Random(f"privcode-inject-{seed}").shuffle(rows)
    write_jsonl(out_path, rows)
    if canaries_out is not None:
        write_jsonl(canaries_out, canaries)
    return canaries


def load_canaries(path) -> list[dict]:
    """The canaries file `inject_canaries` wrote (checked: copies, the secret in the solution)."""
    out = []
    for line, c in iter_jsonl(path, required=CANARY_FIELDS):
        if not isinstance(c.get("copies"), int) or c["copies"] < 0:
            raise PrivcodeError("expected an integer ≥ 0 (times the canary was put into the data)", path=path,
                                line=line, field="copies")
        if c["secret"] not in c["solution"]:
            raise PrivcodeError("the secret does not occur in the solution", path=path, line=line, field="secret")
        out.append(c)
    if not out:
        raise PrivcodeError("no canaries", path=path)
    return out


# ------------------------------------------------------------------------------------------------
# privcode inject-canaries


@dataclass
class InjectConfig(Params):
    _what = "inject-canaries"
    kinds: list = field(default_factory=lambda: list(DEFAULT_KINDS))
    per_kind: int = 10
    copies: list = field(default_factory=lambda: [5, 10, 100])  # copies-groups (see assign_copies)
    seed: int = 0


def main(argv=None) -> None:
    """privcode inject-canaries --data records.jsonl --out DIR --params '{"kinds": [...], "per_kind": 6,
    "copies": [0, 5, 10, 100], "seed": 0}' → DIR/records.jsonl (private data + canaries),
    DIR/canaries.jsonl (ground truth), DIR/privacy.json (raw private data: ε = inf)."""
    from privcode import ledger

    ap = argparse.ArgumentParser(prog="privcode inject-canaries", description=main.__doc__)
    ap.add_argument("--data", required=True, help="private records JSONL")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON: kinds, per_kind, copies, seed")
    a = ap.parse_args(argv)
    cfg = parse_params(a.params, InjectConfig)
    canaries = make_pii_canaries(cfg.kinds, cfg.per_kind, cfg.seed)
    with atomic_dir(a.out, private=True) as tmp:  # private data (and the canaries' secrets): the zone
        canaries = inject_canaries(a.data, canaries, cfg.copies, tmp / "records.jsonl", seed=cfg.seed,
                                   canaries_out=tmp / "canaries.jsonl")
        n = sum(1 for _ in iter_jsonl(tmp / "records.jsonl"))
        ledger.private_source(tmp, stage="inject_canaries", n_records=n, parents=[str(Path(a.data).parent)],
                              canaries=len(canaries), copies=sorted({c["copies"] for c in canaries}))
    print(json.dumps({"records": n, "canaries": len(canaries)}))
