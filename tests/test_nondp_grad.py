"""#17 item 4: the non-DP LoRA weight gradient formed per record ("bmm": one batched GEMM, then a
sum over the records) equals the one-matrix-product form ("mm") and the sum of every record's
gradient computed alone, unpadded — on right-padded micro-batches (the training layout, with and
without the host mask copy that lets the fast loss drop the mask) and left-padded ones (where the
attention mask is what keeps pads out). The check has teeth: a wrong reduction over records or an
ignored padding mask makes it fail (mutations below).

    pytest -q tests/test_nondp_grad.py
"""
from __future__ import annotations

import pytest
import torch

from privcode.dp import fastloss, leanlora
from test_bench import _batch, _tiny_peft

LAM = 0.7  # the PrivSA teacher runs too: its no-grad forward must leave the gradients alone
# fp32: batched vs alone differ by ≤ 1.3e-6 of a tensor's largest entry (every mode and layout,
# measured); the mutations below move it by ≥ 0.1
ATOL = 1e-5


def _grads(pm, batch, weights=None) -> list[torch.Tensor]:
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss = fastloss.per_record_loss(pm, batch, lam=LAM, peft_model=pm, chunk_rows=5)
    (loss if weights is None else loss * weights).sum().backward()
    return [p.grad.detach().clone() for p in params]


def _layout(batch, how: str) -> dict:
    """The same records as `batch` (right-padded, from test_bench._batch): "right" with the host
    copies collate keeps (the fast loss then runs without a mask), "right-mask" without them, or
    "left" (each row's pads moved in front; the mask must hide them)."""
    b = {k: v.clone() for k, v in batch.items()}
    if how == "right":
        b.update(labels_cpu=b["labels"].clone(), syntax_cpu=b["syntax"].clone(),
                 attention_mask_cpu=b["attention_mask"].clone())
    elif how == "left":
        lens = b["attention_mask"].sum(1).tolist()
        for k in b:
            for i, L in enumerate(lens):
                b[k][i] = torch.roll(b[k][i], b[k].shape[1] - L)
    return b


def _alone(batch) -> list[dict]:
    """Each record of a right-padded batch by itself, without padding."""
    lens = batch["attention_mask"].sum(1).tolist()
    return [{k: v[i:i + 1, :L].clone() for k, v in batch.items()} for i, L in enumerate(lens)]


def _model(mode: str):
    pm = _tiny_peft()
    assert leanlora.lean_lora(pm, nondp_grad=mode) == 14
    return pm


def check_equals_records_alone(mode: str, layout: str, weights=None) -> None:
    """Raises AssertionError unless the micro-batch's summed LoRA gradients (mode) equal the sum,
    over its records, of each record's gradient computed alone and unpadded ("mm", one record:
    a path no reduction over records touches). weights: a loss weight per record."""
    batch = _batch()
    ref_model = _model("mm")
    per = [_grads(ref_model, r) for r in _alone(batch)]
    w = torch.ones(len(per)) if weights is None else weights
    ref = [sum(float(w[i]) * per[i][j] for i in range(len(per))) for j in range(len(per[0]))]
    got = _grads(_model(mode), _layout(batch, layout), weights)
    assert len(got) == len(ref) == 28
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=ATOL * float(r.abs().max()))


@pytest.mark.parametrize("layout", ["right", "right-mask", "left"])
@pytest.mark.parametrize("mode", ["mm", "bmm"])
def test_nondp_gradient_equals_records_alone(mode, layout):
    check_equals_records_alone(mode, layout)


@pytest.mark.parametrize("fused", [True, False])
def test_bmm_equals_mm_with_distinct_record_weights(monkeypatch, fused):
    """Both forms of the fused pair node (and of the one-node-per-factor path) give the same
    gradients, with a distinct loss weight per record (a sum that mixed records up would show)."""
    monkeypatch.setattr(leanlora, "FUSE_LORA_PAIRS", fused)
    batch, w = _layout(_batch(), "right"), torch.tensor([1.0, -2.0, 3.5])
    mm, bmm = _grads(_model("mm"), batch, w), _grads(_model("bmm"), batch, w)
    for a, b in zip(bmm, mm):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=ATOL * float(b.abs().max()))
    check_equals_records_alone("bmm", "right", w)


def _ops(mode: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    pm, batch = _model(mode), _layout(_batch(), "right")
    loss = fastloss.per_record_loss(pm, batch).sum()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    return {e.key: e.count for e in prof.key_averages()}


def test_the_mode_decides_the_kernels():
    """"bmm" really runs one batched GEMM per factor (2 layers × 7 targets × A, B) where "mm" runs
    none; the module default (NONDP_GRAD) is what a model gets without the option."""
    mm, bmm = _ops("mm"), _ops("bmm")
    assert mm.get("aten::bmm", 0) == 0 and bmm.get("aten::bmm", 0) == 28
    assert mm["aten::mm"] - bmm["aten::mm"] == 28
    pm = _tiny_peft()
    leanlora.lean_lora(pm)
    factors = [m for m in pm.modules() if isinstance(m, leanlora.LoRAFactor)]
    assert {f.grad_mode() for f in factors} == {leanlora.NONDP_GRAD}
    leanlora.lean_lora(pm, nondp_grad="bmm")  # on already lean layers too
    assert {f.grad_mode() for f in factors} == {"bmm"}
    lgs = leanlora.LoRAGradSample(pm)  # per-record mode wins while DP runs, and ends with it
    assert {f.grad_mode() for f in factors} == {"per_record"}
    lgs._close()
    assert {f.grad_mode() for f in factors} == {"bmm"}
    with pytest.raises(ValueError, match="nondp_grad must be one of mm, bmm, not 'bmm2'"):
        leanlora.lean_lora(pm, nondp_grad="bmm2")


def _reduce_wrongly(how):
    orig = leanlora._factor_grad

    def mutant(g, x, n, scale, mode):
        if mode != "bmm":
            return orig(g, x, n, scale, mode)
        per = orig(g, x, n, scale, "per_record")
        return {"mean": lambda: per.mean(0), "first": lambda: per[0], "drop_last": lambda: per[:-1].sum(0)}[how]()
    return mutant


@pytest.mark.parametrize("mutation", ["mean", "first", "drop_last", "mask_ignored"])
def test_the_check_catches_a_wrong_record_sum_or_padding(monkeypatch, mutation):
    if mutation == "mask_ignored":  # pads visible to attention: only the left-padded rows show it
        monkeypatch.setattr(fastloss, "model_attention_mask", lambda batch: None)
        layout = "left"
    else:
        monkeypatch.setattr(leanlora, "_factor_grad", _reduce_wrongly(mutation))
        layout = "right"
    with pytest.raises(AssertionError):
        check_equals_records_alone("bmm", layout)


def test_bench_train_times_both_nondp_forms_beside_dp(tmp_path):
    """`privcode bench train` runs privcode-nondp (training's form), -mm, -bmm and privcode-dp in one
    call, records which form each non-DP variant ran, and their ratios."""
    import json

    from privcode.bench import train_bench

    out = tmp_path / "train.json"
    train_bench.main(["--shape", "small", "--device", "cpu", "--steps", "1", "--warmup", "1", "--accum", "0",
                      "--variants", "privcode-nondp,privcode-nondp-mm,privcode-nondp-bmm,privcode-dp",
                      "--profile", "privcode-nondp-mm,privcode-nondp-bmm,privcode-dp", "--out", str(out)])
    r = json.loads(out.read_text())
    v = r["variants"]
    assert list(v) == ["privcode-nondp", "privcode-nondp-bmm", "privcode-dp", "privcode-nondp-mm"]
    assert all("error" not in x and x["tok_s"] > 0 for x in v.values()), v
    assert v["privcode-nondp"]["nondp_grad"] == [leanlora.NONDP_GRAD]
    assert v["privcode-nondp-mm"]["nondp_grad"] == ["mm"] and v["privcode-nondp-bmm"]["nondp_grad"] == ["bmm"]
    assert "nondp_grad" not in v["privcode-dp"]
    assert set(r["out_dtype_kernels"]) <= {"mm", "bmm"}  # probed by bf16 GEMMs on CUDA only
    ops = {n: v[n]["profile"]["ops"] for n in ("privcode-nondp-mm", "privcode-nondp-bmm", "privcode-dp")}
    lora = 2 * 7 * 2  # LoRA factors of the small shape; per step: one weight-gradient GEMM each
    assert "aten::bmm" not in ops["privcode-nondp-mm"]
    assert ops["privcode-nondp-bmm"]["aten::bmm"]["count"] == ops["privcode-dp"]["aten::bmm"]["count"] == lora
    assert ops["privcode-nondp-mm"]["aten::mm"]["count"] - ops["privcode-nondp-bmm"]["aten::mm"]["count"] == lora
    assert "aten::addmv_" in ops["privcode-dp"] and "aten::addmv_" not in ops["privcode-nondp-bmm"]  # clipping
    for k in ("privcode-nondp-bmm / privcode-nondp", "privcode-nondp-bmm / privcode-dp", "privcode-nondp / privcode-dp"):
        assert r["ratios"][f"{k} (tok/s)"] > 0
