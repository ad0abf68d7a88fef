"""A pipeline config as the workflow sees it, for code outside the workflow (benches, planners).

    from privcode.config import load_config, stage_options
    cfg = load_config("config/paper.yaml")                  # checked, the schema's defaults filled in
    rt = stage_options(RoundTripConfig, cfg["roundtrip"])   # the section + RoundTripConfig's defaults

`load_config` does what workflow/Snakefile does with a `--configfile`: the YAML file alone (not
merged with config/config.yaml), validated against workflow/schemas/config.schema.yaml by
Snakemake's own `validate`, which fills in the schema's defaults (the keys only the workflow
reads); where Snakemake is not installed (a GPU machine running benches), the same check and defaults
with jsonschema alone. A stage's options are not defaulted there: their defaults live in the stage's option
class, and `stage_options` builds that class from the config's sections.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from privcode.errors import PrivcodeError

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(path) -> dict:
    """The config at `path`, validated as the workflow validates it, with the schema's defaults."""
    import yaml

    if not SCHEMA.is_file():
        raise PrivcodeError("the workflow's config schema is missing (it comes with a source checkout)",
                            path=SCHEMA)
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PrivcodeError(f"cannot read the config: {e}".splitlines()[0], path=path) from None
    try:
        import snakemake.utils  # noqa: F401 - the workflow's own validation where the workflow is installed
    except ImportError:   # a machine with privcode but not the workflow engine (a GPU box running benches)
        return validate_with_jsonschema(cfg, path)
    return validate_with_snakemake(cfg, path)


def _error(err, path):
    key = ".".join(str(k) for k in err.absolute_path)
    return PrivcodeError(err.message, path=path, field=key or None)


def validate_with_snakemake(cfg, path) -> dict:
    """`cfg` checked by snakemake.utils.validate against the schema, its defaults filled in (in place)."""
    import jsonschema
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(cfg, str(SCHEMA))
    except WorkflowError as e:
        err = e.__context__  # Snakemake wraps the schema's ValidationError
        if not isinstance(err, jsonschema.ValidationError):
            raise PrivcodeError(str(e).splitlines()[0], path=path) from None
        raise _error(err, path) from None
    return cfg


def validate_with_jsonschema(cfg, path) -> dict:
    """What validate_with_snakemake does, with jsonschema alone: Draft 2020-12, and each `properties`
    keyword first sets its missing keys' defaults (jsonschema's documented recipe, the one Snakemake uses)."""
    import jsonschema
    import yaml
    from jsonschema import Draft202012Validator, validators

    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    props = Draft202012Validator.VALIDATORS["properties"]

    def with_defaults(validator, properties, instance, sch):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, sub["default"])
        yield from props(validator, properties, instance, sch)

    try:
        validators.extend(Draft202012Validator, {"properties": with_defaults})(schema).validate(cfg)
    except jsonschema.ValidationError as err:
        raise _error(err, path) from None
    return cfg


def stage_options(cls, *sections: dict):
    """`cls` (a stage's Params dataclass) from config sections, later ones winning (e.g. dp_finetune,
    then the model's own dp_finetune keys); a section's keys that are not `cls` fields are the
    workflow's (benchmarks, workers, model...) and are left out; what no section gives: `cls`'s default."""
    names = {f.name for f in fields(cls)}
    return cls.from_dict({k: v for s in sections for k, v in s.items() if k in names}, "config")
