# Shards, metrics, config and timings -> the run's report (Markdown and HTML), its figures and tables,
# each figure and table also an item of `snakemake --report` (captions in workflow/report/).


rule report:
    input:
        shards=[] if CFG.pickle else rules.shards.output[0],
        metrics=rules.evaluate.output[0],
    output:
        md=f"{RUN}/report/report.md",
        html=report(f"{RUN}/report/report.html", caption="../report/page.rst", category="Run"),
        robustness=report(f"{RUN}/report/robustness.png", caption="../report/robustness.rst",
                          category="Robustness"),
        auilc=report(f"{RUN}/report/tables/auilc.csv", caption="../report/auilc.rst", category="Robustness"),
        rates=report(f"{RUN}/report/tables/rates.csv", caption="../report/rates.rst", category="Robustness"),
        timings=report(f"{RUN}/report/tables/timings.csv", caption="../report/timings.rst", category="Run"),
        **shard_report_items(),
    params:
        shards=report_shards,
        out=lambda wc, output: parent(output.md),
        config=CONFIG_FILE,
        timings=f"{RUN}/benchmarks",
        title=f"msaflow run report: {CFG.run_name}",
        label=EVAL_NAME,  # the curve's name in the report
    log:
        f"{RUN}/logs/report.log",
    benchmark:
        f"{RUN}/benchmarks/report.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    threads: 1
    conda:
        "../envs/msaflow.yaml"
    shell:
        "msaflow report -o {params.out:q} {params.shards} --metrics {params.label}={input.metrics:q}"
        " --config {params.config:q} --timings {params.timings:q} --title {params.title:q} > {log:q} 2>&1"
