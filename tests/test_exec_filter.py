"""The execution filter end to end, on the strongest sandbox backend available here (fork server
on by default; the per-snippet path where named)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.filters import exec_filter
from privcode.io import read_json, read_jsonl, write_jsonl
from privcode.sandbox import Limits, get_backend

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


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "per-snippet"])
def test_end_to_end(gen_dir, tmp_path, fork_server):
    out = tmp_path / "filtered"
    stats = exec_filter.run(gen_dir / "samples.jsonl", out, limits=LIM, workers=2, progress=False,
                            fork_server=fork_server)
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
    assert st["dropped_by_lang_reason"] == {"python": {"no_code": 1, "syntax_error": 1, "timeout": 1}}
    assert st["toolchains"] == {"python": "ok", "shell": "ok"}
    be = get_backend("auto")
    assert (st["backend"], st["isolation"], st["fork_server"]) == (be.name, be.isolation, fork_server)
    assert st["worker_restarts"] == 0
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
        exec_filter.run(gen_dir / "samples.jsonl", out, backend=be, limits=LIM, workers=1, progress=False,
                        fork_server=False)
    assert not out.exists()
    progress = tmp_path / "filtered.progress.jsonl"
    n_done = len(read_jsonl(progress))
    assert 3 <= n_done <= 5  # those finished before the crash (with a window of queued runs)

    calls.clear()
    be.run = lambda code, lang, limits: (calls.append(code), real_run(code, lang, limits))[1]
    st = exec_filter.run(gen_dir / "samples.jsonl", out, backend=be, limits=LIM, workers=2, progress=False,
                         fork_server=False)
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
    opt_in = {"accept_unisolated": True} if "accept_unisolated" in inspect.signature(exec_filter.run).parameters else {}
    rc = exec_filter.main(["--input", str(gen_dir / "samples.jsonl"), "--out", str(out), "--workers", "2",
                           "--params", json.dumps({"backend": "rlimit", "wall_s": 4, "cpu_s": 1, **opt_in}),
                           "--no-progress"])
    assert rc == 0
    st = read_json(out / "stats.json")
    assert (st["backend"], st["isolation"], st["n_kept"], st["fork_server"]) == ("rlimit", "rlimit", 3, True)
    out2 = tmp_path / "cli_out2"
    rc = exec_filter.main(["--input", str(gen_dir / "samples.jsonl"), "--out", str(out2), "--params",
                           '{"fork_server": false, "compile_s": 20, "wall_s": 4, "cpu_s": 1}', "--no-progress"])
    assert rc == 0
    st = read_json(out2 / "stats.json")
    assert (st["fork_server"], st["limits"]["compile_s"], st["n_kept"]) == (False, 20, 3)
    rc = exec_filter.main(["--input", str(gen_dir / "samples.jsonl"), "--out", str(tmp_path / "x"),
                           "--params", '{"backend": "rlimit", "require_isolation": true}', "--no-progress"])
    assert rc == 2 and "isolation" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists()
    from privcode import cli  # the `privcode` command passes the stage's status on to Snakemake

    rc = cli.main(["exec-filter", "--input", str(gen_dir / "samples.jsonl"), "--out", str(tmp_path / "x"),
                   "--params", '{"backend": "rlimit", "require_isolation": true}', "--no-progress"])
    assert rc == 2 and not Path(tmp_path / "x").exists()


def test_languages_hostile_samples_and_stats(tmp_path):
    """Several languages from the records' `lang` (with aliases), hostile samples among them: the
    filter survives, drops them with the right reasons and keeps the good ones."""
    be = get_backend("auto")
    have = {lang: not isinstance(be.plan(lang), str) for lang in ("cpp", "java", "javascript")}
    # the memory bomb only where the isolation is confirmed (PID namespace, uid 65534, RLIMIT_NPROC)
    probe = be.run("import os, resource\nprint(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC)[0],"
                   " sum(d.isdigit() for d in os.listdir('/proc')))\n", "python", LIM)
    uid, nproc, visible = (int(x) for x in probe.stdout.split()) if probe.ok else (0, 0, 99)
    bomb = uid == 65534 and 0 < nproc <= 64 and visible <= 5  # PID 1, the template, the probe
    samples = [
        {"id": "py", "problem": "p", "lang": "py", "code": "assert sum([1, 2]) == 3\n"},
        {"id": "parent", "problem": "p", "lang": "python",
         "code": "import os, signal\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\nexcept OSError:\n    pass\n"},
        {"id": "bg", "problem": "p", "lang": "bash", "code": "(sleep 30 &)\necho ok\n"},
        {"id": "cpp", "problem": "p", "lang": "c++", "code": "#include <cstdio>\nint main(){ std::puts(\"hi\"); }\n"},
        {"id": "cpp_bad", "problem": "p", "lang": "cpp", "code": "int main( {\n"},
        {"id": "java", "problem": "p", "lang": "java",
         "code": "public class Solution { public static void main(String[] a) { System.out.println(1); } }\n"},
        {"id": "js", "problem": "p", "lang": "js", "code": "if (1 + 1 !== 2) process.exit(1);\n"},
        {"id": "cob", "problem": "p", "lang": "cobol", "code": "DISPLAY 'HI'.\n"},
    ]
    if bomb:
        samples.append({"id": "mem", "problem": "p", "lang": "python", "code": "x = bytearray(8 * 1024**3)\n"})
    d = tmp_path / "gen"
    d.mkdir()
    write_jsonl(d / "s.jsonl", samples)
    ledger.derive(d, stage="generate")
    st = exec_filter.run(d / "s.jsonl", tmp_path / "out", limits=Limits(wall_s=8, cpu_s=4, compile_s=60),
                         workers=2, progress=False)
    kept = {k["id"] for k in read_jsonl(tmp_path / "out" / "kept.jsonl")}
    dropped = {x["id"]: x for x in read_jsonl(tmp_path / "out" / "dropped.jsonl")}
    assert "py" in kept and dropped["bg"]["reason"] == "background_process"  # `(sleep 30 &)` is left running
    assert dropped["cob"]["reason"] == "toolchain_missing"
    assert not bomb or dropped["mem"]["reason"] == "oom"
    assert "parent" in kept or dropped["parent"]["reason"] == "killed"  # its server (rlimit) may die
    for lang, ids in (("cpp", ("cpp",)), ("java", ("java",)), ("javascript", ("js",))):
        for i in ids:
            assert (i in kept) == have[lang], (i, dropped.get(i))
    if have["cpp"]:
        assert dropped["cpp_bad"]["reason"] == "syntax_error" and dropped["cpp_bad"]["phase"] == "compile"
        assert st["dropped_by_lang_reason"]["cpp"] == {"syntax_error": 1}
        assert read_jsonl(tmp_path / "out" / "kept.jsonl")[[k["id"] for k in read_jsonl(
            tmp_path / "out" / "kept.jsonl")].index("cpp")]["lang"] == "cpp"
    assert st["by_lang"]["cobol"] == {"input": 1, "kept": 0, "dropped": 1}
    assert st["toolchains"]["cobol"].startswith("no toolchain") and st["toolchains"]["python"] == "ok"
    assert st["fork_server"] is True
