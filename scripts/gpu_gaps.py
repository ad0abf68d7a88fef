"""Where a training step leaves the GPU idle: kernel gaps of a `privcode bench train` variant,
attributed to the Python frames that were running on the CPU at the time.

    python3 scripts/gpu_gaps.py privcode-dp-privsa              # 1.5B shape, one CUDA GPU
    python3 scripts/gpu_gaps.py privcode-dp --shape 7b --steps 3

Profiles `--steps` steps after `--warmup` (torch.profiler with Python stacks), then lists the
gaps longer than `--min-gap-us` between GPU kernels, summed by the innermost frames alive at each
gap's midpoint. A GPU-bound step shows small, scattered gaps; one frame with a large total is
CPU work the GPU waits for (an example and what it found: docs/performance.md, the profiles in
docs/measurements/profiles/). CUDA only; random weights (no hub access needed).
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def gaps(trace: dict, min_gap_us: float) -> tuple[float, float, list[tuple[float, float, float]]]:
    """(span µs, busy µs, [(gap µs, start, end)]) of the GPU events in a chrome trace."""
    ev = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in trace["traceEvents"] if e.get("cat") in GPU_CATS)
    if not ev:
        raise SystemExit("no GPU events in the trace (is this a CUDA device?)")
    out, end = [], ev[0][1]
    for a, b in ev[1:]:
        if a - end > min_gap_us:
            out.append((a - end, end, a))
        end = max(end, b)
    return ev[-1][1] - ev[0][0], sum(b - a for a, b in ev), out


def attribute(trace: dict, found, depth: int = 4) -> collections.Counter:
    """Gap time by the `depth` innermost Python frames alive at each gap's midpoint."""
    py = [e for e in trace["traceEvents"] if e.get("cat") == "python_function" and "dur" in e]
    where: collections.Counter = collections.Counter()
    for g, s, t in found:
        mid = (s + t) / 2
        live = sorted((e for e in py if e["ts"] <= mid <= e["ts"] + e["dur"]), key=lambda e: e["dur"])
        where[" < ".join(e["name"].split("/")[-1][:70] for e in live[:depth]) or "(no Python frame)"] += g
    return where


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", help="a privcode bench train variant, e.g. privcode-dp-privsa")
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--min-gap-us", type=float, default=50.0)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from privcode.bench.shapes import get_shape
    from privcode.bench.train_bench import Bench

    if not torch.cuda.is_available():
        raise SystemExit("gpu_gaps needs a CUDA device")
    step, cleanup = Bench(get_shape(a.shape), "cuda", torch.bfloat16, lam=0.5).variant(a.variant)
    for _ in range(a.warmup):
        step(1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(a.steps):
            step(1)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    cleanup()
    span, busy, found = gaps(trace, a.min_gap_us)
    print(f"{a.variant}: GPU span {span / 1e3:.1f} ms for {a.steps} steps, busy {busy / 1e3:.1f} ms, "
          f"gaps > {a.min_gap_us:g} us: {sum(g for g, *_ in found) / 1e3:.1f} ms in {len(found)}")
    for k, v in attribute(trace, found).most_common(a.top):
        print(f"{v / 1e3:8.2f} ms  {k}")


if __name__ == "__main__":
    main()
