"""`privcode bench generate`: tokens/s of generation, privcode's fast backend vs plain model.generate.

    privcode bench generate --shape 1.5b --batches 64,256 --out benchmarks/generate_1.5b.json
    privcode bench generate --shape 1.5b --peers dynamic,static          # + static-cache generate
    privcode bench generate --shape small --device cpu --batches 2 --prompt-len 8 --new-tokens 8
    # the round trip's sampling: n = 20 per prompt, T 0.8, top-p 0.95 (batches count rows = prompts x n)
    privcode bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 \
        --new-tokens 200 --batches 320,640 --peers reference
    # continuous batching vs batch after batch, rows ending at EOS-like lengths, 4 batches of work
    privcode bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 \
        --new-tokens 200 --batches 1280 --lengths uniform:20 --waves 4 --no-refill --peers ""

Random weights of the named shape in bf16 (fp32 on CPU), prompts of exactly --prompt-len random
tokens, greedy (or --n samples per prompt at --temperature/--top-p), exactly --new-tokens new tokens per row (EOS ignored: min_new_tokens for
model.generate, ignore_eos for the fast backend), so that every backend does the same work.
tokens/s = tokens generated / wall seconds of one whole call (prefill included), after one
untimed call of the same shape (the fast backend's first call, which captures its CUDA graphs and
compiles, is reported separately as first_call_s; it prefills the same prompts but ends every row
at its first token).

Real outputs end at EOS; random weights almost never draw it. --lengths gives every (prompt, sample)
row a length drawn once from a distribution (a fixed generator: the same for every backend and
batch) at which the fast backend ends it as if it drew EOS (`generate_ids(lengths=...)`):
`max` (default: every row --new-tokens long), `uniform:LO` (uniform in LO..--new-tokens),
`geometric:MEAN` (geometric with that mean, cut at --new-tokens). --waves W gives each fast-backend call
W batches' worth of prompts, so that finished rows have waiting work to take (continuous batching);
--no-refill also times the fast backend without it (`continuous=False`: batch after batch, each
until its longest row ends) on the same prompts and lengths: rows_identical is the share of its rows
equal to the continuous run's (same random streams; bf16 near-ties aside).

  dynamic   peer: model.generate, default dynamic cache
  static    peer: model.generate(cache_implementation="static") (transformers may compile it)
  fast      privcode.synth.fast.FastHFBackend (static cache + CUDA graph per decode step; sampling:
            one prefill per prompt, sort-free top-p)
  reference peer (sampling only): the fast backend with the sort-based top-p sampler and n prefilled
            copies of each prompt, i.e. what `fast` did before both (same random stream: same tokens)
  fast-compiled  (--compile) the fast backend with each decode layer under torch.compile
  fast-norefill  (--no-refill) the fast backend without continuous batching (fast-compiled-norefill
            with --compile: compiled layers, compared with fast-compiled)
"""
from __future__ import annotations

import gc
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


def row_lengths(spec: str, prompts: int, k: int, new: int, g) -> list[list[int]] | None:
    """--lengths: per prompt, k row lengths in 1..new drawn with generator `g` (None for `max`)."""
    import torch

    kind, _, arg = spec.partition(":")
    try:
        if kind == "max" and not arg:
            return None
        if kind == "uniform":
            lo = int(arg)
            if not 1 <= lo <= new:
                raise ValueError
            return torch.randint(lo, new + 1, (prompts, k), generator=g).tolist()
        if kind == "geometric":
            mean = float(arg)
            if mean < 1:
                raise ValueError
            u = torch.rand((prompts, k), generator=g, dtype=torch.float64).clamp_min(1e-300)
            draws = (u.log() / torch.log1p(torch.tensor(-1 / mean, dtype=torch.float64))).floor() + 1 if mean > 1 \
                else torch.ones((prompts, k), dtype=torch.float64)
            return draws.clamp(1, new).long().tolist()
    except ValueError:
        pass
    raise SystemExit(f"privcode bench generate: --lengths {spec!r}: expected max, uniform:LO (1 <= LO <= "
                     f"--new-tokens) or geometric:MEAN (MEAN >= 1)")


def _same(a: list, b: list) -> float:
    """The share of rows equal in two runs' token lists."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))


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
    P, N = a.prompt_len, a.new_tokens
    k = a.n if a.temperature > 0 else 1
    params = SamplingParams(max_new_tokens=N, temperature=a.temperature, top_p=a.top_p, n=k, seed=0)
    if 0 in batches:  # rows from the free memory, as a stage's `batch_size: 0` (FastHFBackend.rows)
        auto = FastHFBackend(model=model, tokenizer=None, eos_token_id=model.config.eos_token_id, pad_token_id=0,
                             batch_size=0, prompt_rows=a.prompt_rows, prompt_caches=a.prompt_caches).rows(P, params)
        batches = [auto if B == 0 else B for B in batches]
        print(f"batch 0: {auto} rows (free memory, FastHFBackend.rows)")
    most = max([max(1, B // k) * a.waves for B in batches] + peer_batches + static_batches)
    prompts = torch.randint(1, shape.vocab - 2, (most, a.prompt_len), generator=g)
    lengths = row_lengths(a.lengths, most, k, N, g)
    res = {"info": device_info(device), "command": "privcode bench generate " + " ".join(a.argv),
           "attention": a.attention,
           "shape": shape.name, "dtype": str(dtype).split(".")[-1], "prompt_len": P, "new_tokens": N,
           "sampling": {"n": a.n, "temperature": a.temperature, "top_p": a.top_p} if a.temperature > 0 else None,
           "lengths": a.lengths, "waves": a.waves, "prompt_rows": a.prompt_rows, "prompt_caches": a.prompt_caches,
           "results": []}
    mode = f"n={a.n}, T={a.temperature}, top-p {a.top_p}" if a.temperature > 0 else "greedy"
    print(f"generate: {shape.name} {res['dtype']} on {res['info'].get('card')}: prompts {P} tokens, {N} new, {mode}"
          + ("" if lengths is None else f", row lengths {a.lengths}")
          + (f", {a.waves} batches of work" * (a.waves > 1)))

    def record(backend, B, dt, first=None, extra=None, tokens=None):
        tokens = B * N if tokens is None else tokens
        r = {"backend": backend, "batch": B, "seconds": dt, "tokens": tokens, "tok_s": tokens / dt}
        if first is not None:
            r["first_call_s"] = first
        r.update(extra or {})
        res["results"].append(r)
        print(f"{backend:8s} batch {B:4d}: {dt:7.2f} s  {tokens / dt:9.0f} tok/s"
              + (f"  (first call {first:.2f} s)" if first is not None else "")
              + (f"  [attention {r['attention']}]" if "attention" in r else ""), flush=True)

    sampling = a.temperature > 0

    def fast_run(name, B, **kw):
        fb = FastHFBackend(model=model, tokenizer=None, eos_token_id=model.config.eos_token_id, pad_token_id=0,
                           batch_size=B, prompt_rows=a.prompt_rows, attention=a.attention,
                           prompt_caches=a.prompt_caches, **kw)
        m = max(1, B // k) * a.waves
        ids, want = prompts[:m].tolist(), [[N] * k] * m if lengths is None else lengths[:m]
        try:
            _sync(device)
            # rows of 1 or 2 tokens: the same runner (graphs, compiles, prefill), next to no decoding -- of one
            # length exactly where the timed rows are (FastHFBackend.caches sizes the prompt caches by that)
            warm = [[1 + (n != want[0][0]) for n in per] for per in want]
            t0 = time.perf_counter()
            fb.generate_ids(ids, params, ignore_eos=True, lengths=warm)
            _sync(device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = fb.generate_ids(ids, params, ignore_eos=True, lengths=want)
            _sync(device)
            dt = time.perf_counter() - t0
            assert [[len(x) for x in o] for o in out] == want, f"{name}: wrong number of tokens"
            graphs = all(bool(r.graphs) for r in fb._runners.values()) if device.startswith("cuda") else False
            used = fb.dec.attention if fb.dec is not None else None  # after the probes' fallbacks
            held = sorted({r.caches for r in fb._runners.values()})  # prompt caches per group that ran
            record(name, max(1, B // k) * k, dt, first, {"cuda_graph": graphs, "attention": used,
                                                         "prompt_caches": held}, tokens=sum(map(sum, want)))
            return [x for o in out for x in o]
        except Exception as e:  # noqa: BLE001
            res["results"].append({"backend": name, "batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{name:8s} batch {B:4d}: FAILED {type(e).__name__}: {e}", flush=True)
        finally:
            fb._runners.clear()
            gc.collect()  # a runner and its compiled sampler (a bound method) are a reference cycle
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

    fast_tokens = {} if a.compile and a.compiled_only else {B: fast_run("fast", B) for B in batches}
    if a.compile:  # the same backend with each decode layer under torch.compile (first call: the compile)
        for B in batches:
            got = fast_run("fast-compiled", B, compile_layers=True)
            r = res["results"][-1]
            if got is not None and fast_tokens.get(B) is not None and "tok_s" in r:  # fused bf16: near-ties may flip
                r["rows_identical"] = _same(fast_tokens[B], got)
    if a.no_refill:  # batch after batch: the same rows, prompts, lengths and random streams
        for B in batches:
            got = fast_run("fast-compiled-norefill" if a.compile else "fast-norefill", B, continuous=False,
                           compile_layers=a.compile)
            r = res["results"][-1]
            if got is not None and fast_tokens.get(B) is not None and "tok_s" in r:
                r["rows_identical"] = _same(fast_tokens[B], got)
    if sampling:  # model.generate's sampler draws another stream: compare with the reference sampler only
        from privcode.synth.sampling import sort_top_p_sample

        for B in (peer_batches if "reference" in peers else []):
            ref = fast_run("reference", B, sampler=sort_top_p_sample, share_prefix=False)
            r = res["results"][-1]
            if ref is not None and fast_tokens.get(B) is not None and "tok_s" in r:  # bf16: near-ties may flip
                r["rows_identical"] = _same(fast_tokens[B][:len(ref)], ref)
        peers = []

    if lengths is not None and peers:  # model.generate cannot stop a row at a given length
        print(f"peers {','.join(peers)} skipped: they run without --lengths", flush=True)
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
                    f = torch.tensor(fast_tokens[B][:B])
                    o = out.cpu()
                    extra = {"first_token_agree": float((f[:, 0] == o[:, 0]).float().mean()),
                             "rows_identical": float((f == o).all(1).float().mean())}
                record(peer, B, dt, first, extra)
            except Exception as e:  # noqa: BLE001
                res["results"].append({"backend": peer, "batch": B, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{peer:8s} batch {B:4d}: FAILED {type(e).__name__}: {e}", flush=True)

    if a.profile:  # where a step's time goes, at the largest batch (compiled layers with --compile)
        from privcode.bench.decode_profile import print_profile, profile_decode

        if device.startswith("cuda"):  # the measured runners' memory back (compiled code may still hold them)
            torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()
            print(f"profile: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated before its runner", flush=True)
        fb = FastHFBackend(model=model, tokenizer=None, eos_token_id=model.config.eos_token_id, pad_token_id=0,
                           batch_size=max(batches), prompt_rows=a.prompt_rows, compile_layers=a.compile,
                           attention=a.attention, prompt_caches=a.prompt_caches)
        res["profile"] = profile_decode(fb, prompts.tolist(), params, max(batches), a.profile_steps)
        print_profile(res["profile"])

    tok = {(r["backend"], r["batch"]): r["tok_s"] for r in res["results"] if "tok_s" in r}
    res["ratios"] = {f"fast / {p} @ batch {B}": tok[("fast", B)] / tok[(p, B)]
                     for p in {b for b, _ in tok} - {"fast", "fast-compiled", "fast-norefill", "fast-compiled-norefill"}
                     for B in sorted(set(peer_batches + static_batches)) if ("fast", B) in tok and (p, B) in tok}
    for B in batches:
        if ("fast-compiled", B) in tok and ("fast", B) in tok:
            res["ratios"][f"fast-compiled / fast @ batch {B}"] = tok[("fast-compiled", B)] / tok[("fast", B)]
        for on in ("fast", "fast-compiled"):
            if (on + "-norefill", B) in tok and (on, B) in tok:
                res["ratios"][f"{on} / {on}-norefill @ batch {B}"] = tok[(on, B)] / tok[(on + "-norefill", B)]
    want = 30000 if sampling else 80000  # #17: round-trip sampling (8B) / greedy generation (1.5B), one H200
    best = "fast-compiled" if ("fast-compiled", max(batches)) in tok else "fast"
    at = tok.get((best, max(batches)))
    res["target"] = {f"{best} tok/s at the largest batch": at, "target": f">= {want}",
                     "met": None if at is None or not device.startswith("cuda") else at >= want}
    return res


def main(argv=None) -> None:
    from privcode.synth.decoder import ATTENTION

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("generate", __doc__)
    ap.add_argument("--shape", default=None, help="1.5b | 7b | small (default: 1.5b on GPU, small on CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batches", default=None, help="fast backend batch sizes, 0: rows from the free memory as a "
                    "stage's batch_size 0 (default 64,128,256; CPU 2)")
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
    ap.add_argument("--compiled-only", action="store_true", help="with --compile: time only the compiled fast backend "
                    "(no eager run; saves device time)")
    ap.add_argument("--lengths", default="max", help="row lengths: max | uniform:LO | geometric:MEAN (rows end there "
                    "as if they drew EOS)")
    ap.add_argument("--waves", type=int, default=1, help="prompts per call = this x batch / n (fast backends)")
    ap.add_argument("--no-refill", action="store_true", help="also time the fast backend without continuous batching")
    ap.add_argument("--prompt-rows", type=int, default=0, help="rows decoding one prompt's samples at a time "
                    "(0: the backend's default)")
    ap.add_argument("--prompt-caches", type=int, default=0, choices=(0, 1, 2, 3, 4), help="prompt caches per "
                    "group of rows (FastHFBackend.prompt_caches; 0: its default, 4 where rows end at different steps, "
                    "1 with --lengths max)")
    ap.add_argument("--attention", default="auto", choices=ATTENTION, help="the fast backend's decode "
                    "attention (decoder.resolve_attention): auto = the own caches through privcode's Triton kernel on "
                    "CUDA (fp16/bf16), the prompt caches and elsewhere the memory-efficient kernel; efficient = that "
                    "kernel for both; flash, flex, triton = the own caches through FlashAttention-2, flex_attention "
                    "or the Triton kernel; math = matmul, softmax, matmul (comparisons)")
    ap.add_argument("--profile", action="store_true", help="profile decode steps at the largest batch "
                    "(privcode.bench.decode_profile: ms per step by section at each attention length)")
    ap.add_argument("--profile-steps", type=int, default=3, help="eager steps profiled per attention length")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_generate_<shape>.json)")
    a = ap.parse_args(argv)
    import torch

    from privcode.bench.shapes import get_shape

    a.argv = argv
    if a.waves < 1:
        raise SystemExit("privcode bench generate: --waves must be >= 1")
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
