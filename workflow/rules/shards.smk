# Clip tars -> WebDataset shards per split, index.json, failures.csv, summary.json.


rule shards:
    input:
        manifest=rules.manifest.output[0],
        # chunks are 1-based; the pattern is spelled out (not rules.extract.output) so that a storage
        # provider's flags on it (profiles/kubernetes) do not reach expand()
        chunks=expand(f"{EXTRACT_DIR}/chunks/{{k}}-of-{N_CHUNKS}.json", k=range(1, N_CHUNKS + 1)),
    output:
        f"{RUN}/shards/summary.json",
    params:
        extract=lambda wc, input: parent(input.chunks[0], 2),  # EXTRACT_DIR
        out=lambda wc, output: parent(output[0]),
        config=CONFIG_FILE,
        sections=section_hash("extract", "shards"),
    log:
        f"{RUN}/logs/shards.log",
    benchmark:
        f"{RUN}/benchmarks/shards.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    threads: 1
    conda:
        "../envs/msaflow.yaml"
    shell:
        # --remove-packed: the clip tars are deleted once every shard output is written, so the raw
        # data is kept once; a rerun after a kill during the removal keeps the finished shards
        "msaflow shards {params.extract:q} --manifest {input.manifest:q} -o {params.out:q}"
        " --config {params.config:q} --remove-packed > {log:q} 2>&1"
