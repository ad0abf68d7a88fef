"""#13 item 7: the exec filter's output is post-processing only when its sandbox cannot reach
private data; otherwise it refuses, or — with the explicit opt-in — records its output as ε = inf."""
import math
import os

import pytest

from privcode import ledger
from privcode.errors import PrivcodeError
from privcode.filters import exec_filter
from privcode.io import write_jsonl
from privcode.report import note_of
import privcode.sandbox as sb


def _generated(tmp_path):
    gen = tmp_path / "generated"
    write_jsonl(gen / "samples.jsonl", [{"id": "a", "problem": "p", "lang": "python", "raw": "```python\nprint(1)\n```"}])
    ledger.derive(gen, stage="generate")
    return gen / "samples.jsonl"


def test_an_unisolated_backend_is_refused_unless_accepted_and_then_inf(tmp_path):
    samples = _generated(tmp_path)
    rl = sb.get_backend("rlimit")
    assert rl.isolation not in sb.ISOLATING
    with pytest.raises(PrivcodeError, match="accept_unisolated"):
        exec_filter.run(samples, tmp_path / "exec", backend=rl, workers=1, progress=False)
    assert not (tmp_path / "exec").exists()
    exec_filter.run(samples, tmp_path / "exec", backend=rl, workers=1, progress=False, accept_unisolated=True)
    rec = ledger.read(tmp_path / "exec")
    assert math.isinf(rec["epsilon"]) and rec["sandbox"]["backend"] == "rlimit" and not rec["sandbox"]["certified"]
    assert "unisolated 'rlimit'" in note_of(rec)


def test_a_zone_the_sandbox_uid_could_enter_is_not_certified(tmp_path):
    """Even an isolating backend is not certified when the private zone is open to other users."""
    backend = next((b for b in ("bwrap", "container") if sb._registry()[b]().available()), None)
    if backend is None:
        pytest.skip("no isolating backend here")
    samples = _generated(tmp_path)
    zone = tmp_path / "private"
    zone.mkdir(mode=0o700)
    rec = exec_filter.run(samples, tmp_path / "ok", backend=backend, workers=1, progress=False)
    assert rec["n_kept"] == 1 and ledger.read(tmp_path / "ok")["epsilon"] == 0.0
    assert ledger.read(tmp_path / "ok")["sandbox"]["certified"]
    os.chmod(zone, 0o755)
    with pytest.raises(PrivcodeError, match="not 0700"):
        exec_filter.run(samples, tmp_path / "open", backend=backend, workers=1, progress=False)
