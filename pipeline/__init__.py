"""The steps after the dataset adapters, in the order data flows through them:

    extraction/  manifest rows -> clips/<key>.tar        (msaflow extract)
    data/        clip tars -> shards; shards or a pickle -> batches   (msaflow shards; the loader)
    training/    batches -> a trained run -> metrics     (msaflow train, evaluate, predict)
    reporting/   runs -> results table and report        (msaflow results, report)

and the thin layer over them: `cli` (the `msaflow` command), `api` (the Python API) and
`config` (the workflow config, one pydantic model per step).
"""
