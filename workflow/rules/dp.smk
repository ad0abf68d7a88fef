# Stage 1-2: DP-SGD LoRA fine-tuning on the private records, then merge (post-processing).
# variant "privsa": PrivCode's stage 1 (junior model, DP-SGD + the PrivSA syntax-aware KL term);
# "privsa-lm<λmax>": the same for a λmax sweep; "dpsgd": plain DP-SGD, the DPFT baseline;
# "jft": JFT's second stage, plain DP-SGD starting from the model tuned on PII-masked data.
# DP adapters are write-protected: re-training spends privacy budget again (README: how to force).


rule dp_finetune:
    input:
        model=lambda w: dp_base_input(w.model, w.variant),
        data=lambda w: train_data(),
    output:
        protected(directory("results/dp/{model}/{variant}/eps{eps}/adapter")),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/dp_finetune/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/dp_finetune/{model}_{variant}_eps{eps}.tsv"
    params:
        ref=lambda w: dp_base(w.model, w.variant),
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
        model=lambda w: dp_base_input(w.model, w.variant),
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
        ref=lambda w: dp_base(w.model, w.variant),
    shell:
        "privcode merge --base {params.ref} --adapter {input.adapter} --out {output} > {log} 2>&1"
