"""The `msaflow` command line: one subcommand per pipeline step.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their command runs, so
``msaflow --help`` stays fast and a broken optional dependency breaks one command only.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under msaflow.pipeline, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "manifest": ("manifest", "read a dataset and write the normalized clip manifest"),
    "segment": ("segment", "cut long videos into utterances from their recognised speech (segments.csv)"),
    "extract": ("extract", "decode clips, detect faces, compute fbank/tokens (raw or features mode)"),
    "shards": ("shards", "pack extracted clips into WebDataset shards per split"),
    "frontends": ("frontends_cli", "list the registered front-ends and their weights"),
    "train": ("train", "train EMT-DLFR or a baseline"),
    "export-text": ("export_text", "a run's fine-tuned text encoder as a Hugging Face folder (warm start)"),
    "evaluate": ("evaluate", "metrics at every missing rate (or noise level) and their AUILC"),
    "report": ("report", "robustness curves, face-crop contact sheet, failures, timings"),
    "predict": ("predict", "sentiment score for one video with a trained checkpoint"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msaflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the command being run pays for its imports
            importlib.import_module(f"msaflow.pipeline.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Errors a command leaves to this level end with one line
    and a status: the machine's (OSError: no space, permission, I/O error, naming the file) and
    a folder in use by another process (LockError) exit with 2, a stop by a signal with 128 + the
    signal's number; the run can be started again and resumes."""
    from msaflow.pipeline.lock import LockError, Stopped

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(f"msaflow.pipeline.{COMMANDS[args.command][0]}")
    try:
        return int(module.main(args) or 0)
    except LockError as exc:
        print(f"msaflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"msaflow {args.command}: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"msaflow {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signum


def _describe_os_error(exc: OSError) -> str:
    """'FILE: problem' on one line (no traceback: the machine's fault, not a bug)."""
    import os

    problem = exc.strerror or str(exc) or type(exc).__name__
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(names)}: {problem}" if names else problem


if __name__ == "__main__":
    sys.exit(main())
