"""scripts/synth_example_check.py: a program passes when its prompt's example holds, run in the sandbox."""
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("synth_example_check", REPO / "scripts" / "synth_example_check.py")
sec = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sec)

PROBLEM = "Implement `add2(x)` which returns x + 2. For example, `add2(3)` should return `5`."


def test_example_assert_and_program_fence():
    assert sec.example_assert(PROBLEM) == "\nassert (add2(3)) == (5), 'example'\n"
    assert sec.example_assert("Implement `f(x)`.") is None
    assert sec.program({"solution": "```python\ndef f():\n    return 1\n```"}) == "def f():\n    return 1\n"
    assert sec.program({"code": "x = 1\n", "solution": "ignored"}) == "x = 1\n"


def test_counts_right_and_wrong_programs_and_joins_dropped_rows_by_id(tmp_path, capsys):
    kept = tmp_path / "kept.jsonl"
    kept.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "problem": PROBLEM, "code": "def add2(x):\n    return x + 2\n"},
        {"id": "b", "problem": PROBLEM, "code": "def add2(x):\n    return x * 2\n"},
        {"id": "c", "problem": PROBLEM, "solution": "```python\ndef add2(x):\n    return 2 + x\n```"}]) + "\n")
    dropped = tmp_path / "dropped.jsonl"
    dropped.write_text(json.dumps({"id": "b", "reason": "below_threshold"}) + "\n")
    sec.main([str(kept), str(dropped)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("3 programs, 2/3 pass their prompt's example (66.7 %), 0 without one")
    assert out[1].endswith("1 programs, 0/1 pass their prompt's example (0.0 %), 0 without one")
