# Stage 1-2: DP-SGD LoRA fine-tuning on the private records, then merge (post-processing).
# variant "privsa": PrivCode's stage 1 (junior model, DP-SGD + the PrivSA syntax-aware KL term);
# variant "dpsgd": plain DP-SGD, the DPFT baseline (premium model trained directly).


rule dp_finetune:
    input:
        model=lambda w: model_input(w.model),
        data="results/data/private",
    output:
        directory("results/dp/{model}/{variant}/eps{eps}/adapter"),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/dp_finetune/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/dp_finetune/{model}_{variant}_eps{eps}.tsv"
    params:
        ref=lambda w: model_ref(w.model),
        p=lambda w: stage_params(
            "dp_finetune",
            w.model,
            epsilon=float(w.eps),
            delta=config["privacy"]["delta"],
            **privsa_params(w.variant),
        ),
        run=launcher("dp_finetune"),
    resources:
        gpu=gpus("dp_finetune"),
    shell:
        "{params.run} dp-finetune --model {params.ref} --data {input.data}/records.jsonl "
        "--out {output} --params '{params.p}' > {log} 2>&1"


rule merge_dp:
    input:
        model=lambda w: model_input(w.model),
        adapter="results/dp/{model}/{variant}/eps{eps}/adapter",
    output:
        directory("results/dp/{model}/{variant}/eps{eps}/model"),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/merge_dp/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/merge_dp/{model}_{variant}_eps{eps}.tsv"
    params:
        ref=lambda w: model_ref(w.model),
    shell:
        "privcode merge --base {params.ref} --adapter {input.adapter} --out {output} > {log} 2>&1"
