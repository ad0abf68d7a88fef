"""The state of a results tree, from the release side only (nothing in the private zone is read).

    privcode status                 # ./results
    privcode status --results runs/table4/results
    privcode status --artifact results/synth/smollm2/privsa/eps4/exec     # one line (each job prints it)

One line per artifact directory (every directory with a privacy.json), grouped by stage: its ε, δ
and caveats, and what its stage produced (synthetic-data funnel counts, pass@1); then the tables
that exist. Stages with no artifact yet are listed as missing.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from privcode import ledger, zone
from privcode.errors import PrivcodeError

STAGES = [("models", "base models"), ("data", "public prompts"), ("dp", "DP fine-tunes (stage 1, DPFT, JFT)"),
          ("synth", "synthetic data (generate, exec, round trip)"), ("ft", "fine-tunes (stage 6, NonDPFT)"),
          ("eval", "evaluations"), ("leakage", "leakage (Table 4)"), ("vuln", "vulnerability")]


def _what(d: Path) -> str:
    def js(name):
        p = d / name
        return json.loads(p.read_text()) if p.exists() else {}

    if d.name == "generated":
        s = js("stats.json")
        return f"{s.get('prompts')} prompts answered ({s.get('with_code')} with code) in {s.get('seconds', 0):.0f} s"
    rec = ledger.read(d)
    if rec["stage"] == "dp_finetune":
        rel = [r for r in rec["releases"] if r.get("kind") == "dp"]
        return f"DP-SGD, {rel[-1]['steps']} steps, σ={rel[-1]['noise_multiplier']:.3g}" if rel else ""
    if d.name in ("exec", "noexec"):  # noexec: ablation, nothing executed (privcode.filters.passthrough)
        s = js("stats.json")
        how = f"backend {s.get('backend')}" if d.name == "exec" else "not executed"
        return f"kept {s.get('n_kept')}/{s.get('n_input')} ({how})"
    if "roundtrip" in d.name:
        s = js("stats.json")
        return f"kept {s.get('kept')}/{s.get('samples')} at τ={s.get('threshold')}"
    s = js("scores.json")
    if s:
        keys = [k for k in ("base_pass@1", "plus_pass@1", "pass@1") if k in s]
        return ", ".join(f"{k} {s[k]:.1f}" for k in keys)
    return ""


def line(d: Path, root: Path | None = None) -> str:
    """One line about one artifact: its guarantee and what it holds."""
    rec = ledger.read(d)
    eps = "inf" if math.isinf(rec["epsilon"]) else f"{rec['epsilon']:.4g}"
    flag = "" if rec["dp_release"] or rec["epsilon"] == 0 else "  [not a DP release]"
    notes = f"  ({'; '.join(rec['notes'])})" if rec["notes"] else ""
    what = _what(d)
    name = d.relative_to(root) if root else d
    return f"{name}: ε={eps} δ={rec['delta']:g}{flag}{notes}" + (f"  — {what}" if what else "")


def lines(results: Path) -> list[str]:
    out = []
    for key, title in STAGES:
        dirs = sorted(p.parent for p in (results / key).rglob(ledger.FILENAME)) if (results / key).exists() else []
        out.append(f"{title}: {len(dirs) or 'missing'}")
        out += [f"  {line(d, results)}" for d in dirs]
    tables = [t for t in ("table3.csv", "compare.csv", "table4.csv", "table5.csv", "vuln.csv") if (results / t).exists()]
    out.append(f"tables: {', '.join(tables) or 'none yet'}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode status", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--artifact", type=Path, nargs="+", help="one line per artifact directory instead "
                    "(what each Snakemake job prints when it finishes)")
    a = ap.parse_args(argv)
    if a.artifact:
        for d in a.artifact:
            if zone.contains(d):
                raise PrivcodeError("inside the private zone: status reads the release side only", path=d)
            print(line(d))
        return
    print("\n".join(lines(a.results)))
