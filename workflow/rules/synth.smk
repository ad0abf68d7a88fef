# Stages 3-5: the DP junior model answers public prompts; the answers are filtered by running
# them in a sandbox and by a round-trip check. All post-processing: no private data is read.
# The round trip describes and scores every program once (roundtrip-scores); τ is applied to the
# stored scores (roundtrip: the config's τ; roundtrip-tau<τ>: Table 5), so a new τ describes nothing.
# Ablations (sweeps.ablations): noexec keeps every generated program with code, unrun, and
# noexec-roundtrip{,-scores} is the round trip on those (no_exec_filter).


rule generate:
    input:
        model="results/dp/{model}/{variant}/eps{eps}/model",
        prompts="results/data/public",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/generated"),
    log:
        "logs/generate/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/generate/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("generate"),
    params:
        p=lambda w: stage_params("generate", w.model),
        run=on_gpus("generate"),
    shell:
        "{params.run} generate --model {input.model} --prompts {input.prompts}/prompts.jsonl "
        "--out {output} --params '{params.p}' > {log} 2>&1"
        " && privcode status --artifact {output}"


rule exec_filter:
    input:
        "results/synth/{model}/{variant}/eps{eps}/generated",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/exec"),
    log:
        "logs/exec_filter/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/exec_filter/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    # `snakemake --sdm apptainer` runs this job in exec_filter.container_image (null: on the host)
    container:
        config["exec_filter"]["container_image"]
    threads: config["exec_filter"]["workers"]
    params:
        p=exec_filter_params(),
    shell:
        "privcode exec-filter --input {input}/samples.jsonl --out {output} "
        "--workers {threads} --params '{params.p}' > {log} 2>&1"
        " && privcode status --artifact {output}"


rule skip_exec_filter:
    input:
        "results/synth/{model}/{variant}/eps{eps}/generated",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/noexec"),
    log:
        "logs/skip_exec_filter/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/skip_exec_filter/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode skip-exec-filter --input {input}/samples.jsonl --out {output} > {log} 2>&1"
        " && privcode status --artifact {output}"


rule roundtrip_filter:
    input:
        kept="results/synth/{model}/{variant}/eps{eps}/exec",
        describer=lambda w: model_input(config["roundtrip"]["model"]),
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/roundtrip-scores"),
    log:
        "logs/roundtrip_filter/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/roundtrip_filter/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("roundtrip_filter"),
    params:
        ref=model_ref(config["roundtrip"]["model"]),
        p=lambda w: json.dumps(
            {
                **{
                    k: v
                    for k, v in config["roundtrip"].items()
                    if k not in ("model", "threshold")
                },
                "prompt_format": fmt(config["roundtrip"]["model"]),
                "threshold": 0.0,  # describe and score every program; τ is applied below
                # early stop: exact for every τ up to τ_s, so τ_s covers the Table 5 sweep
                **(
                    {
                        "early_stop_threshold": max(
                            [
                                config["roundtrip"]["threshold"],
                                *config["sweeps"]["tau"],
                            ]
                        )
                    }
                    if config["roundtrip"].get("early_stop_round")
                    else {}
                ),
            },
            sort_keys=True,
        ),
        run=on_gpus("roundtrip_filter"),
    shell:
        "{params.run} roundtrip-filter --model {params.ref} --input {input.kept}/kept.jsonl "
        "--out {output} --params '{params.p}' > {log} 2>&1"


rule roundtrip_threshold:
    input:
        "results/synth/{model}/{variant}/eps{eps}/roundtrip-scores",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/roundtrip"),
    log:
        "logs/roundtrip_threshold/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/roundtrip_threshold/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        tau=config["roundtrip"]["threshold"],
    shell:
        "privcode rethreshold --roundtrip {input} --tau {params.tau} --out {output} > {log} 2>&1"
        " && privcode status --artifact {output}"


rule rethreshold:
    input:
        "results/synth/{model}/{variant}/eps{eps}/roundtrip-scores",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/roundtrip-tau{tau}"),
    log:
        "logs/rethreshold/{model}_{variant}_eps{eps}_tau{tau}.log",
    benchmark:
        "benchmarks/rethreshold/{model}_{variant}_eps{eps}_tau{tau}.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode rethreshold --roundtrip {input} --tau {wildcards.tau} --out {output} > {log} 2>&1"


use rule roundtrip_filter as roundtrip_filter_noexec with:
    input:
        kept="results/synth/{model}/{variant}/eps{eps}/noexec",
        describer=lambda w: model_input(config["roundtrip"]["model"]),
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/noexec-roundtrip-scores"),
    log:
        "logs/roundtrip_filter_noexec/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/roundtrip_filter_noexec/{model}_{variant}_eps{eps}.tsv"


use rule roundtrip_threshold as roundtrip_threshold_noexec with:
    input:
        "results/synth/{model}/{variant}/eps{eps}/noexec-roundtrip-scores",
    output:
        directory("results/synth/{model}/{variant}/eps{eps}/noexec-roundtrip"),
    log:
        "logs/roundtrip_threshold_noexec/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/roundtrip_threshold_noexec/{model}_{variant}_eps{eps}.tsv"
