"""vLLM backend, selectable where vLLM is installed (GPU machines). Not installed by default.
Each prompt samples with its own seed, seed + its stream index (SamplingParams.streams, default its
position): vLLM seeds a generator per request, so one seed for every prompt would give them all one stream."""
from __future__ import annotations

from privcode.synth.base import Backend, SamplingParams, cut_at_stop


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model_ref: str, dtype: str = "bfloat16"):
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("generation backend 'vllm' needs `pip install vllm`") from e
        import torch

        self.llm = LLM(model=model_ref, dtype=dtype, tensor_parallel_size=max(1, torch.cuda.device_count()))
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts, params: SamplingParams, progress=None):
        from vllm import SamplingParams as VSP

        streams = range(len(prompts)) if params.streams is None else params.streams
        sps = [VSP(n=params.n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                   seed=params.seed + s, stop=list(params.stop) or None) for s in streams]
        outs = self.llm.generate(prompts, sps)
        if progress is not None:
            progress(len(prompts))
        return [[cut_at_stop(o.text, params.stop) for o in r.outputs] for r in outs]
