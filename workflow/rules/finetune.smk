# Stage 6: ordinary (non-DP) fine-tuning of a premium model — on the filtered synthetic set
# (PrivCode, inherits the junior's ε), on the raw private records (NonDPFT, ε = inf) or on the
# PII-masked private records (JFTmask: JFT's first stage, ε = inf at record level). Logs and
# training statistics go to the private zone (on private data they are non-private functions of it).


rule finetune:
    input:
        model=lambda w: model_input(w.model),
        data=finetune_data,
    output:
        directory("results/ft/{model}/{method}/{tag}/adapter"),
    log:
        zone_log("logs/finetune/{model}_{method}_{tag}.log"),
    benchmark:
        zone_log("benchmarks/finetune/{model}_{method}_{tag}.tsv")
    conda:
        "../../envs/privcode.yaml"
    resources:
        gpu=gpus("finetune"),
    params:
        ref=lambda w: model_ref(w.model),
        file=finetune_file,
        p=lambda w: stage_params("finetune", w.model),
        priv=lambda w: f"{ZONE}/ft/{w.model}/{w.method}/{w.tag}",
        run=launcher("finetune"),
    shell:
        "umask 077; {params.run} finetune --model {params.ref} --data {input.data}/{params.file} "
        "--out {output} --private-dir {params.priv} --params '{params.p}' > {log} 2>&1"
        " && privcode status --artifact {output}"


rule merge_ft:
    input:
        model=lambda w: model_input(w.model),
        adapter="results/ft/{model}/{method}/{tag}/adapter",
    output:
        directory("results/ft/{model}/{method}/{tag}/model"),
    log:
        "logs/merge_ft/{model}_{method}_{tag}.log",
    benchmark:
        "benchmarks/merge_ft/{model}_{method}_{tag}.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        ref=lambda w: model_ref(w.model),
    shell:
        "privcode merge --base {params.ref} --adapter {input.adapter} --out {output} > {log} 2>&1"
