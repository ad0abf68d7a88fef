"""PrivSA's KL term before the first update, eager against compiled teacher (docs/scaling.md).

    python scripts/privsa_kl_floor.py --shape qwen2.5-coder-1.5b           # on a GPU: eager, then compiled
    python scripts/privsa_kl_floor.py --shape tiny --modes eager --device cpu   # CPU check (tests/test_scale_script.py)

At step 1 the LoRA B factors are 0, so the DP model is the frozen teacher and KL(p_base ‖ p_dp)
should be 0. With λ = 1000 (paper.yaml's first-step λ) any difference between the teacher's and
the student's kernels becomes a gradient term. Prints, per micro-batch of real-length taskgen rows
(random weights of the named shape, bf16 base, LoRA r=16 on all projections, as the Snakemake GPU
rules train), the mean cross-entropy and the mean KL per syntax token; one line per micro-batch.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

LAMBDA = 1000.0  # paper.yaml's λ at step 1: the factor a KL floor is multiplied by


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-coder-1.5b", help="a scripts/gpu_smoke.py shape")
    ap.add_argument("--work", type=Path, default=None, help="model + records dir (prepared if missing)")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    ap.add_argument("--rows", type=int, default=32, help="rows per micro-batch")
    ap.add_argument("--batches", type=int, default=3)
    a = ap.parse_args(argv)

    import torch

    from privcode.bench.shapes import LORA_ALPHA, LORA_R, LORA_TARGETS
    from privcode.dp import fastloss
    from privcode.models import load_tokenizer
    from privcode.train import TrainConfig, build_lora_model, collate, load_rows

    work = a.work or Path(f"/tmp/privsa_kl_{a.shape}")
    if not (work / "model").is_dir():
        subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_smoke.py")), "prepare", "--out", str(work),
                        "--shape", a.shape, "--records", str(2 * a.rows * a.batches)], check=True)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TrainConfig(fast=True, dtype="bfloat16" if device.startswith("cuda") else "float32", max_length=1024,
                      lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_targets=LORA_TARGETS)
    tok = load_tokenizer(str(work / "model"))
    rows, _ = load_rows(work / "private" / "data" / "records.jsonl", tok, cfg, syntax=True)
    pm = build_lora_model(str(work / "model"), cfg, device)
    assert all(float(p.detach().abs().max()) == 0 for n, p in pm.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        for mode in a.modes.split(","):
            for k in range(a.batches):
                b = collate(rows[a.rows * k:a.rows * (k + 1)], tok.pad_token_id, device)
                t = time.time()
                f = lambda lam: fastloss.per_record_loss(pm, b, lam=lam, peft_model=pm,
                                                         compile_privsa=mode == "compiled")
                ce = f(0.0)
                kl = (f(LAMBDA) - ce) / LAMBDA
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                print(f"{mode} mb{k}: CE mean {float(ce.mean()):.4f}  KL per syntax token mean {float(kl.mean()):.3e} "
                      f"max {float(kl.abs().max()):.3e}  ({time.time() - t:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
