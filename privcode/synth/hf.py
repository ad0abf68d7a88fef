"""transformers backend: batched `generate`, prompts sorted by length, stop on EOS (and on
`SamplingParams.stop` strings) per row; a batch ends when all its rows have stopped. A sampled batch
draws from torch's stream seeded with seed + the stream index of its first prompt (SamplingParams.streams,
default its position), so batches of one stage run never share a seed; its draws depend on the batch."""
from __future__ import annotations

import torch

from privcode.synth.base import Backend, SamplingParams, cut_at_stop


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model_ref: str, batch_size: int = 16, dtype: str = "float32"):
        from privcode.models import default_device, load_model, load_tokenizer

        self.device = default_device()
        self.tok = load_tokenizer(model_ref, padding_side="left")
        self.model = load_model(model_ref, dtype=dtype, device=self.device).eval()
        self.batch_size = batch_size

    @property
    def tokenizer(self):
        return self.tok

    @torch.inference_mode()
    def generate(self, prompts: list[str], params: SamplingParams, progress=None) -> list[list[str]]:
        out: list[list[str] | None] = [None] * len(prompts)
        lens = [len(self.tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -lens[i])  # similar lengths -> less padding
        bs = max(1, self.batch_size // max(1, params.n))
        streams = list(range(len(prompts))) if params.streams is None else list(params.streams)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            enc = self.tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(self.device)
            kw = dict(max_new_tokens=params.max_new_tokens, pad_token_id=self.tok.pad_token_id,
                      eos_token_id=self.tok.eos_token_id)
            if params.stop:  # transformers' StopStringCriteria: a row stops once its text holds a stop string
                kw.update(stop_strings=list(params.stop), tokenizer=self.tok)
            if params.temperature > 0:
                torch.manual_seed(params.seed + streams[idx[0]])
                kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          num_return_sequences=params.n)
            else:
                kw.update(do_sample=False, num_return_sequences=1, temperature=None, top_p=None, top_k=None)
            gen = self.model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:]
            texts = [cut_at_stop(t, params.stop) for t in self.tok.batch_decode(gen, skip_special_tokens=True)]
            k = params.n if params.temperature > 0 else 1
            for j, i in enumerate(idx):
                out[i] = texts[j * k:(j + 1) * k]
            if progress is not None:
                progress(len(idx))
        return out  # type: ignore[return-value]
