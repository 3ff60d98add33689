"""`msaflow export-text`: the fine-tuned text encoder of a training run as a Hugging Face folder.

Another run can start from it with `msaflow train --text-model FOLDER`: fine-tune a cheap
text-only model first, then train EMT-DLFR on top of its encoder (a two-stage warm start).
The folder holds the encoder's config, its weights from the run's `best.pt` and the
tokenizer files of the encoder the run started from; it is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

from msaflow.pipeline.data.sources import DataError
from msaflow.pipeline.training.run_dir import RunDir

log = logging.getLogger("msaflow.export_text")

ENCODER_PREFIX = "text_encoder.model."  # TextEncoder.model inside every registered model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ExportError(DataError):
    """The run has no fine-tuned encoder to export (a user error: one line, exit status 2)."""


def encoder_state(run_dir: Path) -> tuple[dict, str]:
    """(the encoder's state dict from best.pt, the text model the run started from)."""
    run = RunDir(run_dir).require_finished()
    model_cfg = run.config()["model_config"]
    if model_cfg.get("freeze_text"):
        raise ExportError(f"{run_dir}: the run kept its text encoder frozen; there is nothing fine-tuned to export")
    state = run.weights()
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ExportError(f"{run_dir}/best.pt: no text encoder weights (no '{ENCODER_PREFIX}*' keys)")
    return encoder, model_cfg["text_model"]


def export_text_encoder(run_dir: Path, out: Path) -> Path:
    from msaflow.extractors.text import load_text_encoder, text_model_path

    weights, text_model = encoder_state(run_dir)
    encoder = load_text_encoder(text_model)
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    # the run dropped the pooler (EMT reads the [CLS] state itself): keep the original's
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ExportError(f"{run_dir}/best.pt: encoder weights do not fit {text_model!r} "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    source = text_model_path(text_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        encoder.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        (tmp / "msaflow_export.json").write_text(json.dumps(
            {"run": str(run_dir.resolve()), "started_from": str(text_model)}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="training run directory whose text encoder was fine-tuned")
    p.add_argument("-o", "--out", type=Path, required=True, help="Hugging Face model folder to write")


def main(args: argparse.Namespace) -> int:
    out = export_text_encoder(args.run, args.out)  # a DataError is one line and exit status 2 (msaflow.pipeline.cli)
    log.info(f"text encoder of {args.run} written to {out}; train on top of it with --text-model {out}")
    return 0
