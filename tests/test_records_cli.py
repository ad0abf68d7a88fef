"""Data loading/splitting and the command line's error reporting."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_records
from privcode.data.records import load_records, prepare, split
from privcode import ledger
from privcode.errors import PrivcodeError


def test_parquet_with_own_column_names(tmp_path):
    import pandas as pd

    p = tmp_path / "mine.parquet"
    pd.DataFrame({"instruction": ["a", "b"], "output": ["x", "y"], "language": ["Python", None]}).to_parquet(p)
    recs = load_records(str(p), {"problem": "instruction", "solution": "output", "lang": "language"})
    assert [r["problem"] for r in recs] == ["a", "b"] and [r["lang"] for r in recs] == ["python", "python"]
    with pytest.raises(PrivcodeError) as e:
        load_records(str(p))  # default column names are absent
    assert e.value.field == "problem" and str(p) in str(e.value)


def test_empty_field_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"problem": "a", "solution": "b"}\n{"problem": " ", "solution": "b"}\n')
    with pytest.raises(PrivcodeError) as e:
        load_records(str(p))
    assert (e.value.line, e.value.field) == (2, "problem")


def test_split_is_seeded_and_disjoint():
    recs = [{"id": str(i), "problem": f"p{i}", "solution": "s", "lang": "python"} for i in range(100)]
    a1, b1 = split(recs, 0.26, 42)
    a2, b2 = split(recs, 0.26, 42)
    assert a1 == a2 and len(a1) == 26 and len(b1) == 74
    assert not {r["id"] for r in a1} & {r["id"] for r in b1}
    assert split(recs, 0.26, 1)[0] != a1


def test_prepare_writes_private_and_public_ledgers(tmp_path):
    """The private split goes to the private zone (0700/0600, ε = inf as raw data); the prompts of a
    source declared public are public (ε = 0)."""
    src = write_records(tmp_path / "all.jsonl", 10)
    priv = tmp_path / "private" / "data" / "priv"
    counts = prepare(str(src), priv, tmp_path / "pub", private_fraction=0.5, seed=0, source_is_public=True)
    assert counts == {"private": 5, "public": 5}
    assert math.isinf(ledger.read(priv)["epsilon"])  # raw private data
    assert oct(priv.stat().st_mode & 0o777) == oct(0o700)
    assert {oct(f.stat().st_mode & 0o777) for f in priv.iterdir()} == {oct(0o600)}
    assert ledger.read(tmp_path / "pub")["epsilon"] == 0.0
    pub = [json.loads(x) for x in (tmp_path / "pub" / "prompts.jsonl").read_text().splitlines()]
    assert all("solution" not in r for r in pub)


def test_prompts_split_from_a_private_source_are_not_public(tmp_path):
    """Own data without `source_is_public`: the split's prompts are private problem texts, so
    their ledger (and everything derived from it) is ε = inf with a note; a separate public source
    is public."""
    src = write_records(tmp_path / "all.jsonl", 10)
    priv = tmp_path / "private" / "data" / "priv"
    prepare(str(src), priv, tmp_path / "pub", private_fraction=0.5, seed=0)
    rec = ledger.read(tmp_path / "pub")
    assert math.isinf(rec["epsilon"]) and "source_is_public" in rec["notes"][0]
    pub_src = write_records(tmp_path / "public.jsonl", 4)
    (pub_src.parent / "p2.jsonl").write_text(pub_src.read_text().replace("Write", "Please write"))
    prepare(str(src), tmp_path / "private" / "p2", tmp_path / "pub2", public_source=str(pub_src.parent / "p2.jsonl"))
    assert ledger.read(tmp_path / "pub2")["epsilon"] == 0.0


def run_cli(*args):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["privcode", *args], capture_output=True, text=True, env=env)


def test_cli_lists_every_stage():
    out = run_cli("--help").stdout
    for cmd in ["build-model", "prepare-data", "dp-finetune", "merge", "generate", "exec-filter",
                "roundtrip-filter", "finetune", "evaluate", "table3"]:
        assert cmd in out


def test_cli_missing_model_path_is_one_clear_error(tmp_path, private_data):
    p = run_cli("dp-finetune", "--model", str(tmp_path / "nope"), "--data", str(private_data),
                "--out", str(tmp_path / "o"), "--params",
                '{"epsilon": 4, "delta": 1e-5, "steps": 1, "dataset_size": "public"}')
    assert p.returncode == 2
    assert "model path does not exist" in p.stderr and str(tmp_path / "nope") in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def test_cli_malformed_jsonl_names_line(tmp_path, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "solution": "b"}\n{"problem": "a"}\n')
    p = run_cli("finetune", "--model", str(tiny_model), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "line 2" in p.stderr and "'solution'" in p.stderr


# ---- one --params path: every stage that takes options reads them the same way ----------------

PARAMS_ERROR = re.compile(r"privcode (?P<cmd>[\w-]+): error: --params(?:, field '(?P<field>[^']+)')?: (?P<problem>.+)")


def stages_with_params() -> list[str]:
    """Every `privcode` command whose --help lists a --params option."""
    import contextlib
    import io

    from privcode import cli

    out = []
    for cmd in cli.COMMANDS:
        text = io.StringIO()
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            cli.main([cmd, "--help"])
        if "--params" in text.getvalue():
            out.append(cmd)
    return out


def params_error(cmd: str, params: str, tmp_path, capsys) -> re.Match:
    """The one line `privcode <cmd> ... --params <params>` prints; its required paths are made up."""
    from privcode import cli

    args = [cmd, "--params", params]
    for _ in range(2):
        try:
            rc = cli.main(args)
            break
        except SystemExit as e:  # argparse: "the following arguments are required: --model, --out"
            missing = capsys.readouterr().err.rsplit("required: ", 1)[-1].split()
            assert e.code == 2 and missing, (cmd, missing)
            args += [x for f in missing for x in (f.rstrip(","), str(tmp_path / "nothing"))]
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (cmd, err)
    m = PARAMS_ERROR.fullmatch(err[0])
    assert m and m["cmd"] == cmd, err[0]
    return m


def test_every_stage_reports_bad_params_in_one_line_of_the_same_format(tmp_path, capsys):
    stages = stages_with_params()
    assert {"prepare-data", "dp-finetune", "finetune", "generate", "exec-filter", "roundtrip-filter", "evaluate",
            "audit", "inject-canaries", "leakage", "vuln", "build-model", "make-data", "mask-pii"} <= set(stages)
    for cmd in stages:
        m = params_error(cmd, '{"steps": 4,}', tmp_path, capsys)
        assert m["field"] is None and re.fullmatch(r"not valid JSON: .+ \(line 1 column 13\)", m["problem"])
        m = params_error(cmd, "[4]", tmp_path, capsys)
        assert m["field"] is None and m["problem"] == "expected a JSON object of options, got list"
        m = params_error(cmd, '{"bogus_option": 1}', tmp_path, capsys)
        assert m["field"] == "bogus_option" and re.match(r"unknown [\w-]+ option; known: ", m["problem"]), m[0]
    assert not (tmp_path / "nothing").exists()


BAD_VALUES = [  # (command, --params, the field named, the problem)
    ("dp-finetune", '{"steps": "4"}', "steps", "expected an integer or null, got str '4'"),
    ("exec-filter", '{"fork_server": "no"}', "fork_server", "expected true/false, got str 'no'"),
    ("prepare-data", '{"private_fraction": true}', "private_fraction", "expected a number, got bool True"),
    ("mask-pii", '{"detector": 1}', "detector", "expected a string, got int 1"),
    ("mask-pii", '{"detector": "spacy"}', "detector", "must be one of ['regex', 'starpii'], got 'spacy'"),
    ("make-data", '{"records": -1}', "records", "must be >= 0"),
    ("build-model", '{"source": "hf", "name": "Qwen/Qwen2.5-Coder-1.5B"}', "source",
     "must be one of ['gguf', 'tiny', 'snapshot'], got 'hf'"),
    ("build-model", '{"source": "gguf"}', "gguf", "source gguf needs gguf (a file) or gguf_package"),
]


def test_wrong_type_or_value_is_named_with_its_field(tmp_path, capsys):
    for cmd, params, field, problem in BAD_VALUES:
        m = params_error(cmd, params, tmp_path, capsys)
        assert (m["field"], m["problem"]) == (field, problem), cmd
    assert not (tmp_path / "nothing").exists()
