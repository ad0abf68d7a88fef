"""The data stages a rule calls with `--params` (build-model, make-data, mask-pii) still do their work."""
import json
import math

from conftest import mark_private
from privcode import cli, ledger
from privcode.io import read_json, read_jsonl


def test_mask_pii_replaces_detected_pii_and_stays_private(tmp_path):
    src = tmp_path / "private" / "data" / "canary"
    src.mkdir(parents=True)
    recs = [{"id": "a", "problem": "Mail alice.smith@example.com the report.", "solution": "print('ok')"},
            {"id": "b", "problem": "Add two numbers.", "solution": "def add(a, b):\n    return a + b\n"}]
    (src / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    mark_private(src)
    out = tmp_path / "private" / "data" / "masked"
    assert cli.main(["mask-pii", "--data", str(src / "records.jsonl"), "--out", str(out),
                     "--params", '{"detector": "regex"}']) == 0
    got = read_jsonl(out / "records.jsonl")
    assert got[0]["problem"] == "Mail <EMAIL> the report." and got[1] == recs[1]
    assert read_json(out / "stats.json") == {"records": 2, "masked_spans": 1, "detector": "regex"}
    assert math.isinf(ledger.read(out)["epsilon"])  # still private data
    assert oct(out.stat().st_mode & 0o777) == oct(0o700)
    # the default detector (MaskConfig's) is the same regex detector
    assert cli.main(["mask-pii", "--data", str(src / "records.jsonl"), "--out", str(tmp_path / "private" / "m2")]) == 0
    assert read_jsonl(tmp_path / "private" / "m2" / "records.jsonl") == got


def test_make_data_takes_its_counts_from_params(tmp_path):
    assert cli.main(["make-data", "--out", str(tmp_path), "--params", '{"seed": 1, "records": 12, "benchmark": 3}']) == 0
    assert len(read_jsonl(tmp_path / "records.jsonl")) == 12 and len(read_jsonl(tmp_path / "humaneval.jsonl")) == 3


def test_build_model_tiny_from_params(tmp_path):
    from privcode.models import load_model

    out = tmp_path / "tiny"
    assert cli.main(["build-model", "--out", str(out), "--params", '{"source": "tiny", "pretrain_steps": 2}']) == 0
    assert load_model(str(out)).config.num_hidden_layers == 2
    assert ledger.read(out)["epsilon"] == 0.0 and ledger.read(out)["stage"] == "build_model"
