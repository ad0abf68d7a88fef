"""The generation backend interface: `Backend`, `SamplingParams`, `cut_at_stop` (the backends and
their factory `privcode.synth.get_backend` import this module, never the other way round).

A backend turns rendered prompts into completions. Greedy when temperature == 0; with
temperature > 0 it draws `n` samples per prompt, each prompt from its own random stream
(`SamplingParams.streams`; privcode.synth.calls feeds a stage's prompts in calls). It never sees
private data: stages feed it public prompts (generate, evaluate) or already-DP outputs (round trip).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0   # 0: greedy (EvalPlus pass@1 protocol)
    top_p: float = 1.0
    n: int = 1                 # samples per prompt (round trip: paper n=20)
    seed: int = 0
    stop: tuple[str, ...] = ()  # a completion ends before the first of these strings (EvalPlus: "```")
    # the random stream of each prompt of the call (default: its position in the call): stages pass each
    # prompt's index in the whole input, so no two prompts of a run share a stream, however it is cut
    # into calls (fast: sample j of prompt i draws from (seed, streams[i] * n + j); hf, vllm: seeds)
    streams: tuple[int, ...] | None = None


def cut_at_stop(text: str, stop) -> str:
    """`text` up to (without) the earliest occurrence of any stop string: what every backend returns, so
    stopping early (hf, vllm) and cutting afterwards (fast) give the same completion."""
    ends = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(ends)] if ends else text


class Backend:
    name = "base"

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        """One list of `params.n` completions (without the prompt) per prompt, in order."""
        raise NotImplementedError
