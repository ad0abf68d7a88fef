"""privcode make-data --out results/data/taskgen --params '{"seed": 0, "records": 400, "benchmark": 40}'

Templated Python programming tasks: private records, public prompts and a small benchmark. The command
writes `records.jsonl` (Magicoder OSS-Instruct records: id, problem, solution, lang, family) and
`humaneval.jsonl` (an EvalPlus HumanEval+ file usable as HUMANEVAL_OVERRIDE_PATH, task ids
HumanEval/0..M-1). The benchmark is drawn first and the records exclude its function names and
its parameter instances (family + constants), so no record is a benchmark task in disguise.

Each task family lives in `taskgen_families.py`; a family samples constants (a multiple k, a
shift, a mode, ...) and this module picks the function/argument names and the wording, draws
base and plus inputs, and runs the reference solution to make examples and asserts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template
from typing import Iterable

from privcode.data.taskgen_families import FAMILIES, Spec
from privcode.errors import PrivcodeError
from privcode.io import write_jsonl
from privcode.params import WHERE, Params, parse_params, stage_parser

FRAMES = (
    "Write a Python function `{sig}` that {desc}.",
    "Implement a Python function `{sig}` which {desc}.",
    "Create a function `{sig}` in Python that {desc}.",
    "Your task is to write `{sig}`, a Python function that {desc}.",
)
EXAMPLES = (" For example, `{call}` should return `{out}`.", " Example: `{call}` returns `{out}`.")
INTROS = ("Here is a straightforward implementation:", "The following function solves the task:",
          "A simple solution in Python:")
MAX_TRIES = 80  # draws per family before it counts as exhausted


@dataclass
class Task:
    task_id: str
    family: str
    entry_point: str
    problem: str            # natural-language instruction (Magicoder OSS-Instruct style)
    signature_prompt: str   # HumanEval-style `def f(...):` + docstring with examples
    solution: str           # full reference function source
    tests: list[str]        # assert lines that the reference passes
    base_inputs: list[list]
    plus_inputs: list[list]
    params: dict = field(default_factory=dict)  # family constants (the instance key)
    body: str = ""          # reference body: signature_prompt + body is a complete program

    @property
    def key(self) -> tuple[str, str]:
        """The parameter instance: two tasks with equal keys differ only in names/wording."""
        return self.family, json.dumps(self.params, sort_keys=True)


def _call(fname: str, args: list) -> str:
    return f"{fname}({', '.join(repr(a) for a in args)})"


def _assert(fname: str, args: list, out) -> str:
    if out is None or isinstance(out, bool):
        return f"assert {_call(fname, args)} is {out!r}"
    return f"assert {_call(fname, args)} == {out!r}"


def _trivial(args: list, out) -> bool:
    """An uninformative example: empty input or None/empty output."""
    empty = ([], "", {})
    return out is None or any(out == e and type(out) is type(e) for e in empty) or \
        any(a == e and type(a) is type(e) for a in args for e in empty)


def load_function(source: str, entry_point: str):
    """exec `source` in a fresh namespace and return `entry_point`."""
    ns: dict = {}
    exec(compile(source, f"<taskgen:{entry_point}>", "exec"), ns)
    return ns[entry_point]


def run_reference(task: Task, inputs: Iterable[list]) -> list:
    fn = load_function(task.solution, task.entry_point)
    return [fn(*copy.deepcopy(args)) for args in inputs]


def _draw_inputs(spec: Spec, r: random.Random) -> tuple[list, list]:
    seen: set[str] = set()

    def fresh(args) -> bool:
        k = json.dumps(args, sort_keys=True)
        if k in seen:
            return False
        seen.add(k)
        return True

    base: list = []
    want = r.randint(3, 6)
    for _ in range(want * 6):
        if len(base) == want:
            break
        args = spec.gen(r)
        if fresh(args):
            base.append(args)
    plus = [list(e) for e in spec.edges if fresh(list(e))]
    want = r.randint(max(5, len(plus) + 2), 12)
    big = spec.big or spec.gen
    for _ in range(want * 6):
        if len(plus) >= want:
            break
        args = big(r)
        if fresh(args):
            plus.append(args)
    return base, plus


def render(family: str, spec: Spec, fname: str, argnames: list[str], desc_i: int, frame_i: int,
           example_i: int, inputs: tuple[list, list]) -> Task:
    """Build the Task for one choice of names and wording (inputs already drawn)."""
    mapping = {"f": fname, **{k: str(v) for k, v in {**spec.params, **spec.subs}.items()}}
    for key, name in zip("ab", argnames):
        mapping[key] = name
    desc = Template(spec.descs[desc_i]).substitute(mapping)
    assert desc.startswith(("returns ", "returns, ")), desc
    body = textwrap.indent(Template(spec.body).substitute(mapping).strip("\n") + "\n", "    ")
    header = f"def {fname}({', '.join(argnames)}):\n"
    solution = header + body
    fn = load_function(solution, fname)
    base, plus = inputs
    base_out = [fn(*copy.deepcopy(a)) for a in base]
    for a in plus:  # the reference must run on every plus input
        fn(*copy.deepcopy(a))

    # examples: the shortest informative (non-None) call first, then a short one with another output
    order = sorted(range(len(base)), key=lambda i: (_trivial(base[i], base_out[i]),
                                                    len(_call(fname, base[i]) + repr(base_out[i])), i))
    ex = order[0]
    order = [ex] + sorted((i for i in order[1:] if base_out[i] != base_out[ex]),
                          key=lambda i: len(_call(fname, base[i]) + repr(base_out[i])))
    sig = f"{fname}({', '.join(argnames)})"
    problem = (FRAMES[frame_i].format(sig=sig, desc="\0").replace("\0", desc)
               + EXAMPLES[example_i].format(call=_call(fname, base[ex]), out=repr(base_out[ex])))

    doc = "Return" + desc[len("returns"):].replace("`", "") + "."
    lines = textwrap.wrap(doc, 84, break_on_hyphens=False)
    docstring = '    """' + "\n    ".join(lines) + "\n"
    for i in order[:2]:
        if base_out[i] is None:  # doctest prints nothing for None
            docstring += f"    >>> {_call(fname, base[i])} is None\n    True\n"
        else:
            docstring += f"    >>> {_call(fname, base[i])}\n    {base_out[i]!r}\n"
    prompt = header + docstring + '    """\n'

    tests = [_assert(fname, base[i], base_out[i]) for i in range(min(3, len(base)))]
    tid = f"{family}-{hashlib.sha1(problem.encode()).hexdigest()[:10]}"
    return Task(task_id=tid, family=family, entry_point=fname, problem=problem, signature_prompt=prompt,
                solution=solution, tests=tests, base_inputs=base, plus_inputs=plus, params=dict(spec.params),
                body=body)


def generate_tasks(seed: int, n: int, families: list[str] | None = None, *, exclude: Iterable[Task] = (),
                   salt: str = "tasks") -> list[Task]:
    """`n` tasks, deterministic for (`seed`, `salt`), unique by problem text, cycling over `families`
    (all by default, in a seed-shuffled order). Tasks sharing a function name, a parameter instance or a
    problem with any task in `exclude` are never produced."""
    fams = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown or not fams:
        raise PrivcodeError(f"unknown task families {unknown or fams} (known: {', '.join(FAMILIES)})")
    r = random.Random(f"privcode-taskgen:{seed}:{salt}")
    if families is None:
        r.shuffle(fams)
    exclude = list(exclude)
    bad_names = {t.entry_point for t in exclude}
    bad_keys = {t.key for t in exclude}
    seen_heads: set[str] = set()
    seen_problems = {t.problem for t in exclude}
    out: list[Task] = []
    exhausted: set[str] = set()
    i = 0
    while len(out) < n:
        active = [f for f in fams if f not in exhausted]
        if not active:
            raise PrivcodeError(f"only {len(out)} distinct tasks can be made from families {fams}; asked for {n}")
        fam = active[i % len(active)]
        i += 1
        for _ in range(MAX_TRIES):
            spec = FAMILIES[fam](r)
            names = [x for x in spec.names if x not in bad_names]
            if not names or (fam, json.dumps(spec.params, sort_keys=True)) in bad_keys:
                continue
            fname = r.choice(names)
            argnames: list[str] = []
            for pool in spec.args:
                argnames.append(r.choice([x for x in pool if x not in argnames and x != fname]))
            desc_i, frame_i, example_i = r.randrange(len(spec.descs)), r.randrange(len(FRAMES)), r.randrange(2)
            head = json.dumps([fam, spec.params, fname, argnames, desc_i, frame_i], sort_keys=True)
            if head in seen_heads:
                continue
            task = render(fam, spec, fname, argnames, desc_i, frame_i, example_i, _draw_inputs(spec, r))
            if task.problem in seen_problems:
                continue
            seen_heads.add(head)
            seen_problems.add(task.problem)
            out.append(task)
            break
        else:
            exhausted.add(fam)
    return out


# --- writers -----------------------------------------------------------------------------------
def to_record(task: Task) -> dict:
    """Magicoder OSS-Instruct record; `solution` is a markdown answer with a python block."""
    intro = INTROS[int(hashlib.sha1(task.task_id.encode()).hexdigest(), 16) % len(INTROS)]
    usage = "\n".join(task.tests[:2])
    answer = f"{intro}\n\n```python\n{task.solution}\n\n# Example usage\n{usage}\n```"
    return {"id": task.task_id, "problem": task.problem, "solution": answer, "lang": "python",
            "family": task.family}


def to_humaneval(task: Task, index: int | None = None) -> dict:
    """One line of an EvalPlus HumanEval+ file (the keys `evalplus.data.get_human_eval_plus` reads;
    `prompt + canonical_solution` is the complete reference program)."""
    checks = "".join(f"    {_assert('candidate', a, o)}\n"
                     for a, o in zip(task.base_inputs, run_reference(task, task.base_inputs)))
    return {
        "task_id": f"HumanEval/{index}" if index is not None else task.task_id,
        "prompt": task.signature_prompt,
        "entry_point": task.entry_point,
        "canonical_solution": task.body,
        "test": f"\n\nMETADATA = {{}}\n\n\ndef check(candidate):\n{checks}",
        "contract": "",
        "base_input": task.base_inputs,
        "plus_input": task.plus_inputs,
        "atol": 0,
    }


def task_to_dict(task: Task) -> dict:
    return asdict(task)


@dataclass
class TaskgenConfig(Params):
    """Options of `privcode make-data --params`: the config's data.taskgen section."""
    _what = "make-data"
    seed: int = 0
    records: int = 400    # Magicoder-format records (split later into private records and public prompts)
    benchmark: int = 40   # HumanEval+-format benchmark tasks

    def __post_init__(self):
        for f in ("records", "benchmark"):
            if getattr(self, f) < 0:
                raise PrivcodeError("must be >= 0", path=WHERE, field=f)


def main(argv=None) -> int:
    a = stage_parser("make-data", __doc__, {"out": ("output directory", Path)}, TaskgenConfig).parse_args(argv)
    c = parse_params(a.params, TaskgenConfig)
    bench = generate_tasks(c.seed, c.benchmark, salt="benchmark")
    records = generate_tasks(c.seed, c.records, exclude=bench, salt="records")
    write_jsonl(a.out / "records.jsonl", (to_record(t) for t in records))
    write_jsonl(a.out / "humaneval.jsonl", (to_humaneval(t, i) for i, t in enumerate(bench)))
    print(f"wrote {len(records)} records and {len(bench)} benchmark tasks "
          f"({len({t.family for t in bench})} families) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
