"""Syntax-token spans for the PrivSA loss (privcode.dp.syntax)."""
from __future__ import annotations

import keyword
import random
import re

import pytest

from privcode.dp import syntax
from privcode.dp.syntax import (answer_code_regions, is_supported, merge_spans, syntax_char_spans_in_answer,
                                syntax_spans, token_mask)
from privcode.langs import canonical_lang


def texts(code: str, lang: str) -> list[str]:
    spans = syntax_spans(code, lang)
    assert spans is not None, f"{lang} code did not parse"
    return [code[s:e] for s, e in spans]


def covered(code: str, spans, needle: str, within: str | None = None) -> bool:
    """Whether any char of the first `needle` in `code` (or in the first `within`) is in a span."""
    pos = code.index(within) + within.index(needle) if within else code.index(needle)
    return any(s < pos + len(needle) and pos < e for s, e in spans)


def inside(code: str, spans, needle: str) -> bool:
    """Whether some occurrence of `needle` lies wholly inside one span."""
    return any(needle in code[s:e] for s, e in spans)


def need(lang: str) -> None:
    if not is_supported(lang):
        pytest.skip(f"no tree-sitter grammar installed for {lang}")


def check_program(code: str, lang: str, headers, tokens, not_syntax=(), spans_lang: str | None = None):
    """Every header and token is a syntax text of `code`; no char of a `not_syntax` needle (a string,
    or (needle, within) as `covered` takes them) is in a span of `syntax_spans(code, spans_lang)`.
    Returns the syntax texts."""
    t = texts(code, lang)
    for header in headers:
        assert header in t
    for tok in tokens:
        assert tok in t
    spans = syntax_spans(code, spans_lang or lang)
    for needle in not_syntax:
        assert not covered(code, spans, *((needle,) if isinstance(needle, str) else needle)), needle
    return t


# ---------------------------------------------------------------- per-language programs

PY = '''import math

class Shape(Base):
    """A shape."""  # comment: if x == 1: return

    def area(self, r: float) -> float:
        return math.pi * r ** 2


def add(a, b):
    total = a + b
    for i in range(b):
        if i % 2 == 0 and not i is None:
            total -= i
        elif i > 3:
            continue
        else:
            pass
    while total > 100:
        total //= 2
    total = max(total, 0)
    return total
'''


def test_python():
    check_program(PY, "python",
                  ("def add(a, b):", "class Shape(Base):", "def area(self, r: float) -> float:",
                   "for i in range(b):", "if i % 2 == 0 and not i is None:", "elif i > 3:",
                   "while total > 100:"),
                  ("import", "return", "continue", "else", "pass",  # keywords
                   "=", "+", "-=", "//=", "*", "**", "."),  # operators
                  # identifiers / literals in bodies are not syntax tokens
                  ["total",  # `total = a + b`: lhs
                   ("a", "a + b"), ("b", "+ b"), ("2", "//= 2"), '"""A shape."""',
                   "# comment: if x == 1: return",  # comments contribute nothing
                   ("(", "max(total, 0)"), (",", "max(total, 0)")])  # brackets and commas only count inside headers


JS = '''const sq = (x) => x * 2;
function f(a) {
  let s = 0;
  for (let i = 0; i < a.length; i++) { s += a[i]; }
  if (s === 10) { return "ten"; } else if (s > 10) { return null; }
  while (s) { s--; }
  return s ?? 0;
}
class A extends B { m(y) { return this.v; } }
'''


def test_javascript():
    need("javascript")
    t = check_program(JS, "javascript",
                      ("function f(a)", "for (let i = 0; i < a.length; i++)", "if (s === 10)",
                       "if (s > 10)", "while (s)", "class A extends B", "m(y)", "(x) =>"),
                      ("const", "let", "return", "else", "this", "null", "+=", "??", "--", "*"),
                      ['"ten"', "sq"])
    assert texts(JS, "js") == t  # alias


TS = '''interface Point { x: number; y?: string; }
function dist<T extends Point>(p: T, q: T): number {
  const d: number = p.x - q.x;
  return Math.abs(d);
}
export class Box implements Point { public x: number = 1; scale(k: number): void { if (k > 1) { this.x *= k; } } }
'''


def test_typescript():
    need("typescript")
    check_program(TS, "typescript",
                  ("interface Point", "function dist<T extends Point>(p: T, q: T): number",
                   "class Box implements Point", "scale(k: number): void", "if (k > 1)"),
                  ("const", "return", "export", "public", "number", "-", "*=", "=", "?", ":"),
                  ["Math", "abs"], spans_lang="ts")


CPP = '''#include <iostream>
#include <vector>

template <typename T>
class Stack {
public:
    void push(const T& v) { data.push_back(v); }
private:
    std::vector<T> data;
};

int main(int argc, char** argv) {
    int n = argc * 2;
    for (int i = 0; i < n; i++) {
        if (i % 3 == 0) continue;
        else if (i > 7) break;
        std::cout << i << "\\n";
    }
    while (n-- > 0) {}
    return 0;
}
'''


def test_cpp():
    need("cpp")
    t = check_program(CPP, "cpp",
                      ("int main(int argc, char** argv)", "for (int i = 0; i < n; i++)",
                       "if (i % 3 == 0)", "if (i > 7)", "while (n-- > 0)", "class Stack",
                       "void push(const T& v)"),
                      ("#include", "template", "typename", "public", "private", "int", "return",
                       "continue", "else", "break", "::", "<<", "=", "*", "."),
                      [("data", "data.push_back"), "cout", '"\\n"'])  # `data` in a body
    assert texts(CPP, "c++") == t and texts(CPP, "C++") == t


JAVA = '''import java.util.List;

public class Main {
    private static final int LIMIT = 10;

    public static int add(int a, int b) {
        int s = a + b;
        for (int i = 0; i < LIMIT; i++) {
            if (s >= LIMIT) { return s; } else if (s < 0) { s = -s; }
        }
        for (String w : List.of("x")) { s += w.length(); }
        while (s > 100) s /= 2;
        return s;
    }
}
'''


def test_java():
    need("java")
    check_program(JAVA, "java",
                  ("public class Main", "public static int add(int a, int b)",
                   "for (int i = 0; i < LIMIT; i++)", "if (s >= LIMIT)", "if (s < 0)",
                   "for (String w : List.of(\"x\"))", "while (s > 100)"),
                  ("import", "private", "static", "final", "int", "return", "else", "+", "=",
                   "+=", "/=", "-", "."),
                  ["LIMIT", "10"])


RUST = '''use std::collections::HashMap;

pub struct Counter { n: u32 }

impl Counter {
    pub fn bump(&mut self) -> u32 { self.n += 1; self.n }
}

fn main() -> i32 {
    let mut m: HashMap<&str, i32> = HashMap::new(); // a comment with if and ==
    for i in 0..10 {
        if i % 2 == 0 { m.insert("even", i); } else if i > 5 { break; }
    }
    while let Some(_) = m.remove("even") {}
    println!("{}", m.len());
    0
}
'''


def test_rust():
    need("rust")
    check_program(RUST, "rust",
                  ("fn main() -> i32", "pub fn bump(&mut self) -> u32", "impl Counter",
                   "pub struct Counter", "for i in 0..10", "if i % 2 == 0", "if i > 5",
                   'while let Some(_) = m.remove("even")'),
                  ("use", "let", "mut", "break", "else", "::", "=", "!", "+=", "i32"),
                  ["// a comment with if and ==", "println", '"even"'], spans_lang="rs")
    assert inside(RUST, syntax_spans(RUST, "rust"), "0..10")  # range operator, inside a header


BASH = '''#!/bin/bash
greet() {
  local name="$1"
  if [ -f "$name" ]; then
    echo "file"
  elif [[ $name == x ]]; then
    echo "x"
  else
    echo "none" > /dev/null 2>&1 || exit 1
  fi
  for i in 1 2 3; do echo "$i"; done
  while true; do break; done
}
'''


def test_bash():
    need("bash")
    t = check_program(BASH, "bash",
                      ("greet()", 'if [ -f "$name" ]; then', "elif [[ $name == x ]]; then",
                       "for i in 1 2 3; do", "while true; do"),
                      ("local", "else", "fi", "done", "=", ">", "||", ">&"),
                      ["echo", '"file"', "#!/bin/bash"], spans_lang="shell")
    assert texts(BASH, "sh") == t


OTHERS = {  # language: (program, headers, tokens standalone or inside a header)
    "go": ("""package main

func add(a int, b int) int {
\tfor i := 0; i < b; i++ {
\t\tif a > i { a += i }
\t}
\treturn a
}
""",
        ["func add(a int, b int) int", "for i := 0; i < b; i++", "if a > i"],
        ["package", "return", ":=", "+=", "<"]),
    "csharp": ("""public class A {
    public static int Add(int a, int b) {
        foreach (var x in xs) { a += x; }
        return a + b;
    }
}
""",
        ["public class A", "public static int Add(int a, int b)", "foreach (var x in xs)"],
        ["return", "+=", "+", "int"]),
    "php": ("""<?php
function add($a, $b) {
    if ($a > $b) { return $a - $b; }
    foreach ($b as $k => $v) { echo $v; }
    return $a + $b;
}
""",
        ["function add($a, $b)", "if ($a > $b)", "foreach ($b as $k => $v)"],
        ["return", "echo", "-", "+", "=>"]),
    "c": ("""#include <stdio.h>
int main(void) {
    for (int i = 0; i < 3; i++) {
        if (i == 1) printf("%d", i);
    }
    return 0;
}
""",
        ["int main(void)", "for (int i = 0; i < 3; i++)", "if (i == 1)"],
        ["#include", "return", "=="]),
}


@pytest.mark.parametrize("lang", sorted(OTHERS))
def test_other_languages(lang):
    need(lang)
    code, headers, toks = OTHERS[lang]
    t = check_program(code, lang, headers, ())
    spans = syntax_spans(code, lang)
    for tok in toks:  # standalone or inside a header
        assert inside(code, spans, tok), (lang, tok, t)


def test_php_without_open_tag():
    need("php")
    code = "function f($x) { return $x + 1; }\n"
    assert texts(code, "php") == ["function f($x)", "return", "+"]  # `$` sigils are no operators


def test_header_without_trailing_comment_or_body():
    code = "def f(x):  # note\n    return x\n"
    assert texts(code, "python")[0] == "def f(x):"
    need("java")
    iface = "interface I { int f(int x); }\n"
    assert "int f(int x)" in texts(iface, "java")


# ---------------------------------------------------------------- failure modes

@pytest.mark.parametrize("lang,code", [
    ("python", "def f(:\n    return\n"),
    ("python", "Here is some prose, not code: it (does not parse."),
    ("cpp", "int main( { return 0; }"),
    ("javascript", "function f( { return 1 }"),
    ("rust", "fn main() { let x = ; }"),
    ("java", "public class { void f() {} }"),
    ("bash", "if [ -f x ]; then echo"),
])
def test_unparsable_is_none(lang, code):
    need(lang)
    assert syntax_spans(code, lang) is None


@pytest.mark.parametrize("lang", ["cobol", "", "text", "output", "markdown"])
def test_unsupported_is_none(lang):
    assert not is_supported(lang)
    assert syntax_spans("x = 1\n", lang) is None


def test_missing_grammar_package_is_unsupported(monkeypatch):
    monkeypatch.setitem(syntax.GRAMMARS, "nolang_xyz", ("tree_sitter_nolang_xyz_missing", "language"))
    assert syntax_spans("x", "nolang_xyz") is None
    assert not is_supported("nolang_xyz")


def test_canonical_lang():  # the one language table (privcode.langs) of syntax, sandbox and prompts
    assert canonical_lang("C++") == "cpp"
    assert canonical_lang(" Shell ") == canonical_lang("bash") == canonical_lang("sh") == "shell"
    assert canonical_lang("c#") == "csharp"
    assert canonical_lang("typescript") == "typescript"
    assert canonical_lang(None) == ""
    assert syntax.get_parser("shell") is syntax.get_parser("bash")  # parsed with the bash grammar


def test_parser_cached():
    assert syntax.get_parser("python") is syntax.get_parser("py")


def test_empty_code():
    assert syntax_spans("", "python") == []


# ---------------------------------------------------------------- non-ASCII

def test_non_ascii_python():
    code = 's = "héllo 😀 ñ"\nif s:\n    t = "€" + s\n    return_value = 1\n'
    spans = syntax_spans(code, "python")
    t = [code[a:b] for a, b in spans]
    assert t == ["=", "if s:", "=", "+", "="]
    assert code[spans[1][0]:spans[1][1]] == "if s:"
    assert spans[1][0] == code.index("if s:")


def test_non_ascii_js_and_cpp():
    need("javascript")
    code = 'const e = "😀😀"; /* é */ if (e) { return; }\n'
    t = texts(code, "javascript")
    assert t == ["const", "=", "if (e)", "return"]
    need("cpp")
    code = 'auto s = u8"日本語"; int f() { return 1; }\n'
    spans = syntax_spans(code, "cpp")
    t = [code[a:b] for a, b in spans]
    assert "int f()" in t and "return" in t
    assert code[spans[-1][0]:spans[-1][1]] == "return"


# ---------------------------------------------------------------- markdown answers

ANSWER = '''Here is the Python part:

```python
def add(a, b):
    return a + b
```

And the same in JavaScript, with an explanation of `add`:

```js
function add(a, b) { return a + b; }
```

Output:

```
3
```
'''


def test_answer_code_regions():
    regions = answer_code_regions(ANSWER, "python")
    assert [(ANSWER[s:e], lang) for s, e, lang in regions] == [
        ("def add(a, b):\n    return a + b", "python"),
        ("function add(a, b) { return a + b; }", "javascript"),
        ("3", "python"),  # untagged block: the record's language
    ]


def test_answer_code_regions_edge_cases():
    bare = "def f():\n    pass\n"
    assert answer_code_regions(bare, "python") == [(0, len(bare), "python")]
    unclosed = "Text\n```cpp\nint x = 1;\n"
    [(s, e, lang)] = answer_code_regions(unclosed, "python")
    assert (unclosed[s:e], lang) == ("int x = 1;\n", "cpp")
    tilde = "~~~ C++ {.numberLines}\nint x;\n~~~\n"
    [(s, e, lang)] = answer_code_regions(tilde, "java")
    assert (tilde[s:e], lang) == ("int x;", "cpp")
    longer = "````python\n```\nnot closed by shorter fence\n````\n"
    [(s, e, lang)] = answer_code_regions(longer, "rust")
    assert longer[s:e] == "```\nnot closed by shorter fence" and lang == "python"
    crlf = "x\r\n```python\r\ny = 1\r\n```\r\n"
    [(s, e, _)] = answer_code_regions(crlf, "python")
    assert crlf[s:e] == "y = 1"


def test_syntax_char_spans_in_answer():
    spans, ok, bad = syntax_char_spans_in_answer(ANSWER, "python")
    got = [ANSWER[s:e] for s, e in spans]
    assert got[:3] == ["def add(a, b):", "return", "+"]
    if is_supported("javascript"):
        assert got[3:] == ["function add(a, b)", "return", "+"]
        assert (ok, bad) == (3, 0)  # "3" parses as a Python expression
    # the prose, including inline `add`, is never covered
    assert not covered(ANSWER, spans, "Here is the Python part")
    assert not covered(ANSWER, spans, "`add`")


def test_syntax_char_spans_in_answer_counts_failures():
    text = "```python\ndef f(:\n```\n\n```text\nhello\n```\n\n```python\nx = 1\n```\n"
    spans, ok, bad = syntax_char_spans_in_answer(text, "python")
    assert (ok, bad) == (1, 2)
    assert [text[s:e] for s, e in spans] == ["="]


# ---------------------------------------------------------------- token_mask

def test_merge_spans():
    assert merge_spans([(5, 7), (0, 2), (1, 3), (3, 4), (6, 6), (6, 9)]) == [(0, 3), (3, 4), (5, 9)]


def test_token_mask_synthetic():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 10), (10, 14), (0, 0)]
    assert token_mask(offsets, [(4, 5), (9, 10)]) == [False, False, True, False, True, False, False]
    assert token_mask(offsets, [(0, 1)], shift=5) == [False, False, False, True, False, False, False]
    assert token_mask(offsets, []) == [False] * len(offsets)


def test_token_mask_matches_bruteforce():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 60)
        cuts = sorted(rng.sample(range(1, 200), n))
        offsets = [(0, 0)] + list(zip([0] + cuts[:-1], cuts))
        spans = [(a, a + rng.randint(0, 8)) for a in (rng.randrange(200) for _ in range(rng.randint(0, 15)))]
        shift = rng.randint(-5, 5)
        want = [b > a and any(s + shift < b and a < e + shift for s, e in spans if e > s) for a, b in offsets]
        assert token_mask(offsets, spans, shift) == want


@pytest.fixture(scope="module")
def fast_tokenizer():
    """A byte-level BPE (same recipe as privcode.tiny.build_tokenizer) trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from privcode.data import taskgen

    lines = [t.solution for t in taskgen.generate_tasks(12345, 30)] + [PY, ANSWER, "Question: Write code.\n"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def _check_mask(tok, row: str, spans, shift: int):
    enc = tok(row + tok.eos_token, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = token_mask(offsets, spans, shift)
    abs_spans = [(s + shift, e + shift) for s, e in spans]
    inside = [False] * len(row)
    for s, e in abs_spans:
        for i in range(s, e):
            inside[i] = True
    assert mask[-1] is False  # eos special token: (0, 0)
    for tid, (a, b), m in zip(ids, offsets, mask):
        if m:
            # a masked token decodes to text that shares a char with a span
            if row[a:b].isascii():  # (a byte-level token may hold part of a multi-byte char)
                assert tok.decode([tid]) == row[a:b]
            assert any(inside[a:b])
        elif b > a:
            assert not any(inside[a:b])
    # every span char is inside some masked token
    for s, e in abs_spans:
        for i in range(s, e):
            assert any(m and a <= i < b for (a, b), m in zip(offsets, mask)), row[s:e]
    return mask, offsets


def test_token_mask_real_tokenizer(fast_tokenizer):
    prompt = "Question: add two numbers ✓\n\nAnswer: "
    spans, ok, bad = syntax_char_spans_in_answer(ANSWER, "python")
    mask, offsets = _check_mask(fast_tokenizer, prompt + ANSWER, spans, len(prompt))
    row = prompt + ANSWER
    masked = "".join(row[a:b] for (a, b), m in zip(offsets, mask) if m)
    assert "def" in masked and "return" in masked
    assert "Question" not in masked and "Here" not in masked
    assert not any(m for (a, b), m in zip(offsets, mask) if b <= len(prompt))  # prompt never masked


# ---------------------------------------------------------------- property test on taskgen

_PY_KEYWORDS = set(keyword.kwlist) | set(keyword.softkwlist)
_HEADER_RE = re.compile(r"(async\s+)?(def|class|for|while|if|elif)\b.*:\Z", re.S)


def test_taskgen_property(fast_tokenizer):
    from privcode.data import taskgen

    tasks = taskgen.generate_tasks(7, 40)
    assert tasks
    for task in tasks:
        code = task.solution
        spans = syntax_spans(code, "python")
        assert spans is not None, code
        assert spans == sorted(spans)
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))  # disjoint
        assert code[spans[0][0]:spans[0][1]].startswith("def ")
        for s, e in spans:
            piece = code[s:e]
            if piece in _PY_KEYWORDS:
                continue
            if re.fullmatch(r"[^\w\s\"'`]+", piece):  # operator
                assert piece not in syntax.DELIMITER_TOKENS
                continue
            assert _HEADER_RE.match(piece), piece
            stub = piece[2:] if piece.startswith("elif") else piece  # `elif c:` -> `if c:`
            compile(stub + "\n    pass\n", "<header>", "exec")  # every header is a complete header
        rec = taskgen.to_record(task)
        answer = rec["solution"]
        aspans, ok, bad = syntax_char_spans_in_answer(answer, rec["lang"])
        assert (ok, bad) == (1, 0)
        # the solution's own spans appear, shifted, in the answer's spans
        off = answer.index(code)
        assert all((s + off, e + off) in aspans for s, e in spans)
        _check_mask(fast_tokenizer, rec["problem"] + "\n" + answer, aspans, len(rec["problem"]) + 1)
