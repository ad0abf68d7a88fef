"""Model references: load any model or tokenizer by hub name or local path.

    model, tok = load_model("results/models/tiny/base", device="cpu"), load_tokenizer("results/models/tiny/base")

Every stage loads a model with `from_pretrained(ref)`, where `ref` is a Hugging Face hub name (paper
config) or a local directory (the demo's models, built once by `privcode build-model`:
privcode.build_model) — the same code path.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from privcode.errors import PrivcodeError


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


def package_dir(package: str) -> Path:
    """The directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)  # do not import: the package may need extra deps
    if spec is None or not spec.submodule_search_locations:
        raise PrivcodeError(f"Python package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_package_path(ref: str) -> str:
    """'pkg:NAME/sub/path' -> the path inside an installed package; anything else unchanged."""
    if not ref.startswith("pkg:"):
        return ref
    name, _, sub = ref[4:].partition("/")
    p = package_dir(name) / sub
    if not p.exists():
        raise PrivcodeError(f"'{sub}' not found inside package '{name}'", path=p)
    return str(p)
