"""#16 items 5-6: every config section is validated before any job runs, `--config k=v` works on
the embedded default, δ is checked against N at prepare time, and bad values are one-line errors."""
import copy
import dataclasses
import json
import os
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


@pytest.mark.parametrize("section,cls", [("definitions/train", "privcode.train.TrainConfig"),
                                          ("properties/leakage", "privcode.evaluate.leakage.LeakageConfig"),
                                          ("properties/vuln", "privcode.evaluate.vuln.VulnConfig")])
def test_schema_sections_are_checked_against_the_stage_options(section, cls):
    """A section that mirrors a stage's options lists only its fields (leakage and vuln: exactly them;
    prompt_format comes from the model) and writes no default of its own: what a config leaves out
    takes the dataclass's default, written once, there -- a value the schema section accepts."""
    import importlib

    import jsonschema

    mod, name = cls.rsplit(".", 1)
    fields = {f.name: f for f in dataclasses.fields(getattr(importlib.import_module(mod), name))}
    where, key = section.split("/")
    spec = yaml.safe_load(Path(SCHEMA).read_text())[where][key]
    props = {k: v for k, v in spec["properties"].items() if k != "enabled"}  # vuln.enabled: the workflow's
    assert set(props) <= set(fields), sorted(set(props) - set(fields))
    if where == "properties":
        assert set(props) == set(fields) - {"prompt_format"}
    assert [k for k, v in props.items() if "default" in v] == []
    defaults = {k: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for k, f in fields.items() if k in props}
    jsonschema.validate(defaults, {**spec, "properties": props})
    assert defaults.get("privsa_compile", False) is False


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
