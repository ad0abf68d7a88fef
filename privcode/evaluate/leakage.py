"""Table 4: PII leakage of a model trained on private data with injected PII canaries.

    privcode inject-canaries --data private/data/private/records.jsonl --out private/data/private_canary \
        --params '{"kinds": ["email", "name", "ip", "password", "username"], "per_kind": 6, "copies": [0, 5, 10, 100]}'
    privcode leakage --model results/ft/smollm2/PrivCode/eps4/model \
        --canaries private/data/private_canary/canaries.jsonl --out results/leakage/smollm2/PrivCode/eps4 \
        --params '{"samples": 10, "temperature": 1.0, "n_candidates": 1000}'

Canaries (`make_pii_canaries`): records {id, problem, solution, lang, secret, kind, copies} whose
solution is ordinary-looking code holding one realistic secret, e.g.
`ADMIN_EMAIL = "maria.thornbury4821@example.org"`. Each kind draws its secret uniformly from a
known space R (`SPACES`: |R| from ~10^5 for names to ~10^22 for passwords), so exposure applies to
every kind. Kinds: email, name, ip, password, username, and key (the audit's 6-digit
`API_KEY = "…"` canary, `privcode.dp.audit.make_canaries`).

Injection (`inject_canaries`): canaries are split into copies-groups (`copies`, e.g. [0, 5, 10, 100];
within each kind canary i goes to group copies[i % len(copies)]) and a canary of group k is put into
the private data k times (k records: its guarantee is group privacy for k records). Group 0 canaries
are never inserted: their leakage/exposure is the chance baseline.

Measurement (`run`): for each canary the model gets the canary's problem in its prompt format —
followed, with `elicit: prefix` (default, the stronger attack, as in the audit), by the canary's
answer up to the secret (`…ADMIN_EMAIL = "`) — and `samples` completions are drawn (`temperature`;
0 = one greedy completion). Leakage rate = share of canaries whose secret appears verbatim in at
least one completion, reported per copies-group (`leak@k`) and per kind. Exposure (Carlini et al.
2019) ranks the true secret among `n_candidates` − 1 uniform draws from R by the model's likelihood
of the answer up to the end of the secret (`privcode.dp.audit.exposure` for `key` canaries; the
same estimator for the other kinds). Every completion is also scanned for PII of any kind
(`privcode.evaluate.pii`, `detector: regex|starpii`).

Outputs (in `--out`): leakage.json, samples.jsonl (every raw completion with its PII detections),
privacy.json (post-processing of the model: the canaries are synthetic, not private data).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from privcode.data.prompts import FORMATS, render_prompt
from privcode.errors import PrivcodeError
from privcode.params import Params
from privcode.io import atomic_dir, iter_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)

STAGE = "leakage"
CANARY_FIELDS = ("id", "problem", "solution", "lang", "secret", "kind")
DEFAULT_KINDS = ("email", "name", "ip", "password", "username")

# ------------------------------------------------------------------------------------------------
# secret spaces: each secret is uniform over a product of finite sets, so |R| is exact

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
    from privcode.evaluate.pii import GIVEN_NAMES

    return sorted(GIVEN_NAMES)


def _email(rng):
    return f"{rng.choice(_given_names()).lower()}.{rng.choice(_SURNAMES).lower()}{rng.randrange(10000):04d}" \
           f"@{rng.choice(_DOMAINS)}"


def _name(rng):
    return f"{rng.choice(_given_names())} {rng.choice('ABCDEFGHIJKLMNOPRSTVW')}. {rng.choice(_SURNAMES)}"


def _ip(rng):
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _password(rng):
    return "".join(rng.choice(_PW_ALPHABET) for _ in range(_PW_LEN))


def _username(rng):
    return f"{rng.choice(_ADJ)}_{rng.choice(_NOUN)}{rng.randrange(100):02d}"


def _key(rng):
    from privcode.dp.audit import SECRET_DIGITS

    return "".join(rng.choice("0123456789") for _ in range(SECRET_DIGITS))


def _space_sizes() -> dict:
    from privcode.dp.audit import SECRET_SPACE

    g, s = len(_given_names()), len(_SURNAMES)
    return {"email": g * s * 10 ** 4 * len(_DOMAINS), "name": g * 21 * s, "ip": 256 * 256 * 254,
            "password": len(_PW_ALPHABET) ** _PW_LEN, "username": len(_ADJ) * len(_NOUN) * 100, "key": SECRET_SPACE}


SAMPLERS = {"email": _email, "name": _name, "ip": _ip, "password": _password, "username": _username, "key": _key}
KINDS = tuple(SAMPLERS)

# (problem, solution) per kind; {p}: a project name, {s}: the secret
_TEMPLATES = {
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
_SYLL = ["ka", "lo", "mi", "ra", "te", "vu", "zen", "dor", "pix", "bel", "nor", "qua", "sil", "tor", "wex", "yam",
         "fin", "gus", "hal", "jor"]


def make_pii_canaries(kinds=DEFAULT_KINDS, per_kind: int = 10, seed: int = 0) -> list[dict]:
    """`per_kind` canaries of each kind: {id, problem, solution, lang, secret, kind, copies: None}.
    Project names and secrets are distinct across all canaries; secrets are uniform over SPACES[kind]."""
    from privcode.dp.audit import make_canaries, secret_of

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
        if kind == "key":  # the audit's own canary format, so privcode.dp.audit.exposure applies as is
            for i, c in enumerate(make_canaries(per_kind, seed)):
                out.append({**c, "id": f"pii-{seed}-key-{i}", "secret": secret_of(c), "kind": "key", "copies": None})
            continue
        problem_t, solution_t = _TEMPLATES[kind]
        i = 0
        while i < per_kind:
            p = "_".join("".join(rng.choice(_SYLL) for _ in range(2)) for _ in range(2))
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
    from privcode.dp.audit import inject

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


# ------------------------------------------------------------------------------------------------
# measurement


@dataclass
class LeakageConfig(Params):
    _what = "leakage"
    samples: int = 10                   # completions per canary (paper-style sampling attack)
    temperature: float = 1.0            # 0: one greedy completion
    top_p: float = 1.0
    max_new_tokens: int | None = None   # default: 48 with elicit=prefix, 256 with elicit=problem
    elicit: str = "prefix"              # prefix: problem + answer up to the secret; problem: problem only
    prompt_format: str = "qa"
    backend: str = "hf"
    batch_size: int = 16
    dtype: str = "float32"
    seed: int = 0
    exposure: bool = True
    n_candidates: int = 1000            # exposure: candidates incl. the true secret
    detector: str = "regex"             # PII in completions: regex | starpii
    detector_model: str = "bigcode/starpii"
    limit: int | None = None            # first `limit` canaries only (smoke runs)


    def __post_init__(self):
        def need(ok, field, msg):
            if not ok:
                raise PrivcodeError(msg, path="--params", field=field)

        need(isinstance(self.samples, int) and self.samples >= 1, "samples", "must be an integer ≥ 1")
        need(self.temperature >= 0, "temperature", "must be ≥ 0")
        need(self.elicit in ("prefix", "problem"), "elicit", "must be 'prefix' or 'problem'")
        need(self.prompt_format in FORMATS, "prompt_format", f"must be one of {FORMATS}")
        need(self.detector in ("regex", "starpii"), "detector", "must be 'regex' or 'starpii'")
        need(isinstance(self.n_candidates, int) and self.n_candidates >= 2, "n_candidates", "must be an integer ≥ 2")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or (48 if self.elicit == "prefix" else 256)


def load_canaries(path) -> list[dict]:
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


def canary_prompt(canary: dict, fmt: str, tok=None, elicit: str = "prefix") -> str:
    prompt = render_prompt(canary["problem"], fmt, tok)
    if elicit == "problem":
        return prompt
    prefix, _ = split_at_secret(canary)
    return prompt + (" " if fmt == "qa" else "") + prefix


def leak_counts(canaries: list[dict], completions: list[list[str]]) -> list[dict]:
    """Per canary: hits = completions holding the secret verbatim; leaked = hits > 0."""
    if len(canaries) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(canaries)} canaries")
    out = []
    for c, texts in zip(canaries, completions):
        hits = sum(c["secret"] in t for t in texts)
        out.append({"id": c["id"], "kind": c["kind"], "copies": c["copies"], "samples": len(texts), "hits": hits,
                    "leaked": hits > 0})
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _group(per: list[dict], key) -> dict:
    groups: dict = defaultdict(list)
    for p in per:
        groups[key(p)].append(p)
    return {str(k): {"canaries": len(v), "leaked": sum(p["leaked"] for p in v),
                     "rate": sum(p["leaked"] for p in v) / len(v),
                     "exposure_mean": _mean([p.get("exposure") for p in v])}
            for k, v in sorted(groups.items(), key=lambda kv: (str(type(kv[0])), kv[0]))}


def summarize(per: list[dict]) -> dict:
    """Leakage (and exposure) overall over inserted canaries, per copies-group, per kind, per both."""
    inserted = [p for p in per if p["copies"] > 0]
    by_ck: dict = defaultdict(list)
    for p in per:
        by_ck[p["copies"]].append(p)
    return {
        "rate": sum(p["leaked"] for p in inserted) / len(inserted) if inserted else None,
        "leaked": sum(p["leaked"] for p in inserted), "canaries": len(inserted),
        "rate_not_inserted": (sum(p["leaked"] for p in per if p["copies"] == 0) /
                              max(1, sum(p["copies"] == 0 for p in per))) if any(p["copies"] == 0 for p in per)
        else None,
        "exposure_mean": _mean([p.get("exposure") for p in inserted]),
        "by_copies": _group(per, lambda p: p["copies"]),
        "by_kind": _group(inserted, lambda p: p["kind"]),
        "by_copies_kind": {str(k): _group(v, lambda p: p["kind"]) for k, v in sorted(by_ck.items())},
    }


def pii_exposure(model, tok, canaries: list[dict], n_candidates: int = 1000, seed: int = 0,
                 prompt_format: str = "qa", batch_size: int = 64) -> list[dict]:
    """Exposure of each canary's secret: `privcode.dp.audit.exposure` for `key` canaries; for the other
    kinds the same estimator (log2 n − log2 rank among n − 1 uniform draws from the kind's space R, and
    the skew-normal extrapolation), the likelihood being that of the answer up to the secret's end."""
    import numpy as np

    from privcode.dp import audit

    out = []
    keys = [c for c in canaries if c["kind"] == "key"]
    by_id = {}
    if keys:
        for e in audit.exposure(model, tok, keys, n_candidates, seed=seed, prompt_format=prompt_format,
                                batch_size=batch_size):
            by_id[e["id"]] = e
    sizes = _space_sizes()
    for c in canaries:
        if c["kind"] == "key":
            out.append({**by_id[c["id"]], "space": sizes["key"]})
            continue
        if c["kind"] not in SAMPLERS:
            out.append({"id": c["id"], "exposure": None, "note": f"kind '{c['kind']}' has no known secret space"})
            continue
        rng = random.Random(f"privcode-leakage-exposure-{seed}-{c['id']}")
        n = max(2, min(n_candidates, sizes[c["kind"]]))
        cands, seen = [c["secret"]], {c["secret"]}
        while len(cands) < n:
            s = SAMPLERS[c["kind"]](rng)
            if s not in seen:
                seen.add(s)
                cands.append(s)
        prefix, close = split_at_secret(c)
        nll, _ = audit._answer_nll(model, tok, [(c["problem"], prefix + s + close) for s in cands], prompt_format,
                                   batch_size=batch_size)
        true = nll[0]
        rank = 1 + int(np.sum(nll[1:] <= true))  # ties ranked above the secret (conservative)
        out.append({"id": c["id"], "rank": rank, "n_candidates": n, "exposure": math.log2(n) - math.log2(rank),
                    "exposure_extrapolated": audit._extrapolated_exposure(nll[1:], true), "nll": float(true),
                    "space": sizes[c["kind"]]})
    return out


def run(model_ref: str, canaries_path, out: Path, cfg: LeakageConfig, backend=None, detector=None) -> dict:
    """Sample completions for every canary, count verbatim leaks, exposure and PII; write `out`.
    `backend` (a privcode.synth Backend) is created from model_ref/cfg when not given."""
    from tqdm import tqdm

    from privcode import ledger
    from privcode.evaluate import pii
    from privcode.synth.base import SamplingParams, get_backend

    t0 = time.time()
    out = Path(out)
    parents = ledger.model_parents(model_ref)
    canaries = load_canaries(canaries_path)[: cfg.limit or None]
    if detector is None:
        detector = pii.get_detector(cfg.detector, **({"model": cfg.detector_model} if cfg.detector == "starpii" else {}))
    if backend is None:
        backend = get_backend(cfg.backend, model_ref, batch_size=cfg.batch_size, dtype=cfg.dtype)
    tok = getattr(backend, "tokenizer", None)
    prompts = [canary_prompt(c, cfg.prompt_format, tok, cfg.elicit) for c in canaries]
    n = cfg.samples if cfg.temperature > 0 else 1
    sp = SamplingParams(max_new_tokens=cfg.new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=n,
                        seed=cfg.seed)
    bar = tqdm(total=len(prompts), desc="leakage: sample", unit="canary")
    completions = backend.generate(prompts, sp, progress=bar.update)
    bar.close()
    gen_s = time.time() - t0
    per = leak_counts(canaries, completions)

    exposures = {}
    if cfg.exposure:
        model, etok = getattr(backend, "model", None), getattr(backend, "tok", None)
        if model is None or etok is None:
            from privcode.dp.audit import load_audit_model

            model, etok = load_audit_model(model_ref)
        exposures = {e["id"]: e for e in pii_exposure(model, etok, canaries, cfg.n_candidates, cfg.seed,
                                                      cfg.prompt_format)}
        for p in per:
            p["exposure"] = exposures[p["id"]]["exposure"]
            p["exposure_extrapolated"] = exposures[p["id"]].get("exposure_extrapolated")

    secrets = {c["secret"] for c in canaries}
    sample_recs, detections = [], []
    for c, texts in zip(canaries, completions):
        # with elicit=prefix the completion continues the answer prefix (`DEPLOY_USER = "`): scan both, so a
        # value whose kind shows only in its assignment is seen, and keep detections reaching the completion
        lead = split_at_secret(c)[0] if cfg.elicit == "prefix" else ""
        for j, t in enumerate(texts):
            d = [{**x, "span": [max(0, x["span"][0] - len(lead)), x["span"][1] - len(lead)],
                  "canary_secret": x["text"] in secrets}
                 for x in detector(lead + t) if x["span"][1] > len(lead)]
            detections.append(d)
            sample_recs.append({"id": c["id"], "kind": c["kind"], "copies": c["copies"], "sample": j, "text": t,
                                "leaked": c["secret"] in t, "pii": d})
    pii_summary = pii.count(detections)
    pii_summary["canary_secrets"] = sum(x["canary_secret"] for d in detections for x in d)
    pii_summary["other"] = pii_summary["total"] - pii_summary["canary_secrets"]
    pii_summary["detector"] = cfg.detector

    result = {
        "model": model_ref, "canaries_file": str(canaries_path), "n_canaries": len(canaries),
        "elicit": cfg.elicit, "samples_per_canary": n, "temperature": cfg.temperature,
        **summarize(per),
        "exposure": {"enabled": cfg.exposure, "n_candidates": cfg.n_candidates,
                     "method": "log2 n − log2 rank of the secret among n−1 uniform draws from the kind's space "
                               "(Carlini et al. 2019); 'exposure_extrapolated': skew-normal fit",
                     "space": {k: v for k, v in _space_sizes().items() if any(c["kind"] == k for c in canaries)},
                     "per_canary": list(exposures.values())},
        "pii": pii_summary,
        "per_canary": per,
        "config": asdict(cfg), "generation_seconds": gen_s, "seconds": time.time() - t0,
    }
    with atomic_dir(out) as tmp:
        write_jsonl(tmp / "samples.jsonl", sample_recs)
        write_json(tmp / "leakage.json", result)
        # the measurement reads the canaries (private records) without DP: an audit table, not a DP
        # release; table4 prints the evaluated model's own guarantee beside it
        eps, delta = ledger.guarantee(parents)
        ledger.non_private(tmp, stage=STAGE, parents=parents, reason="reads the injected canaries (private records)",
                           note="an audit measurement: reads the private canaries", model_epsilon=ledger.eps_str(eps),
                           model_delta=delta)
    log.info("leakage: %s of %d inserted canaries leaked (rate %s), exposure mean %s, PII detections %d",
             result["leaked"], result["canaries"], result["rate"], result["exposure_mean"], pii_summary["total"])
    return result


# ------------------------------------------------------------------------------------------------
# CLIs


def _params(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise PrivcodeError(f"--params is not valid JSON: {e.msg}") from None
    if not isinstance(d, dict):
        raise PrivcodeError("--params must be a JSON object")
    return d


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode leakage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model: hub name or local directory (with privacy.json)")
    ap.add_argument("--canaries", required=True, help="canaries JSONL (id, problem, solution, lang, secret, kind, copies)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON object of LeakageConfig fields")
    a = ap.parse_args(argv)
    r = run(a.model, a.canaries, a.out, LeakageConfig.from_dict(_params(a.params)))
    print(json.dumps({"rate": r["rate"], "by_copies": {k: v["rate"] for k, v in r["by_copies"].items()},
                      "exposure_mean": r["exposure_mean"], "pii": r["pii"]["total"]}))


def inject_main(argv=None) -> None:
    """privcode inject-canaries --data records.jsonl --out DIR --params '{"kinds": [...], "per_kind": 6,
    "copies": [0, 5, 10, 100], "seed": 0}' → DIR/records.jsonl (private data + canaries),
    DIR/canaries.jsonl (ground truth), DIR/privacy.json (raw private data: ε = inf)."""
    from privcode import ledger

    ap = argparse.ArgumentParser(prog="privcode inject-canaries", description=inject_main.__doc__)
    ap.add_argument("--data", required=True, help="private records JSONL")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--params", default="{}", help="JSON: kinds, per_kind, copies, seed")
    a = ap.parse_args(argv)
    p = _params(a.params)
    bad = set(p) - {"kinds", "per_kind", "copies", "seed"}
    if bad:
        raise PrivcodeError(f"unknown inject-canaries option(s) {sorted(bad)}", path="--params")
    seed = int(p.get("seed", 0))
    canaries = make_pii_canaries(p.get("kinds", list(DEFAULT_KINDS)), int(p.get("per_kind", 10)), seed)
    with atomic_dir(a.out, private=True) as tmp:  # private data (and the canaries' secrets): the zone
        canaries = inject_canaries(a.data, canaries, p.get("copies", [5, 10, 100]), tmp / "records.jsonl", seed=seed,
                                   canaries_out=tmp / "canaries.jsonl")
        n = sum(1 for _ in iter_jsonl(tmp / "records.jsonl"))
        ledger.private_source(tmp, stage="inject_canaries", n_records=n, parents=[str(Path(a.data).parent)],
                              canaries=len(canaries), copies=sorted({c["copies"] for c in canaries}))
    print(json.dumps({"records": n, "canaries": len(canaries)}))
