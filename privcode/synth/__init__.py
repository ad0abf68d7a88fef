"""Generation backends: one interface (privcode.synth.base), one file per backend, and `get_backend`.

    from privcode.synth import SamplingParams, get_backend
    backend = get_backend("auto", "results/models/tiny/base", batch_size=16)
    backend.generate(["Question: Add two numbers.\n\nAnswer:"], SamplingParams(max_new_tokens=64))
    backend = get_backend("fast", "results/models/tiny/base", compile_layers=True)   # GPU jobs of many steps
"""
from __future__ import annotations

import logging

from privcode.errors import PrivcodeError
from privcode.synth.base import Backend, SamplingParams, cut_at_stop
from privcode.synth.calls import check_batch_size

__all__ = ["Backend", "SamplingParams", "cut_at_stop", "get_backend"]
log = logging.getLogger(__name__)


def get_backend(name: str, model_ref: str, *, batch_size: int = 16, dtype: str = "float32",
                compile_layers: bool = False) -> Backend:
    """hf: plain batched transformers; fast: static KV cache + CUDA graphs (privcode.synth.fast);
    vllm: vLLM when installed; auto: vLLM, else fast on a GPU, else hf. `compile_layers` (fast only:
    torch.compile of the decoder layers, shared by all of them) is refused by the others, auto's choice included.
    `batch_size` 0 lets the backend size its batches: fast from the free GPU memory (CPU_AUTO_ROWS without
    one), vllm its own; auto without a GPU takes hf at CPU_AUTO_ROWS rows; hf named as such refuses it."""
    asked = name
    if name == "auto":
        import torch

        if torch.cuda.is_available():
            try:
                import vllm  # noqa: F401

                name = "vllm"
            except ImportError:
                name = "fast"
        else:
            name = "hf"
    chose = " (what backend auto chose here)" if asked == "auto" else ""
    if asked == "auto" and name == "hf" and type(batch_size) is int and batch_size == 0:
        from privcode.synth.fast import CPU_AUTO_ROWS  # no GPU to size from: the rows fast takes without one

        log.info("backend auto chose hf (no GPU): batch_size 0 -> %d rows", CPU_AUTO_ROWS)
        batch_size = CPU_AUTO_ROWS
    check_batch_size(name, batch_size, chose)
    if compile_layers and name != "fast":
        raise PrivcodeError(f"true needs backend fast; backend '{name}'{chose} has no compiled decoder layers: "
                            "set compile_layers: false or backend: fast", field="compile_layers")
    if name == "fast":
        from privcode.synth.fast import FastHFBackend

        return FastHFBackend(model_ref, batch_size=batch_size, dtype=dtype, compile_layers=compile_layers)
    if name in ("hf", "transformers"):
        from privcode.synth.hf import HFBackend

        return HFBackend(model_ref, batch_size=batch_size, dtype=dtype)
    if name == "vllm":
        from privcode.synth.vllm_backend import VLLMBackend

        return VLLMBackend(model_ref, dtype=dtype)
    raise ValueError(f"unknown generation backend '{name}' (auto, hf, fast, vllm)")
