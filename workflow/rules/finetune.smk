# Stage 6: ordinary (non-DP) fine-tuning of a premium model — on the filtered synthetic set
# (PrivCode, inherits the junior's ε), on the raw private records (NonDPFT, ε = inf) or on the
# PII-masked private records (JFTmask: JFT's first stage, ε = inf at record level).


rule finetune:
    input:
        model=lambda w: model_input(w.model),
        data=finetune_data,
    output:
        directory("results/ft/{model}/{method}/{tag}/adapter"),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/finetune/{model}_{method}_{tag}.log",
    benchmark:
        "benchmarks/finetune/{model}_{method}_{tag}.tsv"
    params:
        ref=lambda w: model_ref(w.model),
        file=finetune_file,
        p=lambda w: stage_params("finetune", w.model),
        run=launcher("finetune"),
    resources:
        gpu=gpus("finetune"),
    shell:
        "{params.run} finetune --model {params.ref} --data {input.data}/{params.file} "
        "--out {output} --params '{params.p}' > {log} 2>&1"


rule merge_ft:
    input:
        model=lambda w: model_input(w.model),
        adapter="results/ft/{model}/{method}/{tag}/adapter",
    output:
        directory("results/ft/{model}/{method}/{tag}/model"),
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/merge_ft/{model}_{method}_{tag}.log",
    benchmark:
        "benchmarks/merge_ft/{model}_{method}_{tag}.tsv"
    params:
        ref=lambda w: model_ref(w.model),
    shell:
        "privcode merge --base {params.ref} --adapter {input.adapter} --out {output} > {log} 2>&1"
