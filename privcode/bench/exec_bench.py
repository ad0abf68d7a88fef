"""`privcode bench exec`: execution-filter throughput, snippets per second (and per core).

    privcode bench exec [--backends auto|all|bwrap,rlimit] [--workers N] [--n-trivial 400]
                        [--n-real 200] [--langs] [--modes fork-server,per-snippet] [--no-peer]
                        [--out results/bench_exec.json]

For every sandbox backend that works here (or those named with --backends), with the fork server
(`pool.run`: long-lived sandboxes, one forked child per snippet) and without it (`Backend.run`:
one sandbox and one interpreter per snippet), on two workloads:

  trivial    `x = 1` -- pure per-snippet overhead
  realistic  taskgen reference solutions with their asserts, exactly the code the exec filter
             sees for a taskgen record (`extract_code(to_record(task)["solution"])`)

and, as the peer, `python3 -c <snippet>` per snippet without any sandbox. Every configuration
runs with --workers parallel workers (default: all cores); "per core" divides the rate by
min(workers, cores). All snippets must succeed (a failed one is reported, the figure kept).
`--langs` adds one line per language: mean seconds per hello-world snippet (compile + run) on
the strongest backend with the fork server.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from privcode.data.prompts import extract_code
from privcode.errors import PrivcodeError
import privcode.sandbox as sb
from privcode.sandbox.base import Limits

HELLO = {
    "python": "print('hello', sum(range(10)))\n",
    "shell": "echo hello $((40 + 5))\n",
    "cpp": "#include <iostream>\nint main() { std::cout << \"hello \" << 45 << std::endl; }\n",
    "java": "public class Main { public static void main(String[] a) { System.out.println(\"hello 45\"); } }\n",
    "rust": "fn main() { println!(\"hello {}\", (0..10).sum::<i32>()); }\n",
    "javascript": "console.log('hello', 45);\n",
    "typescript": "const n: number = 45;\nconsole.log('hello', n);\n",
    "php": "<?php\necho 'hello ' . array_sum(range(0, 9)) . \"\\n\";\n",
    "csharp": "using System;\nclass P { static void Main() { Console.WriteLine(\"hello 45\"); } }\n",
    "swift": "print(\"hello\", 45)\n",
}


def realistic_snippets(n: int) -> list[str]:
    from privcode.data.taskgen import generate_tasks, to_record
    tasks = generate_tasks(0, n, salt="bench-exec")
    return [extract_code(to_record(t)["solution"], "python") for t in tasks]


def _timed(fn, snippets, workers: int) -> tuple[float, int, list]:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as ex:
        results = list(ex.map(fn, snippets))
    dt = time.perf_counter() - t0
    ok = sum(1 for r in results if r is True or getattr(r, "status", None) == "ok")
    bad = [r for r in results if not (r is True or getattr(r, "status", None) == "ok")]
    return dt, ok, bad


def _peer(python: str, limits: Limits):
    def run(code):
        r = subprocess.run([python, "-B", "-s", "-c", code], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=limits.wall_s)
        return r.returncode == 0
    return run


def _row(backend, mode, workload, n, workers, dt, ok, bad, cores) -> dict:
    rate = n / dt if dt > 0 else float("inf")
    row = {"backend": backend, "mode": mode, "workload": workload, "n": n, "workers": workers,
           "seconds": round(dt, 3), "snippets_per_s": round(rate, 1),
           "per_core": round(rate / max(1, min(workers, cores)), 1), "ok": ok}
    if bad:
        b = bad[0]
        row["first_failure"] = (f"{b.status}: {b.detail} {b.stderr[-200:]}" if hasattr(b, "status") else str(b))
    return row


def bench(backends: list[str], workers: int, n_trivial: int, n_real: int, langs: bool,
          log=print, modes=("fork-server", "per-snippet"), peer: bool = True) -> dict:
    cores = os.cpu_count() or 1
    limits = Limits(wall_s=10, cpu_s=10)
    workloads = {"trivial": ["x = 1\n"] * n_trivial, "realistic": realistic_snippets(n_real)}
    rows = []
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # as in the sandbox
    for wl, snippets in workloads.items() if peer else ():
        dt, ok, bad = _timed(_peer(python, limits), snippets, workers)
        rows.append(_row("none (python -c)", "per-snippet", wl, len(snippets), workers, dt, ok, bad, cores))
        log(_fmt(rows[-1]))
    for name in backends:
        be = sb._registry()[name]()
        if not be.available():
            log(f"skip {name}: {be.why_unavailable()}")
            continue
        for wl, snippets in workloads.items():
            if "fork-server" in modes:
                with be.pool(workers, limits) as pool:
                    _timed(lambda c: pool.run(c, "python", limits), ["pass\n"] * workers, workers)  # start
                    dt, ok, bad = _timed(lambda c: pool.run(c, "python", limits), snippets, workers)
                rows.append(_row(name, "fork-server", wl, len(snippets), workers, dt, ok, bad, cores))
                log(_fmt(rows[-1]))
            if "per-snippet" not in modes:
                continue
            k = max(workers, len(snippets) // 4)  # per-snippet sandboxes are slow: a quarter is enough
            dt, ok, bad = _timed(lambda c: be.run(c, "python", limits), snippets[:k], workers)
            rows.append(_row(name, "per-snippet", wl, k, workers, dt, ok, bad, cores))
            log(_fmt(rows[-1]))
    lang_rows = []
    if langs:
        be = sb.get_backend("auto")
        with be.pool(1, limits) as pool:
            pool.run("pass\n", "python", limits)
            for lang, code in HELLO.items():
                times, res = [], None
                for _ in range(3):
                    t0 = time.perf_counter()
                    res = pool.run(code, lang, limits)
                    times.append(time.perf_counter() - t0)
                    if res.status != "ok":
                        break
                lr = {"backend": be.name, "lang": lang, "status": res.status,
                      "seconds_per_snippet": round(sum(times) / len(times), 3),
                      "compile_s": res.compile_s, "run_s": res.wall_s}
                if res.status != "ok":
                    lr["detail"] = res.detail[:200]
                lang_rows.append(lr)
                log(f"  {lang:11} {res.status:17} {lr['seconds_per_snippet']:7.3f} s/snippet "
                    f"(compile {res.compile_s:.3f} s, run {res.wall_s:.3f} s)")
    return {"machine": {"cpu_count": cores, "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_at_end": list(os.getloadavg())},
            "workers": workers, "rows": rows, "languages": lang_rows}


def _fmt(r: dict) -> str:
    extra = f"  FAILED {r['n'] - r['ok']}: {r.get('first_failure', '')[:160]}" if r["ok"] != r["n"] else ""
    return (f"{r['backend']:18} {r['mode']:12} {r['workload']:10} n={r['n']:5} workers={r['workers']} "
            f"{r['snippets_per_s']:8.1f}/s  {r['per_core']:8.1f}/s/core{extra}")


def table(res: dict) -> str:
    lines = ["| backend | mode | workload | n | snippets/s | per core | ok |", "|---|---|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['backend']} | {r['mode']} | {r['workload']} | {r['n']} | {r['snippets_per_s']} "
                     f"| {r['per_core']} | {r['ok']}/{r['n']} |")
    if res.get("languages"):
        lines += ["", "| language | status | s/snippet | compile s | run s |", "|---|---|---:|---:|---:|"]
        for r in res["languages"]:
            lines.append(f"| {r['lang']} | {r['status']} | {r['seconds_per_snippet']} | {r['compile_s']} "
                         f"| {r['run_s']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="privcode bench exec", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="all",
                   help="'all' (every backend that works here), 'auto' (the strongest) or a comma list")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-trivial", type=int, default=400)
    p.add_argument("--n-real", type=int, default=200)
    p.add_argument("--langs", action="store_true", help="also time a hello world per language")
    p.add_argument("--modes", default="fork-server,per-snippet",
                   help="comma list of fork-server, per-snippet (default both)")
    p.add_argument("--no-peer", action="store_true", help="skip the unsandboxed `python -c` rows")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.backends == "all":
        names = list(sb.BACKENDS)
    elif a.backends == "auto":
        names = [sb.get_backend("auto").name]
    else:
        names = [n.strip() for n in a.backends.split(",") if n.strip()]
        unknown = [n for n in names if n not in sb.BACKENDS]
        if unknown:
            raise SystemExit(f"unknown backends {unknown} (choose from {', '.join(sb.BACKENDS)})")
    try:
        modes = tuple(m.strip() for m in a.modes.split(",") if m.strip())
        if not modes or set(modes) - {"fork-server", "per-snippet"}:
            raise SystemExit(f"--modes: choose from fork-server, per-snippet (got {a.modes!r})")
        res = bench(names, a.workers, a.n_trivial, a.n_real, a.langs, modes=modes, peer=not a.no_peer)
    except PrivcodeError as e:
        raise SystemExit(f"privcode: error: {e}")
    print()
    print(table(res))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
