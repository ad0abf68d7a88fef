"""`privcode bench generate`: tokens/s of generation, privcode's fast backend vs plain model.generate.

    privcode bench generate --shape 1.5b --batches 64,256 --out benchmarks/generate_1.5b.json
    privcode bench generate --shape 1.5b --peers dynamic,static          # + static-cache generate
    privcode bench generate --shape small --device cpu --batches 2 --prompt-len 8 --new-tokens 8
    # the round trip's sampling: n = 20 per prompt, T 0.8, top-p 0.95 (batches count rows = prompts x n)
    privcode bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 \
        --new-tokens 200 --batches 320,640 --peers reference

Random weights of the named shape in bf16 (fp32 on CPU), prompts of exactly --prompt-len random
tokens, greedy (or --n samples per prompt at --temperature/--top-p), exactly --new-tokens new tokens per row (EOS ignored: min_new_tokens for
model.generate, ignore_eos for the fast backend), so that every backend does the same work.
tokens/s = batch × new tokens / wall seconds of one whole call (prefill included), after one
untimed call of the same shape (the fast backend's first call, which captures its CUDA graph,
is reported separately as first_call_s).

  dynamic   peer: model.generate, default dynamic cache
  static    peer: model.generate(cache_implementation="static") (transformers may compile it)
  fast      privcode.synth.fast.FastHFBackend (static cache + CUDA graph per decode step; sampling:
            one prefill per prompt, sort-free top-p)
  reference peer (sampling only): the fast backend with the sort-based top-p sampler and n prefilled
            copies of each prompt, i.e. what `fast` did before both (same random stream: same tokens)
  fast-compiled  (--compile) the fast backend with each decode layer under torch.compile
"""
from __future__ import annotations

import sys
import time

from privcode.bench import parser, save_result


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _peer(model, ids, new, device, cache=None):
    import torch

    kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "temperature": None, "top_p": None,
          "top_k": None, "pad_token_id": 0, "eos_token_id": model.config.eos_token_id}
    if cache:
        kw["cache_implementation"] = cache
    am = torch.ones_like(ids)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=am, **kw)
        _sync(device)
    return time.perf_counter() - t0, out[:, ids.shape[1]:]


def run(a) -> dict:
    import torch

    from privcode.bench.shapes import device_info, get_shape
    from privcode.synth.base import SamplingParams
    from privcode.synth.fast import FastHFBackend

    shape = get_shape(a.shape)
    device = a.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    from privcode.bench.shapes import build_model

    model = build_model(shape, device, dtype).eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    batches = [int(x) for x in a.batches.split(",")]
    peer_batches = [int(x) for x in (a.peer_batches or a.batches).split(",")]
    peers = [p for p in (a.peers or "").split(",") if p]
    static_batches = [int(x) for x in (a.static_batches or a.peer_batches or a.batches).split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, shape.vocab - 2, (max(batches + peer_batches + static_batches), a.prompt_len),
                            generator=g)
    P, N = a.prompt_len, a.new_tokens
    res = {"info": device_info(device), "command": "privcode bench generate " + " ".join(a.argv),
           "shape": shape.name, "dtype": str(dtype).split(".")[-1], "prompt_len": P, "new_tokens": N,
           "sampling": {"n": a.n, "temperature": a.temperature, "top_p": a.top_p} if a.temperature > 0 else None,
           "results": []}
    mode = f"n={a.n}, T={a.temperature}, top-p {a.top_p}" if a.temperature > 0 else "greedy"
    print(f"generate: {shape.name} {res['dtype']} on {res['info'].get('card')}: prompts {P} tokens, {N} new, {mode}")

    def record(backend, B, dt, first=None, extra=None):
        r = {"backend": backend, "batch": B, "seconds": dt, "tok_s": B * N / dt}
        if first is not None:
            r["first_call_s"] = first
        r.update(extra or {})
        res["results"].append(r)
        print(f"{backend:8s} batch {B:4d}: {dt:7.2f} s  {B * N / dt:9.0f} tok/s"
              + (f"  (first call {first:.2f} s)" if first is not None else ""), flush=True)

    sampling = a.temperature > 0
    k = a.n if sampling else 1
    params = SamplingParams(max_new_tokens=N, temperature=a.temperature, top_p=a.top_p, n=k, seed=0)

    def fast_run(name, B, **kw):
        fb = FastHFBackend(model=model, tokenizer=None, eos_token_id=model.config.eos_token_id, pad_token_id=0,
                           batch_size=B, **kw)
        ids = prompts[:max(1, B // k)].tolist()
        try:
            _sync(device)
            t0 = time.perf_counter()
            fb.generate_ids(ids, params, ignore_eos=True)
            _sync(device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = fb.generate_ids(ids, params, ignore_eos=True)
            _sync(device)
            dt = time.perf_counter() - t0
            assert all(len(o) == k and all(len(x) == N for x in o) for o in out), f"{name}: wrong number of tokens"
            graphs = all(bool(r.graphs) for r in fb._runners.values()) if device.startswith("cuda") else False
            record(name, len(ids) * k, dt, first, {"cuda_graph": graphs})
            return torch.tensor([x for o in out for x in o])
        except Exception as e:  # noqa: BLE001
            res["results"].append({"backend": name, "batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{name:8s} batch {B:4d}: FAILED {type(e).__name__}: {e}", flush=True)
        finally:
            fb._runners.clear()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    fast_tokens = {B: fast_run("fast", B) for B in batches}
    if a.compile:  # the same backend with each decode layer under torch.compile (first call: the compile)
        for B in batches:
            got = fast_run("fast-compiled", B, compile_layers=True)
            r = res["results"][-1]
            if got is not None and fast_tokens.get(B) is not None and "tok_s" in r:  # fused bf16: near-ties may flip
                r["rows_identical"] = float((fast_tokens[B] == got).all(1).float().mean())
    if sampling:  # model.generate's sampler draws another stream: compare with the reference sampler only
        from privcode.synth.sampling import sort_top_p_sample

        for B in (peer_batches if "reference" in peers else []):
            ref = fast_run("reference", B, sampler=sort_top_p_sample, share_prefix=False)
            r = res["results"][-1]
            if ref is not None and fast_tokens.get(B) is not None and "tok_s" in r:  # bf16: near-ties may flip
                r["rows_identical"] = float((fast_tokens[B] == ref).all(1).float().mean())
        peers = []

    for peer in peers:
        cache = None if peer == "dynamic" else peer
        for B in (static_batches if peer == "static" else peer_batches):
            ids = prompts[:B].to(device)
            try:
                _peer(model, ids[:, :P], min(4, N), device, cache)  # warm-up (kernels, compile)
                first = None
                if cache == "static":  # its first full-length call may compile: time it, then again
                    first, _ = _peer(model, ids, N, device, cache)
                dt, out = _peer(model, ids, N, device, cache)
                assert out.shape == (B, N)
                extra = {}
                if fast_tokens.get(B) is not None:  # agreement with the fast backend (bf16: near-ties may flip)
                    f = fast_tokens[B]
                    o = out.cpu()
                    extra = {"first_token_agree": float((f[:, 0] == o[:, 0]).float().mean()),
                             "rows_identical": float((f == o).all(1).float().mean())}
                record(peer, B, dt, first, extra)
            except Exception as e:  # noqa: BLE001
                res["results"].append({"backend": peer, "batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{peer:8s} batch {B:4d}: FAILED {type(e).__name__}: {e}", flush=True)

    tok = {(r["backend"], r["batch"]): r["tok_s"] for r in res["results"] if "tok_s" in r}
    res["ratios"] = {f"fast / {p} @ batch {B}": tok[("fast", B)] / tok[(p, B)]
                     for p in {b for b, _ in tok} - {"fast", "fast-compiled"} for B in sorted(set(peer_batches + static_batches))
                     if ("fast", B) in tok and (p, B) in tok}
    for B in batches:
        if ("fast-compiled", B) in tok and ("fast", B) in tok:
            res["ratios"][f"fast-compiled / fast @ batch {B}"] = tok[("fast-compiled", B)] / tok[("fast", B)]
    want = 30000 if sampling else 80000  # #17: round-trip sampling (8B) / greedy generation (1.5B), one H200
    best = "fast-compiled" if ("fast-compiled", max(batches)) in tok else "fast"
    at = tok.get((best, max(batches)))
    res["target"] = {f"{best} tok/s at the largest batch": at, "target": f">= {want}",
                     "met": None if at is None or not device.startswith("cuda") else at >= want}
    return res


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("generate", __doc__)
    ap.add_argument("--shape", default=None, help="1.5b | 7b | small (default: 1.5b on GPU, small on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default=None, help="fast backend batch sizes (default 64,128,256; CPU 2)")
    ap.add_argument("--peer-batches", default=None, help="peer batch sizes (default: 64,256; CPU: --batches)")
    ap.add_argument("--peers", default="dynamic", help="comma list of dynamic,static (greedy) or reference "
                    "(sampling) (empty: none)")
    ap.add_argument("--static-batches", default=None, help="batch sizes of the static peer (default: 256; CPU: "
                    "--peer-batches)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (with --temperature > 0)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--compile", action="store_true", help="also time the fast backend with compiled decode layers")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_generate_<shape>.json)")
    a = ap.parse_args(argv)
    import torch

    from privcode.bench.shapes import get_shape

    a.argv = argv
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = a.device.startswith("cuda")
    a.shape = a.shape or ("1.5b" if gpu else "small")
    a.batches = a.batches or ("64,128,256" if gpu else "2")
    a.peer_batches = a.peer_batches or ("64,256" if gpu else a.batches)
    a.static_batches = a.static_batches or ("256" if gpu else a.peer_batches)
    res = run(a)
    print(f"\n== bench generate: {res['shape']} on {res['info'].get('card')} ({res['info']['date']})")
    for k, v in res["ratios"].items():
        print(f"  {k}: {v:.2f}x")
    print(f"  target: {res['target']}")
    save_result(res, a.out or f"benchmarks/bench_generate_{get_shape(a.shape).name}.json")


if __name__ == "__main__":
    main()
