"""Languages and their toolchains: which executables a language needs, where they are (on the host
or in a container image), what a sandbox must bind for them, and the compile and run steps.

A language is run as one or two steps in one fresh directory: an optional *compile* step (own
limits: `Limits.compile_s` wall and CPU seconds, an address-space floor of COMPILE_MEM_MB) and the
*run* step (the snippet's limits). Each step is an argv with placeholders: "{tool}" for the tool's
path as the sandbox sees it, "{src}" the source file, "{class}" the Java main class, "{heap}" the
JVM heap in MiB.

Where tools come from:
- namespaced backends (bwrap, unshare): the host's tools. A tool under /usr (and the /bin, /lib
  links) is visible as it is; one elsewhere (rustup's toolchain under ~/.rustup, an SDK under /opt)
  is bound read-only as its whole toolchain directory at TC_ROOT/<tool> (for rustc, the sysroot
  that `rustc --print sysroot` names, so the rustup proxy is not needed). Absolute paths are
  resolved on the host once, so the sandbox's fresh environment (PATH=/usr/bin:/bin) is enough.
  Config directories a tool reads (/etc/java-*, /etc/php, /etc/mono) are bound read-only too.
- rlimit: the host's tools at their host paths; when the program runs as uid 65534, a tool that
  uid cannot reach (e.g. under /root, mode 0700) counts as missing.
- container: the tools found in the image (probed once with `command -v`).
A language without all its tools gives RunResult status "toolchain_missing".
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

TC_ROOT = "/opt/privcode-tc"  # where toolchains from outside /usr appear inside bwrap/unshare (read-only)
VISIBLE = ("/usr/", "/bin/", "/lib/", "/lib64/", "/sbin/")  # visible in every namespaced sandbox
COMPILE_MEM_MB = 2048  # compilers reserve a lot of address space (JVM, rustc, tsc on V8)
HOST_SEARCH = ("~/.cargo/bin", "/usr/local/cargo/bin", "/usr/local/bin", "/usr/bin", "/bin",
               "/opt/swift/usr/bin", "/usr/share/swift/usr/bin", "/usr/lib/dotnet")
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xss8m",
             "-XX:ReservedCodeCacheSize=48m", "-XX:CompressedClassSpaceSize=48m",
             "-XX:MaxMetaspaceSize=128m", "-XX:ActiveProcessorCount=1", "-Xshare:auto")


@dataclass(frozen=True)
class Tool:
    name: str
    names: tuple[str, ...]          # executable names looked up on the search path, or absolute paths
    root_up: int = 2                # the toolchain directory is this many levels above the executable
    etc: tuple[str, ...] = ()       # host config directories (glob patterns) it reads


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("python", ("/usr/bin/python3", "/usr/local/bin/python3")),
    Tool("sh", ("/bin/bash", "/usr/bin/bash", "/bin/sh")),
    Tool("g++", ("g++", "clang++")),
    Tool("javac", ("javac",), etc=("/etc/java-*",)),
    Tool("java", ("java",), etc=("/etc/java-*",)),
    Tool("rustc", ("rustc",)),
    Tool("node", ("node", "nodejs"), etc=("/etc/ssl/openssl.cnf",)),
    Tool("tsc", ("tsc",), root_up=3),  # .../node_modules/typescript/bin/tsc: bind node_modules (+ @types)
    Tool("php", ("php",), etc=("/etc/php",)),
    Tool("mcs", ("mcs",), etc=("/etc/mono",)),
    Tool("mono", ("mono",), etc=("/etc/mono",)),
    Tool("swiftc", ("swiftc",)),
)}


@dataclass(frozen=True)
class Language:
    name: str
    source: str                     # source file name; "{class}" = the Java public class
    tools: tuple[str, ...]
    run: tuple[str, ...]
    compile: tuple[str, ...] = ()
    syntax_markers: tuple[str, ...] = ()   # run-step stderr that means "does not even parse"
    min_mem_mb: int = 0             # run-step address-space floor (runtimes that reserve a lot)
    inproc_python: bool = False     # the fork server exec()s it in its forked child
    env: tuple[tuple[str, str], ...] = ()  # extra environment of its steps

    @property
    def compiled(self) -> bool:
        return bool(self.compile)


LANGUAGES: dict[str, Language] = {lang.name: lang for lang in (
    Language("python", "main.py", ("python",), ("{python}", "-B", "-s", "{src}"),
             syntax_markers=("SyntaxError", "IndentationError", "TabError"), inproc_python=True),
    Language("shell", "main.sh", ("sh",), ("{sh}", "{src}"),
             syntax_markers=("Syntax error", "syntax error")),
    Language("cpp", "main.cpp", ("g++",), ("./main",),
             ("{g++}", "-std=gnu++17", "-O1", "-pipe", "-w", "-o", "main", "{src}")),
    Language("java", "{class}.java", ("javac", "java"),
             ("{java}", "-Xmx{heap}m", *JVM_FLAGS, "-cp", ".", "{class}"),
             ("{javac}", "-J-Xmx512m", *("-J" + f for f in JVM_FLAGS), "-encoding", "UTF-8",
              "-nowarn", "-d", ".", "{src}"),
             min_mem_mb=768, env=(("MALLOC_ARENA_MAX", "1"),)),  # else thread arenas exhaust RLIMIT_AS
    Language("rust", "main.rs", ("rustc",), ("./main",),
             ("{rustc}", "--edition", "2021", "-C", "opt-level=1", "-C", "debuginfo=0", "-A", "warnings",
              "-o", "main", "{src}")),
    Language("javascript", "main.js", ("node",), ("{node}", "{src}"),
             syntax_markers=("SyntaxError",), min_mem_mb=1024),
    Language("typescript", "main.ts", ("node", "tsc"), ("{node}", "main.js"),
             ("{node}", "{tsc}", "--target", "es2020", "--module", "commonjs", "--lib", "es2020,dom",
              "--skipLibCheck", "--pretty", "false", "{types}", "{src}"),
             min_mem_mb=1024),
    Language("php", "main.php", ("php",), ("{php}", "-d", "display_errors=stderr", "{src}"),
             syntax_markers=("Parse error",)),
    Language("csharp", "main.cs", ("mcs", "mono"), ("{mono}", "main.exe"),
             ("{mcs}", "-out:main.exe", "-optimize+", "-nowarn:0168,0219,0414", "{src}"), min_mem_mb=768,
             env=(("MALLOC_ARENA_MAX", "1"),)),
    Language("swift", "main.swift", ("swiftc",), ("./main",), ("{swiftc}", "-O", "-o", "main", "{src}")),
)}

_JAVA_PACKAGE = re.compile(r"^\s*package\s+([\w.]+)\s*;", re.M)
_JAVA_CLASS = re.compile(r"\b(public\s+)?((?:final|abstract|static|sealed|strictfp)\s+)*"
                         r"(class|interface|enum|record)\s+([A-Za-z_$][\w$]*)")
_JAVA_MAIN = re.compile(r"\bstatic\s+(?:final\s+)?(?:public\s+)?void\s+main\s*\(")
_JAVA_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"", re.S)


def java_names(code: str) -> tuple[str, str]:
    """(file class, main class): the public top-level class names the file; the class that holds
    `static void main` (the nearest class declared before it) is run, qualified by the package."""
    text = _JAVA_COMMENTS.sub(lambda m: " " * len(m.group(0)), code)
    classes = [(m.start(), m.group(4), bool(m.group(1))) for m in _JAVA_CLASS.finditer(text)]
    public = [name for _, name, pub in classes if pub]
    m = _JAVA_MAIN.search(text)
    main = None
    if m is not None:
        before = [name for pos, name, _ in classes if pos < m.start()]
        main = before[-1] if before else None
    file_class = public[0] if public else (main or (classes[0][1] if classes else "Main"))
    main = main or file_class
    pkg = _JAVA_PACKAGE.search(text)
    return file_class, (f"{pkg.group(1)}.{main}" if pkg else main)


# ---- resolution --------------------------------------------------------------------------------

@dataclass
class Resolved:
    """Where a tool is: `path` as the sandbox sees it; `bind` = (host dir, sandbox dir) or None."""
    path: str
    bind: tuple[str, str] | None = None
    etc: tuple[str, ...] = ()


@dataclass
class Plan:
    """One language made concrete for one backend."""
    lang: Language
    tools: dict[str, str]
    binds: tuple[tuple[str, str], ...] = ()
    etc: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    def source_name(self, code: str) -> tuple[str, dict]:
        subst = {}
        if self.lang.name == "java":
            file_class, main_class = java_names(code)
            subst["class"] = main_class
            return self.lang.source.replace("{class}", file_class), subst
        return self.lang.source, subst

    def argv(self, template: tuple[str, ...], src: str, subst: dict) -> list[str]:
        out = []
        for a in template:
            if a == "{types}":
                out += list(self.extra.get("types", ()))
                continue
            for k, v in self.tools.items():
                a = a.replace("{" + k + "}", v)
            a = a.replace("{src}", src)
            for k, v in subst.items():
                a = a.replace("{" + k + "}", str(v))
            out.append(a)
        return out


def _is_visible(path: str) -> bool:
    return any(path.startswith(p) for p in VISIBLE)


def world_reachable(path: str) -> bool:
    """Whether a uid with no special rights can reach and execute `path` (o+x on every directory)."""
    p = Path(path)
    try:
        for d in list(p.parents)[::-1]:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(p).st_mode & (stat.S_IXOTH | stat.S_IROTH))
    except OSError:
        return False


def _host_which(name: str) -> str | None:
    if name.startswith("/"):
        return name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    dirs = os.environ.get("PATH", "").split(os.pathsep) + [os.path.expanduser(d) for d in HOST_SEARCH]
    # never a tool from the project's virtualenv: the sandbox hides it (and it is not the system's)
    venv = os.environ.get("VIRTUAL_ENV")
    dirs = [d for d in dirs if d and not (venv and d.startswith(venv))]
    return shutil.which(name, path=os.pathsep.join(dirs))


def _rust_sysroot(exe: str) -> str | None:
    try:
        r = subprocess.run([exe, "--print", "sysroot"], capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    root = r.stdout.strip()
    return root if r.returncode == 0 and root and os.path.isfile(os.path.join(root, "bin", "rustc")) else None


def resolve_host_tool(tool: Tool, mode: str) -> Resolved | str:
    """mode "bind": a namespaced sandbox that binds what lies outside /usr under TC_ROOT;
    mode "host": the host's own paths (rlimit), mode "host-nobody": same, run as uid 65534."""
    found = None
    for n in tool.names:
        found = _host_which(n)
        if found:
            break
    if not found:
        return f"'{tool.names[0]}' not found"
    real = os.path.realpath(found)
    root = None
    if tool.name == "rustc":
        sysroot = _rust_sysroot(found)
        if sysroot is None:
            return f"'{found} --print sysroot' failed (is a default rustup toolchain installed?)"
        sysroot = os.path.realpath(sysroot)
        real, root = os.path.join(sysroot, "bin", "rustc"), sysroot
    etc = tuple(sorted(p for pat in tool.etc for p in glob.glob(pat)))
    if mode.startswith("host"):
        if mode == "host-nobody" and not world_reachable(real):
            return f"'{real}' is not reachable for uid 65534"
        return Resolved(real, None, etc)
    if _is_visible(real) and root is None:
        return Resolved(real, None, etc)
    if root is None:
        root = real
        for _ in range(tool.root_up):
            root = os.path.dirname(root)
    if _is_visible(real) and _is_visible(root + "/"):
        return Resolved(real, None, etc)
    inside = f"{TC_ROOT}/{tool.name.replace('+', 'x')}"
    return Resolved(inside + real[len(root):], (root, inside), etc)


def plan_from(lang: Language, lookup, isdir=os.path.isdir) -> Plan | str:
    """`lookup(tool_name) -> Resolved | str (why missing)`; `isdir(path)` tests a directory where
    the tools live (the host, or a container image)."""
    tools, binds, etc, missing = {}, [], [], []
    for t in lang.tools:
        r = lookup(t)
        if isinstance(r, str):
            missing.append(f"{t}: {r}")
            continue
        tools[t] = r.path
        if r.bind and r.bind not in binds:
            binds.append(r.bind)
        etc += [e for e in r.etc if e not in etc]
    if missing:
        return f"toolchain for '{lang.name}' incomplete ({'; '.join(missing)})"
    extra = {}
    if lang.name == "typescript":
        # @types/node beside typescript (npm -g installs both under one node_modules)
        host_tsc = tools["tsc"]
        for host, inside in binds:
            if host_tsc.startswith(inside):
                host_tsc = host + host_tsc[len(inside):]
        types_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(host_tsc))), "@types")
        if isdir(os.path.join(types_dir, "node")):
            inside_types = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(tools["tsc"]))), "@types")
            extra["types"] = ("--typeRoots", inside_types, "--types", "node")
    return Plan(lang, tools, tuple(binds), tuple(etc), extra)
