"""How a stage feeds a generation backend: how many prompts per call, each prompt's random stream, and
a checkpoint after every call (generate, the round trip and evaluate use it).

    sp = SamplingParams(max_new_tokens=200, temperature=0.8, n=20, seed=0)
    for start, texts in in_calls(backend, prompts, sp, batch_size=0, streams=index, progress=bar.update):
        for rec, t in zip(todo[start:start + len(texts)], texts):
            done.add({...})  # the stage's progress file: a killed run resumes after the last call

Calls. What a call returns is written to the stage's progress file, so a call is the unit a killed run
redoes. A backend that refills finished rows inside a call (fast with continuous batching, vllm) keeps
its batch full until the call's prompts run out; its last rows then run alone, so its calls hold
CALL_BATCHES batches' worth of sequences. For the others (hf: batch after batch) a call is only a
checkpoint: CHECKPOINT_BATCHES batches. A batch is `batch_size` rows (sequences: n per prompt when
sampling); `batch_size` 0 lets the fast backend size it from the free GPU memory for the longest prompt
of the stage's input (`FastHFBackend.rows`, CPU_AUTO_ROWS without a GPU), vllm sizes its own batches
(a call then holds CALL_BATCHES * SELF_SIZED_ROWS sequences), and hf refuses it (`check_batch_size`)
unless backend auto chose hf for want of a GPU (it then decodes CPU_AUTO_ROWS rows: `get_backend`).

Streams. `streams[i]` is prompt i's index in the stage's whole input (not in the call): it goes to the
backend as `SamplingParams.streams`, so no two prompts of a run, in one call or in different calls,
shards or rounds of different seeds, share a random stream, and with the fast backend (whose streams do
not depend on the batch) a stage's outputs for a seed do not depend on how its input is cut into calls,
on resuming or on sharding.
"""
from __future__ import annotations

from dataclasses import replace

from privcode.errors import PrivcodeError

CALL_BATCHES = 8         # backends that refill finished rows: batches' worth of sequences per call
CHECKPOINT_BATCHES = 2   # the others: a call is a checkpoint
SELF_SIZED_ROWS = 256    # batch_size 0 on vllm (it sizes its batches itself): rows per batch for the call size


def check_batch_size(backend: str, batch_size, chose: str = "") -> None:
    """One PrivcodeError (field batch_size) unless batch_size is an integer >= 1, or 0 with a backend
    that sizes its batches (fast, vllm). `chose`: why the backend is this one (auto's choice)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
        raise PrivcodeError(f"must be an integer >= 0 (0: rows from the free GPU memory, backend fast), got "
                            f"{batch_size!r}", field="batch_size")
    if batch_size == 0 and backend not in ("fast", "vllm"):
        raise PrivcodeError(f"0 (rows from the free GPU memory) needs backend fast (or vllm, which sizes its own "
                            f"batches); backend '{backend}'{chose} decodes a fixed number of rows: set batch_size to "
                            "a row count (e.g. 16) or backend: fast", field="batch_size")


def refills(backend) -> bool:
    """Whether `backend` refills finished rows within a call (so a call's end costs a partial batch)."""
    name = getattr(backend, "name", "")
    return name == "vllm" or (name == "fast" and getattr(backend, "continuous", False))


def batch_rows(backend, prompts: list[str], params, batch_size: int) -> int:
    """Rows of one batch: the backend's own batch_size (fast, hf; else `batch_size`), or when that is 0
    what the backend sizes for the longest of `prompts`."""
    rows = getattr(backend, "batch_size", batch_size)
    if rows > 0:
        return rows
    name = getattr(backend, "name", "")
    check_batch_size(name or type(backend).__name__, rows)
    if name == "vllm":
        return SELF_SIZED_ROWS
    tok = backend.tokenizer
    longest = max(len(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"])
    return backend.rows(max(1, longest), params)


def call_size(backend, prompts: list[str], params, batch_size: int) -> int:
    """Prompts per call for these `prompts` (see the module docstring)."""
    k = params.n if params.temperature > 0 else 1
    batches = CALL_BATCHES if refills(backend) else CHECKPOINT_BATCHES
    return batches * max(1, batch_rows(backend, prompts, params, batch_size) // k)


def in_calls(backend, prompts: list[str], params, *, batch_size: int, streams: list[int], progress=None,
             size: int | None = None):
    """backend.generate over `prompts` in calls of `size` (default call_size) prompts, prompt i with
    random stream streams[i]: yields (index of the call's first prompt, its list of texts per prompt)."""
    if len(streams) != len(prompts):
        raise ValueError(f"{len(streams)} stream indices for {len(prompts)} prompts")
    if not prompts:
        return
    size = size or call_size(backend, prompts, params, batch_size)
    for s in range(0, len(prompts), size):
        part = prompts[s:s + size]
        texts = backend.generate(part, replace(params, streams=tuple(streams[s:s + size])), progress=progress)
        if len(texts) != len(part):
            raise RuntimeError(f"backend returned {len(texts)} results for {len(part)} prompts")
        yield s, texts
