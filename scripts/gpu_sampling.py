"""#17 on one GPU: the sort-free top-p sampler against the sort-based reference at the round trip's
batch (rows x Llama-3.1 vocabulary), and where one decode step of the fast backend spends its time.

    python3 scripts/gpu_sampling.py --out /tmp/out/sampling.json
"""
import argparse
import json
import time

import torch


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def samplers(rows, vocab):
    from privcode.synth.sampling import sort_top_p_sample, top_p_sample

    out = []
    for scale in (1.0, 4.0):  # random-weight-like near-uniform logits; peaked ones like a trained model
        z = (torch.randn(rows, vocab, device="cuda") * scale).bfloat16()
        torch.manual_seed(0)
        a = sort_top_p_sample(z, 0.8, 0.95)
        torch.manual_seed(0)
        b = top_p_sample(z, 0.8, 0.95)
        out.append({"rows": rows, "vocab": vocab, "logit_std": scale, "same_token": float((a == b).float().mean()),
                    "sort_ms": timed(lambda: sort_top_p_sample(z, 0.8, 0.95)),
                    "sort_free_ms": timed(lambda: top_p_sample(z, 0.8, 0.95)),
                    "argmax_ms": timed(lambda: z.argmax(-1))})
        print(out[-1], flush=True)
    return out


def step_profile(shape_name, B, P, new, temperature, top_p, reps=1):
    """GPU time per op class of one eager decode step (what the CUDA graph replays), and the replay."""
    from torch.profiler import ProfilerActivity, profile

    from privcode.bench.shapes import build_model, get_shape
    from privcode.synth.decoder import Decoder
    from privcode.synth.runner import Runner

    shape = get_shape(shape_name)
    model = build_model(shape, "cuda", torch.bfloat16).eval()
    dec = Decoder(model)
    up = lambda x: -(-x // 64) * 64  # noqa: E731 - the backend's slot buckets
    r = Runner(dec, B, up(new) if reps > 1 else up(P + new), temperature=temperature, top_p=top_p, eos=None,
                pad=0, ignore_eos=True, use_graph=True, reps=reps, prefix=up(P) if reps > 1 else 0)
    ids = torch.randint(1, shape.vocab - 2, (B // reps, P)).tolist()
    r.load(list(range(B // reps)), ids)  # every row starts together; profile the step halfway through
    r.start(list(range(B)), [i // reps for i in range(B)], list(range(B)), [P] * B, [new] * B, new)
    for j in range(new // 2):
        r.replay(r.att_len((0 if reps > 1 else P) + j))
    replay_ms = timed(r.graphs[r.S].replay, 20)  # the full-length step (every cache slot read)
    with torch.inference_mode():
        eager_ms = timed(r.step, 5)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                r.step()
            torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 3e3, e.count // 3) for e in prof.key_averages()),
                  key=lambda x: -x[1])
    gpu_ms = sum(t for _, t, _ in rows)
    res = {"shape": shape.name, "batch": B, "prompt_len": P, "temperature": temperature, "top_p": top_p,
           "graph_replay_ms": replay_ms, "eager_step_ms": eager_ms, "kernel_ms": gpu_ms,
           "kernels_per_step": sum(c for _, _, c in rows),
           "top_ops": [{"op": k[:90], "ms": t, "calls": c} for k, t, c in rows[:14]]}
    print(json.dumps(res, indent=1), flush=True)
    del r, model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
           "samplers": samplers(640, 128256) + samplers(64, 128256),
           "profiles": [step_profile("1.5b", 256, 128, 512, 0.0, 1.0),
                        step_profile("8b", 640, 400, 200, 0.8, 0.95, reps=20)]}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
