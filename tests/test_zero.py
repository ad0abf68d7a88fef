"""#20: DP fine-tuning under DeepSpeed ZeRO-3 (privcode.dp.zero) is the DDP path's mechanism — the same
update with noise off, the same run end to end with the same streams — and refuses what would
change it; the non-DP fast path under DeepSpeed trains the reference's model. Two processes (gloo)
in one torchrun (tests/dist_worker.py "zero" calls `worker` in each rank); the noise and mutation
checks of the ZeRO-3 path are in tests/test_dp_teeth.py."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, mark_private
from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.train import TrainConfig, train_dp

pytestmark = pytest.mark.slow  # over ~20 s on 2 cores: `pytest -m 'not slow'` skips it

LORA = dict(lora_targets=["q_proj", "v_proj"], lora_r=8, max_length=128, prompt_format="qa")
E2E = dict(LORA, epsilon=8.0, delta=1e-3, steps=3, batch_size=8, micro_batch_size=2, lr=1e-2, dataset_size="public",
           fast=True, privsa_lambda_max=5.0, privsa_lambda_min=0.1, privsa_alpha=0.5, reproducible_seed=3)
N_REC, C, LAM, PAD_TOKEN = 24, 0.5, 0.5, 5


def write_varied(path: Path, n: int) -> Path:
    """Records of 1..5 code lines: the ranks' length bands then hold different numbers of rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            body = "".join(f"    y = x * {k} + {i}\n" for k in range(i % 5)) + f"    return x + {i}\n"
            fh.write(json.dumps({"id": f"r{i}", "problem": f"Write `f{i}(x)`.", "lang": "python",
                                 "solution": f"```python\ndef f{i}(x):\n{body}```"}) + "\n")
    return path


# ============================================================================================
# the two-process worker


def _flat(params):
    return torch.cat([p.detach().reshape(-1).double() for p in params]).clone()


def signal_update(model_dir, data, path: str, rank: int, world: int, steps: int = 2) -> dict:
    """σ = 0, lr = 1, SGD: the update is −(clipped sum)/E[B]. The same LoRA start, the same Poisson
    samples (seed), one-row micro-batches, PrivSA on with some rows lacking syntax positions."""
    from privcode.dp import engine, fastloss, flatclip, zero
    from privcode.dp.sampling import micro_batches
    from privcode.models import load_tokenizer
    from privcode.train import build_lora_model, collate, load_rows

    cfg = TrainConfig(**LORA, fast=True)
    tok = load_tokenizer(str(model_dir))
    rows, _ = load_rows(data, tok, cfg, syntax=True)
    for i, r in enumerate(rows):
        if i % 3 == 0:  # no syntax position: the teacher runs anyway in lock step
            r["syntax"] = [False] * len(r["syntax"])
    lengths = [len(r["input_ids"]) for r in rows]
    if path == "zero":
        model = zero.build_lora_model(str(model_dir), cfg, "cpu")
        # the padding row: any public token; not the pad token, whose embedding the tiny model keeps at
        # 0 (a row of it has no gradient, so counting it would go unseen)
        Engine = functools.partial(zero.ZeroDPSGD, pad_token=PAD_TOKEN, syntax=True)
    else:
        model, Engine = build_lora_model(str(model_dir), cfg, "cpu"), engine.DPSGD
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:  # every factor non-zero, the same start on both paths
            p.data.normal_(0, 0.2)
    dp = Engine(model, n_records=len(rows), sample_rate=0.5, noise_multiplier=0.0, max_grad_norm=C,
                expected_batch_size=0.5 * len(rows), lr=1.0, weight_decay=0.0, steps=steps, seed=7, device="cpu",
                rank=rank, world=world, optimizer="sgd", lengths=lengths)
    flatclip.accelerate_dpsgd(dp)
    loss = functools.partial(fastloss.per_record_loss, lam=LAM, peft_model=model, lockstep=path == "zero")
    before, counts = _flat(dp.params), []
    for _ in range(steps):
        mbs = micro_batches(dp.next_indices(), lengths, 1)
        counts.append(len(mbs))
        dp.step([collate([rows[i] for i in mb], tok.pad_token_id, "cpu") for mb in mbs], loss)
    res = {"update": _flat(dp.params) - before, "micro_batches": [None] * world}
    torch.distributed.all_gather_object(res["micro_batches"], counts)
    if path == "zero":  # the padding row's own gradient: what dropping it keeps out of the update
        dp.offload.get_param_coordinator().reset_step()
        loss(dp.gsm, dp.pad).sum().backward()
        res["pad_grad_norm"] = float(sum(p.grad_sample.double().pow(2).sum() for p in dp.params).sqrt())
    return res


def worker(model_dir, out_dir, data) -> None:
    from privcode.dp import engine
    from privcode.train import train_nondp

    rank, world = engine.init_distributed()
    out = Path(out_dir)
    res = {path: signal_update(model_dir, out / "varied.jsonl", path, rank, world) for path in ("ddp", "zero")}
    if rank == 0:
        torch.save(res, out / "signal.pt")
    for eng in ("ddp", "deepspeed"):  # end to end, noise on, the same (reproducible) streams
        train_dp(str(model_dir), data, out / eng, TrainConfig(**{**E2E, "engine": eng}),
                 private_dir=out / "private" / eng)
    for fast in (False, True):  # non-DP: DeepSpeed ZeRO-2, reference and fast loss
        train_nondp(str(model_dir), data, out / f"ft_fast{int(fast)}",
                    TrainConfig(**LORA, steps=3, batch_size=8, micro_batch_size=2, lr=1e-2, fast=fast),
                    private_dir=out / "private" / f"ft{int(fast)}")


@pytest.fixture(scope="module")
def two_processes(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    zone = tmp / "private"
    write_varied(tmp / "varied.jsonl", N_REC)
    with pytest.MonkeyPatch.context() as mp:  # the data's ledger: private data lives in the zone
        mp.setenv("PRIVCODE_ZONE", str(zone))
        data = mark_private(write_varied(zone / "data" / "records.jsonl", N_REC).parent)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               PYTHONPATH=f"{REPO}:{REPO / 'tests'}", TQDM_DISABLE="1", PRIVCODE_ZONE=str(zone),
               PRIVCODE_BUDGET_DIR=str(tmp / "budget"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_worker.py"), str(tiny_model), str(tmp), str(data), "zero"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return tmp


def test_zero3_update_equals_the_ddp_update_with_noise_off(two_processes):
    res = torch.load(two_processes / "signal.pt")
    ddp, z = res["ddp"], res["zero"]
    assert ddp["micro_batches"] == z["micro_batches"]  # the same Poisson samples and bands
    assert any(len(set(c)) > 1 for c in zip(*z["micro_batches"]))  # ranks ran padding micro-batches
    assert z["pad_grad_norm"] > C  # whose gradient, counted, would add one of norm C to the clipped sum
    assert float(ddp["update"].abs().max()) > 1e-3
    torch.testing.assert_close(z["update"], ddp["update"], rtol=1e-5, atol=1e-7)


def test_zero3_run_is_the_ddp_run_end_to_end(two_processes):
    """Noise on, the same reproducible streams: the same adapter, ε, σ, q and T in privacy.json."""
    from safetensors.torch import load_file

    a, b = (ledger.read(two_processes / e) for e in ("ddp", "deepspeed"))
    for k in ("epsilon", "delta"):
        assert a[k] == b[k]
    ra, rb = a["releases"][0], b["releases"][0]
    for k in ("noise_multiplier", "sample_rate", "steps", "history", "max_grad_norm", "expected_batch_size",
              "processes"):
        assert ra[k] == rb[k], k
    assert rb["processes"] == 2
    stats = json.loads((two_processes / "private" / "deepspeed" / "train_stats.json").read_text())
    assert stats["config"]["engine"] == "deepspeed" and stats["world_size"] == 2
    wa, wb = (load_file(two_processes / e / "adapter_model.safetensors") for e in ("ddp", "deepspeed"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_fast_non_dp_finetune_under_deepspeed_trains_the_reference_model(two_processes):
    from safetensors.torch import load_file

    ref, fast = (load_file(two_processes / f"ft_fast{i}" / "adapter_model.safetensors") for i in (0, 1))
    stats = [json.loads((two_processes / "private" / f"ft{i}" / "train_stats.json").read_text()) for i in (0, 1)]
    assert stats[1]["world_size"] == 2 and stats[1]["config"]["fast"] and stats[1]["lora_max_abs_delta"] > 0
    assert stats[0]["losses"] == pytest.approx(stats[1]["losses"], rel=1e-5)
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-6)


# ============================================================================================
# refusals (before any model or data is loaded)


@pytest.mark.parametrize("knobs,field", [
    ({"fast": False}, "fast"),
    ({"dtype": "float16"}, "dtype"),
    ({"privsa_compile": True}, "privsa_compile"),
    ({"deepspeed": {"gradient_clipping": 1.0}}, "deepspeed.gradient_clipping"),
    ({"deepspeed": {"fp16": {"enabled": True}}}, "deepspeed.fp16"),
    ({"deepspeed": {"gradient_accumulation_steps": 4}}, "deepspeed.gradient_accumulation_steps"),
    ({"deepspeed": {"optimizer": {"type": "AdamW"}}}, "deepspeed.optimizer"),
    ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed.zero_optimization.stage"),
    ({"deepspeed": {"zero_optimization": {"reduce_bucket_size": 10}}},
     "deepspeed.zero_optimization.reduce_bucket_size"),
    ({"deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
     "deepspeed.zero_optimization.offload_optimizer"),
])
def test_deepspeed_settings_that_would_change_the_mechanism_are_refused(tiny_model, private_data, tmp_path, knobs,
                                                                        field):
    cfg = TrainConfig(**{**E2E, "engine": "deepspeed", **knobs})
    with pytest.raises(PrivcodeError, match=f"field '{field}'"):
        train_dp(str(tiny_model), str(private_data), tmp_path / "a", cfg)
    assert not (tmp_path / "a").exists()


def test_engine_values_are_checked():
    with pytest.raises(PrivcodeError, match="field 'engine'"):
        TrainConfig(engine="zero3")
    with pytest.raises(PrivcodeError, match="field 'zero_offload'"):
        TrainConfig(zero_offload="nvme")
    from privcode.dp import zero

    ok = TrainConfig(**{**E2E, "engine": "deepspeed", "zero_offload": "cpu",
                        "deepspeed": {"zero_optimization": {"stage3_prefetch_bucket_size": 0}}})
    zero.check_config(ok)
    z = zero.ds_config(ok)
    assert z["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                      "stage3_prefetch_bucket_size": 0}
    assert z["gradient_clipping"] == 0 and z["gradient_accumulation_steps"] == 1 and not z["fp16"]["enabled"]


# ============================================================================================
# the GPU rule


def test_a_model_too_large_for_one_gpu_gets_engine_deepspeed_in_the_dp_rule(tmp_path):
    """models.<name>.dp_finetune: {engine: deepspeed, ...} reaches that model's DP runs (DPFT, JFT),
    launched like every GPU training rule (torchrun, one process per GPU of resources.gpus); the
    junior keeps the DDP path."""
    import re

    from test_workflow import snakemake

    overlay = tmp_path / "zero3.yaml"
    overlay.write_text("models:\n  qwen-coder-7b:\n"
                       "    dp_finetune: {engine: deepspeed, zero_offload: cpu, fast: true}\n")
    out = snakemake("-n", "-p", "--forceall", "results/table3.csv", "--configfile", "config/paper.yaml", str(overlay))
    cmds = re.findall(r"(privcode gpu-run --gpus \d -- torchrun --standalone --nproc_per_node \d) -m privcode.cli "
                      r"dp-finetune --model (\S+) .*?--params '([^']*)'", out)
    engines = {}
    for launch, model, params in cmds:
        assert launch.endswith("--gpus 4 -- torchrun --standalone --nproc_per_node 4")
        p = TrainConfig.from_dict(json.loads(params))  # what the run uses: keys left out take its defaults
        engines.setdefault(model, set()).add((p.engine, p.zero_offload, p.fast))
    assert engines["Qwen/Qwen2.5-Coder-7B"] == {("deepspeed", "cpu", True)}
    assert {e[:2] for e in engines["Qwen/Qwen2.5-Coder-1.5B"]} == {("ddp", "none")}
