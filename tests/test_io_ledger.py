import json
import math

import pytest

from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.io import ResumableJsonl, atomic_dir, atomic_file, iter_jsonl, read_jsonl


def test_atomic_file_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write("half")
            raise RuntimeError("crash")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    d = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with atomic_dir(d) as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError
    assert not d.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(d) as tmp:
        (tmp / "a").write_text("x")
    assert (d / "a").read_text() == "x"
    assert oct(d.stat().st_mode & 0o777) != oct(0o700)  # ordinary permissions, not mkdtemp's


@pytest.mark.parametrize("content,line,field,msg", [
    ('{"problem": "p", "solution": "s"}\n{"problem": "p"\n', 2, None, "malformed JSON"),
    ('{"problem": "p", "solution": "s"}\n\n{"problem": "p"}\n', 3, "solution", "missing"),
    ('[1, 2]\n', 1, None, "JSON object"),
    ('{"problem": 3, "solution": "s"}\n', 1, "problem", "string"),
])
def test_jsonl_errors_name_file_line_field(tmp_path, content, line, field, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(PrivcodeError) as e:
        read_jsonl(p, required=("problem", "solution"))
    assert e.value.line == line and e.value.field == field and str(p) in str(e.value) and msg in str(e.value)


def test_missing_file_error(tmp_path):
    with pytest.raises(PrivcodeError, match="does not exist"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))


def test_resumable_jsonl_drops_torn_line(tmp_path):
    p = tmp_path / "prog.jsonl"
    p.write_text('{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}\n{"id": 3, "v"')
    with ResumableJsonl(p) as r:
        assert 1 in r and 2 in r and 3 not in r
        r.add({"id": 3, "v": "c"})
    assert [x["id"] for x in read_jsonl(p)] == [1, 2, 3]


SIZE = {"size": "declared", "declared_size": 20, "assumption": "q = batch_size / declared size 20"}


def _dp(tmp_path, name, eps=2.0, reproducible=False):
    return ledger.dp_release(tmp_path / name, stage="dp", epsilon=eps, delta=1e-6, accountant="prv",
                             sampler="poisson", history=[(1.0, 0.1, 10)], size=SIZE, reproducible=reproducible)


def test_ledger_composition(tmp_path, private_data):
    pub = tmp_path / "public"
    assert ledger.derive(pub, stage="build")["epsilon"] == 0.0
    a = _dp(tmp_path, "a")
    assert a["epsilon"] == 2.0 and a["unit"] == "record" and a["adjacency"] == "add/remove one record"
    assert a["dp_release"] and a["assumptions"] == [SIZE["assumption"]]
    # post-processing keeps ε; the same release reached twice counts once
    m = ledger.derive(tmp_path / "m", stage="merge", parents=[tmp_path / "a", pub])
    g = ledger.derive(tmp_path / "g", stage="gen", parents=[tmp_path / "m", tmp_path / "a"])
    assert ledger.read(tmp_path / "g")["epsilon"] == 2.0 and m["delta"] == g["delta"] == 1e-6
    # a second DP release composes (basic composition)
    _dp(tmp_path, "b", eps=1.0)
    assert ledger.derive(tmp_path / "c", stage="x", parents=[tmp_path / "a", tmp_path / "b"])["epsilon"] == 3.0
    # reading the raw private data without DP: inf
    nd = ledger.derive(tmp_path / "nd", stage="finetune", parents=[pub, private_data.parent])
    assert math.isinf(nd["epsilon"]) and json.loads((tmp_path / "nd" / "privacy.json").read_text())["epsilon"] == "inf"
    assert not nd["dp_release"]


def test_release_ids_are_random_and_release_side_files_hold_no_data_identity(tmp_path, private_data):
    """Two releases with the same parameters get different ids (no hash of anything), and a
    release-side privacy.json never carries the data set's identity or size; the private data's
    own privacy.json (in the zone, 0600) does."""
    a, b = _dp(tmp_path, "a"), _dp(tmp_path, "b")
    assert a["releases"][0]["id"] != b["releases"][0]["id"]
    nd = ledger.derive(tmp_path / "nd", stage="finetune", parents=[private_data.parent])
    text = (tmp_path / "nd" / "privacy.json").read_text()
    data_id, n = ledger.data_identity(private_data.parent)
    assert data_id not in text and '"n_records"' not in text and nd["epsilon"] == math.inf
    assert oct((private_data.parent / "privacy.json").stat().st_mode & 0o777) == oct(0o600)
    with pytest.raises(PrivcodeError, match="release-side"):
        ledger.non_private(tmp_path / "x", stage="x", reason="r", data_id=data_id)


def test_reproducible_release_is_marked_not_a_dp_release(tmp_path):
    r = _dp(tmp_path, "r", reproducible=True)
    d = ledger.derive(tmp_path / "d", stage="gen", parents=[tmp_path / "r"])
    for rec in (r, d):
        assert not rec["dp_release"] and rec["notes"] == [ledger.REPRODUCIBLE_NOTE] and rec["epsilon"] == 2.0


def test_dp_release_checks_its_inputs(tmp_path):
    kw = dict(stage="dp", epsilon=1, accountant="prv", history=[(1, 0.1, 1)], size=SIZE, reproducible=False)
    with pytest.raises(PrivcodeError, match="Poisson"):
        ledger.dp_release(tmp_path / "x", **kw, delta=1e-6, sampler="shuffle")
    with pytest.raises(PrivcodeError, match="delta"):
        ledger.dp_release(tmp_path / "x", **kw, delta=1.5, sampler="poisson")
    with pytest.raises(PrivcodeError, match="private zone"):
        ledger.private_source(tmp_path / "outside", stage="x", n_records=3, data_id="ab")


def test_model_parents(tmp_path):
    assert ledger.model_parents("Qwen/Qwen2.5-Coder-1.5B") == []
    (tmp_path / "m").mkdir()
    with pytest.raises(PrivcodeError, match="provenance"):
        ledger.model_parents(str(tmp_path / "m"))
