"""The execution filter end to end, on the strongest sandbox backend available here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from privcode.dp import ledger
from privcode.errors import PrivcodeError
from privcode.filters import exec_filter
from privcode.io import read_json, read_jsonl, write_jsonl
from privcode.sandbox.base import Limits, get_backend

LIM = Limits(wall_s=4, cpu_s=1)

SAMPLES = [
    {"id": "good1", "problem": "Print 3.", "lang": "python",
     "raw": "Here you go:\n```python\nprint(1 + 2)\n```\nDone."},
    {"id": "good2", "problem": "Sum a list.", "lang": "python",
     "raw": "```py\ndef s(xs):\n    return sum(xs)\n\nassert s([1, 2, 3]) == 6\n```"},
    {"id": "syntax", "problem": "Broken.", "lang": "python", "raw": "```python\ndef f(:\n    return 1\n```"},
    {"id": "loop", "problem": "Spin.", "lang": "python", "raw": "```python\nwhile True:\n    pass\n```"},
    {"id": "prose", "problem": "Explain.", "lang": "python", "raw": "I am sorry, I cannot write that program."},
    {"id": 7, "problem": "Greet in shell.", "lang": "shell", "raw": "```bash\necho hello\n```"},
]


@pytest.fixture
def gen_dir(tmp_path):
    d = tmp_path / "generated"
    d.mkdir()
    write_jsonl(d / "samples.jsonl", SAMPLES)
    ledger.derive(d, stage="generate")
    return d


def test_end_to_end(gen_dir, tmp_path):
    out = tmp_path / "filtered"
    stats = exec_filter.run(gen_dir / "samples.jsonl", out, limits=LIM, workers=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["dropped.jsonl", "kept.jsonl", "privacy.json", "stats.json"]

    kept = read_jsonl(out / "kept.jsonl")
    assert [k["id"] for k in kept] == ["good1", "good2", 7]  # input order
    assert kept[0] == {"id": "good1", "problem": "Print 3.", "solution": "```python\nprint(1 + 2)\n```",
                       "code": "print(1 + 2)\n", "lang": "python"}
    assert kept[2]["lang"] == "shell" and kept[2]["solution"] == "```shell\necho hello\n```"

    dropped = {d["id"]: d for d in read_jsonl(out / "dropped.jsonl")}
    assert {k: d["reason"] for k, d in dropped.items()} == \
        {"syntax": "syntax_error", "loop": "timeout", "prose": "no_code"}
    assert "SyntaxError" in dropped["syntax"]["stderr_tail"]

    st = read_json(out / "stats.json")
    assert st == stats
    assert (st["n_input"], st["n_kept"], st["n_dropped"]) == (6, 3, 3)
    assert st["dropped_by_reason"] == {"no_code": 1, "syntax_error": 1, "timeout": 1}
    assert st["by_lang"] == {"python": {"input": 5, "kept": 2, "dropped": 3},
                             "shell": {"input": 1, "kept": 1, "dropped": 0}}
    be = get_backend("auto")
    assert (st["backend"], st["isolation"]) == (be.name, be.isolation)
    assert st["limits"]["wall_s"] == 4 and st["executed"] == 6 and st["resumed"] == 0
    assert st["throughput_samples_per_s"] > 0

    priv = ledger.read(out)
    assert priv["stage"] == "exec_filter" and priv["epsilon"] == 0.0
    assert priv["parents"] == [str(gen_dir)]
    # nothing left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["filtered", "generated"]


def test_resume_after_interruption(gen_dir, tmp_path):
    out = tmp_path / "filtered"
    be = get_backend("auto")
    real_run = be.run
    calls = []

    def flaky(code, lang, limits):
        calls.append(code)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_run(code, lang, limits)

    be.run = flaky
    with pytest.raises(RuntimeError, match="simulated crash"):
        exec_filter.run(gen_dir / "samples.jsonl", out, backend=be, limits=LIM, workers=1, progress=False)
    assert not out.exists()
    progress = tmp_path / "filtered.progress.jsonl"
    n_done = len(read_jsonl(progress))
    assert 3 <= n_done <= 5  # those finished before the crash (with a window of queued runs)

    calls.clear()
    be.run = lambda code, lang, limits: (calls.append(code), real_run(code, lang, limits))[1]
    st = exec_filter.run(gen_dir / "samples.jsonl", out, backend=be, limits=LIM, workers=2, progress=False)
    assert (st["resumed"], st["executed"], len(calls)) == (n_done, 6 - n_done, 6 - n_done)
    assert (st["n_kept"], st["n_dropped"]) == (3, 3)
    assert not progress.exists()

    # other limits change the fingerprint: everything is run again
    out2 = tmp_path / "filtered2"
    st2 = exec_filter.run(gen_dir / "samples.jsonl", out2, limits=Limits(wall_s=5, cpu_s=1), progress=False)
    assert (st2["resumed"], st2["executed"]) == (0, 6)


def test_nothing_kept_raises_and_leaves_reports_beside(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    write_jsonl(d / "s.jsonl", [SAMPLES[2], SAMPLES[4]])
    ledger.derive(d, stage="generate")
    out = tmp_path / "filtered"
    with pytest.raises(PrivcodeError, match=r"kept 0 of 2 samples; see .*filtered\.dropped\.jsonl"):
        exec_filter.run(d / "s.jsonl", out, limits=LIM, progress=False)
    assert not out.exists()
    assert [r["reason"] for r in read_jsonl(tmp_path / "filtered.dropped.jsonl")] == ["syntax_error", "no_code"]
    assert json.loads((tmp_path / "filtered.stats.json").read_text())["n_kept"] == 0


def test_ready_code_field_and_unknown_language(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    write_jsonl(d / "s.jsonl", [
        {"id": "a", "problem": "p", "lang": "python", "code": "print('ready')", "raw": "ignored"},
        {"id": "b", "problem": "p", "lang": "cobol", "raw": "```cobol\nDISPLAY 'HI'.\n```"},
    ])
    ledger.derive(d, stage="generate")
    st = exec_filter.run(d / "s.jsonl", tmp_path / "out", limits=LIM, progress=False)
    assert st["dropped_by_reason"] == {"toolchain_missing": 1}
    assert read_jsonl(tmp_path / "out" / "kept.jsonl")[0]["code"] == "print('ready')\n"


@pytest.mark.parametrize("bad, match", [
    ({"id": "x", "lang": "python", "raw": "r"}, "field 'problem'"),
    ({"problem": "p", "lang": "python", "raw": "r"}, "field 'id'"),
    ({"id": "x", "problem": "p", "lang": "python"}, "field 'raw'"),
])
def test_bad_input_names_line_and_field(tmp_path, bad, match):
    d = tmp_path / "gen"
    d.mkdir()
    write_jsonl(d / "s.jsonl", [SAMPLES[0], bad])
    ledger.derive(d, stage="generate")
    with pytest.raises(PrivcodeError, match=f"line 2, {match}"):
        exec_filter.run(d / "s.jsonl", tmp_path / "out", limits=LIM, progress=False)


def test_duplicate_ids_and_missing_ledger(tmp_path):
    d = tmp_path / "gen"
    d.mkdir()
    write_jsonl(d / "s.jsonl", [SAMPLES[0], SAMPLES[0]])
    with pytest.raises(PrivcodeError, match="no privacy.json"):
        exec_filter.run(d / "s.jsonl", tmp_path / "out", limits=LIM, progress=False)
    ledger.derive(d, stage="generate")
    with pytest.raises(PrivcodeError, match="duplicate id"):
        exec_filter.run(d / "s.jsonl", tmp_path / "out", limits=LIM, progress=False)


def test_cli(gen_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = exec_filter.main(["--input", str(gen_dir / "samples.jsonl"), "--out", str(out), "--backend", "rlimit",
                           "--workers", "2", "--wall-s", "4", "--cpu-s", "1", "--no-progress"])
    assert rc == 0
    st = read_json(out / "stats.json")
    assert (st["backend"], st["isolation"], st["n_kept"]) == ("rlimit", "rlimit", 3)
    rc = exec_filter.main(["--input", str(gen_dir / "samples.jsonl"), "--out", str(tmp_path / "x"),
                           "--backend", "rlimit", "--require-isolation", "--no-progress"])
    assert rc == 2 and "isolation" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists()
