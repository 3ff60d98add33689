# Trained runs -> metrics at every missing rate (or noise level) of the test split, and their AUILC.


rule evaluate:
    input:
        runs=[f"{RUN}/runs/{name}/metrics.json" for name in TRAIN_RUNS],  # spelled out: see rule shards
    output:
        f"{RUN}/evaluate/{EVAL_NAME}.json",
    params:
        data=TRAIN_DATA,
        runs=lambda wc, input: [parent(f) for f in input.runs],
        # per-rate runs are each scored at their own rate; one model is scored on the whole grid
        rates=f"--rates {CFG.evaluate.rates}" if CFG.train.protocol == "single-model" else "",
        corruption=CFG.evaluate.corruption,
        sections=section_hash("train", "evaluate"),
    log:
        f"{RUN}/logs/evaluate.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate.tsv"
    resources:
        mem_mb=CFG.train.mem_mb,
        runtime=60,
        gpu=min(CFG.train.gpus, 1),  # scoring runs in one process
    threads: CFG.train.threads
    conda:
        "../envs/msaflow.yaml"
    shell:
        "msaflow evaluate {params.runs:q} --data {params.data:q} {params.rates}"
        " --corruption {params.corruption} --threads {threads} -o {output:q} > {log:q} 2>&1"
