# Shards (or an MMSA feature pickle) -> one trained run folder per seed (x rate for per-rate).


rule train:
    input:
        data=TRAIN_DATA if CFG.pickle else rules.shards.output[0],
    output:
        f"{RUN}/runs/{{run}}/metrics.json",
    params:
        launch=TRAIN_LAUNCH,
        args=lambda wc: TRAIN_RUNS[wc.run],
        data=train_data,
        out=lambda wc, output: parent(output[0]),
        config=CONFIG_FILE,
        sections=section_hash("train"),
    log:
        f"{RUN}/logs/train-{{run}}.log",
    benchmark:
        f"{RUN}/benchmarks/train-{{run}}.tsv"
    wildcard_constraints:
        run="|".join(TRAIN_RUNS),
    resources:
        mem_mb=CFG.train.mem_mb,
        runtime=24 * 60,
        gpu=CFG.train.gpus,
    threads: CFG.train.threads
    conda:
        "../envs/msaflow.yaml"
    shell:
        "{params.launch} train --data {params.data:q} -o {params.out:q} --config {params.config:q}"
        " --threads {threads} {params.args} > {log:q} 2>&1"
