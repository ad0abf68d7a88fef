"""Does a synthetic program do what its prompt asks? Each taskgen prompt states one example call and its
result ("For example, `f([1, 2])` should return `3`"); this runs every program with that example as an
assert, in privcode's sandbox (never in this process), and prints the pass rate of each set.

    python scripts/synth_example_check.py results/synth/smollm2/privsa/eps4/{exec/kept,exec/dropped,roundtrip/kept,roundtrip/dropped}.jsonl
    python scripts/synth_example_check.py --show 3 results/synth/smollm2/privsa/eps4/roundtrip/kept.jsonl

The exec filter only checks that a program runs (its definitions execute); this is the stricter check
the taskgen prompts allow. For analysis of a synthetic set (the DP release): it reads nothing private.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from privcode.sandbox import Limits, get_backend

EXAMPLE = re.compile(r"(?:For example,|Example:|e\.g\.,?|for instance,?)\s*`([^`]+)`\s*"
                     r"(?:should return|returns|gives|is|==|->|evaluates to)\s*`([^`]+)`", re.I)


def example_assert(problem: str) -> str | None:
    m = EXAMPLE.search(problem)
    return f"\nassert ({m.group(1)}) == ({m.group(2)}), 'example'\n" if m else None


def program(r: dict) -> str:
    """The program of a synthetic row: `code`, else `solution` without its markdown fence."""
    text = r.get("code") or r.get("solution") or ""
    m = re.search(r"```[\w+-]*\n(.*?)```", text, re.S)
    return m.group(1) if m else text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="JSONL with problem and code (or solution)")
    ap.add_argument("--show", type=int, default=0, help="print this many passing and failing examples")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    sets = {f: [json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in a.files}
    # dropped rows carry only an id: their problem and program come from the other files (e.g. exec/kept)
    known = {r["id"]: r for rows in sets.values() for r in rows if r.get("problem") and program(r)}
    box = get_backend("auto", require_isolation=True)
    with box.pool(a.workers, Limits(wall_s=5, cpu_s=5)) as pool:
        for f, rows in sets.items():
            res = {"pass": [], "fail": [], "no example": []}
            for r in rows:
                r = r if r.get("problem") and program(r) else known.get(r.get("id"), r)
                test, code = example_assert(r.get("problem", "")), program(r)
                if test is None:
                    res["no example"].append(r)
                    continue
                res["pass" if pool.run(code + test, "python").ok else "fail"].append(r)
            n = len(res["pass"]) + len(res["fail"])
            print(f"{f}: {len(rows)} programs, {len(res['pass'])}/{n} pass their prompt's example"
                  f" ({100 * len(res['pass']) / max(n, 1):.1f} %), {len(res['no example'])} without one")
            for kind in ("pass", "fail"):
                for r in res[kind][:a.show]:
                    print(f"--- {kind}: {r.get('id')}\n{r['problem']}\n{program(r)}")


if __name__ == "__main__":
    main()
