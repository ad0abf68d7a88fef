"""Task families for `privcode.data.taskgen`.

A family is a function `fam(r: random.Random) -> Spec` registered with `@family("name")`. It
samples the instance constants (`params`: the multiple k, the shift, a mode, ...) and returns
templates for the wording and the reference body; `taskgen` picks the function name, argument
names and phrasing and renders the task. Templates use `string.Template`: `$f` is the function
name, `$a`/`$b` the argument names, and every key of `params`/`subs` is available.

Rules for a family: every description starts with "returns "; the body is written without
indentation and must not use any name from the argument pools as a local variable; inputs are
lists of JSON values (lists, ints, strings, bools) and the reference never mutates them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

# argument-name pools (bodies never use these as locals)
LIST_INT = ("nums", "xs", "values", "numbers", "arr", "data")
TEXT = ("s", "text", "line", "phrase", "source")
WORD_LIST = ("words", "tokens", "items", "strings")
INT = ("n", "num", "number", "limit")
MATRIX = ("matrix", "grid", "rows", "mat", "table")
INTERVALS = ("intervals", "ranges", "spans", "segments")
TARGET = ("target", "goal", "total", "wanted")

WORDS = ("apple river stone light green table music happy cloud tiger bread chair dance eagle "
         "flame grape house ivory lemon mango night ocean piano queen robot sugar train voice "
         "water zebra a an of to in sky sun cat dog map red go be it we").split()
ANAGRAMS = (("listen", "silent", "enlist", "tinsel"), ("evil", "vile", "live", "veil"),
            ("rat", "tar", "art"), ("god", "dog"), ("stop", "pots", "tops", "spot", "post"),
            ("night", "thing"), ("earth", "heart", "hater"), ("below", "elbow", "bowel"))


@dataclass
class Spec:
    params: dict                       # the constants that make this instance (disjointness key)
    names: Sequence[str]               # candidate function names
    args: Sequence[Sequence[str]]      # candidate names for each argument
    descs: Sequence[str]               # Template strings, each starting with "returns "
    body: str                          # Template of the function body, not indented
    gen: Callable[[random.Random], list]   # one typical argument list
    edges: Sequence[list] = ()         # edge-case argument lists (go to plus_inputs)
    big: Callable[[random.Random], list] | None = None  # one larger argument list (plus_inputs)
    subs: dict = field(default_factory=dict)  # extra template values (not part of the key)


FAMILIES: dict[str, Callable[[random.Random], Spec]] = {}


def family(name: str):
    def deco(fn):
        FAMILIES[name] = fn
        return fn
    return deco


# --- input helpers -----------------------------------------------------------------------------
def ints(r, lo, hi, nmin, nmax):
    return [r.randint(lo, hi) for _ in range(r.randint(nmin, nmax))]


def sentence(r, nmin=2, nmax=8, caps=False):
    ws = [r.choice(WORDS) for _ in range(r.randint(nmin, nmax))]
    if caps:
        ws = [w.capitalize() if r.random() < 0.3 else w.upper() if r.random() < 0.1 else w for w in ws]
    return " ".join(ws)


def nested(r, depth=3):
    out = []
    for _ in range(r.randint(0, 4)):
        if depth > 0 and r.random() < 0.35:
            out.append(nested(r, depth - 1))
        else:
            out.append(r.randint(-9, 30))
    return out


def _ord(k):
    return {1: "first", 2: "second", 3: "third", 4: "fourth"}[k]


# --- families ----------------------------------------------------------------------------------
@family("sum_multiples")
def _sum_multiples(r):
    k = r.choice([2, 3, 4, 5, 6, 7, 9, 10, 11, 12])
    return Spec(
        params={"k": k},
        names=("sum_multiples", "sum_of_multiples", "multiples_total", "add_multiples", "divisible_sum"),
        args=[LIST_INT],
        descs=("returns the sum of the elements of `$a` that are divisible by $k (0 if there are none)",
               "returns the total of all numbers in `$a` that are multiples of $k, or 0 when no number qualifies"),
        body="return sum(x for x in $a if x % $k == 0)",
        gen=lambda r: [ints(r, -20, 60, 3, 9)],
        edges=[[[]], [[0]], [[-k, k, 1]], [[1, 2, 3]]],
        big=lambda r: [ints(r, -1000, 1000, 30, 80)],
    )


@family("reverse_words")
def _reverse_words(r):
    mode = r.choice(["order", "letters", "order_upper", "both"])
    names, desc, expr = {
        "order": (("reverse_words", "words_backwards", "flip_word_order", "reverse_sentence"),
                  "returns the words of `$a` in reverse order",
                  '" ".join(reversed($a.split()))'),
        "letters": (("reverse_each_word", "mirror_words", "flip_letters", "reverse_word_letters"),
                    "returns `$a` with the letters of every word reversed while the words keep their order",
                    '" ".join(word[::-1] for word in $a.split())'),
        "order_upper": (("shout_reversed", "reverse_words_upper", "loud_reverse", "upper_reverse_words"),
                        "returns the words of `$a` in reverse order, converted to upper case",
                        '" ".join(reversed($a.upper().split()))'),
        "both": (("reverse_all_words", "mirror_sentence", "full_word_reverse", "backwards_text"),
                 "returns the words of `$a` in reverse order with the letters of each word reversed as well",
                 '" ".join(word[::-1] for word in reversed($a.split()))'),
    }[mode]
    tail = "; words are separated by whitespace and the result joins them with single spaces"
    return Spec(
        params={"mode": mode}, names=names, args=[TEXT],
        descs=(desc + tail, desc + " (split on whitespace, join with one space)"),
        body=f"return {expr}",
        gen=lambda r: [sentence(r, 1, 6)],
        edges=[[""], ["one"], ["  spaced   out  "], ["Hello World"]],
        big=lambda r: [sentence(r, 20, 40)],
    )


@family("count_vowels")
def _count_vowels(r):
    vowels = r.choice(["aeiou", "aeiouy"])
    ci = r.choice([True, False])
    vlist = ", ".join(vowels[:-1]) + " and " + vowels[-1]
    if ci:
        descs = ("returns the number of vowels ($vlist) in `$a`, ignoring case",
                 "returns how many characters of `$a` are vowels ($vlist), counting upper and lower case alike")
        body = 'return sum(1 for ch in $a.lower() if ch in "$vowels")'
    else:
        descs = ("returns the number of lowercase vowels ($vlist) in `$a`; uppercase letters do not count",
                 "returns how many characters of `$a` are one of the lowercase vowels $vlist (case-sensitive)")
        body = 'return sum(1 for ch in $a if ch in "$vowels")'
    return Spec(
        params={"vowels": vowels, "ignore_case": ci},
        names=("count_vowels", "vowel_count", "num_vowels", "vowels_in", "tally_vowels"),
        args=[TEXT], descs=descs, body=body, subs={"vlist": vlist},
        gen=lambda r: [sentence(r, 1, 5, caps=True)],
        edges=[[""], ["xyz"], ["AEIOUY aeiouy"], ["rhythm"]],
        big=lambda r: [sentence(r, 20, 40, caps=True)],
    )


@family("fizzbuzz")
def _fizzbuzz(r):
    p, q = r.choice([(3, 5), (2, 7), (3, 4), (4, 6), (5, 7), (2, 3), (3, 7)])
    w1, w2 = r.choice([("Fizz", "Buzz"), ("Foo", "Bar"), ("Ping", "Pong"), ("Tic", "Tac")])
    return Spec(
        params={"p": p, "q": q, "w1": w1, "w2": w2},
        names=("fizzbuzz", "fizz_buzz_list", "word_game", "number_words", "play_fizzbuzz"),
        args=[INT],
        descs=('returns a list of strings for the numbers 1 to `$a`: multiples of $p become "$w1", '
               'multiples of $q become "$w2", multiples of both become "$w1$w2", and any other number is '
               'written as its decimal string',
               'returns a list with one string per number from 1 up to `$a` inclusive, using "$w1" for '
               'multiples of $p, "$w2" for multiples of $q, "$w1$w2" for multiples of both, and the '
               'number itself (as a string) otherwise'),
        body=f"""\
out = []
for i in range(1, $a + 1):
    word = ""
    if i % $p == 0:
        word += "$w1"
    if i % $q == 0:
        word += "$w2"
    out.append(word or str(i))
return out""",
        gen=lambda r: [r.randint(1, 16)],
        edges=[[0], [1], [p * q]],
        big=lambda r: [r.randint(50, 120)],
    )


@family("running_stat")
def _running(r):
    mode = r.choice(["max", "min", "sum", "absmax"])
    names, what, update = {
        "max": (("running_max", "prefix_max", "cumulative_max", "max_so_far"),
                "the largest value", "best = x if best is None or x > best else best"),
        "min": (("running_min", "prefix_min", "cumulative_min", "min_so_far"),
                "the smallest value", "best = x if best is None or x < best else best"),
        "sum": (("running_sum", "prefix_sums", "cumulative_sum", "partial_sums"),
                "the sum of the values", "best = x if best is None else best + x"),
        "absmax": (("running_abs_max", "prefix_abs_max", "max_magnitude_so_far", "cumulative_abs_max"),
                   "the largest absolute value", "best = abs(x) if best is None else max(best, abs(x))"),
    }[mode]
    return Spec(
        params={"mode": mode}, names=names, args=[LIST_INT],
        descs=("returns a list whose i-th element is $what among the first i + 1 elements of `$a`",
               "returns a new list of the same length as `$a` where each position holds $what seen so far"),
        subs={"what": what},
        body=f"""\
out = []
best = None
for x in $a:
    {update}
    out.append(best)
return out""",
        gen=lambda r: [ints(r, -20, 20, 3, 8)],
        edges=[[[]], [[5]], [[-3, -3, -3]], [[1, 2, 3, 4]]],
        big=lambda r: [ints(r, -500, 500, 30, 60)],
    )


@family("run_length")
def _run_length(r):
    style = r.choice(["char_count", "count_char", "pairs", "compress"])
    append, ret, desc = {
        "char_count": ("out.append($a[i] + str(j - i))", '"".join(out)',
                       'returns the run-length encoding of `$a` as a string in which each run of equal '
                       'characters is written as the character followed by the run length (e.g. "aaab" -> "a3b1")'),
        "count_char": ("out.append(str(j - i) + $a[i])", '"".join(out)',
                       'returns the run-length encoding of `$a` as a string in which each run of equal '
                       'characters is written as the run length followed by the character (e.g. "aaab" -> "3a1b")'),
        "pairs": ("out.append([$a[i], j - i])", "out",
                  "returns the run-length encoding of `$a` as a list of [character, run length] pairs, in order"),
        "compress": ("out.append($a[i] + (str(j - i) if j - i > 1 else \"\"))", '"".join(out)',
                     'returns `$a` compressed so that each run of two or more equal characters becomes the '
                     'character followed by the run length, while single characters stay as they are '
                     '(e.g. "aaab" -> "a3b")'),
    }[style]
    def gen(r, runs=(1, 5)):
        return ["".join(r.choice("abcxyz") * r.randint(1, 4) for _ in range(r.randint(*runs)))]
    return Spec(
        params={"style": style},
        names=("run_length_encode", "rle", "encode_runs", "compress_runs", "squeeze_text"),
        args=[TEXT], descs=(desc, desc.replace("returns the run-length encoding", "returns the RLE encoding")),
        body=f"""\
out = []
i = 0
while i < len($a):
    j = i
    while j < len($a) and $a[j] == $a[i]:
        j += 1
    {append}
    i = j
return {ret}""",
        gen=gen, edges=[[""], ["a"], ["zzzzzzzzzzzz"], ["abab"]],
        big=lambda r: gen(r, (20, 40)),
    )


@family("caesar_shift")
def _caesar(r):
    k = r.randint(1, 25)
    direction = r.choice(["forward", "backward"])
    sign = "+" if direction == "forward" else "-"
    return Spec(
        params={"k": k, "direction": direction},
        names=("caesar_shift", "caesar_cipher", "shift_letters", "rotate_letters", "encode_caesar"),
        args=[TEXT],
        descs=("returns `$a` with every letter shifted $k places $direction in the alphabet (wrapping around), "
               "keeping upper and lower case; all other characters are unchanged",
               "returns the Caesar cipher of `$a` that moves each ASCII letter $k positions $direction in the "
               "alphabet with wrap-around, preserving case and leaving non-letters as they are"),
        body=f"""\
out = []
for ch in $a:
    if "a" <= ch <= "z":
        out.append(chr((ord(ch) - 97 {sign} $k) % 26 + 97))
    elif "A" <= ch <= "Z":
        out.append(chr((ord(ch) - 65 {sign} $k) % 26 + 65))
    else:
        out.append(ch)
return "".join(out)""",
        gen=lambda r: [sentence(r, 1, 5, caps=True) + r.choice(["", "!", "?", " 42"])],
        edges=[[""], ["xyz XYZ"], ["abc, ABC!"], ["123"]],
        big=lambda r: [sentence(r, 20, 40, caps=True)],
    )


@family("gcd_lcm")
def _gcd_lcm(r):
    mode = r.choice(["gcd", "lcm", "coprime"])
    k = r.choice([6, 10, 12, 15, 14]) if mode == "coprime" else 0
    if mode == "gcd":
        names = ("gcd_of_list", "list_gcd", "greatest_common_divisor", "common_divisor", "gcd_all")
        descs = ("returns the greatest common divisor of all numbers in `$a` (0 for an empty list)",
                 "returns the largest integer that divides every element of `$a`; an empty list gives 0")
        body = "import math\n\nacc = 0\nfor x in $a:\n    acc = math.gcd(acc, x)\nreturn acc"
        def gen(r):
            f = r.choice([1, 2, 3, 5, 6, 7])
            return [[f * r.randint(1, 30) for _ in range(r.randint(1, 5))]]
    elif mode == "lcm":
        names = ("lcm_of_list", "list_lcm", "least_common_multiple", "common_multiple", "lcm_all")
        descs = ("returns the least common multiple of all numbers in `$a` (1 for an empty list)",
                 "returns the smallest positive integer divisible by every element of `$a`; an empty list gives 1")
        body = "import math\n\nacc = 1\nfor x in $a:\n    acc = acc * x // math.gcd(acc, x)\nreturn acc"
        def gen(r):
            return [ints(r, 1, 20, 1, 5)]
    else:
        names = ("count_coprime", "coprime_count", "num_coprime_with_k", "coprimes_in")
        descs = ("returns how many elements of `$a` are coprime with $k (their greatest common divisor with $k is 1)",
                 "returns the number of values x in `$a` with gcd(x, $k) == 1")
        body = "import math\n\nreturn sum(1 for x in $a if math.gcd(x, $k) == 1)"
        def gen(r):
            return [ints(r, 1, 60, 2, 8)]
    return Spec(
        params={"mode": mode, "k": k}, names=names, args=[LIST_INT], descs=descs, body=body, gen=gen,
        edges=[[[]], [[7]], [[1, 1]], [[12, 18, 24]]],
        big=lambda r: [ints(r, 1, 40, 6, 12)],
    )


@family("palindrome_filtered")
def _palindrome(r):
    keep = r.choice(["alnum", "alpha"])
    ci = r.choice([True, False])
    what = "letters and digits" if keep == "alnum" else "letters"
    case = "ignoring case" if ci else "where upper and lower case count as different characters"
    lower = ".lower()" if ci else ""
    def gen(r):
        if r.random() < 0.5:
            w = r.choice(WORDS) + r.choice(WORDS)
            s = w + r.choice(["", "x", "1"]) + w[::-1]
            s = "".join(ch.upper() if r.random() < 0.2 else ch for ch in s)
            s = "".join(ch + (r.choice([" ", ",", "!", ""]) if r.random() < 0.2 else "") for ch in s)
            return [s]
        return [sentence(r, 1, 3, caps=True)]
    return Spec(
        params={"keep": keep, "ignore_case": ci},
        names=("is_palindrome", "is_clean_palindrome", "reads_same_backwards", "palindrome_check",
               "check_palindrome"),
        args=[TEXT],
        descs=("returns True if `$a` reads the same forwards and backwards when only its $what are kept, "
               "$case, and False otherwise",
               "returns whether the $what of `$a`, $case, form a palindrome (True or False)"),
        subs={"what": what, "case": case},
        body=f"chars = [ch{lower} for ch in $a if ch.is{keep}()]\nreturn chars == chars[::-1]",
        gen=gen, edges=[[""], ["A man, a plan, a canal: Panama"], ["No 'x' in Nixon"], ["ab1ba"], ["Aa"]],
    )


@family("fib_mod")
def _fib(r):
    m = r.choice([7, 10, 13, 97, 100, 1000, 10007])
    seq = r.choice(["fibonacci", "lucas"])
    start, first = ("0, 1", "F(0) = 0 and F(1) = 1") if seq == "fibonacci" else ("2, 1", "L(0) = 2 and L(1) = 1")
    label = "Fibonacci" if seq == "fibonacci" else "Lucas"
    return Spec(
        params={"m": m, "seq": seq},
        names=(f"{seq}_mod", f"nth_{seq}_mod", f"{seq}_remainder", f"mod_{seq}"),
        args=[INT],
        descs=("returns the `$a`-th $label number modulo $m, where $first and every later term is the sum "
               "of the two before it",
               "returns the remainder modulo $m of the $label number with index `$a` ($first)"),
        subs={"label": label, "first": first},
        body=f"prev, cur = {start}\nfor _ in range($a):\n    prev, cur = cur, (prev + cur) % $m\nreturn prev % $m",
        gen=lambda r: [r.randint(0, 40)],
        edges=[[0], [1], [2]],
        big=lambda r: [r.randint(300, 3000)],
    )


@family("flatten")
def _flatten(r):
    post = r.choice(["none", "sorted", "reversed", "sum"])
    ret, names, desc = {
        "none": ("out", ("flatten", "flatten_list", "deep_flatten", "unnest"),
                 "returns a flat list of all integers in the arbitrarily nested list `$a`, in left-to-right order"),
        "sorted": ("sorted(out)", ("flatten_sorted", "sorted_leaves", "flat_sorted", "sort_nested"),
                   "returns all integers of the arbitrarily nested list `$a` as one flat list sorted in ascending order"),
        "reversed": ("out[::-1]", ("flatten_reversed", "reverse_flatten", "flat_backwards", "unnest_reversed"),
                     "returns all integers of the arbitrarily nested list `$a` as one flat list in right-to-left order"),
        "sum": ("sum(out)", ("nested_sum", "deep_sum", "sum_nested", "total_of_nested"),
                "returns the sum of all integers in the arbitrarily nested list `$a` (0 if there are none)"),
    }[post]
    return Spec(
        params={"post": post}, names=names, args=[("nested", "lst", "tree", "xs")],
        descs=(desc, desc.replace("arbitrarily nested list", "nested list (lists may contain lists to any depth)")),
        body=f"""\
out = []

def walk(item):
    if isinstance(item, list):
        for sub in item:
            walk(sub)
    else:
        out.append(item)

walk($a)
return {ret}""",
        gen=lambda r: [nested(r)], edges=[[[]], [[[], [[]]]], [[1, [2, [3, [4, [5]]]]]]],
        big=lambda r: [[nested(r, 4) for _ in range(6)]],
    )


@family("dedupe")
def _dedupe(r):
    keep = r.choice(["first", "last"])
    kind = r.choice(["int", "str"])
    it, fin = ("$a", "out") if keep == "first" else ("reversed($a)", "out[::-1]")
    gen = ((lambda r: [ints(r, 0, 6, 3, 10)]) if kind == "int"
           else (lambda r: [[r.choice(WORDS[:8]) for _ in range(r.randint(3, 9))]]))
    return Spec(
        params={"keep": keep, "kind": kind},
        names=("dedupe", "remove_duplicates", "unique_in_order", "drop_repeats", "distinct_keep_order"),
        args=[LIST_INT if kind == "int" else WORD_LIST],
        descs=("returns the elements of `$a` without duplicates, keeping only the $keep occurrence of each value "
               "and preserving the order in which those occurrences appear",
               "returns a new list with repeated values of `$a` removed (the $keep occurrence of each value "
               "survives) and the relative order of the survivors unchanged"),
        body=f"seen = set()\nout = []\nfor x in {it}:\n    if x not in seen:\n        seen.add(x)\n"
             f"        out.append(x)\nreturn {fin}",
        gen=gen, edges=[[[]], [[1, 1, 1]] if kind == "int" else [["a", "a"]],
                        [[3, 1, 3, 2, 1]] if kind == "int" else [["b", "a", "b", "c", "a"]]],
        big=lambda r: [[x for _ in range(6) for x in gen(r)[0]]],
    )


@family("rotate_list")
def _rotate(r):
    k = r.randint(1, 6)
    direction = r.choice(["left", "right"])
    ret = "$a[shift:] + $a[:shift]" if direction == "left" else "$a[len($a) - shift:] + $a[:len($a) - shift]"
    return Spec(
        params={"k": k, "direction": direction},
        names=("rotate", "rotate_list", "shift_list", "cycle_items", "rotate_by_k"),
        args=[LIST_INT],
        descs=("returns `$a` rotated $k positions to the $direction (elements that fall off one end come back "
               "at the other); an empty list stays empty",
               "returns a new list that is `$a` cyclically shifted $direction by $k places (the shift wraps "
               "around, so it is taken modulo the length)"),
        body=f"if not $a:\n    return []\nshift = $k % len($a)\nreturn {ret}",
        gen=lambda r: [ints(r, 0, 9, 2, 8)], edges=[[[]], [[1]], [list(range(k))], [list(range(k + 1))]],
    )


@family("matrix_transform")
def _matrix(r):
    mode = r.choice(["transpose", "rotate_cw", "rotate_ccw", "mirror", "flip"])
    names, desc, ret = {
        "transpose": (("transpose", "matrix_transpose", "swap_rows_cols", "transposed"),
                      "returns the transpose of the rectangular matrix `$a` (a list of rows)",
                      "[list(row) for row in zip(*$a)]"),
        "rotate_cw": (("rotate_clockwise", "rotate_matrix_cw", "turn_right", "rotate_grid"),
                      "returns the rectangular matrix `$a` (a list of rows) rotated 90 degrees clockwise",
                      "[list(row) for row in zip(*$a[::-1])]"),
        "rotate_ccw": (("rotate_counterclockwise", "rotate_matrix_ccw", "turn_left", "rotate_grid_left"),
                       "returns the rectangular matrix `$a` (a list of rows) rotated 90 degrees counterclockwise",
                       "[list(row) for row in zip(*$a)][::-1]"),
        "mirror": (("mirror_rows", "flip_horizontal", "mirror_matrix", "reverse_rows"),
                   "returns the rectangular matrix `$a` (a list of rows) mirrored left to right, i.e. every row reversed",
                   "[row[::-1] for row in $a]"),
        "flip": (("flip_vertical", "upside_down", "flip_matrix", "reverse_row_order"),
                 "returns the rectangular matrix `$a` (a list of rows) flipped upside down, i.e. the rows in reverse order",
                 "[list(row) for row in $a[::-1]]"),
    }[mode]
    def gen(r, hi=4):
        rows, cols = r.randint(1, hi), r.randint(1, hi)
        return [[[r.randint(0, 9) for _ in range(cols)] for _ in range(rows)]]
    return Spec(
        params={"mode": mode}, names=names, args=[MATRIX],
        descs=(desc + "; an empty matrix gives an empty list", desc + " as a new list of lists ([] for [])"),
        body=f"if not $a:\n    return []\nreturn {ret}",
        gen=gen, edges=[[[]], [[[1]]], [[[1, 2, 3]]], [[[1], [2], [3]]]], big=lambda r: gen(r, 9),
    )


@family("word_frequency")
def _word_freq(r):
    lower = r.choice([True, False])
    minlen = r.choice([1, 2, 3, 4])
    filt = "every" if minlen == 1 else f"each {minlen}-or-more-letter"
    conv = " (converted to lower case)" if lower else " (case-sensitive)"
    return Spec(
        params={"lower": lower, "minlen": minlen},
        names=("word_frequency", "word_counts", "count_words", "word_histogram", "tally_words"),
        args=[TEXT],
        descs=("returns a dictionary mapping $filt whitespace-separated word of `$a`$conv to the number of "
               "times it occurs",
               "returns a dict from $filt word of `$a`$conv to its count, where words are separated by whitespace"),
        subs={"filt": filt, "conv": conv},
        body=("counts = {}\nfor word in $a.split():\n" + ("    word = word.lower()\n" if lower else "")
              + "    if len(word) >= $minlen:\n        counts[word] = counts.get(word, 0) + 1\nreturn counts"),
        gen=lambda r: [sentence(r, 2, 9, caps=True)], edges=[[""], ["a A a"], ["Tree tree TREE"]],
        big=lambda r: [sentence(r, 30, 60, caps=True)],
    )


@family("kth_largest")
def _kth(r):
    k = r.choice([2, 3])
    side = r.choice(["largest", "smallest"])
    distinct = r.choice([True, False])
    src = "set($a)" if distinct else "$a"
    rev = ", reverse=True" if side == "largest" else ""
    what = "distinct value" if distinct else "value (duplicates count separately)"
    return Spec(
        params={"k": k, "side": side, "distinct": distinct},
        names=(f"{_ord(k)}_{side}", f"kth_{side}", f"find_{_ord(k)}_{side}", f"{_ord(k)}_{side}_value"),
        args=[LIST_INT],
        descs=("returns the $ord $side $what in `$a`, or None if there are fewer than $k such values",
               "returns the element that is $ord $side in `$a` counting each $what, and None when `$a` "
               "does not have $k of them"),
        subs={"ord": _ord(k), "what": what},
        body=f"vals = sorted({src}{rev})\nif len(vals) < $k:\n    return None\nreturn vals[$k - 1]",
        gen=lambda r: [ints(r, -10, 20, 2, 8)], edges=[[[]], [[5]], [[4, 4, 4]], [[1, 2]], [[3, 3, 1, 2]]],
    )


@family("balanced_brackets")
def _brackets(r):
    kinds = r.choice(["()", "()[]", "()[]{}", "()<>", "[]{}"])
    pairs = ", ".join(f"'{kinds[i + 1]}': '{kinds[i]}'" for i in range(0, len(kinds), 2))
    opens = kinds[0::2]
    listed = " ".join(kinds[i:i + 2] for i in range(0, len(kinds), 2))
    def gen(r, n=4):
        def bal(d):
            if d == 0 or r.random() < 0.3:
                return ""
            i = r.randrange(0, len(kinds), 2)
            return kinds[i] + bal(d - 1) + kinds[i + 1] + bal(d - 1)
        s = bal(n)
        if s and r.random() < 0.5:
            j = r.randrange(len(s))
            s = s[:j] + s[j + 1:] if r.random() < 0.5 else s[:j] + r.choice(kinds) + s[j:]
        if r.random() < 0.3:
            s = s.replace(kinds[0], "x" + kinds[0], 1)
        return [s]
    return Spec(
        params={"kinds": kinds},
        names=("is_balanced", "balanced_brackets", "brackets_match", "check_brackets", "valid_nesting"),
        args=[TEXT],
        descs=("returns True if the brackets $listed in `$a` are balanced and properly nested, ignoring all "
               "other characters, and False otherwise",
               "returns whether every opening bracket in `$a` (of the kinds $listed) is closed by the matching "
               "bracket in the right order; other characters are ignored"),
        subs={"listed": listed, "pairs": pairs, "opens": opens},
        body=("pairs = {$pairs}\nstack = []\nfor ch in $a:\n    if ch in \"$opens\":\n        stack.append(ch)\n"
              "    elif ch in pairs:\n        if not stack or stack[-1] != pairs[ch]:\n            return False\n"
              "        stack.pop()\nreturn not stack"),
        gen=gen, edges=[[""], [kinds[1]], [kinds[0]], [kinds[0] + "a" + kinds[1]], [kinds[1] + kinds[0]]],
        big=lambda r: gen(r, 7),
    )


@family("base_to_int")
def _base(r):
    base = r.choice([2, 3, 8, 16])
    signed = r.choice([True, False])
    digits = {2: "0 and 1", 3: "0, 1 and 2", 8: "0 to 7", 16: "0-9 and a-f (either case)"}[base]
    label = {2: "binary", 3: "base-3", 8: "octal", 16: "hexadecimal"}[base]
    sign_note = ", optionally preceded by a minus sign" if signed else ""
    def gen(r, hi=5000):
        v = r.randint(0, hi)
        s = ""
        while True:
            s = "0123456789abcdef"[v % base] + s
            v //= base
            if v == 0:
                break
        if base == 16 and r.random() < 0.5:
            s = s.upper()
        if signed and r.random() < 0.4:
            s = "-" + s
        return [s]
    return Spec(
        params={"base": base, "signed": signed},
        names=(f"{label.replace('-', '_')}_to_int", f"parse_{label.replace('-', '_')}", "digits_to_int",
               f"from_base_{base}", f"base{base}_value"),
        args=[("digits", "s", "code", "numeral")],
        descs=("returns the integer value of `$a`, a $label numeral made of the digits $digits$sign_note",
               "returns the int represented by the $label string `$a` (digits $digits$sign_note)"),
        subs={"label": label, "digits": digits, "sign_note": sign_note},
        body="return int($a, $base)",
        gen=gen, edges=[["0"], ["1"], ["-1"] if signed else ["10"]], big=lambda r: gen(r, 10 ** 12),
    )


@family("digit_power_sum")
def _digit_power(r):
    p = r.randint(1, 5)
    return Spec(
        params={"p": p},
        names=("digit_power_sum", "sum_digit_powers", "powered_digit_sum", "digits_to_power", "digit_sum_pow"),
        args=[INT],
        descs=("returns the sum of the decimal digits of `$a`, each raised to the power $p (a minus sign is ignored)",
               "returns d1**$p + d2**$p + ... over the decimal digits d1, d2, ... of abs(`$a`)"),
        body="return sum(int(d) ** $p for d in str(abs($a)))",
        gen=lambda r: [r.randint(-999, 99999)], edges=[[0], [7], [-405], [153]],
        big=lambda r: [r.randint(10 ** 15, 10 ** 18)],
    )


@family("merge_intervals")
def _intervals(r):
    touching = r.choice([True, False])
    out = r.choice(["list", "count", "length"])
    cmp = "<=" if touching else "<"
    ret = {"list": "merged", "count": "len(merged)", "length": "sum(e - s for s, e in merged)"}[out]
    what = {"list": "the merged intervals as a sorted list of [start, end] lists",
            "count": "how many intervals remain after merging",
            "length": "the total length covered by the union of the intervals"}[out]
    rule = ("overlapping intervals, including ones that merely touch such as [1, 2] and [2, 3], are merged"
            if touching else "intervals are merged only when they overlap by a positive length "
            "(touching ones such as [1, 2] and [2, 3] stay separate)")
    def gen(r, n=(0, 5), hi=20):
        res = []
        for _ in range(r.randint(*n)):
            s = r.randint(0, hi)
            res.append([s, s + r.randint(0, 5)])
        return [res]
    return Spec(
        params={"touching": touching, "out": out},
        names=("merge_intervals", "combine_ranges", "union_intervals", "merge_spans", "collapse_intervals"),
        args=[INTERVALS],
        descs=("returns $what for the list `$a` of [start, end] intervals (start <= end), where $rule",
               "returns $what after merging the [start, end] intervals in `$a`; $rule"),
        subs={"what": what, "rule": rule},
        body=(f"merged = []\nfor start, end in sorted($a):\n    if merged and start {cmp} merged[-1][1]:\n"
              "        merged[-1][1] = max(merged[-1][1], end)\n    else:\n        merged.append([start, end])\n"
              f"return {ret}"),
        gen=gen, edges=[[[]], [[[1, 2], [2, 3]]], [[[5, 5]]], [[[1, 10], [2, 3], [4, 5]]]],
        big=lambda r: gen(r, (20, 40), 200),
    )


@family("anagram_groups")
def _anagrams(r):
    m = r.choice([1, 2, 3])
    ci = r.choice([True, False])
    lower = ".lower()" if ci else ""
    case = "ignoring case" if ci else "case-sensitively"
    size = "" if m == 1 else f" that contain at least {m} words"
    def gen(r, n=(2, 7)):
        ws = []
        for _ in range(r.randint(*n)):
            w = r.choice(r.choice(ANAGRAMS)) if r.random() < 0.8 else r.choice(WORDS)
            ws.append(w.capitalize() if r.random() < 0.25 else w)
        return [ws]
    return Spec(
        params={"min_size": m, "ignore_case": ci},
        names=("count_anagram_groups", "anagram_classes", "num_anagram_groups", "group_anagrams_count"),
        args=[WORD_LIST],
        descs=("returns the number of groups of anagrams$size among the words in `$a`, comparing letters $case "
               "(repeated words count as members of their group)",
               "returns how many anagram classes$size the list `$a` forms when words are compared $case "
               "(two words are in the same class if they use the same letters the same number of times)"),
        subs={"size": size, "case": case},
        body=(f"groups = {{}}\nfor word in $a:\n    key = \"\".join(sorted(word{lower}))\n"
              "    groups[key] = groups.get(key, 0) + 1\nreturn sum(1 for size in groups.values() if size >= $min_size)"),
        gen=gen, edges=[[[]], [["a"]], [["ab", "BA", "ba"]], [["Dog", "god", "odg"]]], big=lambda r: gen(r, (30, 60)),
    )


@family("prime_count")
def _primes(r):
    inclusive = r.choice([True, False])
    agg = r.choice(["count", "sum"])
    rng = "less than or equal to `$a`" if inclusive else "strictly less than `$a`"
    what = "number" if agg == "count" else "sum"
    ret = "sum(1 for i in range(size) if sieve[i])" if agg == "count" else "sum(i for i in range(size) if sieve[i])"
    return Spec(
        params={"inclusive": inclusive, "agg": agg},
        names=(f"{agg}_primes", f"prime_{agg}", f"{agg}_primes_below", f"primes_{agg}_upto"),
        args=[INT],
        descs=("returns the $what of prime numbers $rng (0 if there are none)",
               "returns the $what of all primes p with p $rel `$a`"),
        subs={"what": what, "rng": rng, "rel": "<=" if inclusive else "<"},
        body=(f"size = $a{' + 1' if inclusive else ''}\nif size < 2:\n    return 0\nsieve = [True] * size\n"
              "sieve[0] = sieve[1] = False\nfor i in range(2, int(size ** 0.5) + 1):\n    if sieve[i]:\n"
              f"        for j in range(i * i, size, i):\n            sieve[j] = False\nreturn {ret}"),
        gen=lambda r: [r.randint(0, 60)], edges=[[0], [1], [2], [3], [-5]], big=lambda r: [r.randint(1000, 20000)],
    )


@family("char_histogram")
def _histogram(r):
    letters = r.choice([True, False])
    ci = r.choice([True, False])
    out = r.choice(["dict", "pairs"])
    skip = "not ch.isalpha()" if letters else "ch.isspace()"
    which = "letter" if letters else "non-whitespace character"
    case = " (case-insensitive: upper case is counted as lower case)" if ci else " (case-sensitive)"
    shape = ("a dictionary mapping each $which of `$a`$case to its number of occurrences" if out == "dict" else
             "a list of [character, count] pairs, sorted by character, for each $which of `$a`$case")
    ret = "counts" if out == "dict" else "sorted([ch, c] for ch, c in counts.items())"
    return Spec(
        params={"letters": letters, "ignore_case": ci, "out": out},
        names=("char_histogram", "char_counts", "letter_frequency", "count_chars", "character_tally"),
        args=[TEXT],
        descs=("returns " + shape, "returns " + shape.replace("each", "every distinct")),
        subs={"which": which, "case": case},
        body=(f"counts = {{}}\nfor ch in $a:\n    if {skip}:\n        continue\n"
              + ("    ch = ch.lower()\n" if ci else "") + f"    counts[ch] = counts.get(ch, 0) + 1\nreturn {ret}"),
        gen=lambda r: [sentence(r, 1, 4, caps=True) + r.choice(["", "!", " 1 2", "?"])],
        edges=[[""], ["   "], ["AaBb!!"]],
    )


@family("count_long_words")
def _long_words(r):
    k = r.randint(2, 7)
    cmp = r.choice(["longer", "at_most"])
    op, what = (">", "more than $k characters") if cmp == "longer" else ("<=", "at most $k characters")
    return Spec(
        params={"k": k, "cmp": cmp},
        names=("count_long_words", "words_longer_than", "count_words_by_length", "length_filter_count"),
        args=[TEXT],
        descs=(f"returns the number of whitespace-separated words in `$a` that have {what}",
               f"returns how many words of `$a` (split on whitespace) are made of {what}"),
        body=f"return sum(1 for word in $a.split() if len(word) {op} $k)",
        gen=lambda r: [sentence(r, 1, 8)], edges=[[""], ["a"], ["abcdefgh abc"]],
        big=lambda r: [sentence(r, 30, 50)],
    )


@family("window_sum")
def _window(r):
    k = r.randint(2, 5)
    best = r.choice(["max", "min"])
    return Spec(
        params={"k": k, "best": best},
        names=(f"{best}_window_sum", f"{best}_sum_of_{k}", f"best_{k}_window" if best == "max" else f"lowest_{k}_window",
               f"{best}_consecutive_sum"),
        args=[LIST_INT],
        descs=("returns the ${best}imum sum of $k consecutive elements of `$a`, or None if `$a` has fewer than $k elements",
               "returns the ${best}imal total over all windows of $k adjacent values in `$a` (None when the list is "
               "shorter than $k)"),
        body=(f"if len($a) < $k:\n    return None\nwindow = sum($a[:$k])\nbest = window\n"
              f"for i in range($k, len($a)):\n    window += $a[i] - $a[i - $k]\n    best = {best}(best, window)\n"
              "return best"),
        gen=lambda r: [ints(r, -10, 20, k - 1, k + 6)], edges=[[[]], [[1] * k], [[5] * (k - 1)]],
        big=lambda r: [ints(r, -100, 100, 50, 100)],
    )


@family("collatz")
def _collatz(r):
    mode = r.choice(["steps", "peak", "length"])
    rule = r.choice(["3n+1", "(3n+1)/2"])
    odd = "3 * cur + 1" if rule == "3n+1" else "(3 * cur + 1) // 2"
    what, ret = {"steps": ("the number of steps needed to reach 1", "steps"),
                 "peak": ("the largest value reached (including the start)", "peak"),
                 "length": ("the number of values in the sequence from the start down to 1, both included",
                            "steps + 1")}[mode]
    return Spec(
        params={"mode": mode, "rule": rule},
        names=(f"collatz_{mode}", f"hailstone_{mode}", f"{mode}_of_collatz", f"collatz_sequence_{mode}"),
        args=[INT],
        descs=("returns $what when starting from the positive integer `$a` and repeatedly replacing an even value "
               "n by n // 2 and an odd value n by $rule",
               "returns, for the sequence that starts at `$a` >= 1 and maps even n to n // 2 and odd n to $rule "
               "until it reaches 1, $what"),
        subs={"what": what},
        body=(f"cur = $a\nsteps = 0\npeak = cur\nwhile cur != 1:\n    if cur % 2 == 0:\n        cur //= 2\n"
              f"    else:\n        cur = {odd}\n    peak = max(peak, cur)\n    steps += 1\nreturn {ret}"),
        gen=lambda r: [r.randint(1, 60)], edges=[[1], [2], [27]], big=lambda r: [r.randint(10 ** 5, 10 ** 6)],
    )


@family("case_convert")
def _case(r):
    mode = r.choice(["snake_to_camel", "snake_to_pascal", "camel_to_snake", "kebab_to_camel"])
    names, desc, body, gen = {
        "snake_to_camel": (("snake_to_camel", "to_camel_case", "camelize", "snake_case_to_camel"),
                           "returns the lowercase snake_case identifier `$a` converted to camelCase",
                           'parts = $a.split("_")\nreturn parts[0] + "".join(p.capitalize() for p in parts[1:])',
                           lambda r: ["_".join(r.choice(WORDS) for _ in range(r.randint(1, 4)))]),
        "snake_to_pascal": (("snake_to_pascal", "to_pascal_case", "pascalize", "snake_case_to_pascal"),
                            "returns the lowercase snake_case identifier `$a` converted to PascalCase",
                            'return "".join(p.capitalize() for p in $a.split("_"))',
                            lambda r: ["_".join(r.choice(WORDS) for _ in range(r.randint(1, 4)))]),
        "camel_to_snake": (("camel_to_snake", "to_snake_case", "snakeify", "camel_case_to_snake"),
                           "returns the camelCase identifier `$a` converted to snake_case (each upper-case letter "
                           "becomes an underscore followed by its lower-case form)",
                           'return "".join("_" + ch.lower() if ch.isupper() else ch for ch in $a)',
                           lambda r: [r.choice(WORDS) + "".join(r.choice(WORDS).capitalize()
                                                                for _ in range(r.randint(0, 3)))]),
        "kebab_to_camel": (("kebab_to_camel", "dashes_to_camel", "kebab_case_to_camel", "dash_camelize"),
                           "returns the lowercase kebab-case identifier `$a` (words joined by '-') converted to camelCase",
                           'parts = $a.split("-")\nreturn parts[0] + "".join(p.capitalize() for p in parts[1:])',
                           lambda r: ["-".join(r.choice(WORDS) for _ in range(r.randint(1, 4)))]),
    }[mode]
    return Spec(
        params={"mode": mode}, names=names, args=[("name", "ident", "identifier", "s")],
        descs=(desc, desc.replace("converted to", "rewritten in")), body=body, gen=gen,
        edges=[[""], ["x"], ["ab"]],
    )


@family("pair_sum")
def _pair_sum(r):
    mode = r.choice(["count", "exists", "first", "distinct"])
    names, desc, hit, ret = {
        "count": (("count_pairs_with_sum", "pair_sum_count", "num_pairs_summing", "count_sum_pairs"),
                  "returns the number of index pairs i < j with `$a`[i] + `$a`[j] == `$b`",
                  "found += 1", "found"),
        "exists": (("has_pair_with_sum", "pair_sum_exists", "two_sum_exists", "can_make_sum"),
                   "returns True if two elements at different positions of `$a` add up to `$b`, else False",
                   "return True", "False"),
        "first": (("first_pair_with_sum", "two_sum_indices", "find_sum_pair", "pair_indices"),
                  "returns [i, j] for the first index pair i < j (smallest i, then smallest j) with "
                  "`$a`[i] + `$a`[j] == `$b`, or None if there is none",
                  "return [i, j]", "None"),
        "distinct": (("count_value_pairs", "distinct_sum_pairs", "unique_pairs_with_sum", "value_pairs_summing"),
                     "returns the number of distinct value pairs (x, y) with x <= y, x + y == `$b`, where x and y "
                     "are elements of `$a` at different positions",
                     "found.add((min($a[i], $a[j]), max($a[i], $a[j])))", "len(found)"),
    }[mode]
    init = "found = set()\n" if mode == "distinct" else "found = 0\n" if mode == "count" else ""
    def gen(r, n=(0, 8)):
        xs = ints(r, -5, 10, *n)
        t = (xs[0] + xs[-1]) if xs and r.random() < 0.7 else r.randint(-5, 15)
        return [xs, t]
    return Spec(
        params={"mode": mode}, names=names, args=[LIST_INT, TARGET],
        descs=(desc, desc.replace("returns", "returns, for the integer list `$a` and integer `$b`,", 1)),
        body=(f"{init}for i in range(len($a)):\n    for j in range(i + 1, len($a)):\n"
              f"        if $a[i] + $a[j] == $b:\n            {hit}\nreturn {ret}"),
        gen=gen, edges=[[[], 0], [[5], 10], [[2, 2, 2], 4]], big=lambda r: gen(r, (60, 100)),
    )


@family("chunk_list")
def _chunks(r):
    k = r.randint(2, 5)
    mode = r.choice(["chunks", "sums"])
    item = "$a[i:i + $k]" if mode == "chunks" else "sum($a[i:i + $k])"
    descs = (("returns `$a` split into consecutive chunks of $k elements (the last chunk may be shorter), as a "
              "list of lists",
              "returns a list of lists holding the consecutive groups of $k elements of `$a` (the final group may "
              "contain fewer)") if mode == "chunks" else
             ("returns a list with the sum of each consecutive block of $k elements of `$a` (the last block may be "
              "shorter)",
              "returns the sums of the consecutive groups of $k elements of `$a`, in order (the final group may "
              "contain fewer)"))
    return Spec(
        params={"k": k, "mode": mode},
        names=(f"chunk_{mode}", "chunked" if mode == "chunks" else "block_sums",
               "split_into_chunks" if mode == "chunks" else "sum_blocks",
               "batch_items" if mode == "chunks" else "chunk_totals"),
        args=[LIST_INT],
        descs=descs,
        body=f"return [{item} for i in range(0, len($a), $k)]",
        gen=lambda r: [ints(r, -5, 20, 1, 11)], edges=[[[]], [[1]], [list(range(k))], [list(range(k + 1))]],
    )
