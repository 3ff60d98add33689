# The dataset -> manifest.csv (one normalized row per clip).


rule manifest:
    input:
        dataset_csv(),
    output:
        f"{RUN}/manifest.csv",
    params:
        config=CONFIG_FILE,
        sections=section_hash("dataset"),
    log:
        f"{RUN}/logs/manifest.log",
    benchmark:
        f"{RUN}/benchmarks/manifest.tsv"
    resources:
        mem_mb=2000,
        runtime=30,
    threads: 1
    conda:
        "../envs/msaflow.yaml"
    shell:
        "msaflow manifest -o {output:q} --config {params.config:q} > {log:q} 2>&1"
