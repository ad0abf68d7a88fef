# Stage 8: tables, figures and the HTML report. ε and δ come from each evaluated model's
# privacy.json, never from config.


rule table3:
    input:
        [
            f"results/eval/{m}/{method}/{tag}/{b}"
            for m, method, tag in table3_rows()
            for b in config["evaluate"]["benchmarks"]
        ],
    output:
        report("results/table3.csv", category="Tables", caption="../report/table3.rst"),
    log:
        "logs/table3.log",
    benchmark:
        "benchmarks/table3.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode table3 --out {output} {input} > {log} 2>&1"


rule compare:
    input:
        compare_dirs(),
    output:
        report(
            "results/compare.csv", category="Tables", caption="../report/compare.rst"
        ),
    log:
        "logs/compare.log",
    benchmark:
        "benchmarks/compare.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode compare --out {output} {input} > {log} 2>&1"


rule table4:
    input:
        [f"results/leakage/{m}/{method}/{tag}" for m, method, tag in table3_rows()],
    output:
        report("results/table4.csv", category="Tables", caption="../report/table4.rst"),
    log:
        "logs/table4.log",
    benchmark:
        "benchmarks/table4.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode table4 --out {output} {input} > {log} 2>&1"


rule vulntable:
    input:
        [f"results/vuln/{m}/{method}/{tag}" for m, method, tag in table3_rows()],
    output:
        report("results/vuln.csv", category="Tables", caption="../report/vuln.rst"),
    log:
        "logs/vulntable.log",
    benchmark:
        "benchmarks/vulntable.tsv"
    conda:
        "../../envs/privcode.yaml"
    shell:
        "privcode vulntable --out {output} {input} > {log} 2>&1"


rule table5:
    input:
        [row.split(":", 1)[1] for row in table5_rows()],
    output:
        report("results/table5.csv", category="Tables", caption="../report/table5.rst"),
    log:
        "logs/table5.log",
    benchmark:
        "benchmarks/table5.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        rows=" ".join(table5_rows()),
    shell:
        "privcode table5 --out {output} {params.rows} > {log} 2>&1"


rule figures:
    input:
        table3="results/table3.csv",
        table5=["results/table5.csv"] if table5_rows() else [],
        synth=[synth_dir(t) for t in eps_tags()],
    output:
        utility=report(
            "results/figures/privacy_utility.png",
            category="Figures",
            caption="../report/privacy_utility.rst",
        ),
        funnel=report(
            "results/figures/funnel.png",
            category="Figures",
            caption="../report/funnel.rst",
        ),
    log:
        "logs/figures.log",
    benchmark:
        "benchmarks/figures.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        table5=lambda wc, input: f"--table5 {input.table5}" if input.table5 else "",
    shell:
        "privcode figures --table3 {input.table3} {params.table5} --synth results/synth --out results/figures > {log} 2>&1"


rule results:
    input:
        "results/table3.csv",
        *(["results/compare.csv"] if compare_dirs() else []),
        *(["results/table4.csv"] if canaries_on() else []),
        *(["results/vuln.csv"] if vuln_on() else []),
        *(["results/table5.csv"] if table5_rows() else []),
        "results/figures/privacy_utility.png",


# Releasing is explicit: `snakemake --cores 1 release` copies release.artifacts out with a
# certificate of their guarantee and of the total cost of everything released from the same data.
rule release:
    input:
        config["release"]["artifacts"],
    output:
        directory(config["release"]["out"]),
    log:
        "logs/release.log",
    benchmark:
        "benchmarks/release.tsv"
    conda:
        "../../envs/privcode.yaml"
    params:
        cap=lambda w: (
            f"--cap {config['privacy']['total_epsilon_cap']}"
            if config["privacy"]["total_epsilon_cap"]
            else ""
        ),
    shell:
        "privcode release --out {output} {params.cap} {input} > {log} 2>&1"
