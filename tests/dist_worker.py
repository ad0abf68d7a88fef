"""Run by torchrun in tests/test_dp_mechanism.py: one DP-SGD step on every rank (gloo).

argv[4] "noise" (default): zero gradients, so the update is the noise alone.
argv[4] "signal": real gradients and σ = 0, so the update is the clipped sum alone, which must
not depend on the number of processes. Rank 0 writes the update to argv[2].
argv[4] "teeth" (tests/test_dp_teeth.py): argv[2] is a directory; argv[5] a comma-separated list
of mutation names ("" = the honest mechanism); the noise, sensitivity and sampling probes run
under each, and their measurements are written there.
argv[4] "zero" (tests/test_zero.py): argv[2] is a directory; the DDP path and DeepSpeed ZeRO-3 side by
side (test_zero.worker)."""
import sys

import torch

if len(sys.argv) > 4 and sys.argv[4] == "teeth":
    import test_dp_teeth

    test_dp_teeth.worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[5].split(",") if len(sys.argv) > 5 else [""])
    sys.exit(0)
if len(sys.argv) > 4 and sys.argv[4] == "zero":
    import test_zero

    test_zero.worker(sys.argv[1], sys.argv[2], sys.argv[3])
    sys.exit(0)

from privcode.dp import engine
from privcode.train import TrainConfig, build_lora_model, collate, load_rows
from privcode.models import default_device, load_tokenizer

model_dir, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "noise"
rank, world = engine.init_distributed()
device = default_device()  # CPU + gloo in CI; one GPU per process + NCCL on a GPU host
cfg = TrainConfig(lora_targets=["q_proj", "v_proj"], max_length=48, lora_r=16)
tok = load_tokenizer(model_dir)
rows, _ = load_rows(data, tok, cfg)
torch.manual_seed(0)
model = build_lora_model(model_dir, cfg, device)
dp = engine.DPSGD(model, n_records=len(rows), sample_rate=0.5,
                  noise_multiplier=2.0 if mode == "noise" else 0.0, max_grad_norm=0.5,
                  expected_batch_size=0.5 * len(rows), lr=1.0, weight_decay=0.0, steps=1, seed=7,
                  device=device, rank=rank, world=world, optimizer="sgd",
                  lengths=[len(r["input_ids"]) for r in rows])
before = torch.cat([p.detach().flatten().clone() for p in dp.params])
idx = dp.next_indices()
batches = [collate([rows[i] for i in idx], tok.pad_token_id, device)] if idx else []
scale = 0.0 if mode == "noise" else 1.0
dp.step(batches, lambda m, b: engine.per_record_loss(m, b) * scale)
after = torch.cat([p.detach().flatten() for p in dp.params])
if rank == 0:
    torch.save({"update": (after - before).cpu(), "local_batch": len(idx),
                "global_batch": dp.sampler.last_global_size}, out)
