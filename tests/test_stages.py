"""Unit tests of the generate, merge, evaluate-prompt and table3 stages on a tiny model."""
import json
import math

import pytest
import torch

from conftest import fake_dp_release
from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.io import read_jsonl, write_json, write_jsonl


def _prompts(tmp_path, n=3):
    d = tmp_path / "public"
    write_jsonl(d / "prompts.jsonl", [{"id": f"p{i}", "problem": f"Write f{i}.", "lang": "python"} for i in range(n)])
    ledger.derive(d, stage="test")
    return d / "prompts.jsonl"


def test_generate_resumes_and_keeps_raw(tiny_model, tmp_path):
    from privcode.synth.generate import GenerateConfig, run

    prompts = _prompts(tmp_path)
    out = tmp_path / "gen"
    # a killed run left one finished answer (and a torn line) behind: it must be reused, not redone
    (tmp_path / ".gen.progress.jsonl").write_text(
        json.dumps({"id": "p1", "problem": "Write f1.", "lang": "python", "raw": "```python\nx = 1\n```"}) + '\n{"id": "p2"')
    stats = run(str(tiny_model), str(prompts), out, GenerateConfig(max_new_tokens=5, batch_size=2))
    samples = {r["id"]: r for r in read_jsonl(out / "samples.jsonl")}
    assert list(samples) == ["p0", "p1", "p2"] and stats["prompts"] == 3
    assert samples["p1"]["raw"] == "```python\nx = 1\n```" and samples["p1"]["code"] == "x = 1\n"
    assert len(read_jsonl(out / "raw.jsonl")) == 3 and ledger.read(out)["epsilon"] == 0.0
    assert not (tmp_path / ".gen.progress.jsonl").exists()


def test_generate_over_two_devices_equals_one_process_and_resumes(tiny_model, tmp_path, monkeypatch):
    """shards: one process per device of CUDA_VISIBLE_DEVICES (fake ids on CPU), merged in prompt order."""
    from privcode.synth.generate import GenerateConfig, run

    prompts = _prompts(tmp_path, n=5)
    cfg = dict(max_new_tokens=6, batch_size=2)
    one = run(str(tiny_model), str(prompts), tmp_path / "one", GenerateConfig(**cfg, shards=1))
    assert one["processes"] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "fake0,fake1")
    # shard 1 of 2 was killed after p3 (its slice is p1, p3): that answer must be reused, not redone
    (tmp_path / ".two.progress.1of2.jsonl").write_text(
        json.dumps({"id": "p3", "problem": "Write f3.", "lang": "python", "raw": "reused"}) + "\n")
    two = run(str(tiny_model), str(prompts), tmp_path / "two", GenerateConfig(**cfg))
    assert two["processes"] == 2
    a, b = read_jsonl(tmp_path / "one" / "raw.jsonl"), read_jsonl(tmp_path / "two" / "raw.jsonl")
    assert [r["id"] for r in b] == ["p0", "p1", "p2", "p3", "p4"]
    assert [r["raw"] for r in b] == [r["raw"] if r["id"] != "p3" else "reused" for r in a]
    assert not list(tmp_path.glob(".two.progress*"))
    with pytest.raises(PrivcodeError, match="shards must be"):
        run(str(tiny_model), str(prompts), tmp_path / "bad", GenerateConfig(**cfg, shards=-1))


def test_generate_shards_each_see_one_device(tmp_path, monkeypatch):
    from privcode import shard

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "g7,g9")
    log = tmp_path / "seen"
    # the children are `python -m privcode.cli <stage> ...`: use a stage that fails loudly to see the env
    with pytest.raises(PrivcodeError, match="shard 0/2 .*failed"):
        shard.spawn("no-such-stage", [], 2)
    assert shard.count(0) == 2 and shard.count(3) == 3 and shard.part(list(range(5)), (1, 2)) == [1, 3]
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    (tmp_path / "sitecustomize.py").write_text(
        f"import os\nopen({str(log)!r}, 'a').write(os.environ['CUDA_VISIBLE_DEVICES'] + '\\n')\n")
    with pytest.raises(PrivcodeError):
        shard.spawn("no-such-stage", [], 2)
    assert sorted(log.read_text().split()) == ["g7", "g9"]


def test_merge_equals_adapter_model(tiny_model, tmp_path):
    from peft import PeftModel

    from privcode.merge import merge
    from privcode.models import load_model
    from privcode.train import TrainConfig, build_lora_model

    m = build_lora_model(str(tiny_model), TrainConfig(lora_targets=["q_proj", "v_proj"]), "cpu")
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.2)
    m.save_pretrained(tmp_path / "adapter")
    ledger.derive(tmp_path / "adapter", stage="test")
    merge(str(tiny_model), str(tmp_path / "adapter"), tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_model(str(tiny_model)), tmp_path / "adapter")(input_ids=ids).logits
        got = load_model(str(tmp_path / "merged"))(input_ids=ids).logits
        base = load_model(str(tiny_model))(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, base)
    assert (tmp_path / "merged" / "privacy.json").exists()


def test_merge_rejects_non_adapter(tiny_model, tmp_path):
    from privcode.merge import merge

    with pytest.raises(PrivcodeError, match="adapter_config.json"):
        merge(str(tiny_model), str(tmp_path), tmp_path / "m")


def test_evaluate_prompt_and_solution():
    from privcode.evaluate.generation import task_prompt, to_solution

    p = task_prompt('def f(x):\n    """Double x."""\n', "qa", None)
    assert p.startswith("Question: Please provide") and p.endswith("```python\n")
    task = {"prompt": 'def f(x):\n    """Double x."""\n', "entry_point": "f"}
    assert to_solution("def f(x):\n    return 2 * x\n```\nbla", task) == "def f(x):\n    return 2 * x\n"
    assert to_solution("    return 2 * x\n```", task) == task["prompt"] + "    return 2 * x\n"


def _eval_dir(root, model, method, tag, parents, base, plus):
    d = root / "results" / "eval" / model / method / tag / "humaneval"
    ledger.derive(d, stage="evaluate", parents=parents)
    write_json(d / "scores.json", {"base_pass@1": base, "plus_pass@1": plus})
    return str(d)


def test_table3_reads_epsilon_from_the_ledger_only(tmp_path, private_data):
    from privcode.report.table3 import build

    pub = tmp_path / "pub"
    ledger.derive(pub, stage="build")
    dp = tmp_path / "dp"
    fake_dp_release(dp, 3.5, 1e-6)
    dirs = [_eval_dir(tmp_path, "m", "PrivCode", "eps4", [dp], 40.0, 35.0),
            _eval_dir(tmp_path, "m", "PreCode", "base", [pub], 30.0, 25.0),
            _eval_dir(tmp_path, "m", "NonDPFT", "inf", [private_data.parent], 50.0, 45.0)]
    df = build(dirs)
    assert list(df["method"]) == ["PreCode", "NonDPFT", "PrivCode"]
    row = df.set_index("method")
    assert row.loc["PrivCode", "epsilon"] == 3.5  # the ledger's value, not the "eps4" in the path
    assert math.isinf(row.loc["NonDPFT", "epsilon"]) and row.loc["PreCode", "epsilon"] == 0.0
    assert row.loc["PrivCode", "HumanEval+"] == 35.0


def test_check_ref(tmp_path):
    from privcode.models import check_ref

    assert check_ref("Qwen/Qwen2.5-Coder-1.5B") == "Qwen/Qwen2.5-Coder-1.5B"
    with pytest.raises(PrivcodeError, match="does not exist"):
        check_ref(str(tmp_path / "missing"))
    with pytest.raises(PrivcodeError, match="config.json"):
        check_ref(str(tmp_path))
