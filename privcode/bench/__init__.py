"""`privcode bench <what>`: benchmarks (speed figures live here, never in timed unit tests).

    privcode bench exec       # sandbox / execution-filter throughput (snippets per second per core)
    privcode bench train      # tokens/s of a training step: privcode vs peers (GPU)
    privcode bench generate   # tokens/s of the generation stage vs plain model.generate (GPU)
    privcode bench attention  # the decoder's own-cache attention paths alone: ms per step, GB/s (GPU)
    privcode bench pipeline   # unit cost of every stage, GPU-hours of one PrivCode column (GPU)
    privcode bench zero       # DP fine-tuning under DeepSpeed ZeRO-3 on one GPU vs the DDP path (GPU)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCHES = {
    "exec": "privcode.bench.exec_bench",
    "train": "privcode.bench.train_bench",
    "generate": "privcode.bench.generate_bench",
    "attention": "privcode.bench.attention_bench",
    "pipeline": "privcode.bench.pipeline_bench",
    "zero": "privcode.bench.zero_bench",
}


def save_result(res: dict, path) -> Path:
    """A benchmark's result JSON, written atomically (values JSON cannot hold as their str); says where."""
    import json

    from privcode.io import atomic_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as fh:
        json.dump(res, fh, indent=1, default=str)
    print(f"wrote {out}")
    return out


def parser(name: str, doc: str):
    """The argument parser of `privcode bench <name>`: the bench module's docstring as its description."""
    import argparse

    return argparse.ArgumentParser(prog=f"privcode bench {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(__doc__)
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    importlib.import_module(BENCHES[argv[0]]).main(argv[1:])
