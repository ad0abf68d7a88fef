# Base models and data: built once, read by every later stage. The private records (and the
# logs of the rules that read them) live in the private zone, ZONE (common.smk).


rule build_model:
    output:
        directory("results/models/{model}/base"),
    log:
        "logs/build_model/{model}.log",
    benchmark:
        "benchmarks/build_model/{model}.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        p=lambda w: build_params(w.model),
    shell:
        "privcode build-model --out {output} --params '{params.p}' > {log} 2>&1"


rule make_data:
    output:
        records="results/data/taskgen/records.jsonl",
        bench="results/data/taskgen/humaneval.jsonl",
    log:
        "logs/make_data.log",
    benchmark:
        "benchmarks/make_data.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        p=json.dumps(config["data"].get("taskgen", {}), sort_keys=True),
    shell:
        "privcode make-data --out results/data/taskgen --params '{params.p}' > {log} 2>&1"


rule prepare_data:
    input:
        src=lambda w: [data_source()] if config["data"]["source"] == "taskgen" else [],
    output:
        private=directory(f"{ZONE}/data/private"),
        public=directory("results/data/public"),
    log:
        zone_log("logs/prepare_data.log"),
    benchmark:
        zone_log("benchmarks/prepare_data.tsv")
    conda:
        "../../envs/privcode.yaml"
    params:
        source=lambda w: data_source(),
        p=lambda w: json.dumps(
            {
                **{
                    k: v
                    for k, v in config["data"].items()
                    if k not in ("source", "taskgen")
                },
                "delta": config["privacy"]["delta"],
                "dataset_size": config["privacy"]["dataset_size"],
            },
            sort_keys=True,
        ),
    shell:
        "umask 077; privcode prepare-data --source {params.source} --private {output.private} "
        "--public {output.public} --params '{params.p}' > {log} 2>&1"


rule inject_canaries:
    input:
        f"{ZONE}/data/private",
    output:
        directory(f"{ZONE}/data/private_canary"),
    log:
        zone_log("logs/inject_canaries.log"),
    benchmark:
        zone_log("benchmarks/inject_canaries.tsv")
    conda:
        "../../envs/privcode.yaml"
    params:
        p=lambda w: json.dumps(
            {k: v for k, v in config["canaries"].items() if k != "enabled"},
            sort_keys=True,
        ),
    shell:
        "umask 077; privcode inject-canaries --data {input}/records.jsonl --out {output} "
        "--params '{params.p}' > {log} 2>&1"


rule mask_pii:
    input:
        lambda w: train_data(),
    output:
        directory(f"{ZONE}/data/private_masked"),
    log:
        zone_log("logs/mask_pii.log"),
    benchmark:
        zone_log("benchmarks/mask_pii.tsv")
    conda:
        "../../envs/privcode.yaml"
    params:
        p=stage_params("jft"),
    shell:
        "umask 077; privcode mask-pii --data {input}/records.jsonl --out {output} "
        "--params '{params.p}' > {log} 2>&1"
