"""Where a decode step of the fast backend spends its time: `privcode bench generate --profile`.

    privcode bench generate --shape 8b --n 20 --temperature 0.8 --top-p 0.95 --prompt-len 400 \
        --new-tokens 200 --batches 1280 --compile --peers "" --profile
    privcode bench generate --shape small --device cpu --batches 4 --prompt-len 8 --new-tokens 70 --profile

One runner of the batch shape a call would use (rows, cache length, prompt cache of --prompt-len), every
row started on a random prompt and decoding to --new-tokens. Walking through the steps of a call, at
each attention length (SLOT_BUCKET-rounded cache slots a step reads) it times the step as the
backend runs it (CUDA graph replays, CUDA events, `graph_ms`) and profiles `--profile-steps` eager
steps of the same state with torch.profiler: device (kernel) time per step in total (`kernel_ms`) and
per section of the step (`Decoder.mark`: embedding, q/k/v, cache write, attention, o_proj and MLP,
head, sampling, bookkeeping), and the kernels that take most of it. `mean` weights each length by the
number of steps of a call that read it. On CPU the times are host times of the eager step.
"""
from __future__ import annotations

import time

SECTIONS = ("embed, rotary, masks", "norm, q/k/v, rotary", "cache write", "attention", "o_proj, MLP", "final norm",
            "head", "sampling", "argmax", "bookkeeping")


def _ms(evt, attr: str) -> float:
    """An event's time in ms (torch >= 2.4 names it device_*, older cuda_*; CPU: cpu_*)."""
    for name in (attr, attr.replace("device", "cuda")):
        if hasattr(evt, name):
            return getattr(evt, name) / 1e3
    return 0.0


def _profile_steps(r, att: int, steps: int, cuda: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    r.dec.mark = record_function
    try:
        with torch.inference_mode(), profile(activities=acts) as prof:
            for _ in range(steps):
                r.step(att)
            if cuda:
                torch.cuda.synchronize(r.dev)
    finally:
        from privcode.synth.decoder import unmarked

        r.dec.mark = unmarked
    avg = prof.key_averages()
    kind = "device_time_total" if cuda else "cpu_time_total"
    sections = {e.key: _ms(e, kind) / steps for e in avg if e.key in SECTIONS}
    if cuda:
        # the sections' record_function ranges show up on the device too (gpu_user_annotation): not kernels
        kernels = [e for e in avg if str(getattr(e, "device_type", "")).endswith("CUDA") and e.key not in SECTIONS]
        total = sum(_ms(e, "self_device_time_total") for e in kernels) / steps
        top = sorted(kernels, key=lambda e: -_ms(e, "self_device_time_total"))[:12]
        top = [{"kernel": e.key[:120], "ms": _ms(e, "self_device_time_total") / steps, "calls": e.count // steps}
               for e in top]
    else:
        total, top = sum(sections.values()), []
    return {"kernel_ms": total, "kernel_calls": sum(t["calls"] for t in top), "sections": sections,
            "top_kernels": top}


def profile_decode(fb, prompts: list[list[int]], params, rows: int, steps: int = 3) -> dict:
    """Profile the decode steps of FastHFBackend `fb` at `rows` rows (see the module docstring);
    `prompts`: token lists of one length, at least rows / group of them."""
    import torch

    from privcode.synth.decoder import bucket

    k = params.n if params.temperature > 0 else 1
    shared = fb.share_prefix and k > 1
    g = fb.group_rows(k) if shared else 1
    P, new = len(prompts[0]), params.max_new_tokens
    B = max(g, rows - rows % g)
    c = (fb.prompt_caches or 1) if shared else 1  # rows at one length: the second cache only if asked for
    r = fb._runner(B, bucket(new) if shared else bucket(P + new), params.temperature, params.top_p, True, g,
                   bucket(P) if shared else 0, c)
    cuda = r.dev.type == "cuda"
    holders = list(range(0, B // g * c if shared else B, c))  # each group's first cache
    r.begin(params.seed)
    r.load(holders, [prompts[h % len(prompts)] for h in holders])
    r.start(list(range(B)), [i // g * c for i in range(B)], list(range(B)), [P] * B, [new] * B, new)
    first = 0 if shared else P  # the slot the first decode step writes
    per_att: dict[int, list[int]] = {}
    for t in range(new - 1):
        per_att.setdefault(r.att_len(first + t), []).append(t)
    out = {"rows": B, "prompt_rows": g, "prompt_caches": c, "prompt_len": P, "new_tokens": new,
           "cuda_graph": bool(r.graphs),
           "attention": fb.dec.attention, "lengths": {}}
    t = 0
    for att, ts in per_att.items():
        while t < ts[0]:  # steps the previous length's timing and profile did not take
            r.replay(r.att_len(first + t))
            t += 1
        timed = min(len(ts), 8)
        if cuda:
            torch.cuda.synchronize(r.dev)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        t0 = time.perf_counter()
        for _ in range(timed):  # these steps advance the rows, as a call's would
            r.replay(att)
        if cuda:
            e1.record()
            torch.cuda.synchronize(r.dev)
            graph_ms = e0.elapsed_time(e1) / timed
        else:
            graph_ms = (time.perf_counter() - t0) * 1e3 / timed
        t += timed
        prof = _profile_steps(r, att, min(steps, max(1, len(ts) - timed)), cuda)
        t += min(steps, max(1, len(ts) - timed))
        out["lengths"][att] = {"steps_of_a_call": len(ts), "graph_ms": graph_ms, **prof}
    total = sum(v["steps_of_a_call"] for v in out["lengths"].values())
    w = {a: v["steps_of_a_call"] / total for a, v in out["lengths"].items()}
    mean = {"graph_ms": sum(w[a] * v["graph_ms"] for a, v in out["lengths"].items()),
            "kernel_ms": sum(w[a] * v["kernel_ms"] for a, v in out["lengths"].items()),
            "sections": {s: sum(w[a] * v["sections"].get(s, 0.0) for a, v in out["lengths"].items())
                         for s in SECTIONS}}
    mean["sections"] = {s: x for s, x in mean["sections"].items() if x > 0}
    mean["tok_s_at_graph_ms"] = B / mean["graph_ms"] * 1e3
    out["mean"] = mean
    fb._runners.clear()
    if cuda:
        torch.cuda.empty_cache()
    return out


def print_profile(p: dict) -> None:
    """The profile as a table: ms per step by section, at each attention length and on average."""
    atts = list(p["lengths"])
    print(f"\n--- decode step profile: {p['rows']} rows ({p['prompt_rows']} per prompt), attention {p['attention']}, "
          f"CUDA graph {p['cuda_graph']}; ms per step")
    print(f"{'section':24s}" + "".join(f"{'att ' + str(a):>10s}" for a in atts) + f"{'mean':>10s}")
    for s in SECTIONS:
        if s in p["mean"]["sections"]:
            print(f"{s:24s}" + "".join(f"{p['lengths'][a]['sections'].get(s, 0.0):10.2f}" for a in atts)
                  + f"{p['mean']['sections'][s]:10.2f}")
    for key in ("kernel_ms", "graph_ms"):
        print(f"{key:24s}" + "".join(f"{p['lengths'][a][key]:10.2f}" for a in atts) + f"{p['mean'][key]:10.2f}")
    print(f"tok/s at the mean graph step: {p['mean']['tok_s_at_graph_ms']:.0f}")
    last = p["lengths"][atts[-1]]
    for k in last["top_kernels"][:8]:
        print(f"  {k['ms']:7.2f} ms  x{k['calls']:<4d} {k['kernel']}")
