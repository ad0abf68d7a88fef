"""`privcode bench attention`: the decoder's own-cache attention alone, every path at a model's real decode
shape -- how far each is from reading the caches at the card's memory bandwidth.

    privcode bench attention --shape 8b --rows 1280 --slots 256 --keys 20:200       # the round trip's rows
    privcode bench attention --shape 1.5b --rows 1024 --slots 640 --keys 128:640    # greedy, 128 + 512 tokens
    privcode bench attention --shape small --device cpu --rows 8 --slots 64 --paths math,triton

One decode step's attention of one layer over the rows' own caches (privcode.synth.decoder): queries
[rows, kv, G, d], caches [rows, kv, slots, d] in bf16 (fp32 on CPU), row i reading its first keys[i] (drawn
once, uniform in LO..HI, from a fixed generator), the rest of its slots poisoned. Each path (--paths: the
decoder's `attention` values for the own caches) is checked against the math path on the same inputs
(max_abs_err of the output; a path that reads past a row's keys is far off), then timed: ms per call (CUDA
events, after warm-up calls that compile), ms per step (x the shape's layers) and GB/s = the bytes of the keys
and values the rows must read / the call's time -- at the card's bandwidth (H100 SXM ~3.35 TB/s, H200 ~4.8
TB/s) the call is at its memory bound. A path that cannot run here is recorded with its error. Random
inputs; nothing private.
"""
from __future__ import annotations

import sys
import time

from privcode.bench import parser, save_result

PATHS = ("efficient", "flash", "flex", "triton", "math")


def inputs(shape, rows: int, slots: int, lo: int, hi: int, dtype, device, seed: int = 0):
    """(q [rows, kv, G, d], K, V [rows, kv, slots, d] with each row's slots past its count poisoned, counts
    int32 [rows]) for `shape`'s heads; the counts uniform in lo..hi."""
    import torch

    g = torch.Generator().manual_seed(seed)
    kv, d = shape.kv_heads, shape.hidden // shape.heads
    G = shape.heads // kv
    counts = torch.randint(lo, hi + 1, (rows,), generator=g, dtype=torch.int32)
    q = torch.randn(rows, kv, G, d, generator=g)
    K, V = (torch.randn(rows, kv, slots, d, generator=g) for _ in range(2))
    past = (torch.arange(slots)[None, :] >= counts[:, None].long()).view(rows, 1, slots, 1)
    K, V = (t.masked_fill(past, 1e3) for t in (K, V))
    put = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return put(q), put(K), put(V), counts.to(device)


def prepare(path: str, q, K, V, counts, scale: float):
    """A zero-argument call of the decoder's own-cache attention through `path` (decoder.own_attend) -> (o,
    lse), with what the decoder makes once per step for all layers (decoder.step_keys) made here, once."""
    import torch

    from privcode.synth import decoder

    if path.startswith("triton["):  # triton[keys,warps,stages]: the Triton kernel with that config
        config = tuple(int(x) for x in path[len("triton["):-1].split(","))
        return lambda: decoder.triton_attend(q, K, V, counts, scale, config)
    slots = K.shape[2]
    mask = (torch.arange(slots, device=q.device)[None, :] < counts[:, None]).view(-1, 1, 1, slots)
    keys = decoder.step_keys(decoder.prefix_keys(mask, q.dtype), slots, path)
    return lambda: decoder.own_attend(q, K, V, keys, scale, path)


def time_path(fn, device: str, warmup: int, iters: int) -> float:
    """Seconds per call of fn() (CUDA events on a GPU, wall time elsewhere), after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def bench(a) -> dict:
    import torch

    from privcode.bench.shapes import device_info, get_shape

    shape = get_shape(a.shape)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lo, _, hi = a.keys.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi <= a.slots:
        raise SystemExit(f"--keys {a.keys}: need 1 <= LO <= HI <= --slots {a.slots}")
    q, K, V, counts = inputs(shape, a.rows, a.slots, lo, hi, dtype, device)
    scale = q.shape[-1] ** -0.5
    ro, rl = prepare("math", q.float(), K.float(), V.float(), counts, scale)()
    # the bytes the rows must read: each row's keys and values of every KV head, nothing past its count
    need = int(counts.sum()) * K.shape[1] * K.shape[3] * 2 * K.element_size()
    res = {"info": device_info(device), "command": "privcode bench attention " + " ".join(a.argv),
           "shape": shape.name, "dtype": str(dtype).split(".")[-1], "rows": a.rows, "slots": a.slots,
           "keys": [lo, hi], "mean_keys": float(counts.float().mean()), "kv_heads": q.shape[1],
           "query_heads_per_kv": q.shape[2], "head_dim": q.shape[3], "layers": shape.layers,
           "bytes_per_call": need, "results": []}
    print(f"attention: {shape.name} {res['dtype']} on {res['info'].get('card', device)}: {a.rows} rows x "
          f"{q.shape[1]} KV heads x G {q.shape[2]} x d {q.shape[3]}, {a.slots} slots, keys {lo}..{hi} "
          f"(mean {res['mean_keys']:.0f}): {need / 1e6:.1f} MB to read per call")
    for path in a.paths.split(",") + [f"triton[{c}]" for c in a.triton_configs.split()]:
        try:
            fn = prepare(path, q, K, V, counts, scale)
            o, lse = fn()
            err = max(float((o.float() - ro).abs().max()), float((lse.float() - rl).abs().max()))
            s = time_path(fn, device, a.warmup, a.iters)
            r = {"path": path, "ms_per_call": s * 1e3, "ms_per_step": s * 1e3 * shape.layers,
                 "gb_s": need / s / 1e9, "max_abs_err": err}
            print(f"{path:9s} {r['ms_per_call']:8.3f} ms/call  {r['ms_per_step']:8.2f} ms/step ({shape.layers} "
                  f"layers)  {r['gb_s']:8.1f} GB/s  max err {err:.2e}", flush=True)
        except Exception as e:  # noqa: BLE001 - a path that cannot run here is a result
            r = {"path": path, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"{path:9s} cannot run here: {r['error'][:120]}", flush=True)
        res["results"].append(r)
    return res


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("attention", __doc__)
    ap.add_argument("--shape", default="8b", help="model shape whose heads and layers to use (privcode.bench.shapes)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--rows", type=int, default=1280, help="decoding rows (the round trip's: 64 groups of n 20)")
    ap.add_argument("--slots", type=int, default=256, help="own-cache slots a step reads (the attention length: "
                    "new tokens rounded up to 64)")
    ap.add_argument("--keys", default="20:200", help="LO:HI, each row's key count uniform in it (or one number)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma list of " + ", ".join(PATHS))
    ap.add_argument("--triton-configs", default="", help="also time the Triton kernel with these configs: "
                    "space-separated KEYS,WARPS,STAGES (keys per loop step, a power of 2 >= 16), e.g. "
                    "'32,2,2 64,2,3 128,4,2' (own_attention.CONFIG is the default's)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (compiles)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_attention_<shape>.json)")
    a = ap.parse_args(argv)
    a.argv = argv
    bad = [p for p in a.paths.split(",") if p not in PATHS]
    if bad:
        raise SystemExit(f"--paths: unknown {bad} (choose from {', '.join(PATHS)})")
    for c in a.triton_configs.split():
        parts = c.split(",")
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts) or int(parts[0]) < 16 \
                or int(parts[0]) & (int(parts[0]) - 1):
            raise SystemExit(f"--triton-configs: '{c}' is not KEYS,WARPS,STAGES (KEYS a power of 2 >= 16)")
    res = bench(a)
    save_result(res, a.out or f"benchmarks/bench_attention_{res['shape']}.json")
