"""Prompt formats and code extraction, shared by training, generation and evaluation.

The default `qa` format is PrivCode's own ("Question: ...\\n\\nAnswer:"); `chat` uses the
tokenizer's chat template (for instruct models such as SmolLM2-Instruct or Llama-3.1-Instruct).
"""
from __future__ import annotations

import re

from privcode.langs import names_of

FORMATS = ("qa", "chat")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def render_prompt(problem: str, fmt: str = "qa", tokenizer=None) -> str:
    """The text a model is conditioned on for `problem` (no answer)."""
    if fmt == "qa":
        return f"Question: {problem}\n\nAnswer:"
    if fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt format 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown prompt format '{fmt}' (choose from {FORMATS})")


def render_example(problem: str, solution: str, fmt: str = "qa", tokenizer=None) -> tuple[str, str]:
    """(prompt, answer) for training: the loss is taken on the answer tokens only."""
    prompt = render_prompt(problem, fmt, tokenizer)
    answer = (" " if fmt == "qa" else "") + solution.strip()
    return prompt, answer


def extract_code(text: str, lang: str = "python") -> str | None:
    """The code of the first fenced block in `text` whose tag matches `lang` (else the first
    untagged/other block). Without any fence, the whole text if it looks like code for Python
    (it compiles), else None."""
    if text is None:
        return None
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
    want = names_of(lang)
    for tag, body in blocks:
        if tag in want and body.strip():
            return body.rstrip() + "\n"
    for tag, body in blocks:
        if body.strip():
            return body.rstrip() + "\n"
    if lang == "python" and text.strip():
        try:
            compile(text, "<generated>", "exec")
            return text.strip() + "\n"
        except (SyntaxError, ValueError):
            return None
    return None


# --- round trip (PrivCode's "describe the program" prompt) -----------------------------------
DESCRIBE_TEMPLATE = (
    "The following code is a solution to a natural language programming problem. "
    "Please describe the problem into the format **You are tasked with [full described problem] [END]** "
    "according to the given solution:\nGiven solution:\n{code}\nDescribed problem:\n"
)
_DESCRIPTION = re.compile(r"You are tasked with\s+(.+?)\s*(?:\[END\]|\Z)", re.S)


def describe_prompt(code: str) -> str:
    return DESCRIBE_TEMPLATE.format(code=code.strip())


def parse_description(text: str) -> str | None:
    """'You are tasked with ...' up to [END] (or the end of the text); None if absent/empty."""
    m = _DESCRIPTION.search(text or "")
    if not m:
        return None
    body = m.group(1).strip().strip("*").strip()
    return f"You are tasked with {body}" if body else None


def described(problem: str) -> str:
    """The ideal answer to describe_prompt: used to pre-train the tiny test model on public data."""
    return f"**You are tasked with {problem} [END]**"
