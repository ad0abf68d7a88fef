"""Stage 2: merge a LoRA adapter into its base weights (post-processing: keeps the adapter's ε).

    privcode merge --base results/models/smollm2/base --adapter results/dp/smollm2/privsa/eps4/adapter \
        --out results/dp/smollm2/privsa/eps4/model
"""
from __future__ import annotations

from pathlib import Path

from privcode.errors import PrivcodeError
from privcode.io import atomic_dir
from privcode.params import stage_parser


def merge(base: str, adapter: str, out: Path, dtype: str = "float32") -> None:
    from peft import PeftModel

    from privcode import ledger
    from privcode.models import load_model, load_tokenizer

    if not (Path(adapter) / "adapter_config.json").exists():
        raise PrivcodeError("not a LoRA adapter directory (no adapter_config.json)", path=adapter)
    model = load_model(base, dtype=dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tok = load_tokenizer(base)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        ledger.derive(tmp, stage="merge", parents=[adapter] + ledger.model_parents(base))


def main(argv=None) -> None:
    ap = stage_parser("merge", __doc__, {"base": "base model: hub name or local directory",
                                         "adapter": "LoRA adapter directory", "out": ("output directory", Path)})
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    merge(a.base, a.adapter, a.out, a.dtype)
