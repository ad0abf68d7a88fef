"""The Snakemake workflow: configs validate, both configs and the slurm profile dry-run, lint."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CONFIGS = sorted((REPO / "config").glob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))


def snakemake_run(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    env.pop("PRIVCODE_ZONE", None)  # the workflow's zone is private/ in its working directory
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, capture_output=True, text=True)


def snakemake(*args, cwd=REPO, check=True):
    p = snakemake_run(*args, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p.stdout + p.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    from snakemake.utils import validate

    cfg = yaml.safe_load(path.read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    for role in [cfg["junior"], cfg["roundtrip"]["model"], *cfg["premium"]]:
        assert role in cfg["models"], f"{path.name}: '{role}' is not a key of models"


def test_schema_rejects_bad_config():
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["privacy"]["delta"] = 2
    with pytest.raises(Exception, match="delta|maximum"):
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def jobs(out: str) -> dict:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = out.split("Job stats:")[1].splitlines()[3:]
    res = {}
    for ln in lines:
        parts = ln.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        res[parts[0]] = int(parts[1])
    return res


def test_dry_run_demo_config():
    out = snakemake("-n", "--forceall")
    j = jobs(out)
    # DP runs: junior with PrivSA (PrivCode), premium with plain DP-SGD (DPFT), JFT's DP stage
    assert j["dp_finetune"] == 3 and j["finetune"] == 4  # NonDPFT, JFTmask, PrivCode, PrivCode at τ'
    # 6 evaluated models (5 methods + PrivCode at τ') x 2 benchmarks (generated, first 10 real HumanEval)
    assert j["evaluate"] == 6 * 2 and j["leakage"] == 5 and j["vuln"] == 5 and j["rethreshold"] == 1
    for rule in ("table3", "table4", "table5", "vulntable", "figures", "inject_canaries", "mask_pii"):
        assert j[rule] == 1, rule


def test_dry_run_paper_config_plans_full_grid():
    out = snakemake("-n", "results/table3.csv", "--configfile", "config/paper.yaml")
    j = jobs(out)
    # 4 premium models x 5 methods x 6 benchmarks; DP runs: junior + 4 DPFT + 4 JFT
    assert j["evaluate"] == 4 * 5 * 6 and j["dp_finetune"] == 9 and j["finetune"] == 12
    assert "build_model" not in j and "make_data" not in j  # hub names: nothing to build, no network
    assert "torchrun --standalone --nproc_per_node 4" in out


def test_models_own_dp_finetune_memory_knobs_reach_their_runs_only():
    """models.<name>.dp_finetune (paper.yaml: the 1.5B junior) overrides the section's memory knobs
    for that model's DP runs; the premium models' DPFT/JFT runs keep the section's."""
    out = snakemake("-n", "-p", "--forceall", "results/table3.csv", "--configfile", "config/paper.yaml")
    runs = {}
    for m in re.finditer(r"dp-finetune --model (\S+) .*?--out results/dp/([^/]+)/(\S+?)/eps\S+ --private-dir \S+ "
                         r"--params '(\{.*?\})'", out):
        runs[(m.group(2), m.group(3))] = json.loads(m.group(4))
    assert len(runs) == 9, sorted(runs)
    for (model, variant), p in runs.items():
        want = (256, 24576) if model == "qwen-coder-1.5b" else (64, 8192)
        assert (p["micro_batch_size"], p["micro_batch_tokens"]) == want, (model, variant)
        assert p["steps"] == 100 and p["batch_size"] == 256  # nothing else moves


def test_model_memory_knobs_are_the_only_keys_a_model_may_set():
    from snakemake.utils import validate

    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg["models"]["qwen-coder-1.5b"]["dp_finetune"]["noise_multiplier"] = 0.1
    with pytest.raises(Exception, match="noise_multiplier|Additional properties"):
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_slurm_profile_dry_run_requests_gpus():
    out = snakemake("-n", "results/table3.csv", "--configfile", "config/paper.yaml",
                    "--profile", "workflow/profiles/slurm")
    assert "gpu=1" in out and "gpu=4" in out


def test_lint_clean():
    out = snakemake("--lint")
    assert "Congratulations, your workflow is in a good condition!" in out


def test_dry_run_paper_sweeps_and_tables():
    out = snakemake("-n", "--configfile", "config/paper.yaml")
    j = jobs(out)
    # τ sweep re-uses the round-trip scores (3 rethresholds, no new generation per τ);
    # ε sweep: 3 more junior DP runs + synthesis; λmax sweep: 3 more junior DP runs + synthesis
    assert j["rethreshold"] == 3 and j["generate"] == 1 + 3 + 3
    assert j["table5"] == j["vulntable"] == j["figures"] == 1
    assert "table4" not in j and "inject_canaries" not in j  # Table 4: its own experiment (below)


def test_paper_table3_trains_on_the_private_data_alone():
    """paper.yaml's Table 3 runs never see the canaries (the paper runs Table 4 separately): every
    DP run and the NonDPFT fine-tune read private/data/private (the private zone)."""
    out = snakemake("-n", "-p", "--forceall", "results/table3.csv", "--configfile", "config/paper.yaml")
    data = re.findall(r"dp-finetune --model \S+ --data (\S+)", out)
    assert len(data) == 9 and set(data) == {"private/data/private/records.jsonl"}, data
    nondp = re.findall(r"(?<!dp-)finetune --model \S+ --data (\S+) --out results/ft/[^/]+/NonDPFT/", out)
    assert len(nondp) == 4 and set(nondp) == {"private/data/private/records.jsonl"}, nondp
    assert "private_canary" not in out


def test_paper_table4_overlay_is_its_own_experiment(tmp_path):
    """config/overlays/paper-table4.yaml over paper.yaml, in its own directory (-d): every method is
    trained on the private records plus canaries and Table 4 gets one leakage row per Table 3 row."""
    from snakemake.utils import validate

    overlay = "config/overlays/paper-table4.yaml"
    cfg = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    cfg["canaries"].update(yaml.safe_load((REPO / overlay).read_text())["canaries"])
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert overlay.split("/", 1)[1] in (REPO / overlay).read_text()  # its header names the command
    out = snakemake("results/table4.csv", "-n", "-p", "-d", str(tmp_path / "table4"),
                    "--configfile", "config/paper.yaml", overlay)
    j = jobs(out)
    assert j["inject_canaries"] == 1 and j["leakage"] == 4 * 5 and j["dp_finetune"] == 9 and j["table4"] == 1
    data = re.findall(r"dp-finetune --model \S+ --data (\S+)", out)
    assert set(data) == {"private/data/private_canary/records.jsonl"}, data


# ---- exec_filter.container_image: the rule's `container:` for `snakemake --sdm apptainer` --------

IMAGE = "docker://example.org/privcode-exec-filter:test"
APPTAINER = shutil.which("apptainer") or shutil.which("singularity")


def demo_config(tmp_path, **exec_filter) -> Path:
    """config/config.yaml with exec_filter keys overridden, written to a file (--configfile)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["exec_filter"].update(exec_filter)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# Snakemake's own job objects for the DAG of results/table3.csv: per rule, the set of
# (container_img_url, url of the Image the executor wraps the job in). job.container_img is what the
# local executor passes to `apptainer exec` (it is None unless --sdm apptainer is on). Building the
# DAG needs no apptainer binary; only pulling the image does.
_JOB_CONTAINERS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import (ConfigSettings, DAGSettings, DeploymentMethod, DeploymentSettings,
                                      OutputSettings, Quietness, ResourceSettings)
configfile, sdm = sys.argv[1], sys.argv[2:]
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                      config_settings=ConfigSettings(configfiles=[Path(configfile)]),
                      deployment_settings=DeploymentSettings(
                          deployment_method={DeploymentMethod.parse_choice(m) for m in sdm}),
                      snakefile=Path("workflow/Snakefile"), workdir=Path.cwd())
    wf.dag(DAGSettings(targets={"results/table3.csv"}, forceall=True)).printrulegraph()  # builds the DAG
    jobs = {}
    for job in wf._workflow.dag.jobs:
        img = job.container_img
        jobs.setdefault(job.rule.name, set()).add((job.container_img_url, img.url if img else None))
print("JOBS " + json.dumps({rule: sorted(pairs, key=str) for rule, pairs in jobs.items()}))
"""


def job_containers(configfile, *sdm) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", _JOB_CONTAINERS, str(configfile), *sdm], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("JOBS ")][-1]
    return {rule: [tuple(x) for x in pairs] for rule, pairs in json.loads(line[5:]).items()}


def test_container_image_key_defaults_to_null_and_rejects_whitespace():
    from snakemake.utils import validate

    schema = str(REPO / "workflow" / "schemas" / "config.schema.yaml")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    del cfg["exec_filter"]["container_image"]
    validate(cfg, schema)
    assert cfg["exec_filter"]["container_image"] is None
    cfg["exec_filter"]["container_image"] = "docker://a b"
    with pytest.raises(Exception, match="container_image|does not match"):
        validate(cfg, schema)


def test_sdm_apptainer_attaches_image_to_exec_filter_jobs_only(tmp_path):
    with_image = job_containers(demo_config(tmp_path, container_image=IMAGE), "apptainer")
    assert with_image["exec_filter"] == [(IMAGE, IMAGE)]
    assert {r: p for r, p in with_image.items() if r != "exec_filter"} == \
        {r: [(None, None)] for r in with_image if r != "exec_filter"}
    assert len(with_image) > 10  # the whole Table 3 DAG was built
    # the shipped configs: no image, every job runs on the host even with --sdm apptainer
    for cfg in (REPO / "config" / "config.yaml", REPO / "config" / "paper.yaml"):
        assert {p for pairs in job_containers(cfg, "apptainer").values() for p in pairs} == {(None, None)}, cfg
    # without --sdm apptainer the directive is inert: no job is wrapped in an image
    plain = job_containers(demo_config(tmp_path, container_image=IMAGE))
    assert plain["exec_filter"] == [(IMAGE, None)]


def test_sdm_apptainer_dry_run(tmp_path):
    """The CLI dry run: with an image, Snakemake deploys it (pull announced, or -- with no apptainer
    binary on this machine -- it stops because it needs one); without, --sdm apptainer is a no-op."""
    target = ("-n", "--forceall", "results/table3.csv")  # targets before --sdm (it takes several values)
    needs = "The apptainer or singularity command has to be available"
    pulled = f"Singularity image {IMAGE} will be pulled."
    p = snakemake_run(*target, "--configfile", str(demo_config(tmp_path, container_image=IMAGE)), "--sdm", "apptainer")
    out = p.stdout + p.stderr
    if APPTAINER:
        assert p.returncode == 0 and pulled in out, out[-3000:]
        assert "exec_filter" in jobs(out)
    else:
        assert p.returncode != 0 and needs in out, out[-3000:]
    out = snakemake(*target, "--sdm", "apptainer")  # demo config: container_image null
    assert needs not in out and "Singularity image" not in out and jobs(out)["exec_filter"] == 1


# What the image (containers/exec-filter.def, exec-filter.Dockerfile) installs: privcode without its
# dependencies, plus tqdm. The filter must run with exactly that on top of the standard library.
_IMAGE_PYTHON = """
import sys
sys.path.insert(0, sys.argv[1])
from privcode.filters.exec_filter import main
sys.exit(main(sys.argv[2:]))
"""


def test_exec_filter_runs_with_stdlib_and_tqdm_only(tmp_path):
    import tqdm

    from privcode import ledger
    from privcode.io import read_json, write_jsonl

    site = tmp_path / "site"  # privcode + tqdm only; `-I -S`: no site-packages, no PYTHONPATH
    site.mkdir()
    (site / "privcode").symlink_to(REPO / "privcode")
    (site / "tqdm").symlink_to(Path(tqdm.__file__).parent)
    gen = tmp_path / "generated"
    gen.mkdir()
    write_jsonl(gen / "samples.jsonl", [
        {"id": "ok", "problem": "p", "lang": "python", "raw": "```python\nprint(1 + 2)\n```"},
        {"id": "bad", "problem": "p", "lang": "shell", "raw": "```bash\nexit 3\n```"},
    ])
    ledger.derive(gen, stage="generate")

    def run(*args, **env):
        return subprocess.run([sys.executable, "-I", "-S", "-c", _IMAGE_PYTHON, str(site),
                               "--input", str(gen / "samples.jsonl"), "--workers", "1", "--no-progress", *args],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=300)

    p = run("--out", str(tmp_path / "exec"))
    assert p.returncode == 0, p.stderr[-3000:]
    st = read_json(tmp_path / "exec" / "stats.json")
    assert (st["n_kept"], st["dropped_by_reason"]) == (1, {"error": 1})
    assert st["backend"] in ("bwrap", "unshare", "rlimit")  # auto: no engine here, as in the image
    # inside an Apptainer image (which sets APPTAINER_CONTAINER) backend "container" says what to use
    p = run("--out", str(tmp_path / "exec2"), "--params", '{"backend": "container"}',
            APPTAINER_CONTAINER="/img/exec-filter.sif")
    if p.returncode == 0:
        pytest.skip("a container engine with the sandbox image works here")
    if "cannot run the sandbox image" in p.stderr:
        pytest.skip("an engine with the sandbox image answers here (it cannot start it): its error comes first")
    assert p.returncode == 2 and "inside the Apptainer image /img/exec-filter.sif" in p.stderr
    assert "use backend auto or bwrap" in p.stderr


def apt_packages(text: str) -> set:
    """Package names of the `apt-get install` commands of a container definition."""
    pkgs = set()
    for line in text.replace("\\\n", " ").splitlines():
        for cmd in line.split("apt-get install")[1:]:
            pkgs |= {w for w in re.split(r"&&|;", cmd)[0].split() if not w.startswith("-")}
    return pkgs


def test_exec_filter_images_carry_the_sandbox_toolchains():
    toolchains = set.union(*(apt_packages((REPO / "containers" / n).read_text())
                             for n in ("sandbox.Dockerfile", "sandbox.def")))
    assert {"python3", "g++", "rustc", "nodejs", "php-cli", "mono-mcs"} <= toolchains
    for name in ("exec-filter.def", "exec-filter.Dockerfile"):
        text = (REPO / "containers" / name).read_text()
        assert toolchains | {"bubblewrap", "python3-pip"} <= apt_packages(text), name
        assert "--no-deps /opt/privcode 'tqdm>=4.66'" in text and "privcode exec-filter --help" in text, name
    ignore = (REPO / "containers" / "exec-filter.Dockerfile.dockerignore").read_text().split()
    assert {"*", "!pyproject.toml", "!privcode"} <= set(ignore)


_CONDA_ENVS = """
import json
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import DAGSettings, DeploymentMethod, DeploymentSettings, OutputSettings, Quietness, ResourceSettings
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                      deployment_settings=DeploymentSettings(deployment_method={DeploymentMethod.CONDA}),
                      snakefile=Path("workflow/Snakefile"), workdir=Path.cwd())
    wf.dag(DAGSettings(targets={"results/table3.csv"}, forceall=True)).printrulegraph()  # builds the DAG
    path = lambda f: str(Path(f.get_path_or_uri(secret_free=True)).resolve()) if f else None
    envs = {path(j.conda_env.file): path(j.conda_env.post_deploy_file) for j in wf._workflow.dag.jobs if j.conda_env}
print("ENVS " + json.dumps(envs))
"""


def test_conda_env_post_deploy_installs_the_makefiles_bigcodebench():
    """--sdm conda: Snakemake's own lookup finds envs/privcode.post-deploy.sh for the jobs' env
    (no conda needed to plan), and the script installs the BigCodeBench the Makefile pins, --no-deps."""
    p = subprocess.run([sys.executable, "-c", _CONDA_ENVS], cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    envs = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("ENVS ")][-1][5:])
    post = REPO / "envs" / "privcode.post-deploy.sh"
    assert envs == {str(REPO / "envs" / "privcode.yaml"): str(post)}
    assert os.access(post, os.X_OK) and subprocess.run(["bash", "-n", str(post)]).returncode == 0
    pin = re.search(r"--no-deps (bigcodebench==\S+)", (REPO / "Makefile").read_text()).group(1)
    assert re.search(rf"pip install --no-deps {re.escape(pin)}\s*$", post.read_text(), re.M)


def test_conda_env_resolves_after_snakemake_copies_it(tmp_path):
    """#16 item 3: the env file holds no path relative to the repository (Snakemake copies it away),
    DeepSpeed is in it for the GPU rules, and the post-deploy script installs privcode from the
    workflow's own source — found from the working directory (also `-d runs/x`) or $PRIVCODE_SRC."""
    copy = tmp_path / ".snakemake" / "conda" / "abc123.yaml"
    copy.parent.mkdir(parents=True)
    shutil.copy(REPO / "envs" / "privcode.yaml", copy)
    env = yaml.safe_load(copy.read_text())
    pips = [x for d in env["dependencies"] if isinstance(d, dict) for x in d["pip"]]
    assert not [x for x in pips if x.startswith(("-e", ".", "/")) or "../" in x], pips
    assert any(x.startswith("deepspeed") for x in pips)
    post = REPO / "envs" / "privcode.post-deploy.sh"
    run_dir = REPO / "runs" / f"postdeploy-{os.getpid()}"  # runs/ is git-ignored
    run_dir.mkdir(parents=True)
    try:
        base = dict(os.environ, PRIVCODE_POST_DEPLOY_DRYRUN="1")
        base.pop("PRIVCODE_SRC", None)
        p = subprocess.run(["bash", str(post)], cwd=run_dir, env=base, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.splitlines()[0] == f"python -m pip install {REPO}", p.stderr
    finally:
        run_dir.rmdir()
    p = subprocess.run(["bash", str(post)], cwd=tmp_path, env=base, capture_output=True, text=True)
    assert p.returncode == 1 and "set PRIVCODE_SRC" in p.stderr
    p = subprocess.run(["bash", str(post)], cwd=tmp_path, env={**base, "PRIVCODE_SRC": "/opt/privcode"},
                       capture_output=True, text=True)
    assert p.stdout.splitlines()[0] == "python -m pip install /opt/privcode"


def test_paper_gpu_jobs_take_their_own_gpus_and_4_where_it_pays():
    """#16 items 1-2: every GPU rule's command starts with `privcode gpu-run --gpus N`; DP stage 1,
    DPFT and the utility fine-tune run torchrun on 4 GPUs; the CPU demo has no gpu-run at all."""
    out = snakemake("-n", "-p", "--forceall", "results/table3.csv", "--configfile", "config/paper.yaml")
    dp = re.findall(r"(privcode gpu-run --gpus \d -- \S+(?: --standalone --nproc_per_node \d -m privcode.cli)?) "
                    r"dp-finetune", out)
    assert len(dp) == 9 and set(dp) == {"privcode gpu-run --gpus 4 -- torchrun --standalone --nproc_per_node 4 "
                                        "-m privcode.cli"}
    for stage in ("generate", "roundtrip-filter", "evaluate"):
        cmds = re.findall(rf"(\S+ gpu-run --gpus \d -- privcode|privcode) {stage} ", out)
        assert cmds and set(cmds) == {"privcode gpu-run --gpus 1 -- privcode"}, (stage, set(cmds))
    assert "privcode gpu-run --gpus 4 -- torchrun --standalone --nproc_per_node 4 -m privcode.cli finetune" in out
    assert "gpu-run" not in snakemake("-n", "-p", "--forceall")


def test_slurm_submit_string_keeps_a_4_gpu_job_on_one_node():
    """#16 item 4: the slurm plugin's own submit string for the 4-GPU fine-tune, from the profile's
    resources: one node, 4 GPUs of the model asked for, the profile's CPUs and memory."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    prof = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    gpus = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["resources"]["gpus"]

    class Resources(dict):
        __getattr__ = dict.__getitem__

    for rule in ("dp_finetune", "finetune"):
        res = Resources({**prof["default-resources"], **prof["set-resources"][rule], "gpu": gpus[rule]})
        job = SimpleNamespace(resources=res, threads=1, is_group=lambda: False, name=rule, wildcards={})
        call = get_submit_command(job, {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
                                        "partition": "", "workdir": "/w"}) + set_gres_string(job)
        assert "--nodes=1" in call and "--gpus=h100:4" in call, call
        assert f"--cpus-per-task={res['cpus_per_task']}" in call and f"--mem {res['mem_mb']}" in call, call
