"""#16 items 5-6: every config section is validated before any job runs, `--config k=v` works on
the embedded default, δ is checked against N at prepare time, and bad values are one-line errors."""
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_records
from privcode.errors import PrivcodeError
from test_workflow import jobs, snakemake

SCHEMA = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
DEMO = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def _invalid(**patch):
    from snakemake.utils import validate

    cfg = copy.deepcopy(DEMO)
    for path, value in patch.items():
        d = cfg
        *head, last = path.split("__")
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    with pytest.raises(Exception) as e:
        validate(cfg, SCHEMA)
    return str(e.value)


@pytest.mark.parametrize("patch", [
    {"leakage__samplez": 3}, {"vuln__severty": "high"}, {"privacy__epsilons": [0]}, {"privacy__delta": 0},
    {"roundtrip__threshold": 1.5}, {"sweeps__tau": [-0.1]}, {"privacy__dataset_size": "secret"},
    {"privacy__dataset_size": 0}, {"exec_filter__accept_unisolatd": True}, {"leakage__samples": 0},
])
def test_schema_rejects_typos_and_out_of_range_values_in_every_section(patch):
    assert _invalid(**patch)


# A config section that mirrors a stage's options: (its option class, the keys the workflow itself reads
# (a schema default allowed there, equal to the class's where the stage has the field too), the fields
# the config does not set (the rule computes them, or only the command line gives them); None: the
# section lists a subset of the fields)
MIRRORS = {
    "definitions/train": ("privcode.train.TrainConfig", set(), None),
    "properties/leakage": ("privcode.evaluate.leakage.LeakageConfig", set(), {"prompt_format"}),
    "properties/vuln": ("privcode.evaluate.vuln.VulnConfig", {"enabled"}, {"prompt_format"}),
    "properties/generate": ("privcode.synth.generate.GenerateConfig", set(), {"prompt_format"}),
    "properties/exec_filter": ("privcode.filters.exec_filter.ExecFilterConfig", {"workers", "container_image"},
                               {"lang_field", "code_field"}),
    "properties/roundtrip": ("privcode.filters.roundtrip.RoundTripConfig", {"model", "threshold"},
                             {"prompt_format", "early_stop_threshold"}),
    "properties/evaluate": ("privcode.evaluate.run.EvalConfig", {"benchmarks", "overrides", "limits"},
                            {"prompt_format", "override"}),
    "properties/jft": ("privcode.data.mask.MaskConfig", set(), set()),
    "properties/data/properties/taskgen": ("privcode.data.taskgen.TaskgenConfig", set(), set()),
    # prepare-data takes prepare's keyword arguments; the rule adds privacy.delta and dataset_size
    "properties/data": ("privcode.data.records.prepare", {"source", "taskgen"}, {"delta", "dataset_size"}),
    "properties/canaries": ("privcode.data.canaries.InjectConfig", {"enabled"}, set()),
    # dp-finetune options (epsilon: one run per privacy.epsilons value); release reads the cap too
    "properties/privacy": ("privcode.train.TrainConfig", {"epsilons", "total_epsilon_cap"}, None),
}
# the schema defaults of keys only the workflow reads (no stage has them): written there alone
WORKFLOW_ONLY = {"methods", "privsa", "privsa/lambda_max", "privsa/lambda_min", "privsa/alpha", "privsa/interval",
                 "sweeps", "sweeps/tau", "sweeps/epsilon", "sweeps/lambda_max", "sweeps/ablations", "release",
                 "release/out", "release/artifacts", "canaries", "leakage", "vuln", "jft"}


def _option_class(path: str):
    import importlib

    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(mod), name)


def _defaults(target) -> dict:
    """An option class's fields with their defaults; a function's keyword-only arguments."""
    if not dataclasses.is_dataclass(target):
        import inspect

        return {p.name: p.default for p in inspect.signature(target).parameters.values() if p.kind is p.KEYWORD_ONLY}
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(target)}


@pytest.mark.parametrize("section", MIRRORS)
def test_schema_sections_are_checked_against_the_stage_options(section):
    """A section that mirrors a stage's options lists only its fields (exactly them, but what the rule
    sets) and writes no default of its own: what a config leaves out takes the dataclass's default,
    written once, there -- a value the schema section accepts. Only keys the workflow reads itself
    keep a schema default, the class's value where the stage has that option too."""
    import jsonschema

    cls, workflow_keys, not_in_config = MIRRORS[section]
    defaults = _defaults(_option_class(cls))
    spec = yaml.safe_load(Path(SCHEMA).read_text())
    for key in section.split("/"):
        spec = spec[key]
    assert spec.get("additionalProperties") is False
    props = {k: v for k, v in spec["properties"].items() if k in defaults or k not in workflow_keys}
    assert set(props) <= set(defaults), sorted(set(props) - set(defaults))
    if not_in_config is not None:
        assert set(props) == set(defaults) - not_in_config, sorted(set(props) ^ (set(defaults) - not_in_config))
    with_default = {k for k, v in spec["properties"].items() if "default" in v}
    assert with_default <= workflow_keys, sorted(with_default - workflow_keys)
    for k in with_default & set(defaults):  # read by the workflow and passed on: one value
        assert spec["properties"][k]["default"] == defaults[k], k
    required = set(spec.get("required", ()))  # a config must give these: the class's default is moot
    spec = {**{k: v for k, v in spec.items() if k != "required"}, "properties": props}
    jsonschema.validate({k: defaults[k] for k in props if k not in required}, spec)
    assert defaults.get("privsa_compile", False) is False
    assert defaults.get("compile_layers", False) is False


def _schema_defaults(spec: dict, path: str = "") -> dict:
    """Every default the schema writes: {"section/key": value}."""
    out = {}
    for k, v in spec.get("properties", {}).items():
        p = f"{path}/{k}" if path else k
        if "default" in v:
            out[p] = v["default"]
        out.update(_schema_defaults(v, p))
    return out


def test_every_schema_default_is_one_the_workflow_reads_and_the_workflow_does_not_repeat_it():
    """A schema default is written once: only for a key the workflow reads itself (a stage's option has
    its default in the stage's class), and no rule falls back to a value of its own with
    `.get("key", default)`: validation has filled it in before any rule runs."""
    spec = yaml.safe_load(Path(SCHEMA).read_text())
    found = _schema_defaults(spec)
    mirrored = {f"{section.replace('properties/', '')}/{k}" for section, (_, keys, _) in MIRRORS.items()
                for k in keys}
    assert set(found) - WORKFLOW_ONLY - mirrored == set()
    assert {"exec_filter/workers", "release/out", "privsa/lambda_max", "canaries/enabled"} <= set(found)
    rules = "\n".join(f.read_text() for f in (REPO / "workflow").rglob("*") if f.suffix == ".smk" or f.name == "Snakefile")
    repeated = sorted(p for p in found if f'.get("{p.rsplit("/", 1)[-1]}"' in rules)
    assert not repeated, repeated


def test_a_models_entry_is_build_model_options_but_its_prompt_format_and_stage_keys():
    """rule build_model passes a model's entry (but prompt_format and dp_finetune) as `privcode
    build-model --params`: every other key the schema allows there is a BuildConfig field."""
    spec = yaml.safe_load(Path(SCHEMA).read_text())["properties"]["models"]["additionalProperties"]
    build = _defaults(_option_class("privcode.build_model.BuildConfig"))
    assert set(spec["properties"]) - {"prompt_format", "dp_finetune"} <= set(build)
    assert set(spec["properties"]["source"]["enum"]) - {"hf"} == set(_option_class("privcode.build_model.SOURCES"))


# the commands whose --params a rule builds from a config section (or a model's entry), and their options
PLANNED = {"build-model": "privcode.build_model.BuildConfig", "make-data": "privcode.data.taskgen.TaskgenConfig",
           "mask-pii": "privcode.data.mask.MaskConfig", "generate": "privcode.synth.generate.GenerateConfig",
           "exec-filter": "privcode.filters.exec_filter.ExecFilterConfig",
           "roundtrip-filter": "privcode.filters.roundtrip.RoundTripConfig",
           "evaluate": "privcode.evaluate.run.EvalConfig", "prepare-data": "privcode.data.records.prepare",
           "inject-canaries": "privcode.data.canaries.InjectConfig"}


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/gpu-small.yaml", "tests/configs/tiny.yaml"])
def test_every_planned_params_is_accepted_by_its_stage(configfile):
    """What a dry run would pass these stages (their sections without schema defaults, a model's entry)
    is read by the stage's own option class, with the config's values and the class's defaults."""
    from privcode.params import parse_params

    cfg = yaml.safe_load((REPO / configfile).read_text())
    out = snakemake("-n", "-p", "--forceall", "--configfile", configfile)
    seen = {}
    for cmd, params in re.findall(r"privcode (?!gpu-run)([\w-]+) [^\n]*?--params '(\{.*?\})'", out):
        if cmd in PLANNED:
            target = _option_class(PLANNED[cmd])
            seen[cmd] = parse_params(params, target, **({} if dataclasses.is_dataclass(target) else {"skip": 3}))
    assert set(seen) == set(PLANNED) - ({"make-data"} if cfg["data"]["source"] != "taskgen" else set()) \
        - ({"inject-canaries"} if not cfg.get("canaries", {}).get("enabled") else set())
    privacy = {k: cfg["privacy"][k] for k in ("delta", "dataset_size")}
    assert seen["prepare-data"] == {**{k: v for k, v in cfg["data"].items() if k not in ("source", "taskgen")},
                                    **privacy}  # what the config leaves out: prepare's defaults
    taskgen = cfg["data"].get("taskgen", {})
    assert dataclasses.asdict(seen["make-data"]) == {**_defaults(type(seen["make-data"])), **taskgen}
    assert seen["mask-pii"].detector == cfg["jft"]["detector"]
    gen = {**_defaults(type(seen["generate"])), **cfg["generate"]}
    assert {k: getattr(seen["generate"], k) for k in gen if k != "prompt_format"} == \
        {k: v for k, v in gen.items() if k != "prompt_format"}


def test_config_alone_applies_on_top_of_the_embedded_default():
    out = snakemake("-n", "--config", "junior=smollm2", "methods=[PreCode]")
    assert jobs(out)  # before: "'models' is a required property"


def test_delta_is_checked_against_n_when_the_data_is_prepared(tmp_path):
    from privcode.data.records import prepare

    src = write_records(tmp_path / "all.jsonl", 10)
    with pytest.raises(PrivcodeError, match="privacy.delta"):
        prepare(str(src), tmp_path / "private" / "p", tmp_path / "pub", private_fraction=0.5, delta=0.3,
                dataset_size="public")
    with pytest.raises(PrivcodeError, match="declared"):
        prepare(str(src), tmp_path / "private" / "p", tmp_path / "pub", private_fraction=0.5, delta=0.05,
                dataset_size=100)
    assert not (tmp_path / "private" / "p").exists()


def _cli(*args, **env):
    e = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "privcode.cli", *args], capture_output=True, text=True, env=e)


def test_offline_hub_model_and_bad_epsilon_are_one_line_errors(tmp_path, private_data):
    p = _cli("dp-finetune", "--model", "privcode-test/no-such-model", "--data", str(private_data),
             "--out", str(tmp_path / "o"), "--params", json.dumps({"epsilon": 4, "delta": 1e-5, "steps": 1,
                                                                    "dataset_size": "public"}))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "cannot reach the Hugging Face hub for model 'privcode-test/no-such-model'" in p.stderr
    assert "models.<name>.name" in p.stderr
    for eps in (0, -1):
        p = _cli("dp-finetune", "--model", "privcode-test/x", "--data", str(private_data), "--out",
                 str(tmp_path / "o"), "--params", json.dumps({"epsilon": eps, "delta": 1e-5, "steps": 1,
                                                              "dataset_size": "public"}))
        assert p.returncode == 2 and "Traceback" not in p.stderr and "epsilon" in p.stderr, p.stderr[-2000:]
    assert len([ln for ln in p.stderr.splitlines() if "error" in ln]) == 1
