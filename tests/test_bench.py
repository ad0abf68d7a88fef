"""#6 (GPU speed), CPU side: the benchmarks run end to end on the `small` shape and write every
field; the memory-lean loss, lean LoRA and flat clipping compute what the reference computes."""
from __future__ import annotations

import json

import pytest
import torch

from privcode.dp import engine, fastloss, flatclip, leanlora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_peft(seed=0, vocab=300):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=128,
                      attn_implementation="sdpa")
    pm = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    for _, p in pm.named_parameters():
        if p.requires_grad:  # LoRA B starts at 0; make both factors non-trivial
            p.data.normal_(0, 0.2)
    pm.train()
    return pm


def _batch(vocab=300, B=3, T=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 15:] = 0
    am[2, 9:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[am == 0] = -100
    syn = (torch.rand(B, T, generator=g) < 0.4) & (labels != -100)
    return {"input_ids": ids, "attention_mask": am, "labels": labels, "syntax": syn}


def _loss_and_grads(pm, fn, batch, lam):
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = fn(pm, batch, lam=lam, peft_model=pm)
    (loss * torch.arange(1.0, len(loss) + 1)).sum().backward()  # distinct weight per record
    return loss.detach(), [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_fast_loss_equals_reference_values_and_gradients(lam):
    pm = _tiny_peft()
    batch = _batch()
    ref_loss, ref_g = _loss_and_grads(pm, engine.per_record_loss, batch, lam)
    assert leanlora.lean_lora(pm) == 2 * 7
    fast = lambda m, b, **k: fastloss.per_record_loss(m, b, chunk_rows=7, **k)
    loss, g = _loss_and_grads(pm, fast, batch, lam)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_privsa_equals_eager_and_really_compiles(monkeypatch):
    """compile_privsa runs the teacher forward and the KL math through torch.compile (inductor, on
    CPU here); values and gradients equal the eager fast path, and both functions were compiled
    (not silently left eager after a failure)."""
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batch = _batch()
    eager_loss, eager_g = _loss_and_grads(pm, lambda m, b, **k: fastloss.per_record_loss(m, b, chunk_rows=7, **k),
                                          batch, 0.7)
    fastloss._COMPILED.clear()
    assert fastloss.compile_status(pm) == {"teacher": None, "kl_rows": None}
    warned = []
    monkeypatch.setattr(fastloss, "_warn_compile", lambda key, e: warned.append((key, e)))
    comp = lambda m, b, **k: fastloss.per_record_loss(m, b, chunk_rows=7, compile_privsa=True, **k)
    loss, g = _loss_and_grads(pm, comp, batch, 0.7)
    assert warned == []
    assert fastloss.compile_status(pm) == {"teacher": True, "kl_rows": True}
    assert "_privcode_compiled" not in str(sorted(pm.state_dict()))  # the compiled teacher is no submodule
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, eager_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    shorter = {k: v[:, :17] for k, v in batch.items()}  # another length: dynamic shapes, same answer
    l2, _ = _loss_and_grads(pm, comp, shorter, 0.7)
    e2, _ = _loss_and_grads(pm, lambda m, b, **k: fastloss.per_record_loss(m, b, chunk_rows=7, **k), shorter, 0.7)
    torch.testing.assert_close(l2, e2, rtol=1e-5, atol=1e-6)
    fastloss._COMPILED.clear()


def test_fast_loss_edge_cases():
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    b = _batch()
    b["syntax"][:] = False  # no syntax positions: the KL term is exactly zero
    k = fastloss.per_record_loss(pm, b, lam=1.0, ce_weight=0.0, peft_model=pm)
    assert float(k.abs().max()) == 0.0
    b["labels"][:] = -100  # no answer tokens at all: zero loss that still backpropagates
    z = fastloss.per_record_loss(pm, b)
    assert z.shape == (3,) and float(z.abs().max()) == 0.0
    z.sum().backward()
    with pytest.raises(ValueError):
        fastloss.per_record_loss(pm, _batch(), lam=0.5)  # PrivSA without the PEFT model


def test_lean_lora_keeps_keys_and_disabled_adapters_give_the_base():
    pm = _tiny_peft()
    keys = sorted(pm.state_dict())
    ids = _batch()["input_ids"]
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    leanlora.lean_lora(pm)
    assert leanlora.lean_lora(pm) == 14  # idempotent
    assert sorted(pm.state_dict()) == keys
    with torch.no_grad(), pm.disable_adapter():
        torch.testing.assert_close(pm(input_ids=ids).logits, base)
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_fast_loss_per_record_gradients_through_opacus_hooks():
    """Opacus per-sample gradients of a padded micro-batch (lean LoRA + fast loss with the KL
    term) equal each record's own gradient: records stay independent."""
    from opacus import GradSampleModule

    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batch = _batch()
    gsm = GradSampleModule(pm, batch_first=True, loss_reduction="sum")
    params = [(n, p) for n, p in gsm.named_parameters() if p.requires_grad]
    loss = lambda b: fastloss.per_record_loss(gsm, b, lam=0.7, peft_model=pm, chunk_rows=5)
    loss(batch).sum().backward()
    batched = {n: p.grad_sample.detach().clone() for n, p in params}
    for i in range(3):
        gsm.zero_grad(set_to_none=True)
        for _, p in params:
            p.grad_sample = None
        loss({k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        for n, p in params:
            torch.testing.assert_close(batched[n][i], p.grad.detach(), rtol=1e-5, atol=1e-7)
    gsm._close()


def _dp_grads(pm, batches, fast, sigma, seed=0):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(pm, batch_first=True, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=sigma, max_grad_norm=0.05,
                      expected_batch_size=6, loss_reduction="sum", generator=torch.Generator().manual_seed(seed))
    if fast:
        flatclip.fast_dp_optimizer(opt)
    for j, b in enumerate(batches):
        fastloss.per_record_loss(gsm, b).sum().backward()
        opt.signal_skip_step(do_skip=j < len(batches) - 1)
        opt.step()
        if j < len(batches) - 1:
            opt.zero_grad(set_to_none=True)
    out = [p.grad.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    gsm._close()
    return out


def test_flat_clipping_equals_opacus_and_adds_the_same_noise_std():
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batches = [_batch(seed=1), _batch(seed=2)]  # two micro-batches accumulated into one step
    for a, b in zip(_dp_grads(pm, batches, False, 0.0), _dp_grads(pm, batches, True, 0.0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    clean = torch.cat([g.flatten() for g in _dp_grads(pm, batches, True, 0.0)])
    noisy = torch.cat([g.flatten() for g in _dp_grads(pm, batches, True, 3.0)])
    assert (noisy - clean).numel() > 4000
    assert float((noisy - clean).std()) == pytest.approx(3.0 * 0.05, rel=0.06)


def test_fast_backend_matches_hf_backend(tiny_model):
    from privcode.models import load_model, load_tokenizer
    from privcode.synth.base import SamplingParams
    from privcode.synth.fast import FastHFBackend
    from privcode.synth.hf import HFBackend

    hf = HFBackend(str(tiny_model), batch_size=4)
    tok = load_tokenizer(str(tiny_model), padding_side="left")
    fb = FastHFBackend(model=load_model(str(tiny_model)), tokenizer=tok, batch_size=4)
    prompts = ["def add(a", "Question: Write a function.", "x", "Answer: Sure. def add(a, b):", "return a"]
    p = SamplingParams(max_new_tokens=16)
    assert fb.generate(prompts, p) == hf.generate(prompts, p)
    s = fb.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, n=3, seed=1))
    assert [len(x) for x in s] == [3] * 5
    assert s == fb.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, n=3, seed=1))
    ids = fb.generate_ids([[5, 6, 7]], SamplingParams(max_new_tokens=9), ignore_eos=True)
    assert len(ids[0][0]) == 9


def test_bench_train_small_cpu_writes_every_field(tmp_path):
    from privcode.bench import train_bench

    out = tmp_path / "train.json"
    train_bench.main(["--shape", "small", "--device", "cpu", "--steps", "1", "--warmup", "1", "--accum", "2",
                      "--profile", "privcode-dp", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["variants"]) == set(train_bench.ALL)
    for name, v in r["variants"].items():
        assert "error" not in v, (name, v.get("error"))
        assert v["step_s"] > 0 and v["tok_s"] > 0 and v["loss"] == pytest.approx(v["loss"])  # finite
        assert "peak_gb" in v
    assert set(r["targets"]) == set(train_bench.TARGETS)
    assert all(r["targets"][k]["value"] is not None for k in r["targets"] if "memory" not in k)
    for n in train_bench.ACCUM_VARIANTS:
        e = r["stage1_estimate"][n]  # CPU timings of one step are noise: check the fields only
        assert {"t_micro_s", "t_opt_s", "step_s", "total_min", "met"} <= set(e)
    assert r["variants"]["privcode-dp"]["profile"]["wall_s"] > 0
    assert r["info"]["card"] == "cpu" and r["shape"]["name"] == "small" and r["matrix_tok_s"]


def test_bench_zero_small_cpu_runs_zero3_offload_and_the_ddp_path(tmp_path):
    """`privcode bench zero` on CPU: the --big shape's dp-finetune runs end to end, one under DeepSpeed
    ZeRO-3 with the base's partitions offloaded to CPU memory, one on the DDP path: the same plan, so
    the same ε (from privacy.json), and tokens/s of each."""
    from privcode.bench import zero_bench

    out = tmp_path / "zero.json"
    # expected batch 8 of 16 records: the timed step's Poisson sample is empty (0 tok/s) w.p. 2^-16 only
    zero_bench.main(["--device", "cpu", "--shapes", "none", "--big", "small", "--big-steps", "2", "--records", "16",
                     "--big-batch", "8", "--big-micro", "4", "--out", str(out)])
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"small-deepspeed-offload", "small-ddp-capped"}
    for r in runs.values():
        assert "error" not in r, r["error"]
        assert r["tokens_per_s"] > 0 and 0 < r["epsilon"] <= 4.0 and len(r["step_s"]) == 2
    assert runs["small-deepspeed-offload"]["offload"] == "cpu"
    assert runs["small-deepspeed-offload"]["epsilon"] == runs["small-ddp-capped"]["epsilon"]


def test_bench_generate_small_cpu_writes_every_field(tmp_path):
    from privcode.bench import generate_bench

    out = tmp_path / "gen.json"
    generate_bench.main(["--shape", "small", "--device", "cpu", "--batches", "2,3", "--prompt-len", "8",
                         "--new-tokens", "6", "--peers", "dynamic", "--out", str(out)])
    r = json.loads(out.read_text())
    got = {(x["backend"], x["batch"]): x for x in r["results"]}
    assert set(got) == {("fast", 2), ("fast", 3), ("dynamic", 2), ("dynamic", 3)}
    for x in got.values():
        assert "error" not in x and x["tok_s"] > 0
    # fp32 on CPU: the fast backend produces exactly model.generate's tokens
    assert got[("dynamic", 2)]["rows_identical"] == 1.0 and got[("dynamic", 3)]["rows_identical"] == 1.0
    assert set(r["ratios"]) == {"fast / dynamic @ batch 2", "fast / dynamic @ batch 3"}
    assert r["new_tokens"] == 6 and r["info"]["card"] == "cpu" and "target" in r
    assert got[("fast", 2)]["attention"] == "auto"  # the attention path that ran (after any probe's fallback)


def test_bench_generate_rows_of_one_length_hold_one_prompt_cache_per_group(tmp_path):
    """--lengths max (every row runs to --new-tokens, a group's rows end together): one prompt cache per group
    (FastHFBackend.caches: rows given one length end together), not the 4 holders of rows ending at different
    steps (memory the run does not use: the H100 round at n 5 and 1,020 rows ran out of memory with them); the
    group stays all n rows of a prompt (an explicit prompt_caches 1 would split it: GROUP_SPLIT)."""
    from privcode.bench import generate_bench

    out = tmp_path / "gen.json"
    generate_bench.main(["--shape", "small", "--device", "cpu", "--batches", "4", "--prompt-len", "8", "--new-tokens",
                         "5", "--n", "2", "--temperature", "0.8", "--peers", "", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["prompt_caches"] == 0 and [x["prompt_caches"] for x in r["results"]] == [[1]]


def test_bench_generate_batch_0_takes_the_rows_a_stage_would(tmp_path):
    """--batches 0 (what `privcode bench pipeline` passes for a config's batch_size 0): the rows the fast
    backend's auto_rows gives a stage (CPU: CPU_AUTO_ROWS), then whole prompts as for any batch."""
    from privcode.bench import generate_bench
    from privcode.synth.fast import CPU_AUTO_ROWS

    out = tmp_path / "gen.json"
    generate_bench.main(["--shape", "small", "--device", "cpu", "--batches", "0,2", "--prompt-len", "4",
                         "--new-tokens", "3", "--n", "3", "--temperature", "0.8", "--peers", "", "--out", str(out)])
    got = [(x["backend"], x["batch"]) for x in json.loads(out.read_text())["results"] if "tok_s" in x]
    # rows are whole prompts' n samples: 32 -> 30, 2 -> 3
    assert got == [("fast", CPU_AUTO_ROWS - CPU_AUTO_ROWS % 3), ("fast", 3)]


def test_bench_generate_rows_of_given_lengths_with_and_without_refill(tmp_path):
    """--lengths/--waves/--no-refill: rows end at lengths drawn once (tokens = their sum), the continuous and the
    batch-after-batch runs and the reference peer give the same rows (fp32 on CPU), and bad specs are refused."""
    from privcode.bench import generate_bench

    out = tmp_path / "gen.json"
    generate_bench.main(["--shape", "small", "--device", "cpu", "--batches", "4", "--prompt-len", "8", "--new-tokens",
                         "10", "--n", "2", "--temperature", "0.8", "--top-p", "0.9", "--lengths", "geometric:4",
                         "--waves", "3", "--no-refill", "--peers", "reference", "--out", str(out)])
    r = json.loads(out.read_text())
    got = {x["backend"]: x for x in r["results"]}
    assert set(got) == {"fast", "fast-norefill", "reference"} and not any("error" in x for x in got.values())
    tokens = {x["tokens"] for x in got.values()}
    assert len(tokens) == 1 and 12 <= tokens.pop() < 6 * 2 * 10  # 6 prompts x 2 rows, ended before --new-tokens
    assert got["fast-norefill"]["rows_identical"] == 1.0 and got["reference"]["rows_identical"] == 1.0
    assert "fast / fast-norefill @ batch 4" in r["ratios"] and r["lengths"] == "geometric:4" and r["waves"] == 3
    assert got["fast"]["prompt_caches"] == [4]  # rows end at different steps: AUTO_CACHES holders per group
    import torch

    geo = torch.tensor(generate_bench.row_lengths("geometric:20", 4000, 5, 1000, torch.Generator().manual_seed(1)))
    assert geo.min() >= 1 and abs(float(geo.float().mean()) - 20) < 0.5  # sd 19.5 / sqrt(20000) = 0.14
    uni = torch.tensor(generate_bench.row_lengths("uniform:3", 2000, 5, 7, torch.Generator().manual_seed(1)))
    assert set(uni.flatten().tolist()) == {3, 4, 5, 6, 7}
    assert generate_bench.row_lengths("max", 3, 2, 7, torch.Generator()) is None
    for bad in ("uniform:0", "geometric:x", "normal:3"):
        with pytest.raises(SystemExit, match="--lengths"):
            generate_bench.main(["--shape", "small", "--device", "cpu", "--lengths", bad, "--out", str(out)])


def test_bench_generate_profile_walks_a_calls_steps_by_attention_length(tmp_path):
    """--profile: at every attention length a call's steps read, the step's time by section (attention,
    sampling, the layers' halves...), weighted by how many steps read that length; the profiled and timed
    steps leave the runner where a call would be (every row ends at --new-tokens)."""
    from privcode.bench import generate_bench
    from privcode.bench.decode_profile import SECTIONS

    out = tmp_path / "gen.json"
    generate_bench.main(["--shape", "small", "--device", "cpu", "--batches", "4", "--prompt-len", "8", "--new-tokens",
                         "70", "--n", "2", "--temperature", "0.8", "--top-p", "0.9", "--prompt-rows", "2",
                         "--peers", "", "--profile", "--profile-steps", "2", "--out", str(out)])
    p = json.loads(out.read_text())["profile"]
    assert (p["rows"], p["prompt_rows"], p["new_tokens"]) == (4, 2, 70)
    # own caches (shared prompt cache): 69 decode steps write slots 0..68 -> lengths 64 and 128
    assert {a: v["steps_of_a_call"] for a, v in p["lengths"].items()} == {"64": 64, "128": 5}
    for v in p["lengths"].values():
        # every section a sampled step marks (Decoder.mark, the runner's marks) is one SECTIONS names: a mark
        # renamed on either side would drop out of the profile
        assert set(v["sections"]) == set(SECTIONS) - {"argmax"} and v["graph_ms"] > 0
    mean = p["mean"]
    want = (64 * p["lengths"]["64"]["graph_ms"] + 5 * p["lengths"]["128"]["graph_ms"]) / 69
    assert mean["graph_ms"] == pytest.approx(want) and mean["tok_s_at_graph_ms"] == pytest.approx(4e3 / want)


def test_bench_attention_small_cpu_checks_and_times_each_path(tmp_path):
    """`privcode bench attention`: each own-cache path checked against the math path on the decoder's layout
    (rows' slots past their counts poisoned: a path that read them would show a large error), timed, the
    bytes the rows must read counted from their key counts; a path that cannot run here is an error entry."""
    from privcode.bench import attention_bench
    from privcode.bench.shapes import get_shape

    out = tmp_path / "att.json"
    attention_bench.main(["--shape", "small", "--device", "cpu", "--rows", "8", "--slots", "64", "--keys", "1:64",
                          "--paths", "math,flex,efficient", "--triton-configs", "32,2,2", "--warmup", "1", "--iters",
                          "2", "--out", str(out)])
    r = json.loads(out.read_text())
    q, K, V, counts = attention_bench.inputs(get_shape("small"), 8, 64, 1, 64, torch.float32, "cpu")
    assert r["bytes_per_call"] == int(counts.sum()) * 2 * 16 * 2 * 4  # keys + values, 2 KV heads, d 16, fp32
    assert (r["kv_heads"], r["query_heads_per_kv"], r["head_dim"], r["layers"]) == (2, 2, 16, 2)
    res = {x["path"]: x for x in r["results"]}
    assert res["math"]["max_abs_err"] == 0 and res["flex"]["max_abs_err"] < 1e-4
    assert res["math"]["ms_per_step"] == pytest.approx(2 * res["math"]["ms_per_call"]) and res["math"]["gb_s"] > 0
    assert "error" in res["efficient"]  # the memory-efficient kernel: CUDA only
    assert "triton[32,2,2]" in res  # (here without a GPU or Triton's interpreter: an error entry)
    with pytest.raises(SystemExit, match="not KEYS,WARPS,STAGES"):
        attention_bench.main(["--device", "cpu", "--triton-configs", "48,2,2"])
    # the poison is there: attention over all 64 slots (counts ignored) is far from the rows' own keys'
    ro, _ = attention_bench.prepare("math", q, K, V, counts, 0.25)()
    whole, _ = attention_bench.prepare("math", q, K, V, torch.full_like(counts, 64), 0.25)()
    assert (whole - ro).abs().max() > 1.0


def test_hook_free_per_record_gradients_equal_batch_of_one():
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batch = _batch()
    lgs = leanlora.LoRAGradSample(pm)
    params = [(n, p) for n, p in lgs.named_parameters() if p.requires_grad]
    loss = lambda b: fastloss.per_record_loss(lgs, b, lam=0.7, peft_model=pm, chunk_rows=5)
    loss(batch).sum().backward()
    batched = {n: p.grad_sample.detach().clone() for n, p in params}
    assert all(p.grad is None for _, p in params)  # per-record mode computes no summed gradient
    lgs._close()
    for i in range(3):
        for _, p in params:
            p.grad = None
        loss({k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        for n, p in params:
            torch.testing.assert_close(batched[n][i], p.grad.detach(), rtol=1e-5, atol=1e-7)


def test_accelerated_dpsgd_takes_the_same_step_as_the_stock_engine():
    """engine.DPSGD with Opacus hooks and the reference loss vs. accelerate_dpsgd + lean LoRA +
    fast loss: same clipped update (σ = 0), over a step of two micro-batches."""
    def run(fast):
        pm = _tiny_peft()
        if fast:
            leanlora.lean_lora(pm)
        dp = engine.DPSGD(pm, n_records=100, sample_rate=0.06, noise_multiplier=0.0, max_grad_norm=0.05,
                          expected_batch_size=6, lr=0.1, weight_decay=0.0, steps=3, seed=0, device="cpu",
                          optimizer="sgd")
        if fast:
            assert flatclip.accelerate_dpsgd(dp)
        fn = fastloss.per_record_loss if fast else engine.per_record_loss
        before = [p.detach().clone() for p in pm.parameters() if p.requires_grad]
        dp.step([_batch(seed=1), _batch(seed=2)], lambda m, b: fn(m, b, lam=0.7, peft_model=pm))
        return [p.detach() - b for p, b in zip([p for p in pm.parameters() if p.requires_grad], before)]
    ref, fast = run(False), run(True)
    assert max(float(d.abs().max()) for d in ref) > 1e-4
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # deltas of ~0.2-sized weights


def _nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return [type(f).__name__ for f in seen]


@pytest.mark.parametrize("per_record", [False, True])
def test_fused_lora_pairs_equal_one_node_per_factor(monkeypatch, per_record):
    """One autograd node per LoRA layer computes what two factor nodes compute: loss, summed
    gradients and per-record gradients are bitwise-close; the graph has half the LoRA nodes."""
    batch = _batch()
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(leanlora, "FUSE_LORA_PAIRS", fused)
        pm = _tiny_peft()
        leanlora.lean_lora(pm)
        m = leanlora.LoRAGradSample(pm) if per_record else pm
        loss = fastloss.per_record_loss(m, batch, lam=0.7, peft_model=pm, chunk_rows=5)
        names = _nodes(loss.sum())
        (loss * torch.arange(1.0, 4.0)).sum().backward()
        ps = [p for p in pm.parameters() if p.requires_grad]
        runs[fused] = (loss.detach(), [(p.grad_sample if per_record else p.grad).clone() for p in ps], names)
    (l0, g0, n0), (l1, g1, n1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert n0.count("_LoRAFnBackward") == 28 and "_LoRAPairFnBackward" not in n0  # 2 layers x 7 x (A, B)
    assert n1.count("_LoRAPairFnBackward") == 14 and "_LoRAFnBackward" not in n1


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_loss_positions_from_host_copies_equal_device_ones(lam):
    """collate keeps CPU copies of labels/syntax so the fast loss finds its positions without a
    device sync; they are the positions the device tensors give, and the loss is the same."""
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batch = _batch()
    host = {**batch, "labels_cpu": batch["labels"].clone(), "syntax_cpu": batch["syntax"].clone()}
    a, b = fastloss.loss_positions(batch, bool(lam)), fastloss.loss_positions(host, bool(lam))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
    if lam:
        assert a[2] == int(batch["syntax"][:, 1:].sum())  # every syntax position enters the KL
        assert bool(batch["syntax"][:, 1:][a[0][:a[2]], a[1][:a[2]]].all())  # KL positions first
    la = fastloss.per_record_loss(pm, batch, lam=lam, peft_model=pm, chunk_rows=7)
    lb = fastloss.per_record_loss(pm, host, lam=lam, peft_model=pm, chunk_rows=7)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_right_padded_rows_need_no_attention_mask(lam):
    """Causal attention: under right padding a real token sees only real tokens, so dropping the
    mask (what the fast loss does when the host copy shows right padding) changes no loss value
    and no per-record gradient."""
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    batch = _batch()
    assert fastloss.model_attention_mask(batch) is batch["attention_mask"]  # no host copy: keep it
    unmasked = {**batch, "attention_mask_cpu": batch["attention_mask"].clone()}
    assert fastloss.model_attention_mask(unmasked) is None
    left = batch["attention_mask"].flip(1)
    assert fastloss.model_attention_mask({**batch, "attention_mask_cpu": left}) is not None
    holes = torch.ones_like(left)
    holes[0, 3] = 0
    assert fastloss.model_attention_mask({**batch, "attention_mask_cpu": holes}) is not None

    def per_record(b):
        lgs = leanlora.LoRAGradSample(pm)
        params = [p for p in lgs.parameters() if p.requires_grad]
        loss = fastloss.per_record_loss(lgs, b, lam=lam, peft_model=pm, chunk_rows=5)
        loss.sum().backward()
        gs = [p.grad_sample.detach().clone() for p in params]
        for p in params:
            p.grad_sample = None
        lgs._close()
        return loss.detach(), gs

    ref_loss, ref_gs = per_record(batch)
    loss, gs = per_record(unmasked)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(gs, ref_gs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the mask did matter for the padded positions themselves: the test is not vacuous
    dec, _ = fastloss.decoder_and_head(pm)
    with torch.no_grad():
        h_mask = dec(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        h_none = dec(input_ids=batch["input_ids"], attention_mask=None).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(h_none[real], h_mask[real], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(h_none[~real], h_mask[~real])


def test_collate_keeps_a_right_padded_host_mask():
    from privcode.train import collate

    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [-100]}]
    b = collate(rows, pad_id=0, device="cpu")
    assert b["attention_mask_cpu"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert fastloss.model_attention_mask(b) is None


def test_fused_adamw_only_where_every_parameter_is_on_cuda():
    p = torch.nn.Parameter(torch.zeros(3))
    assert engine.fused_kwargs([p]) == {}
    assert engine.fused_kwargs([p], "sgd") == {}
    assert engine.fused_kwargs([]) == {}


def test_adapters_disabled_is_peft_disable_adapter_and_restores_state():
    from opacus import GradSampleModule

    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    ids = _batch()["input_ids"]
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    with torch.no_grad():
        adapted = pm(input_ids=ids).logits
    assert not torch.allclose(base, adapted)
    gsm = GradSampleModule(pm, batch_first=True, loss_reduction="sum")  # found through wrappers too
    for wrapper in (pm, gsm):
        with torch.no_grad(), leanlora.adapters_disabled(wrapper):
            torch.testing.assert_close(pm(input_ids=ids).logits, base)
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=ids).logits, adapted)
    gsm._close()
    assert len(pm.__dict__["_privcode_lora_layers"]) == 14
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == grads
    with pytest.raises(RuntimeError), leanlora.adapters_disabled(pm):  # restored on errors as well
        raise RuntimeError("boom")
    assert not any(m._disable_adapters for m in pm.__dict__["_privcode_lora_layers"])


def test_adapters_disabled_falls_back_to_peft_for_modules_to_save():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
    pm = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    pm.base_model.model.lm_head.modules_to_save["default"].weight.data.normal_()
    ids = _batch()["input_ids"]
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    with torch.no_grad(), leanlora.adapters_disabled(pm):
        torch.testing.assert_close(pm(input_ids=ids).logits, base)
    assert pm.__dict__["_privcode_lora_layers"] == []  # not plain LoRA: PEFT's own context manager


def test_gpu_gaps_finds_idle_time_and_the_frames_behind_it():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("gpu_gaps", REPO / "scripts" / "gpu_gaps.py")
    gg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gg)
    k = lambda ts, dur: {"cat": "kernel", "ts": ts, "dur": dur}  # noqa: E731
    f = lambda name, ts, dur: {"cat": "python_function", "name": name, "ts": ts, "dur": dur}  # noqa: E731
    trace = {"traceEvents": [k(0, 10), k(5, 20), k(40, 10), k(50, 5), k(300, 10),  # gaps: 15 us, 245 us
                             f("step", 0, 400), f("peft.py(1): get_model_status", 60, 230), f("cpu op", 1, 2)]}
    span, busy, found = gg.gaps(trace, min_gap_us=10)
    assert span == 310 and busy == 55
    assert [g for g, *_ in found] == [15, 245]
    where = gg.attribute(trace, found)
    assert where["peft.py(1): get_model_status < step"] == 245 and where["step"] == 15
    assert gg.gaps(trace, min_gap_us=100)[2] == [(245, 55, 300)]
