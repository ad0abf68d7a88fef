# Stage 8: tables. ε and δ come from each evaluated model's privacy.json, never from config.


rule table3:
    input:
        [
            f"results/eval/{m}/{method}/{tag}/{b}"
            for m, method, tag in table3_rows()
            for b in config["evaluate"]["benchmarks"]
        ],
    output:
        "results/table3.csv",
    conda:
        "../../envs/privcode.yaml"
    log:
        "logs/table3.log",
    benchmark:
        "benchmarks/table3.tsv"
    shell:
        "privcode table3 --out {output} {input} > {log} 2>&1"
