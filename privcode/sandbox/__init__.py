"""Running untrusted generated code: pick a sandbox backend (`get_backend`), run snippets in it.

    from privcode.sandbox import Limits, get_backend
    box = get_backend("auto", require_isolation=True)
    box.run("print(1)\\n", "python", Limits(wall_s=5)).stdout      # '1\\n'
    with box.pool(4) as pool:                                       # long-lived fork-server workers
        results = [pool.run(code, "python") for code in programs]

Backends, strongest first (`get_backend("auto")` picks the first that works here):
- ``container`` (privcode.sandbox.container, isolation "container"): Docker, Podman or
  Apptainer running the sandbox image; available only when an engine works and has the image.
- ``bwrap`` (privcode.sandbox.bwrap, "namespaces+fs"): bubblewrap.
- ``unshare`` (privcode.sandbox.unshare, "namespaces+fs"): util-linux unshare + a pivot_root into
  the same allow-list root; needs root.
- ``rlimit`` (privcode.sandbox.rlimit, "rlimit"): NOT isolating (no namespaces; it reaches the
  network, the host's files and processes). Refused unless the user opts in.

The interface every backend implements, the limits and the isolation contract (ISOLATING):
privcode.sandbox.base. Backends import only that base (and its helpers); this factory imports them.
"""
from __future__ import annotations

from privcode.errors import PrivcodeError
from privcode.sandbox.base import ISOLATING, Backend, Limits, RunResult, is_syntax_error

__all__ = ["BACKENDS", "ISOLATING", "Backend", "Limits", "RunResult", "get_backend", "is_syntax_error"]
BACKENDS = ("container", "bwrap", "unshare", "rlimit")  # strongest first


def _registry() -> dict:
    from privcode.sandbox.bwrap import BwrapBackend
    from privcode.sandbox.container import ContainerBackend
    from privcode.sandbox.rlimit import RlimitBackend
    from privcode.sandbox.unshare import UnshareBackend
    return {"container": ContainerBackend, "bwrap": BwrapBackend, "unshare": UnshareBackend,
            "rlimit": RlimitBackend}


def get_backend(name: str = "auto", *, require_isolation: bool = False) -> Backend:
    """A ready backend. `auto` = the strongest available (container > bwrap > unshare > rlimit).
    With `require_isolation`, a backend whose isolation is not in ISOLATING (`rlimit`) is refused."""
    reg = _registry()
    if isinstance(name, Backend):
        b = name
    elif name == "auto":
        reasons = []
        b = None
        for n in BACKENDS:
            cand = reg[n]()
            if cand.available():
                b = cand
                break
            reasons.append(f"{n}: {cand.why_unavailable()}")
        if b is None:  # pragma: no cover - rlimit is always available on Linux
            raise PrivcodeError("no sandbox backend works here (" + "; ".join(reasons) + ")")
        if require_isolation and b.isolation not in ISOLATING:
            raise PrivcodeError("no isolating sandbox backend works here and isolation is required ("
                                + "; ".join(reasons) + "); install bubblewrap (apt-get install bubblewrap)"
                                " or run as root for unshare")
        return b
    else:
        if name not in reg:
            raise PrivcodeError(f"unknown sandbox backend '{name}' (choose from auto, {', '.join(BACKENDS)})")
        b = reg[name]()
    if not b.available():
        raise PrivcodeError(f"sandbox backend '{b.name}' does not work here: {b.why_unavailable()}")
    if require_isolation and b.isolation not in ISOLATING:
        raise PrivcodeError(f"sandbox backend '{b.name}' (isolation '{b.isolation}') does not meet the isolation"
                            " contract and isolation is required")
    return b
