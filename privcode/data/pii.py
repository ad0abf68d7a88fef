"""PII detection in generated code: a regex detector (default, offline) and StarPII (optional).

    from privcode.data.pii import detect
    detect('ADMIN_EMAIL = "maria.lee4821@example.org"')
    # [{'kind': 'email', 'span': (15, 41), 'text': 'maria.lee4821@example.org'}]

Kinds (shared by both detectors and by the leakage canaries): email, ip, key, password, username,
name.

Regex detector (`detector: regex`), what it finds and its limits:
- email: RFC-5322-ish `local@domain.tld`; addresses at example.com/.org/.net are PII-*shaped* test
  data but are reported too (the leakage canaries use them). Misses obfuscated addresses ("a at b").
- ip: dotted IPv4 with every octet ≤ 255 (not preceded/followed by another digit or dot, so
  version strings such as 1.2.3.4.5 are skipped) and IPv6 (full or `::`-compressed, validated by
  `ipaddress`). 0.0.0.0, 127.0.0.0/8, 255.255.255.255, ::1 and :: are not reported (they identify no
  one); private ranges (10/8, 192.168/16, ...) are, as in StarPII's training labels. A four-part
  version number with small parts ("1.2.3.4") is indistinguishable from an address and is reported.
- key: well-known token formats — AWS access key ids (AKIA/ASIA…), GitHub (ghp_…, github_pat_…),
  Slack (xox?-…), Google API keys (AIza…), Stripe (sk_live_…), JWTs, PEM private-key headers — and
  bare hexadecimal strings of 32+ characters (this also catches hashes/UUID-less digests: a known
  false-positive source), plus values of 6+ characters assigned to key-like names (`api_key = "…"`,
  `token: "…"`).
- password: quoted values (4+ characters) assigned to password-like names (password, passwd, pwd, secret,
  db_pass, …) in Python/JSON/YAML/INI style; obvious placeholders ("", "changeme", "<password>",
  "xxx", "your_password", "${VAR}") are ignored. Passwords not assigned to such a name are missed.
- username: quoted values assigned to user/username/login/user_name/db_user; misses usernames in
  prose or URLs (user@host is reported as an email when it has a TLD).
- name: "Given [M.] Surname" where Given is one of ~200 common English given names (`GIVEN_NAMES`)
  and Surname is a capitalized word not in a small stop list; anywhere in the text (comments,
  strings, prose). Names with other given names, lowercase names, or single names are missed;
  capitalized phrases that start with a listed name ("Grant Access", "Will Return") can be false
  positives (the stop list removes the common ones).

StarPII (`detector: starpii`): the paper-style NER model `bigcode/starpii` (a gated Hugging Face
repository: accept its terms and log in, or give a local copy as `model`) run through the
transformers token-classification pipeline with `aggregation_strategy="simple"`; its labels
(EMAIL, IP_ADDRESS, KEY, PASSWORD, USERNAME, NAME) map to the kinds above. Not used offline/in tests.
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from typing import Iterable

KINDS = ("email", "ip", "key", "password", "username", "name")
# when two detections overlap, the longer wins; on equal spans the earlier kind in this order
_PRIORITY = {k: i for i, k in enumerate(("key_format", "email", "ip", "key_var", "password", "username", "key", "name"))}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})(?![\w:])"
                   r"|(?<![\w:])::(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}(?![\w:])")
_KEY_FORMATS = [
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b"),      # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b"),                                  # GitHub token
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b"),
    re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),                                   # Slack
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),                                           # Google API key
    re.compile(r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{16,}\b"),                            # Stripe
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),   # JWT
    re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY(?: BLOCK)?-----"),
]
_HEX = re.compile(r"(?<![0-9A-Za-z_])[0-9a-fA-F]{32,}(?![0-9A-Za-z_])")

_Q = r"""(?P<q>["'])(?P<v>(?:(?!(?P=q))[^\\\n]|\\.){1,200})(?P=q)"""  # a one-line quoted string
_ASSIGN = r"""(?:["']?)\s*(?:=|:|=>|:=)\s*(?:[rbuf]{0,2})"""  # `name = "v"`, `"name": "v"`, `name: 'v'`


def _assign(names: str) -> re.Pattern:
    return re.compile(rf"""(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]+_)*(?:{names})(?:_[A-Za-z0-9]+)*{_ASSIGN}{_Q}""")


_PASSWORD = _assign(r"password|passwd|passwort|pass|pwd|secret|secret_key|passphrase|db_pass")
_USERNAME = _assign(r"user|username|user_name|login|userid|user_id|uname")
_KEYVAR = _assign(r"api_?key|apikey|access_?key|auth_?token|token|secret_?token|private_?key|client_?secret")
_PLACEHOLDER = re.compile(r"""(?ix)^(?:|\s+|x+|\*+|\.+|-+|<[^>]*>|\{[^}]*\}|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|%\(?\w*\)?s
    |(?:your|my|enter|insert|some|example|dummy|fake|sample|default|placeholder)(?:[_ -]\w+)*
    |password|passwd|pass|pwd|secret|changeme|change_me|admin|root|user|username|login|none|null|token|key
    |api[_-]?key|todo|tbd|redacted|hidden|\?+)$""")
_MIN_LEN = {"password": 4, "username": 2, "key": 6}  # shorter assigned values are not reported
_WORDLIKE_VALUE = re.compile(r"^[A-Za-z ]+\.?$")  # "Enter your password." etc. for password values

GIVEN_NAMES = frozenset("""
Aaron Abigail Adam Adrian Alan Albert Alex Alexander Alice Alicia Allison Amanda Amber Amy Andrea Andrew Angela
Anna Anne Anthony Antonio Ashley Barbara Benjamin Betty Beverly Brandon Brenda Brian Bruce Bryan Carl Carlos
Carol Caroline Catherine Charles Charlotte Cheryl Chris Christian Christina Christine Christopher Claire Cynthia
Daniel Danielle David Deborah Denise Dennis Diana Diane Donald Donna Doris Dorothy Douglas Dylan Edward
Elena Elizabeth Ellen Emily Emma Eric Ethan Eugene Evelyn Frances Frank Gabriel Gary George Gerald Gloria
Grace Gregory Hannah Harold Heather Helen Henry Isabella Jack Jacob Jacqueline James Jane Janet Janice Jason
Jean Jeffrey Jennifer Jeremy Jerry Jesse Jessica Joan Joe John Johnny Jonathan Jordan Jose Joseph Joshua
Joyce Juan Judith Judy Julia Julie Justin Karen Katherine Kathleen Kathryn Keith Kelly Kenneth Kevin Kimberly
Kyle Larry Laura Lauren Lawrence Linda Lisa Logan Louis Madison Margaret Maria Marie Marilyn Marisol Mark
Martha Mary Matthew Megan Melissa Michael Michelle Nancy Natalie Nathan Nicholas Nicole Noah Olivia Pamela
Patricia Patrick Paul Peter Philip Rachel Ralph Randy Raymond Rebecca Richard Robert Roger Ronald Rose Russell
Ruth Ryan Samantha Samuel Sandra Sara Sarah Scott Sean Sharon Shirley Sophia Stephanie Stephen Steven Susan
Teresa Terry Thomas Timothy Tyler Victoria Vincent Virginia Walter Wayne William Zachary
""".split())
_NAME_STOP = frozenset("""
Access Account Add Admin After All And Api App Array Base Bool Build Call Case Check Class Client Code Config
Count Create Data Date Default Delete Dict Error Event False File Filter For From Function Get Handler Http
If Import In Index Info Input Int Item Key List Load Log Main Manager Map Model Name New None Not Null Number
Object Of Or Output Parse Path Post Print Process Query Read Request Response Result Return Run Save Self
Server Service Set Start State String Test The This To True Type Update User Value View Write
""".split())
_NAME = re.compile(r"\b([A-Z][a-z]+) (?:([A-Z])\. )?([A-Z][a-z]+(?:-[A-Z][a-z]+)?|Mc[A-Z][a-z]+|O'[A-Z][a-z]+)\b")


def _hit(kind: str, m: re.Match, group: int | str = 0) -> dict:
    return {"kind": kind, "span": (m.start(group), m.end(group)), "text": m.group(group)}


def _ip_ok(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or (ip.version == 4 and str(ip) == "255.255.255.255"))


def _regex_candidates(text: str) -> Iterable[dict]:
    for m in _EMAIL.finditer(text):
        yield _hit("email", m)
    for m in _IPV4.finditer(text):
        if all(int(g) <= 255 and (g == "0" or not g.startswith("0")) for g in m.groups()) and _ip_ok(m.group(0)):
            yield _hit("ip", m)
    for m in _IPV6.finditer(text):
        if _ip_ok(m.group(0)) and m.group(0).count(":") >= 2:
            yield _hit("ip", m)
    for rx in _KEY_FORMATS:
        for m in rx.finditer(text):
            yield {**_hit("key", m), "_prio": "key_format"}
    for m in _HEX.finditer(text):
        if len(set(m.group(0).lower())) >= 6:  # not "0000…" or "ffff…"
            yield {**_hit("key", m), "_prio": "key_format"}
    for rx, kind in ((_PASSWORD, "password"), (_USERNAME, "username"), (_KEYVAR, "key")):
        for m in rx.finditer(text):
            v = m.group("v")
            if _PLACEHOLDER.match(v.strip()) or (kind == "password" and " " in v.strip() and _WORDLIKE_VALUE.match(v)):
                continue
            if kind == "username" and not re.fullmatch(r"[A-Za-z0-9_.@-]{2,64}", v):
                continue
            if len(v) < _MIN_LEN[kind]:
                continue
            yield {**_hit(kind, m, "v"), **({"_prio": "key_var"} if rx is _KEYVAR else {})}
    for m in _NAME.finditer(text):
        given, last = m.group(1), m.group(3)
        if given in GIVEN_NAMES and last not in _NAME_STOP and last not in GIVEN_NAMES:
            yield _hit("name", m)


def _resolve(hits: list[dict]) -> list[dict]:
    """Drop detections contained in a longer (or equal-span, higher-priority) one; sort by position."""
    def prio(h):
        return _PRIORITY[h.get("_prio", h["kind"])]

    hits = sorted(hits, key=lambda h: (h["span"][0], -(h["span"][1] - h["span"][0]), prio(h)))
    out: list[dict] = []
    for h in hits:
        s, e = h["span"]
        if any(o["span"][0] <= s and e <= o["span"][1] for o in out):
            continue
        out.append(h)
    return [{"kind": h["kind"], "span": h["span"], "text": h["text"]} for h in out]


def detect(text: str) -> list[dict]:
    """Regex PII detections in `text`: [{kind, span: (start, end), text}], by position, no overlaps
    where one detection lies inside another."""
    if not text:
        return []
    return _resolve(list(_regex_candidates(text)))


class StarPII:
    """bigcode/starpii through a transformers token-classification pipeline (needs the model weights)."""

    LABELS = {"EMAIL": "email", "IP_ADDRESS": "ip", "KEY": "key", "PASSWORD": "password",
              "USERNAME": "username", "NAME": "name"}

    def __init__(self, model: str = "bigcode/starpii", device: int | str | None = None, threshold: float = 0.5):
        from transformers import pipeline

        from privcode.models import default_device

        self.threshold = threshold
        self._pipe = pipeline("token-classification", model=model, aggregation_strategy="simple",
                              device=device if device is not None else default_device())

    def __call__(self, text: str) -> list[dict]:
        if not text:
            return []
        out = []
        for ent in self._pipe(text):
            kind = self.LABELS.get(str(ent.get("entity_group", "")).upper())
            if kind and float(ent.get("score", 0)) >= self.threshold:
                s, e = int(ent["start"]), int(ent["end"])
                out.append({"kind": kind, "span": (s, e), "text": text[s:e]})
        return out


def get_detector(name: str = "regex", **kw):
    """A callable text -> detections: 'regex' (this module's `detect`) or 'starpii'."""
    if name == "regex":
        return detect
    if name == "starpii":
        return StarPII(**kw)
    from privcode.errors import PrivcodeError

    raise PrivcodeError(f"unknown PII detector '{name}' (regex, starpii)", field="detector")


def count(detections_per_text: Iterable[list[dict]]) -> dict:
    """Summary over many texts: total detections, per kind, and texts with at least one."""
    by_kind: Counter = Counter()
    texts = with_pii = 0
    for d in detections_per_text:
        texts += 1
        with_pii += bool(d)
        by_kind.update(x["kind"] for x in d)
    return {"total": sum(by_kind.values()), "by_kind": {k: by_kind.get(k, 0) for k in KINDS},
            "texts": texts, "texts_with_pii": with_pii}
