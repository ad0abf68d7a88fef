# Stage 7: pass@1 of every (premium model, method, ε) on every configured benchmark; canary
# leakage and PII in outputs (Table 4); share of generated programs a static analyzer flags.


rule evaluate:
    input:
        model=eval_model_input,
        override=lambda w: (
            [config["evaluate"]["overrides"][w.bench]]
            if w.bench in config["evaluate"]["overrides"]
            else []
        ),
    output:
        directory("results/eval/{model}/{method}/{tag}/{bench}"),
    log:
        "logs/evaluate/{model}_{method}_{tag}_{bench}.log",
    benchmark:
        "benchmarks/evaluate/{model}_{method}_{tag}_{bench}.tsv"
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("evaluate"),
    params:
        ref=eval_model,
        p=eval_params,
        run=on_gpus("evaluate"),
    shell:
        "{params.run} evaluate --model {params.ref} --benchmark {wildcards.bench} --out {output} "
        "--params '{params.p}' > {log} 2>&1"
        " && privcode status --artifact {output}"


rule leakage:
    input:
        model=eval_model_input,
        canaries=f"{ZONE}/data/private_canary",
    output:
        directory("results/leakage/{model}/{method}/{tag}"),
    log:
        "logs/leakage/{model}_{method}_{tag}.log",
    benchmark:
        "benchmarks/leakage/{model}_{method}_{tag}.tsv"
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("evaluate"),
    params:
        ref=eval_model,
        p=lambda w: stage_params("leakage", w.model),
        run=on_gpus("evaluate"),
    shell:
        "{params.run} leakage --model {params.ref} --canaries {input.canaries}/canaries.jsonl "
        "--out {output} --params '{params.p}' > {log} 2>&1"


rule vuln:
    input:
        model=eval_model_input,
    output:
        directory("results/vuln/{model}/{method}/{tag}"),
    log:
        "logs/vuln/{model}_{method}_{tag}.log",
    benchmark:
        "benchmarks/vuln/{model}_{method}_{tag}.tsv"
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("evaluate"),
    params:
        ref=eval_model,
        p=lambda w: stage_params("vuln", w.model),
        run=on_gpus("evaluate"),
    shell:
        "{params.run} vuln --model {params.ref} --out {output} --params '{params.p}' > {log} 2>&1"
