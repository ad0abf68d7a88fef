# Stage 7: pass@1 of every (premium model, method, ε) on every configured benchmark.


rule evaluate:
    input:
        model=lambda w: [] if w.method == "PreCode" and not model_input(w.model) else [eval_model(w)],
        override=lambda w: [config["evaluate"].get("overrides", {})[w.bench]]
        if w.bench in config["evaluate"].get("overrides", {})
        else [],
    output:
        directory("results/eval/{model}/{method}/{tag}/{bench}"),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/evaluate/{model}_{method}_{tag}_{bench}.log",
    benchmark:
        "benchmarks/evaluate/{model}_{method}_{tag}_{bench}.tsv"
    params:
        ref=eval_model,
        p=eval_params,
    resources:
        gpu=gpus("evaluate"),
    shell:
        "privcode evaluate --model {params.ref} --benchmark {wildcards.bench} --out {output} "
        "--params '{params.p}' > {log} 2>&1"
