# Helpers shared by the rules: model references, stage parameters as JSON, GPU launchers,
# the Table 3 grid and the Table 5 sweep grid (a Snakemake Paramspace).
import json
import os
import re

import pandas as pd
from snakemake.utils import Paramspace

METHODS = ["PreCode", "NonDPFT", "DPFT", "JFT", "PrivCode"]

# The private zone (privcode.zone): private records, training statistics, checkpoints and the
# logs of the rules that read private data: `private/` in the working directory, where privcode's
# commands look for it. The budget registry lives outside every run directory
# ($PRIVCODE_BUDGET_DIR, else ~/.privcode/budget).
ZONE = "private"
os.makedirs(ZONE, exist_ok=True)
os.chmod(ZONE, 0o700)


def zone_log(name):
    """A log or benchmark path inside the private zone (rules that read private data)."""
    return f"{ZONE}/{name}"


BUILT_SOURCES = ("gguf", "tiny", "snapshot")
# Table 5's ablations (sweeps.ablations): each is a PrivCode run with one change, as
# (DP variant of stage 1, synthesis directory it fine-tunes on). no_privsa: λ = 0, plain DP-SGD
# (the junior's dpsgd run); constant_lambda: λ(t) = λmax for every step; no_exec_filter: the round
# trip on every generated program (noexec: nothing executed); no_roundtrip: the exec filter's kept
# programs; no_filters: every generated program with code.
ABLATIONS = {
    "no_privsa": ("dpsgd", "roundtrip"),
    "constant_lambda": ("privsa-const", "roundtrip"),
    "no_exec_filter": ("privsa", "noexec-roundtrip"),
    "no_roundtrip": ("privsa", "exec"),
    "no_filters": ("privsa", "noexec"),
}
_ABL = "|".join(ABLATIONS)
TAG_RE = re.compile(
    rf"eps(?P<eps>[0-9.]+)(?:(-lm(?P<lm>[0-9.]+))?(-tau(?P<tau>[0-9.]+))?|-(?P<abl>{_ABL}))"
)
TAG_WILDCARD = (
    rf"base|inf|eps[0-9.]+(?:(-lm[0-9.]+)?(-tau[0-9.]+)?|-({_ABL}))"  # TAG_RE, unnamed
)


def model_cfg(name):
    return config["models"][name]


def model_ref(name):
    """What stages pass to from_pretrained: a built local directory or a hub name / path."""
    m = model_cfg(name)
    return f"results/models/{name}/base" if m["source"] in BUILT_SOURCES else m["name"]


def build_params(name):
    """`privcode build-model --params`: the model's entry, but its prompt format and per-stage keys."""
    keys = ("prompt_format", "dp_finetune")
    return json.dumps(
        {k: v for k, v in model_cfg(name).items() if k not in keys}, sort_keys=True
    )


def model_input(name):
    return [model_ref(name)] if model_cfg(name)["source"] in BUILT_SOURCES else []


def fmt(name):
    """A model's prompt format for training, generation and describing: a base model
    (prompt_format: base) uses privcode's qa format there; evaluation prompts it as EvalPlus's
    --force-base-prompt does (eval_params passes `base`)."""
    f = model_cfg(name)["prompt_format"]
    return "qa" if f == "base" else f


def stage_params(section, model=None, **extra):
    """The JSON a stage gets via --params: its config section, the model's prompt format and the
    model's own keys for this section (models.<name>.dp_finetune: memory knobs)."""
    p = {k: v for k, v in config[section].items() if k != "enabled"}
    if model is not None:
        p["prompt_format"] = fmt(model)
        p.update(model_cfg(model).get(section, {}))
    p.update(extra)
    return json.dumps(p, sort_keys=True)


def gpus(stage):
    return int(config["resources"]["gpus"].get(stage, 0))


def on_gpus(stage):
    """`privcode` for a CPU stage; for a GPU stage, `privcode gpu-run` first takes the stage's
    GPUs (devices no other running job holds: privcode.gpus) and runs the command on them.
    """
    n = gpus(stage)
    return f"privcode gpu-run --gpus {n} -- privcode" if n >= 1 else "privcode"


def launcher(stage):
    """Training stages: one process per GPU with torchrun when the stage has several."""
    n = gpus(stage)
    if n > 1:
        return f"privcode gpu-run --gpus {n} -- torchrun --standalone --nproc_per_node {n} -m privcode.cli"
    return on_gpus(stage)


def main_eps():
    return config["privacy"]["epsilons"][0]


def eps_tags():
    return [f"eps{e:g}" for e in config["privacy"]["epsilons"]]


def canaries_on():
    return config["canaries"]["enabled"]


def vuln_on():
    return config["vuln"]["enabled"]


def train_data():
    """The private records every private-data stage trains on (with canaries for Table 4)."""
    return f"{ZONE}/data/private_canary" if canaries_on() else f"{ZONE}/data/private"


def dp_privacy_params():
    """The privacy section's keys a DP run needs (its N assumption, the seed opt-in, the cap):
    every key but epsilons, TrainConfig fields (TrainConfig's default if left out)."""
    return {k: v for k, v in config["privacy"].items() if k != "epsilons"}


def data_source():
    s = config["data"]["source"]
    return "results/data/taskgen/records.jsonl" if s == "taskgen" else s


# --- DP variants: dpsgd (DPFT), privsa (PrivCode stage 1), privsa-lm<λmax> (sweep), jft ---------


def dp_base(model, variant):
    """JFT's DP stage starts from the model fine-tuned on PII-masked data; the others from base."""
    return (
        f"results/ft/{model}/JFTmask/inf/model"
        if variant == "jft"
        else model_ref(model)
    )


def dp_base_input(model, variant):
    return [dp_base(model, variant)] if variant == "jft" else model_input(model)


def privsa_params(variant):
    """PrivSA settings of a DP variant: the config's `privsa` section, or off for plain DP-SGD."""
    if variant in ("dpsgd", "jft"):
        return {"privsa_lambda_max": 0.0, "privsa_lambda_min": 0.0}
    c = config["privsa"]
    lam_max = float(variant.split("-lm")[1]) if "-lm" in variant else c["lambda_max"]
    return {
        "privsa_lambda_max": lam_max,
        "privsa_lambda_min": c["lambda_min"],
        # privsa-const (ablation constant_lambda): no decay, λ(t) = λmax at every step
        "privsa_alpha": 0.0 if variant == "privsa-const" else c["alpha"],
        "privsa_interval": c["interval"],
    }


def privcode_parts(tag):
    """PrivCode tag eps<ε>[-lm<λmax>][-tau<τ>] or eps<ε>-<ablation> -> (eps, DP variant, synthesis
    dir name: the filter stage whose kept.jsonl the premium model is fine-tuned on)."""
    m = TAG_RE.fullmatch(tag)
    if m["abl"]:
        return (m["eps"], *ABLATIONS[m["abl"]])
    variant = f"privsa-lm{m['lm']}" if m["lm"] else "privsa"
    return m["eps"], variant, f"roundtrip-tau{m['tau']}" if m["tau"] else "roundtrip"


def synth_dir(tag):
    eps, variant, rt = privcode_parts(tag)
    return f"results/synth/{config['junior']}/{variant}/eps{eps}/{rt}"


def finetune_data(w):
    if w.method == "NonDPFT":
        return train_data()
    if w.method == "JFTmask":
        return f"{ZONE}/data/private_masked"
    return synth_dir(w.tag)


def finetune_file(w):
    return "kept.jsonl" if w.method == "PrivCode" else "records.jsonl"


def eval_model(w):
    """The model directory (or hub name) a method's row evaluates."""
    if w.method == "PreCode":
        return model_ref(w.model)
    if w.method in ("DPFT", "JFT"):
        variant = "dpsgd" if w.method == "DPFT" else "jft"
        return f"results/dp/{w.model}/{variant}/{w.tag}/model"
    return f"results/ft/{w.model}/{w.method}/{w.tag}/model"


def eval_model_input(w):
    return [] if w.method == "PreCode" and not model_input(w.model) else [eval_model(w)]


def eval_params(w):
    e = config["evaluate"]
    p = {k: v for k, v in e.items() if k not in ("benchmarks", "overrides", "limits")}
    p["override"] = e["overrides"].get(w.bench)
    p["limit"] = e["limits"].get(w.bench, e.get("limit"))
    p["prompt_format"] = model_cfg(w.model)[
        "prompt_format"
    ]  # base: EvalPlus's --force-base-prompt
    return json.dumps(p, sort_keys=True)


def table3_rows():
    rows = []
    for m in config["premium"]:
        for method in config["methods"]:
            if method == "PreCode":
                rows.append((m, method, "base"))
            elif method == "NonDPFT":
                rows.append((m, method, "inf"))
            else:
                rows += [(m, method, t) for t in eps_tags()]
    return rows


def compare_dirs():
    """What `privcode compare` pairs: PrivCode's evaluations and those of its baselines (DPFT at the
    same tag, PreCode); none unless PrivCode and a baseline are among the methods."""
    m = config["methods"]
    if "PrivCode" not in m or not {"DPFT", "PreCode"} & set(m):
        return []
    return [
        f"results/eval/{p}/{method}/{tag}/{b}"
        for p, method, tag in table3_rows()
        if method in ("PrivCode", "DPFT", "PreCode")
        for b in config["evaluate"]["benchmarks"]
    ]


def sweep_space():
    """Table 5's grid as a Paramspace: one row per (sweep, value), the main setting included
    (ablations: `none`, PrivCode as configured)."""
    s = config["sweeps"]
    main = {
        "tau": config["roundtrip"]["threshold"],
        "epsilon": main_eps(),
        "lambda_max": config["privsa"]["lambda_max"],
        "ablations": "none",
    }
    name = {
        "ablations": "ablation"
    }  # the table's sweep column names one ablation per row
    rows = [
        (name.get(k, k), v)
        for k in ("tau", "epsilon", "lambda_max", "ablations")
        if s[k]
        for v in [main[k], *s[k]]
    ]
    return Paramspace(
        pd.DataFrame(rows, columns=["sweep", "value"]), filename_params="*"
    )


def sweep_value(value):
    return f"{value:g}" if isinstance(value, (int, float)) else value


def sweep_tag(sweep, value):
    e = f"eps{main_eps():g}"
    if sweep == "ablation":
        return e if value == "none" else f"{e}-{value}"
    if sweep == "epsilon":
        return f"eps{float(value):g}"
    if float(value) == float(
        {
            "tau": config["roundtrip"]["threshold"],
            "lambda_max": config["privsa"]["lambda_max"],
        }[sweep]
    ):
        return e
    return f"{e}-tau{float(value):g}" if sweep == "tau" else f"{e}-lm{float(value):g}"


def table5_rows():
    """PARAM=VALUE:EVAL_DIR arguments of `privcode table5`, for each premium model and benchmark."""
    space = sweep_space()
    return [
        f"{r.sweep}={sweep_value(r.value)}:results/eval/{m}/PrivCode/{sweep_tag(r.sweep, r.value)}/{b}"
        for r in space.dataframe.itertuples()
        for m in config["premium"]
        for b in config["evaluate"]["benchmarks"]
    ]


def exec_filter_params():
    """`privcode exec-filter --params`: the exec_filter section but workers (the job's threads) and
    container_image (the rule's container)."""
    c = config["exec_filter"]
    return json.dumps(
        {k: v for k, v in c.items() if k not in ("workers", "container_image")},
        sort_keys=True,
    )
