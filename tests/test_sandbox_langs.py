"""Languages: compile + run inside the sandbox, each where its toolchain exists here (else the
status must be "toolchain_missing"), on the strongest namespaced backend with the fork server, and
the compiled path once per backend without it."""
from __future__ import annotations

import pytest

import privcode.sandbox as sandbox
from privcode.sandbox.base import Limits, is_syntax_error
from privcode.sandbox.toolchains import LANGUAGES, java_names
from test_sandbox import Runner, _backend  # noqa: E402  (tests/ is on sys.path)

LIM = Limits(wall_s=10, cpu_s=5, compile_s=60)

# each prints "hello 42" computed by the program itself
HELLO = {
    "python": "print('hello', 6 * 7)\n",
    "shell": "echo hello $((6 * 7))\n",
    "cpp": "#include <bits/stdc++.h>\nint main() { std::vector<int> v{6, 7};\n"
           "  std::cout << \"hello \" << v[0] * v[1] << std::endl; }\n",
    "java": "import java.util.*;\n\nclass Helper { static int f() { return 6 * 7; } }\n\n"
            "public class Solution {\n  public static void main(String[] args) {\n"
            "    System.out.println(\"hello \" + Helper.f());\n  }\n}\n",
    "rust": "fn main() { let v = vec![6, 7]; println!(\"hello {}\", v[0] * v[1]); }\n",
    "javascript": "const xs = [6, 7];\nconsole.log('hello', xs[0] * xs[1]);\n",
    "typescript": "function mul(a: number, b: number): number { return a * b; }\n"
                  "console.log('hello', mul(6, 7));\n",
    "php": "<?php\n$x = 6 * 7;\necho \"hello $x\\n\";\n",
    "csharp": "using System;\nusing System.Linq;\n\npublic class Program {\n  public static void Main() {\n"
              "    Console.WriteLine(\"hello \" + new[] {6, 7}.Aggregate((a, b) => a * b));\n  }\n}\n",
    "swift": "let xs = [6, 7]\nprint(\"hello\", xs[0] * xs[1])\n",
}
BROKEN = {  # does not parse / compile
    "python": "def f(:\n", "shell": "if then fi\n", "cpp": "int main( {\n",
    "java": "public class Main { void f( }\n", "rust": "fn main() { let x: i32 = \"s\"; }\n",
    "javascript": "function (\n", "typescript": "let x: number = 'text';\nconsole.log(x);\n",
    "php": "<?php echo 'a'\necho 'b';\n", "csharp": "class P { static void Main() { int x = \"s\"; } }\n",
    "swift": "let x: Int = \"s\"\n",
}
CRASH = {  # compiles, fails at run time
    "python": "raise SystemExit(3)\n", "shell": "exit 3\n", "cpp": "int main() { return 3; }\n",
    "java": "public class Main { public static void main(String[] a) { System.exit(3); } }\n",
    "rust": "fn main() { std::process::exit(3); }\n", "javascript": "process.exit(3);\n",
    "typescript": "(globalThis as any).process.exit(3);\n", "php": "<?php exit(3);\n",
    "csharp": "class P { static int Main() { return 3; } }\n", "swift": "import Foundation\nexit(3)\n",
}


@pytest.fixture(scope="module")
def fs_runner():
    b = None
    for name in ("bwrap", "unshare", "rlimit"):
        cand = sandbox._registry()[name]()
        if cand.available():
            b = cand
            break
    r = Runner(b, True)
    yield r
    r.close()


def _have(runner, lang) -> bool:
    return not isinstance(runner.backend.plan(lang), str)


@pytest.mark.parametrize("lang", sorted(LANGUAGES))
def test_language_hello_broken_crash(fs_runner, lang):
    r = fs_runner.run(HELLO[lang], lang, LIM)
    if not _have(fs_runner, lang):
        assert r.status == "toolchain_missing" and lang in r.detail, r
        pytest.skip(f"{lang}: {r.detail}")
    assert (r.status, r.stdout.split()) == ("ok", ["hello", "42"]), r
    assert r.fork_server and (r.compile_s > 0) == LANGUAGES[lang].compiled
    bad = fs_runner.run(BROKEN[lang], lang, LIM)
    assert bad.status == "error" and is_syntax_error(bad, lang), bad
    assert bad.phase == ("compile" if LANGUAGES[lang].compiled else "run")
    if lang == "typescript":
        return  # tsc takes ~1-2 s per compile; the run-time failure path is the same as javascript's
    crash = fs_runner.run(CRASH[lang], lang, LIM)
    assert (crash.status, crash.returncode, crash.phase) == ("error", 3, "run"), crash
    assert not is_syntax_error(crash, lang)


def test_compile_time_limit(fs_runner):
    if not _have(fs_runner, "cpp"):
        pytest.skip("no C++ toolchain")
    r = fs_runner.run(HELLO["cpp"], "cpp", Limits(wall_s=5, cpu_s=2, compile_s=0.05))
    assert (r.status, r.phase) == ("timeout", "compile") and "compile" in r.detail, r
    # a program that loops at run time hits the run limits, not the compile limit
    r = fs_runner.run("int main() { volatile long i = 0; for (;;) i++; }\n", "cpp",
                      Limits(wall_s=5, cpu_s=1, compile_s=60))
    assert (r.status, r.phase) == ("timeout", "run"), r


def test_java_class_names():
    assert java_names("public class Temp { public static void main(String[] a) {} }") == ("Temp", "Temp")
    code = "class A {}\npublic final class Solution {\n public static void main(String[] x) {}\n}"
    assert java_names(code) == ("Solution", "Solution")
    assert java_names("class Main { public static void main(String[] a) {} }") == ("Main", "Main")
    assert java_names("package a.b;\npublic class P { public static void main(String[] a) {} }") == ("P", "a.b.P")
    # the public class names the file; `main` sits in the other (non-public) class
    code = "public class Util { static int f() { return 1; } }\nclass Runner { public static void main(String[] a) {} }"
    assert java_names(code) == ("Util", "Runner")
    # comments and strings do not count
    assert java_names("// public class Fake\n/* class Nope */\nclass Real { static public void main(String[] a) {"
                      " String s = \"class Str\"; } }") == ("Real", "Real")


def test_java_with_package_and_odd_class(fs_runner):
    if not _have(fs_runner, "java"):
        pytest.skip("no Java toolchain")
    code = ("package com.example;\n\nimport java.util.*;\n\npublic class WordCounter {\n"
            "  public static void main(String[] args) {\n"
            "    Map<String, Integer> m = new HashMap<>();\n    m.put(\"a\", 41);\n"
            "    System.out.println(m.get(\"a\") + 1);\n  }\n}\n")
    r = fs_runner.run(code, "java", LIM)
    assert (r.status, r.stdout) == ("ok", "42\n"), r


@pytest.mark.parametrize("name", ("bwrap", "unshare", "rlimit"))
def test_compiled_language_per_snippet(name):
    b = _backend(name)
    for lang in ("rust", "cpp", "java"):
        plan = b.plan(lang)
        r = b.run(HELLO[lang], lang, LIM)
        if isinstance(plan, str):
            assert r.status == "toolchain_missing", r
            continue
        assert (r.status, r.stdout.split(), r.fork_server) == ("ok", ["hello", "42"], False), (lang, r)
        break  # one compiled language per backend is enough here (the fork-server tests cover the rest)


def test_language_aliases(fs_runner):
    assert fs_runner.run("echo $((1+1))\n", "bash", LIM).stdout == "2\n"
    assert fs_runner.run("print(6 * 7)\n", "py", LIM).stdout == "42\n"
    if _have(fs_runner, "javascript"):
        assert fs_runner.run(HELLO["javascript"], "js", LIM).stdout == "hello 42\n"
    r = fs_runner.run("x", "cobol", LIM)
    assert r.status == "toolchain_missing" and "cobol" in r.detail
