"""`privcode bench train`: time one full optimizer step of LoRA fine-tuning, privcode vs peers.

    privcode bench train --shape 1.5b --out benchmarks/train_1.5b.json         # GPU
    privcode bench train --shape 7b --out benchmarks/train_7b.json
    privcode bench train --shape small --device cpu --steps 1 --warmup 1        # every code path, CPU

Random weights of the named shape (privcode.bench.shapes), bf16 base on GPU, LoRA r=16 α=32 on
q,k,v,o,gate,up,down, full-length rows of T tokens (first quarter prompt, no loss), one
micro-batch per step (plus a K-micro-batch step for the stage-1 estimate). Variants:

  hf-peft               peer: PEFT model, `model(**batch, labels=...)` loss, backward, AdamW (every
                        variant: fused on CUDA, HF Trainer's default)
  opacus-hooks          peer: Opacus GradSampleModule + DPOptimizer, per-record CE on full logits
  opacus-ghost          peer: Opacus ghost clipping (GradSampleModuleFastGradientClipping,
                        DPOptimizerFastGradientClipping, double backward)
  privcode-nondp-stock  privcode before #6: engine.per_record_loss + plain PEFT LoRA + AdamW
  privcode-dp-stock     privcode before #6: engine.DPSGD with engine.per_record_loss
  privcode-nondp        fastloss.per_record_loss + lean LoRA + AdamW; LoRA weight gradients as
                        training forms them (leanlora.NONDP_GRAD)
  privcode-nondp-bmm    the same with lean_lora nondp_grad "bmm": per-record batched products summed
                        over the records (the DP path's GEMM shape); privcode-nondp-mm (not in the
                        default list): nondp_grad "mm", one product over the micro-batch's tokens
  privcode-dp-hooks     engine.DPSGD (Opacus hooks) + flat clipping + lean LoRA + fast loss
  privcode-dp           engine.DPSGD + flatclip.accelerate_dpsgd (hook-free per-record LoRA
                        gradients, flat clipping) + lean LoRA + fast loss
  privcode-dp-privsa    the same with the PrivSA KL term (teacher = adapters disabled), teacher
                        forward and KL math under torch.compile on CUDA (training's default)
  privcode-dp-privsa-eager  the same without torch.compile

Timing: warm-up steps excluded, torch.cuda.synchronize() around the timed steps, wall clock.
Peak memory: torch.cuda.max_memory_allocated over the timed steps (weights included).
"""
from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

from privcode.bench import parser, save_result
from privcode.bench.train_variants import ACCUM_VARIANTS, ALL, NONDP, Bench, _mem, _sync

# ratio name -> (numerator, denominator, kind, target, direction)
TARGETS = {
    "privcode-dp / privcode-nondp (tok/s)": ("privcode-dp", "privcode-nondp", "tok_s", 0.95, ">="),
    "privcode-nondp / hf-peft (tok/s)": ("privcode-nondp", "hf-peft", "tok_s", 1.5, ">="),
    "privcode-dp-privsa / privcode-nondp (tok/s)": ("privcode-dp-privsa", "privcode-nondp", "tok_s", 0.7, ">="),
    "privcode-dp / privcode-nondp (peak memory)": ("privcode-dp", "privcode-nondp", "peak_gb", 1.1, "<="),
}
EXTRA_RATIOS = [
    ("privcode-dp", "opacus-hooks"), ("privcode-dp", "opacus-ghost"), ("privcode-dp", "hf-peft"),
    ("privcode-nondp", "privcode-nondp-stock"), ("privcode-dp", "privcode-dp-stock"),
    ("opacus-hooks", "hf-peft"), ("opacus-ghost", "hf-peft"), ("privcode-dp-privsa", "privcode-dp"),
    ("privcode-dp-privsa", "privcode-dp-privsa-eager"), ("privcode-dp-privsa-eager", "privcode-nondp"),
    ("privcode-dp", "privcode-dp-hooks"), ("privcode-nondp", "privcode-dp"), ("privcode-nondp-bmm", "privcode-dp"),
    ("privcode-nondp-bmm", "privcode-nondp"), ("privcode-nondp-bmm", "hf-peft"),
]
STAGE1 = {"steps": 100, "expected_batch": 256, "target_min": 15.0}
# per step in a profile's JSON: GEMMs (LoRA weight gradients: mm or bmm), the bmm form's sums, host
# reads (item: a sync on CUDA), DP's flat clipping (cat, norm, addmv_)
PROFILE_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::sum", "aten::item", "aten::cat",
               "aten::linalg_vector_norm", "aten::addmv_")


def _time(step, device, warmup, steps, k=1):
    for _ in range(warmup):
        step(k)
    _sync(device)
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = step(k)
    _sync(device)
    dt = (time.perf_counter() - t0) / max(1, steps)
    return dt, float(loss) if loss is not None else None


def _profile(step, device, name, out_dir: Path | None, steps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - t0) / steps
    ka = prof.key_averages()

    def dev_self(e):
        for a in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, a):
                return getattr(e, a)
        return 0.0
    # kernels only (operator rows repeat their kernels' time)
    busy = sum(dev_self(e) for e in ka if "CUDA" in str(getattr(e, "device_type", ""))) / 1e6 / steps
    sort = "self_device_time_total" if acts[-1] != ProfilerActivity.CPU else "self_cpu_time_total"
    try:
        table = ka.table(sort_by=sort, row_limit=30, max_name_column_width=70)
    except Exception:  # noqa: BLE001 - older column names
        table = ka.table(sort_by="self_cuda_time_total", row_limit=30)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:  # the CPU side too: a device-idle gap shows up here (syncs, guards, Python)
            cpu = ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
        except Exception:  # noqa: BLE001 - older column names
            cpu = ""
        (out_dir / f"profile_{name}.txt").write_text(table + "\n\n== sorted by self CPU time\n" + cpu)
    print(f"\n--- profile {name}: wall {wall * 1e3:.1f} ms/step (profiled), device-busy {busy * 1e3:.1f} ms/step")
    print("\n".join(table.splitlines()[:26]))
    ops = {e.key: {"count": e.count / steps, "device_ms": dev_self(e) / 1e3 / steps}
           for e in ka if e.key in PROFILE_OPS}
    return {"wall_s": wall, "device_busy_s": busy, "ops": ops}


def run(a) -> dict:
    import torch

    from privcode.bench.shapes import device_info, get_shape

    shape = get_shape(a.shape)
    device = a.device
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    variants = [v.strip() for v in a.variants.split(",")] if a.variants else ALL
    order = [v for v in ALL if v in variants] + [v for v in variants if v not in ALL]
    profile = set(filter(None, (a.profile or "").split(",")))
    bench = Bench(shape, device, dtype, lam=a.lam)
    tokens = shape.micro_batch * shape.seq_len
    res = {"info": device_info(device), "command": "privcode bench train " + " ".join(a.argv),
           "shape": {**shape.__dict__, "params_b": round(shape.params_b, 3)},
           "config": {"dtype": str(dtype).split(".")[-1], "lora_r": bench.lora["r"], "lora_alpha": bench.lora["alpha"],
                      "lora_targets": bench.lora["targets"], "steps": a.steps, "warmup": a.warmup,
                      "tokens_per_micro_batch": tokens, "accum": a.accum, "privsa_lambda": a.lam},
           "weights_gb": _mem(device), "variants": {}}
    print(f"shape {shape.name} ({shape.params_b:.2f}B params), T={shape.seq_len}, micro-batch {shape.micro_batch}, "
          f"{res['config']['dtype']}, device {res['info'].get('card')}")
    for name in order:
        r: dict = {}
        cleanup = None
        try:
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            r["mem_start_gb"] = _mem(device)
            step, cleanup = bench.variant(name)
            dt, loss = _time(step, device, a.warmup, a.steps)
            r.update(step_s=dt, tok_s=tokens / dt, peak_gb=_mem(device, "peak"), loss=loss)
            if a.accum > 1 and name in ACCUM_VARIANTS:
                dk, _ = _time(step, device, 1, max(1, a.steps // 2), k=a.accum)
                r.update(accum=a.accum, accum_step_s=dk, accum_peak_gb=_mem(device, "peak"))
            if name.startswith("privcode-dp-privsa"):  # compiled, fell back to eager, or not tried
                r["compiled"] = bench.compile_probe()
            if name in NONDP:  # how its LoRA weight gradients were formed (leanlora.NONDP_GRAD for privcode-nondp)
                r["nondp_grad"] = bench.grad_mode
            if name in profile:
                r["profile"] = _profile(step, device, name, Path(a.profile_dir) if a.profile_dir else None)
            print(f"{name:22s} {dt * 1e3:9.1f} ms/step {tokens / dt:10.0f} tok/s  peak {r['peak_gb']} GB  loss {loss:.4f}",
                  flush=True)
        except Exception as e:  # noqa: BLE001 - an OOM in one peer must not lose the others
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name:22s} FAILED {r['error']}", flush=True)
        finally:
            step = None
            if cleanup is not None:
                try:
                    cleanup()
                except Exception as e:  # noqa: BLE001
                    r.setdefault("cleanup_error", f"{type(e).__name__}: {e}")
                    bench.base = bench.base.unload() if hasattr(bench.base, "unload") else bench.base
            cleanup = None
            res["variants"][name] = r
    from privcode.dp.leanlora import OUT_DTYPE_OK

    res["out_dtype_kernels"] = dict(OUT_DTYPE_OK)  # {} on CPU; False: that GEMM ran on fp32 copies (slow)
    _ratios(res)
    _stage1(res)
    return res


def _ratios(res: dict) -> None:
    v = res["variants"]

    def get(n, kind):
        x = v.get(n, {}).get(kind)
        return x if isinstance(x, (int, float)) and x else None
    res["targets"] = {}
    for label, (num, den, kind, target, d) in TARGETS.items():
        a, b = get(num, kind), get(den, kind)
        val = a / b if a and b else None
        met = None if val is None or a is None else (val >= target if d == ">=" else val <= target)
        res["targets"][label] = {"value": val, "target": f"{d} {target}", "met": met}
    res["ratios"] = {}
    for num, den in EXTRA_RATIOS:
        a, b = get(num, "tok_s"), get(den, "tok_s")
        res["ratios"][f"{num} / {den} (tok/s)"] = a / b if a and b else None
    names = [n for n in v if get(n, "tok_s")]
    res["matrix_tok_s"] = {a: {b: get(a, "tok_s") / get(b, "tok_s") for b in names} for a in names}


def _stage1(res: dict) -> None:
    """Paper-scale stage 1: 100 steps of expected batch 256 at T ≤ 1024, from t(K) = K·t_micro + t_opt
    (two measured points: 1 and K micro-batches per step)."""
    sh = res["shape"]
    out = {"steps": STAGE1["steps"], "expected_batch": STAGE1["expected_batch"], "seq_len": sh["seq_len"],
           "micro_batch": sh["micro_batch"], "target_min": STAGE1["target_min"], "card": res["info"].get("card")}
    micro = -(-STAGE1["expected_batch"] // sh["micro_batch"])
    for name in ACCUM_VARIANTS:
        r = res["variants"].get(name, {})
        if "accum_step_s" not in r:
            continue
        K, t1, tk = r["accum"], r["step_s"], r["accum_step_s"]
        t_micro = (tk - t1) / (K - 1)
        t_opt = max(0.0, t1 - t_micro)
        step = micro * t_micro + t_opt
        total = STAGE1["steps"] * step / 60
        out[name] = {"t_micro_s": t_micro, "t_opt_s": t_opt, "step_s": step, "total_min": total,
                     "met": total < STAGE1["target_min"]}
    res["stage1_estimate"] = out


def _print(res: dict) -> None:
    v = res["variants"]
    ref = v.get("hf-peft", {}).get("tok_s")
    nd = v.get("privcode-nondp", {}).get("tok_s")
    print(f"\n== bench train: {res['shape']['name']} on {res['info'].get('card')} ({res['info']['date']}), "
          f"T={res['shape']['seq_len']} micro-batch {res['shape']['micro_batch']}, {res['config']['dtype']}")
    print(f"{'variant':22s} {'ms/step':>9s} {'tok/s':>9s} {'peak GB':>8s} {'vs hf-peft':>10s} {'vs pc-nondp':>11s}")
    for n, r in v.items():
        if "tok_s" not in r:
            print(f"{n:22s} {r.get('error', 'not run')}")
            continue
        vs = [f"{r['tok_s'] / x:.2f}x" if x else "-" for x in (ref, nd)]
        print(f"{n:22s} {r['step_s'] * 1e3:9.1f} {r['tok_s']:9.0f} {r['peak_gb']!s:>8s} {vs[0]:>10s} {vs[1]:>11s}")
    print("targets:")
    for k, t in res["targets"].items():
        val = "-" if t["value"] is None else f"{t['value']:.3f}"
        print(f"  {k:46s} {val:>7s}  (target {t['target']})  {'' if t['met'] is None else ('MET' if t['met'] else 'MISSED')}")
    for k, x in res["ratios"].items():
        print(f"  {k:46s} {'-' if x is None else f'{x:.3f}':>7s}")
    s = res.get("stage1_estimate", {})
    for n in ACCUM_VARIANTS:
        if n in s:
            e = s[n]
            print(f"stage-1 estimate ({n}): {s['steps']} steps x {s['expected_batch']} records = "
                  f"{e['step_s']:.2f} s/step, {e['total_min']:.1f} min (t_micro {e['t_micro_s'] * 1e3:.0f} ms, "
                  f"t_opt {e['t_opt_s'] * 1e3:.0f} ms) on {s['card']}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("train", __doc__)
    ap.add_argument("--shape", default=None, help="1.5b | 7b | small (default: 1.5b on GPU, small on CPU)")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="base weights (default bf16 on GPU)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--accum", type=int, default=4, help="micro-batches of the extra step timed for the "
                    "stage-1 estimate (privcode-dp*); 0 or 1: skip")
    ap.add_argument("--variants", default=None, help=f"comma list (default all): {','.join(ALL)}")
    ap.add_argument("--lam", type=float, default=0.5, help="PrivSA λ of privcode-dp-privsa")
    ap.add_argument("--profile", default=None, help="comma list of variants to profile (torch.profiler, 2 steps)")
    ap.add_argument("--profile-dir", default=None, help="write profile tables here")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_train_<shape>.json)")
    a = ap.parse_args(argv)
    import torch

    a.argv = argv
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.shape = a.shape or ("1.5b" if a.device.startswith("cuda") else "small")
    res = run(a)
    _print(res)
    from privcode.bench.shapes import get_shape

    save_result(res, a.out or f"benchmarks/bench_train_{get_shape(a.shape).name}.json")


if __name__ == "__main__":
    main()
