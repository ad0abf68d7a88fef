"""Syntax-token positions for the PrivSA loss (tree-sitter based).

PrivSA adds ``λ(t)·KL(p_base ‖ p_dp)`` on the *syntax tokens* of each training record. This
module finds them: it parses the code of a record with tree-sitter and returns **character
spans** of

1. *headers* of function/method/class definitions and of for/while/if (else-if/elif)
   statements: from the node's start to the end of the last non-comment child before its
   body (``def f(x, y):``, ``for (int i = 0; i < n; i++)``, ``fn main() -> i32``,
   ``function f(a)``, ``if [ -f x ]; then``), see :data:`HEADER_NODES`;
2. every *keyword* token: an anonymous leaf whose text is a word (``def``, ``return``,
   ``const``, ``fn``, ``let``, ``public``, ``#include``), plus the named leaves listed in
   :data:`NAMED_KEYWORD_LEAVES` (``True``/``None``, C ``int``, Java ``void``, Rust ``mut``...);
3. every *operator* token: an anonymous leaf made only of punctuation (``+``, ``==``, ``=``,
   ``->``, ``&&``, ``::``, ``<<``, ``.``, ``:``, ``=>``...), except the pure delimiters in
   :data:`DELIMITER_TOKENS` (brackets, ``,`` and ``;``) and string/char quote tokens. Angle
   brackets of generics/templates (``vector<int>``) are anonymous ``<``/``>`` tokens, hence
   operators.
   Delimiters that belong to a header are still covered, by the header span. The ``$``
   sigil of PHP variables and bash ``$x`` is no operator (:data:`NON_OPERATOR_PARENTS`).

Comments (any node whose type contains ``comment``) contribute nothing. Spans are
end-exclusive, in ``code`` (character, not byte) coordinates, sorted, and merged where they
overlap. Code that does not parse (the tree has an ERROR or MISSING node) or whose
language has no installed grammar gives ``None``; callers count those records and give them
KL weight 0. Positions come only from the parse tree, never from matching token ids.

Token positions are then found through a fast tokenizer's offset mapping::

    >>> from privcode.dp.syntax import syntax_spans, syntax_char_spans_in_answer, token_mask
    >>> code = "def add(a, b):\\n    return a + b\\n"
    >>> [code[s:e] for s, e in syntax_spans(code, "python")]
    ['def add(a, b):', 'return', '+']
    >>> answer = "Here:\\n```python\\nx = 1\\n```\\n"
    >>> spans, n_ok, n_bad = syntax_char_spans_in_answer(answer, "python")
    >>> [answer[s:e] for s, e in spans], n_ok, n_bad
    (['='], 1, 0)
    >>> prompt = "Q: set x\\nA: "          # training row = prompt + answer
    >>> offsets = [(0, 0), (0, 3), (3, 8), (8, 12), (12, 18), (18, 28), (28, 30), (30, 32), (32, 35)]
    >>> token_mask(offsets, spans, shift=len(prompt))  # tokenizer offsets of the row
    [False, False, False, False, False, False, False, True, False]

(``offsets`` mimics a tokenizer's ``return_offsets_mapping``: ``(0, 0)`` is a special token;
the answer's ``=`` is row character 30, inside the token ``(30, 32)``.)

Grammars come from the per-language PyPI packages (``tree-sitter-python``,
``tree-sitter-javascript``, ...; the per-language tables: privcode.dp.grammars); they are imported lazily, one
``Parser`` per language is cached, and a language whose package is missing is unsupported.
"""
from __future__ import annotations

import importlib
import re
from bisect import bisect_left, bisect_right
from functools import lru_cache
from itertools import accumulate

from privcode.dp.grammars import (DELIMITER_TOKENS, GRAMMARS, HEADER_NODES, NAMED_KEYWORD_LEAVES,
                                  NON_OPERATOR_PARENTS)
from privcode.langs import canonical_lang

__all__ = [
    "GRAMMARS", "HEADER_NODES", "NAMED_KEYWORD_LEAVES", "DELIMITER_TOKENS", "NON_OPERATOR_PARENTS",
    "is_supported", "get_parser", "syntax_spans", "answer_code_regions",
    "syntax_char_spans_in_answer", "token_mask", "merge_spans",
]

Span = tuple[int, int]

_QUOTE_CHARS = frozenset("\"'`")
_WORD = re.compile(r"#?[A-Za-z_]\w*")


@lru_cache(maxsize=None)
def _language(lang: str, variant: str | None = None):
    spec = GRAMMARS.get(lang)
    if spec is None:
        return None
    try:
        import tree_sitter as ts
        mod = importlib.import_module(spec[0])
        return ts.Language(getattr(mod, variant or spec[1])())
    except (ImportError, AttributeError, ValueError, TypeError):
        return None  # grammar package missing or ABI-incompatible with the runtime


@lru_cache(maxsize=None)
def _parser(lang: str, variant: str | None = None):
    language = _language(lang, variant)
    if language is None:
        return None
    import tree_sitter as ts
    return ts.Parser(language)


def get_parser(lang: str, code: str | None = None):
    """Cached tree-sitter ``Parser`` for ``lang`` (any alias), or None if unsupported."""
    lang = canonical_lang(lang)
    if lang == "php" and code is not None and "<?" not in code:
        return _parser(lang, "language_php_only")  # bare PHP snippet, no <?php tag
    return _parser(lang)


def is_supported(lang: str) -> bool:
    """Whether a grammar for ``lang`` is installed and loads."""
    return get_parser(lang) is not None


def merge_spans(spans) -> list[Span]:
    """Sort spans and merge those that overlap (touching spans stay apart, so that e.g.
    ``else`` and ``:`` remain two spans); empty spans are dropped."""
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s < out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _header_end(node, spec: str) -> int | None:
    """End byte of the header of `node`, or None if it has none."""
    if spec.startswith(">"):
        tok = spec[1:]
        for c in node.children:
            if not c.is_named and c.type == tok:
                return c.end_byte
        return None
    whole_ok = spec == "" or spec.endswith("?")
    field = spec.rstrip("?+")
    body = node.child_by_field_name(field) if field else None
    if body is None:
        if not whole_ok:
            return None
        end = None
        for c in node.children:
            if "comment" not in c.type and not (not c.is_named and c.type == ";"):
                end = c.end_byte
        return end
    if spec.endswith("+"):
        first = body.child(0)
        return first.end_byte if first is not None else body.start_byte
    end = None
    for c in node.children:
        if c.start_byte >= body.start_byte:
            break
        if "comment" not in c.type:
            end = c.end_byte
    return end


def _byte_spans(root, src: bytes, lang: str) -> list[Span]:
    headers = HEADER_NODES.get(lang, {})
    named_kw = NAMED_KEYWORD_LEAVES.get(lang, frozenset())
    no_op = NON_OPERATOR_PARENTS.get(lang, frozenset())
    spans: list[Span] = []
    stack = [(root, "")]
    while stack:
        node, parent = stack.pop()
        typ = node.type
        if "comment" in typ:
            continue
        children = node.children
        if not children:
            if node.end_byte <= node.start_byte:
                continue
            if node.is_named:
                if typ in named_kw:
                    text = src[node.start_byte:node.end_byte].decode("utf-8", "replace")
                    if _WORD.fullmatch(text):
                        spans.append((node.start_byte, node.end_byte))
                continue
            text = src[node.start_byte:node.end_byte].decode("utf-8", "replace")
            if _WORD.fullmatch(text):  # keyword (anonymous tokens that are words are keywords)
                spans.append((node.start_byte, node.end_byte))
            elif (text not in DELIMITER_TOKENS and parent not in no_op
                  and not _QUOTE_CHARS.intersection(text)
                  and not any(ch.isalnum() or ch.isspace() for ch in text)):
                spans.append((node.start_byte, node.end_byte))  # operator
            continue
        spec = headers.get(typ)
        if spec is not None:
            end = _header_end(node, spec)
            if end is not None and end > node.start_byte:
                spans.append((node.start_byte, end))
        stack.extend((c, typ) for c in children)
    return spans


def _bytes_to_chars(code: str, src: bytes, spans: list[Span]) -> list[Span]:
    if len(src) == len(code):  # ASCII: byte offsets are char offsets
        return spans
    lens = [1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4 for o in map(ord, code)]
    starts = list(accumulate(lens, initial=0))  # starts[i] = byte offset of char i
    return [(bisect_left(starts, s), bisect_left(starts, e)) for s, e in spans]


def syntax_spans(code: str, lang: str) -> list[Span] | None:
    """Merged char spans (end-exclusive, in ``code`` coordinates) of headers, keywords and
    operators of ``code``; None if ``lang`` is unsupported or ``code`` does not parse."""
    lang = canonical_lang(lang)
    parser = get_parser(lang, code)
    if parser is None:
        return None
    src = code.encode("utf-8", "surrogatepass")
    tree = parser.parse(src)
    root = tree.root_node
    if root.has_error:
        return None
    return merge_spans(_bytes_to_chars(code, src, _byte_spans(root, src, lang)))


_FENCE_OPEN = re.compile(r"[ ]{0,3}(`{3,}|~{3,})[ \t]*([^\n]*?)[ \t]*\r?\n?")
_FENCE_CLOSE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})[ \t]*\r?\n?")


def _fence_lang(info: str, default: str) -> str:
    word = info.split()[0] if info.split() else ""
    word = word.strip("{}.").split(",")[0].strip("{}.")
    return canonical_lang(word) if word else canonical_lang(default)


def answer_code_regions(text: str, lang: str) -> list[tuple[int, int, str]]:
    """Fenced code blocks (```` ``` ```` or ``~~~``) of a markdown answer as ``(start, end,
    block_lang)`` in ``text`` coordinates; ``text[start:end]`` is the block's content without
    the newline before the closing fence. ``block_lang`` is the fence tag (normalised), else
    the record's ``lang``. An unclosed fence runs to the end of ``text``. No fence at all:
    the whole text is one region in ``lang``."""
    regions: list[tuple[int, int, str]] = []
    pos, n = 0, len(text)
    open_fence: str | None = None
    start = 0
    block_lang = ""
    saw_fence = False
    while pos < n:
        nl = text.find("\n", pos)
        line_end = n if nl < 0 else nl + 1
        line = text[pos:line_end]
        if open_fence is None:
            m = _FENCE_OPEN.fullmatch(line)
            if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
                open_fence, start, saw_fence = m.group(1), line_end, True
                block_lang = _fence_lang(m.group(2), lang)
        else:
            m = _FENCE_CLOSE.fullmatch(line)
            if m and m.group(1)[0] == open_fence[0] and len(m.group(1)) >= len(open_fence):
                end = pos
                if end > start and text[end - 1] == "\n":
                    end -= 1
                    if end > start and text[end - 1] == "\r":
                        end -= 1
                regions.append((start, end, block_lang))
                open_fence = None
        pos = line_end
    if open_fence is not None:
        regions.append((min(start, n), n, block_lang))
    if not saw_fence:
        return [(0, n, canonical_lang(lang))]
    return regions


def syntax_char_spans_in_answer(text: str, lang: str) -> tuple[list[Span], int, int]:
    """Syntax spans of every code region of a markdown answer, in ``text`` coordinates,
    plus ``(n_regions_parsed, n_regions_failed_or_unsupported)``."""
    spans: list[Span] = []
    ok = bad = 0
    for s, e, block_lang in answer_code_regions(text, lang):
        found = syntax_spans(text[s:e], block_lang)
        if found is None:
            bad += 1
            continue
        ok += 1
        spans.extend((a + s, b + s) for a, b in found)
    return merge_spans(spans), ok, bad


def token_mask(offsets, spans, shift: int = 0) -> list[bool]:
    """True for each token whose char range ``[a, b)`` overlaps some span; span coordinates
    plus ``shift`` are coordinates in the tokenized string (e.g. ``shift=len(prompt)`` for
    answer spans when ``prompt + answer`` was tokenized). Empty ranges (``(0, 0)`` special
    tokens) are False. O((n + m) log m) for n tokens and m spans."""
    merged = merge_spans((s + shift, e + shift) for s, e in spans)
    starts = [s for s, _ in merged]
    ends = [e for _, e in merged]
    out = []
    for a, b in offsets:
        if b <= a:
            out.append(False)
            continue
        i = bisect_right(ends, a)  # first span ending after a
        out.append(i < len(starts) and starts[i] < b)
    return out
