# msaflow workflow: manifest -> extract (N parallel chunk jobs) -> shards -> train (seeds x rates)
# -> evaluate -> report. One rule file per step in workflow/rules/, each rule calling one `msaflow`
# command; the steps' knobs live in the config (validated against workflow/schemas/config.schema.json)
# and results in results/<run_name>/.
#
#   snakemake --cores 2                                   the bundled demo (config/config.yaml)
#   snakemake --cores 8 --configfile config/mosi.yaml     another config: it replaces the demo's
#   snakemake --report report.html                        after a run: Snakemake's report of it
#
# A killed run resumes with the same command plus --rerun-incomplete (docs/workflow.md).

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# The default target (rules in included files never are): the run's report.
rule all:
    input:
        rules.report.output.md,
