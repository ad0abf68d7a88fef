"""The fork server's parts (privcode/sandbox/server/) are standalone: they import the standard library
and each other only, and the program the host sends into a sandbox (server.PROGRAM) serves a snippet
with nothing of the project importable. Its behaviour inside each backend: test_sandbox*.py."""
from __future__ import annotations

import ast
import base64
import json
import resource
import subprocess
import sys
from pathlib import Path

from privcode.sandbox import server
from privcode.sandbox.server import common

HERE = Path(server.__file__).parent


def test_parts_import_only_the_standard_library_and_earlier_parts():
    assert sorted(server.PARTS) == sorted(p.stem for p in HERE.glob("*.py") if p.stem != "__init__")
    for i, part in enumerate(server.PARTS):
        for node in ast.walk(ast.parse((HERE / f"{part}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in server.PARTS[:i], (part, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert all(n.split(".")[0] in sys.stdlib_module_names for n in names), (part, names)


def _frames(data: bytes) -> list[dict]:
    out = []
    while data:
        n = common.frame_length(data[:4])
        out.append(json.loads(data[4:4 + n].decode("utf-8")))
        data = data[4 + n:]
    return out


def test_program_serves_a_snippet_with_nothing_of_the_project_importable(tmp_path):
    """`python -I -S`: no site-packages, so privcode cannot be imported; the parts come in as text."""
    cfg = {"workdir": "sandbox", "wipe": [], "own_ipc": False, "pdeathsig": False}
    snippet = ("import sys\nprint(sorted(m for m in sys.modules if 'privcode' in m))\n"
               "import privcode\n")
    step = {"name": "run", "python": "main.py", "wall_s": 20, "cpu_s": 10, "mem_mb": 1024, "fsize_mb": 8,
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[1], "output_bytes": 10_000}
    request = {"files": {"main.py": snippet}, "env": {"PATH": "/usr/bin:/bin"}, "steps": [step]}
    p = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", server.PROGRAM, json.dumps(cfg)], cwd=tmp_path,
                       input=common.pack_frame(request) + common.pack_frame({"op": "exit"}), capture_output=True,
                       timeout=60)
    hello, resp = _frames(p.stdout)
    assert hello["ready"] is True and hello["python"] == "%d.%d.%d" % sys.version_info[:3], hello
    assert resp["tainted"] == "", (resp, p.stderr)
    (r,) = resp["steps"]
    assert base64.b64decode(r["stdout"]).decode().splitlines() == [str(
        [server.PACKAGE] + sorted(f"{server.PACKAGE}.{part}" for part in server.PARTS))]
    assert r["rc"] == 1 and b"No module named 'privcode'" in base64.b64decode(r["stderr"]), r
    assert p.returncode == 0 and not (tmp_path / "sandbox").exists()  # the server wiped the snippet's directory
