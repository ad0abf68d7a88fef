# Stage 1-2: DP-SGD LoRA fine-tuning on the private records, then merge (post-processing).
# variant "privsa": PrivCode's stage 1 (junior model, DP-SGD + the PrivSA syntax-aware KL term);
# "privsa-lm<λmax>": the same for a λmax sweep; "dpsgd": plain DP-SGD, the DPFT baseline;
# "jft": JFT's second stage, plain DP-SGD starting from the model tuned on PII-masked data.
# DP adapters are write-protected: re-training spends privacy budget again (README: how to force).
# What crosses to results/: the adapter (weights, config, tokenizer, privacy.json); statistics,
# checkpoints, the log and the runtime stay in the private zone.


rule dp_finetune:
    input:
        model=lambda w: dp_base_input(w.model, w.variant),
        data=lambda w: train_data(),
    output:
        protected(directory("results/dp/{model}/{variant}/eps{eps}/adapter")),
    log:
        zone_log("logs/dp_finetune/{model}_{variant}_eps{eps}.log"),
    benchmark:
        zone_log("benchmarks/dp_finetune/{model}_{variant}_eps{eps}.tsv")
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("dp_finetune"),
    params:
        ref=lambda w: dp_base(w.model, w.variant),
        p=lambda w: stage_params(
            "dp_finetune",
            w.model,
            epsilon=float(w.eps),
            **dp_privacy_params(),
            **privsa_params(w.variant),
        ),
        priv=lambda w: f"{ZONE}/dp/{w.model}/{w.variant}/eps{w.eps}",
        run=launcher("dp_finetune"),
    shell:
        "umask 077; {params.run} dp-finetune --model {params.ref} --data {input.data}/records.jsonl "
        "--out {output} --private-dir {params.priv} --params '{params.p}' > {log} 2>&1"
        " && privcode status --artifact {output}"


rule merge_dp:
    input:
        model=lambda w: dp_base_input(w.model, w.variant),
        adapter="results/dp/{model}/{variant}/eps{eps}/adapter",
    output:
        directory("results/dp/{model}/{variant}/eps{eps}/model"),
    log:
        "logs/merge_dp/{model}_{variant}_eps{eps}.log",
    benchmark:
        "benchmarks/merge_dp/{model}_{variant}_eps{eps}.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        ref=lambda w: dp_base(w.model, w.variant),
    shell:
        "privcode merge --base {params.ref} --adapter {input.adapter} --out {output} > {log} 2>&1"
