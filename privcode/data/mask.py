"""JFT's first stage input: the private records with detected PII replaced by placeholders.

    privcode mask-pii --data private/data/private_canary/records.jsonl --out private/data/private_masked \
        --params '{"detector": "regex"}'

Not a privacy mechanism in the DP sense: masking misses what the detector misses, so the output
is still private data (its privacy.json keeps ε = inf for one record). JFT ("just fine-tune
twice") gives *selective* DP — protection of the masked spans — not record-level DP; table3 says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir, iter_jsonl, write_json, write_jsonl
from privcode.params import WHERE, Params, parse_params, stage_parser

MASK_NOTE = "selective DP only: a non-private stage read PII-masked private data"


def mask_text(text: str, detector) -> tuple[str, int]:
    spans = sorted(detector(text), key=lambda d: d["span"][0])
    out, last, n = [], 0, 0
    for d in spans:
        s, e = d["span"]
        if s < last:
            continue
        out += [text[last:s], f"<{d['kind'].upper()}>"]
        last, n = e, n + 1
    out.append(text[last:])
    return "".join(out), n


DETECTORS = ("regex", "starpii")


@dataclass
class MaskConfig(Params):
    """Options of `privcode mask-pii --params`: the config's jft section."""
    _what = "mask-pii"
    detector: str = "regex"  # regex | starpii (privcode.data.pii)

    def __post_init__(self):
        if self.detector not in DETECTORS:
            raise PrivcodeError(f"must be one of {list(DETECTORS)}, got {self.detector!r}", path=WHERE,
                                field="detector")


def main(argv=None) -> None:
    from privcode import ledger
    from privcode.data.pii import get_detector

    a = stage_parser("mask-pii", __doc__, {"data": "private records JSONL", "out": ("output directory", Path)},
                     MaskConfig).parse_args(argv)
    c = parse_params(a.params, MaskConfig)
    det = get_detector(c.detector)
    recs, masked = [], 0
    for _, r in iter_jsonl(a.data, required=("problem", "solution")):
        r = dict(r)
        for f in ("problem", "solution"):
            r[f], n = mask_text(r[f], det)
            masked += n
        recs.append(r)
    with atomic_dir(a.out, private=True) as tmp:  # still private data: the private zone
        write_jsonl(tmp / "records.jsonl", recs)
        write_json(tmp / "stats.json", {"records": len(recs), "masked_spans": masked, "detector": c.detector})
        # derived from private data without DP: ε = inf, the same data set for the budget
        ledger.private_source(tmp, stage="mask_pii", n_records=len(recs), parents=[str(Path(a.data).parent)],
                              note=MASK_NOTE, detector=c.detector)
    print(json.dumps({"records": len(recs), "masked_spans": masked}))
