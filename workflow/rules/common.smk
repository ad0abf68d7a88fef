# Helpers shared by the rules: model references, stage parameters as JSON, GPU launchers.
import json

METHODS = ["PreCode", "NonDPFT", "DPFT", "PrivCode"]
BUILT_SOURCES = ("gguf", "tiny", "snapshot")


def model_cfg(name):
    return config["models"][name]


def model_ref(name):
    """What stages pass to from_pretrained: a built local directory or a hub name / path."""
    m = model_cfg(name)
    return f"results/models/{name}/base" if m["source"] in BUILT_SOURCES else m["name"]


def model_input(name):
    return [model_ref(name)] if model_cfg(name)["source"] in BUILT_SOURCES else []


def fmt(name):
    return model_cfg(name)["prompt_format"]


def stage_params(section, model=None, **extra):
    """The JSON a stage gets via --params: its config section (+ the model's prompt format)."""
    p = dict(config[section])
    if model is not None:
        p["prompt_format"] = fmt(model)
    p.update(extra)
    return json.dumps(p, sort_keys=True)


def gpus(stage):
    return int(config["resources"]["gpus"].get(stage, 0))


def launcher(stage):
    """`privcode` for one process, torchrun with one process per GPU otherwise."""
    n = gpus(stage)
    if n > 1:
        return f"torchrun --standalone --nproc_per_node {n} -m privcode.cli"
    return "privcode"


def eps_tags():
    return [f"eps{e:g}" for e in config["privacy"]["epsilons"]]


def data_source():
    s = config["data"]["source"]
    return "results/data/taskgen/records.jsonl" if s == "taskgen" else s


def finetune_data(w):
    if w.method == "NonDPFT":
        return "results/data/private"
    return f"results/synth/{config['junior']}/{w.tag}/roundtrip"


def finetune_file(w):
    return "records.jsonl" if w.method == "NonDPFT" else "kept.jsonl"


def eval_model(w):
    """The model directory (or hub name) a method's row evaluates."""
    if w.method == "PreCode":
        return model_ref(w.model)
    if w.method == "DPFT":
        return f"results/dp/{w.model}/dpsgd/{w.tag}/model"
    return f"results/ft/{w.model}/{w.method}/{w.tag}/model"


def eval_params(w):
    e = config["evaluate"]
    p = {k: v for k, v in e.items() if k not in ("benchmarks", "overrides")}
    p["override"] = e.get("overrides", {}).get(w.bench)
    p["prompt_format"] = fmt(w.model)
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


def exec_filter_args():
    """Sandbox flags from the exec_filter section (a string: Snakemake compares params by value)."""
    c = config["exec_filter"]
    flags = [f"--backend {c['backend']}"] + (["--require-isolation"] if c["require_isolation"] else [])
    for k in ("wall_s", "cpu_s", "mem_mb", "fsize_mb", "nproc", "output_bytes"):
        flags.append(f"--{k.replace('_', '-')} {c[k]}")
    return " ".join(flags)


def privsa_params(variant):
    """PrivSA settings for a DP variant: the config's `privsa` section, or off for plain DP-SGD."""
    if variant == "dpsgd":
        return {"privsa_lambda_max": 0.0, "privsa_lambda_min": 0.0}
    c = config["privsa"]
    return {
        "privsa_lambda_max": c["lambda_max"],
        "privsa_lambda_min": c["lambda_min"],
        "privsa_alpha": c["alpha"],
        "privsa_interval": c["interval"],
    }
