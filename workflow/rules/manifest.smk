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
        # the workflow trains on train and valid: unlabeled clips there stop it here, before extraction
        "msaflow manifest -o {output:q} --config {params.config:q} --require-labels train,valid > {log:q} 2>&1"
