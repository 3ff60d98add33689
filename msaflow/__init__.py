"""msaflow: raw talking-person videos to a trained, robust multimodal sentiment model.

The code lives in the repository's top-level folders and is imported under this name:
``msaflow.pipeline``, ``msaflow.extractors``, ``msaflow.model``, ``msaflow.datasets``.

The Python API (the same code as the `msaflow` commands; a user error raises ValueError with
the command's one-line message)::

    import msaflow

    run = msaflow.train("results/demo/shards", "runs/s0", model="end-to-end", epochs=2, batch_size=4,
                        config="config/config.yaml")      # any `msaflow train` option, `-` spelled `_`
    metrics = msaflow.evaluate(["runs/s0", "runs/s1"], "results/demo/shards", rates="0.0:1.0:0.1",
                               out="metrics.json")      # seeds of one configuration, pooled
    arrays = msaflow.extract_clip("clip.mp4", "what was said", config={"mode": "raw", "fps": 25})
    arrays["face"].shape, arrays["fbank"].shape, arrays["meta"]["n_face_frames"]

    run = msaflow.load_run("runs/s0")                   # the model stays loaded
    run.predict("clip.mp4", text="what was said").score
    rows = run.predict_many(["a.mp4", "b.mp4"])         # or dicts with path, text, start, end
    msaflow.results(["runs/s0", "runs/s1"], out="results.csv")   # one row per run, appended

- ``train(data, out, *, model="emt-dlfr", config=None, **options) -> Run``: ``msaflow train``;
  ``config`` is a YAML path or its content as a dict (``{"model": {...}, "optim": {...}}``, or a
  workflow config whose ``train:`` section gives defaults the options override).
- ``evaluate(runs, data, *, out=None, **options) -> dict``: ``msaflow evaluate`` (``rates``,
  ``corruption``, ``rescore``, ``threads``); the metrics.json content.
- ``extract_clip(path, text="", *, config=None, start=None, end=None, device="cpu") -> dict`` (``device``:
  auto, cpu or cuda, the rule of ``msaflow.device``):
  one clip's arrays by member name (raw: face, vision_mask, wav, fbank, audio_mask, text_ids;
  features: vision, audio, text, ...) and ``meta``.
- ``load_run(run_dir, device="cpu", extract_config=None) -> Run``: ``.predict(video, text="",
  start=None, end=None)`` returns a Prediction (``score``, ``n_face_frames``, ``has_audio``,
  ...); ``.predict_many(clips)`` a list of rows; ``.config``, ``.metrics``, ``.model``.
- ``results(runs, out=None) -> list[dict]``: ``msaflow results``.

Log messages go to the ``msaflow`` logger (``logging.basicConfig(level=logging.INFO)`` shows
the progress lines).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "train", "evaluate", "extract_clip", "load_run", "results", "Run"]


def train(data, out, *, model: str = "emt-dlfr", config=None, **options):
    """Train a model on a shard folder or an MMSA pickle into the run folder `out`; the loaded Run.
    Options are `msaflow train`'s (`epochs=2`, `batch_size=4`, `protocol="single-model"`, ...)."""
    from msaflow.pipeline.api import train as _train

    return _train(data, out, model=model, config=config, **options)


def evaluate(runs, data, *, out=None, **options) -> dict:
    """Metrics of one run or of seeds of one configuration at every missing rate, and their AUILC."""
    from msaflow.pipeline.api import evaluate as _evaluate

    return _evaluate(runs, data, out=out, **options)


def extract_clip(path, text: str = "", *, config=None, start=None, end=None, device: str = "cpu") -> dict:
    """One video through the extraction of `msaflow extract`: {member name: array, "meta": dict}."""
    from msaflow.pipeline.api import extract_clip as _extract_clip

    return _extract_clip(path, text, config=config, start=start, end=end, device=device)


def load_run(run_dir, device: str = "cpu", extract_config=None):
    """A finished training run with its model loaded; `.predict(video)` scores clips."""
    from msaflow.pipeline.api import load_run as _load_run

    return _load_run(run_dir, device=device, extract_config=extract_config)


def results(runs, out=None) -> list[dict]:
    """One results row per run (model, protocol, seed, encoder, every metric, AUILC); added to `out`."""
    from msaflow.pipeline.api import results as _results

    return _results(runs, out=out)


def __getattr__(name: str):
    if name == "Run":
        from msaflow.pipeline.training.predict import Run

        return Run
    raise AttributeError(f"module 'msaflow' has no attribute {name!r}")
