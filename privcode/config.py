"""A pipeline config as the workflow sees it, for code outside the workflow (benches, planners).

    from privcode.config import load_config, stage_options
    cfg = load_config("config/paper.yaml")                  # checked, the schema's defaults filled in
    rt = stage_options(RoundTripConfig, cfg["roundtrip"])   # the section + RoundTripConfig's defaults

`load_config` does what workflow/Snakefile does with a `--configfile`: the YAML file alone (not
merged with config/config.yaml), validated against workflow/schemas/config.schema.yaml by
Snakemake's own `validate`, which fills in the schema's defaults (the keys only the workflow
reads). A stage's options are not defaulted there: their defaults live in the stage's option
class, and `stage_options` builds that class from the config's sections.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from privcode.errors import PrivcodeError

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def load_config(path) -> dict:
    """The config at `path`, validated as the workflow validates it, with the schema's defaults."""
    import jsonschema
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    if not SCHEMA.is_file():
        raise PrivcodeError("the workflow's config schema is missing (it comes with a source checkout)",
                            path=SCHEMA)
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PrivcodeError(f"cannot read the config: {e}".splitlines()[0], path=path) from None
    try:
        validate(cfg, str(SCHEMA))
    except WorkflowError as e:
        err = e.__context__  # Snakemake wraps the schema's ValidationError
        if not isinstance(err, jsonschema.ValidationError):
            raise PrivcodeError(str(e).splitlines()[0], path=path) from None
        key = ".".join(str(k) for k in err.absolute_path)
        raise PrivcodeError(err.message, path=path, field=key or None) from None
    return cfg


def stage_options(cls, *sections: dict):
    """`cls` (a stage's Params dataclass) from config sections, later ones winning (e.g. dp_finetune,
    then the model's own dp_finetune keys); a section's keys that are not `cls` fields are the
    workflow's (benchmarks, workers, model...) and are left out; what no section gives: `cls`'s default."""
    names = {f.name for f in fields(cls)}
    return cls.from_dict({k: v for s in sections for k, v in s.items() if k in names}, "config")
