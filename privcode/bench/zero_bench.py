"""`privcode bench zero`: DP fine-tuning under DeepSpeed ZeRO-3 on ONE GPU, end to end, random weights.

    privcode bench zero                    # GPU: 1.5B and 7B, DDP path vs ZeRO-3; 32B, CPU offload, 40 GiB cap
    privcode bench zero --shapes none --big 7b --cap-gb 10 --out benchmarks/zero_7b.json   # a 7B in 10 GiB
    privcode bench zero --device cpu --shapes small --big small --steps 2 --batch 4        # CPU check

Each run is `privcode dp-finetune` (privcode.train.train_dp, its own process) on generated records
and a small BPE tokenizer, the base built with random weights of the shape (privcode.bench.shapes)
instead of loaded: Poisson sampling, the accountant and privacy.json as in a real run. Runs:
every --shapes shape with engine ddp and engine deepspeed (ZeRO-3, no offload); then the --big shape
with engine deepspeed + zero_offload cpu under a GPU memory cap of --cap-gb
(torch.cuda.set_per_process_memory_fraction), and — to show it does not fit otherwise — with engine
ddp under the same cap. Reported per run: tokens/s (steps after the first), peak GPU memory
(max_memory_allocated over the steps) and ε from privacy.json. fast path, PrivSA on (--lam 0: off),
LoRA r=16 on all projections, bf16 on GPU; E[B] = --batch rows of about T tokens per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from privcode.bench import parser, save_result


def prepare(work: Path, n: int, seq_len: int) -> None:
    """Records of about `seq_len` tokens (taskgen solutions joined) in a private zone with their
    ledger, and a tokenizer directory with a public ledger entry (the model reference)."""
    from transformers import Qwen2Config

    from privcode import ledger
    from privcode.data import taskgen
    from privcode.data.records import data_id_of
    from privcode.io import write_jsonl
    from privcode.tiny import build_tokenizer

    tasks = [taskgen.to_record(t) for t in taskgen.generate_tasks(0, 4 * n)]
    recs = []
    for i in range(n):
        parts = [tasks[(4 * i + k) % len(tasks)]["solution"] for k in range(max(1, seq_len // 100))]
        recs.append({"id": f"b{i}", "problem": tasks[4 * i]["problem"], "solution": "\n\n".join(parts),
                     "lang": "python"})
    data = work / "private" / "data"
    write_jsonl(data / "records.jsonl", recs)
    ledger.private_source(data, stage="bench", n_records=n, data_id=data_id_of(recs))
    tok = build_tokenizer([r["problem"] + r["solution"] for r in recs])
    tok.save_pretrained(work / "tok")
    Qwen2Config(vocab_size=len(tok)).save_pretrained(work / "tok")  # a model directory for check_ref
    ledger.derive(work / "tok", stage="build_model", source="random weights (privcode bench zero)")


def run_one(spec: dict) -> dict:
    """One train_dp run in this process; the base of spec["shape"] with random weights."""
    import dataclasses

    import torch

    from privcode import ledger, models
    from privcode.bench.shapes import build_model, get_shape
    from privcode.train import TrainConfig, train_dp

    work = Path(spec["work"])
    if spec.get("cap_gb") and spec["device"].startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] / total), 0)
    tok = models.load_tokenizer(str(work / "tok"))
    shape = get_shape(spec["shape"])
    shape = dataclasses.replace(shape, vocab=max(shape.vocab, len(tok)))
    models.load_model = lambda ref, dtype="float32", device=None: build_model(shape, device, getattr(torch, dtype))
    cfg = TrainConfig(epsilon=4.0, delta=1e-5, dataset_size="public", steps=spec["steps"], batch_size=spec["batch"],
                      micro_batch_size=spec["micro"] or shape.micro_batch, max_length=shape.seq_len, lr=5e-4, fast=True,
                      dtype="bfloat16" if spec["device"].startswith("cuda") else "float32", lora_r=16, lora_alpha=32,
                      lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      privsa_lambda_max=spec["lam"], privsa_lambda_min=min(0.1, spec["lam"]), privsa_alpha=0.01,
                      engine=spec["engine"], zero_offload=spec["offload"])
    out = work / "runs" / spec["name"]
    t0 = time.time()
    try:
        stats = train_dp(str(work / "tok"), str(work / "private" / "data" / "records.jsonl"), out, cfg,
                         private_dir=work / "private" / "runs" / spec["name"])
    except torch.OutOfMemoryError as e:
        return {**spec, "error": f"OutOfMemoryError: {str(e).splitlines()[0][:160]}"}
    return {**spec, "tokens_per_s": stats["tokens_per_s"], "peak_gib": stats["peak_mem_gib_max_rank"],
            "epsilon": ledger.read(out)["epsilon"], "step_s": stats["step_seconds"], "wall_s": time.time() - t0,
            "params_b": round(shape.params_b, 2)}


def plan(a) -> list[dict]:
    base = {"device": a.device, "lam": a.lam, "work": str(a.work), "micro": None, "cap_gb": None}
    runs = [{**base, "name": f"{s}-{e}", "shape": s, "engine": e, "offload": "none", "batch": a.batch, "steps": a.steps}
            for s in a.shapes for e in ("ddp", "deepspeed")]
    if a.big:
        big = {**base, "shape": a.big, "batch": a.big_batch, "steps": a.big_steps, "micro": a.big_micro,
               "cap_gb": a.cap_gb if a.device.startswith("cuda") else None}
        runs += [{**big, "name": f"{a.big}-deepspeed-offload", "engine": "deepspeed", "offload": "cpu"},
                 {**big, "name": f"{a.big}-ddp-capped", "engine": "ddp", "offload": "none"}]
    return runs


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("zero", __doc__)
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--shapes", default=None, help="shapes run with both engines (default 1.5b,7b on GPU; 'none')")
    ap.add_argument("--big", default=None, help="shape run with ZeRO-3 + CPU offload under --cap-gb (default 32b on "
                                                "GPU; 'none': skip)")
    ap.add_argument("--cap-gb", type=float, default=40.0, help="GPU memory cap of the --big runs (GiB)")
    ap.add_argument("--steps", type=int, default=4, help="DP steps of a --shapes run (the first is not timed)")
    ap.add_argument("--batch", type=int, default=16, help="expected batch size (rows) of the --shapes runs")
    ap.add_argument("--big-steps", type=int, default=3, help="DP steps of a --big run")
    ap.add_argument("--big-batch", type=int, default=2, help="expected batch size (rows) of the --big runs")
    ap.add_argument("--big-micro", type=int, default=1, help="rows per micro-batch of the --big runs")
    ap.add_argument("--records", type=int, default=64, help="generated records (q = batch / records)")
    ap.add_argument("--lam", type=float, default=0.5, help="PrivSA λ (0: plain DP-SGD)")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/bench_zero.json)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in a child process
    a = ap.parse_args(argv)
    if a.run:
        print("RESULT " + json.dumps(run_one(json.loads(a.run)), default=str), flush=True)
        return
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = a.device.startswith("cuda")
    a.shapes = [s for s in (a.shapes or ("1.5b,7b" if gpu else "small")).split(",") if s and s != "none"]
    a.big = None if a.big == "none" else (a.big or ("32b" if gpu else "small"))
    from privcode.bench.shapes import device_info, get_shape

    seq = max(get_shape(s).seq_len for s in [*a.shapes, a.big] if s)
    results = {"info": device_info(a.device), "command": "privcode bench zero " + " ".join(argv), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        a.work = Path(tmp)
        env = {**os.environ, "PRIVCODE_ZONE": str(a.work / "private"), "PRIVCODE_BUDGET_DIR": str(a.work / "budget"),
               "PRIVCODE_ALLOW_RETRAIN": "1", "TQDM_DISABLE": "1"}
        zone, os.environ["PRIVCODE_ZONE"] = os.environ.get("PRIVCODE_ZONE"), env["PRIVCODE_ZONE"]
        try:  # the records' ledger: private data lives in the zone
            prepare(a.work, a.records, seq)
        finally:
            os.environ.pop("PRIVCODE_ZONE") if zone is None else os.environ.update(PRIVCODE_ZONE=zone)
        for spec in plan(a):
            p = subprocess.run([sys.executable, "-m", "privcode.bench.zero_bench", "--run", json.dumps(spec)],
                               env=env, capture_output=True, text=True)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            r = json.loads(line[-1][7:]) if line else {**spec, "error": f"exit {p.returncode}: {p.stderr[-600:]}"}
            results["runs"].append(r)
            _row(r)
    print(f"card {results['info'].get('card')}")
    save_result(results, a.out or "benchmarks/bench_zero.json")


def _row(r: dict) -> None:
    cap = f"cap {r['cap_gb']:g} GiB" if r.get("cap_gb") else ""
    what = f"{r['shape']:>8s} {r['engine']:9s} offload {r['offload']:4s} {cap:12s}"
    if "error" in r:
        print(f"{what} FAILED {r['error']}", flush=True)
    else:
        print(f"{what} {r['tokens_per_s']:9.0f} tok/s  peak {r['peak_gib']:6.2f} GiB  ε {r['epsilon']:.3f}  "
              f"({r['params_b']:g}B params, {r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
