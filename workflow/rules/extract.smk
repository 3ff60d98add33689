# manifest.csv -> one tar per clip, in N parallel chunk jobs.


rule extract:
    input:
        manifest=rules.manifest.output[0],
    output:
        # temporary: deleted once the shards are built (the shards step also removes the clip tars it
        # packed), so a run with nothing changed does nothing, and one that must rebuild the shards
        # (new manifest, other settings) re-extracts the clips first instead of missing them
        temp(f"{EXTRACT_DIR}/chunks/{{k}}-of-{N_CHUNKS}.json"),
    params:
        out=lambda wc, output: parent(output[0], 2),  # EXTRACT_DIR
        n=N_CHUNKS,
        config=CONFIG_FILE,
        sections=section_hash("extract"),
    log:
        f"{RUN}/logs/extract-{{k}}-of-{N_CHUNKS}.log",
    benchmark:
        f"{RUN}/benchmarks/extract-{{k}}-of-{N_CHUNKS}.tsv"
    wildcard_constraints:
        k=r"\d+",
    resources:
        mem_mb=CFG.workflow.extract_mem_mb,
        runtime=24 * 60,
        gpu=CFG.workflow.extract_gpus,
    threads: max(1, CFG.extract.threads)
    conda:
        "../envs/msaflow.yaml"
    shell:
        "msaflow extract {input.manifest:q} -o {params.out:q} --config {params.config:q}"
        " --chunk {wildcards.k}/{params.n} > {log:q} 2>&1"
