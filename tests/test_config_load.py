"""privcode.config.load_config: the workflow's validation (snakemake.utils.validate) and, where Snakemake is
not installed, jsonschema alone with the same defaults: both give the same config for every shipped config
and the same error for a bad one."""
import copy
from pathlib import Path

import pytest
import yaml

from privcode.config import SCHEMA, validate_with_jsonschema, validate_with_snakemake
from privcode.errors import PrivcodeError

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("config/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_both_validations_fill_the_same_defaults(path):
    raw = yaml.safe_load(path.read_text())
    a, b = validate_with_snakemake(copy.deepcopy(raw), path), validate_with_jsonschema(copy.deepcopy(raw), path)
    assert a == b


def test_both_validations_fill_defaults_at_every_level():
    """Keys with schema defaults left out, top-level and nested: both fill the same values in (a validation
    that filled none would pass the equality above for configs that spell every key out)."""
    schema = yaml.safe_load(SCHEMA.read_text())
    raw = yaml.safe_load(CONFIGS[0].read_text())
    req = set(schema.get("required", []))
    dropped = [k for k, sub in schema["properties"].items() if "default" in sub and k in raw and k not in req]
    nested = [(k, n) for k, sub in schema["properties"].items() if isinstance(raw.get(k), dict)
              for n, s in sub.get("properties", {}).items()
              if "default" in s and n in raw[k] and n not in sub.get("required", [])]
    assert dropped and nested
    for k in dropped:
        del raw[k]
    for k, n in nested:
        raw.get(k, {}).pop(n, None)
    a, b = validate_with_snakemake(copy.deepcopy(raw), "x"), validate_with_jsonschema(copy.deepcopy(raw), "x")
    assert a == b
    assert all(k in a for k in dropped) and all(n in a[k] for k, n in nested if k in a)


@pytest.mark.parametrize("validate", [validate_with_snakemake, validate_with_jsonschema])
def test_a_bad_value_is_one_error_naming_its_key(validate):
    raw = yaml.safe_load(CONFIGS[0].read_text())
    raw["roundtrip"]["n"] = "twenty"
    with pytest.raises(PrivcodeError) as e:
        validate(raw, CONFIGS[0])
    assert "roundtrip.n" in str(e.value) and CONFIGS[0].name in str(e.value)


def test_load_config_without_snakemake_gives_the_same_config(monkeypatch):
    """On a machine without the workflow engine (sys.modules entries of None make its import fail)."""
    import sys

    from privcode.config import load_config

    want = load_config(CONFIGS[-1])
    for name in [m for m in sys.modules if m == "snakemake" or m.startswith("snakemake.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "snakemake", None)
    monkeypatch.setitem(sys.modules, "snakemake.utils", None)
    assert load_config(CONFIGS[-1]) == want
