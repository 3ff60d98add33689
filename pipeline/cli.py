"""The `msaflow` command line: one subcommand per pipeline step.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their command runs, so
``msaflow --help`` stays fast and a broken optional dependency breaks one command only.

Messages go through the `logging` module (logger ``msaflow``): progress and results on
stdout, warnings and errors on stderr, one line each, so they land in log files as they do
on a terminal. ``-v`` / ``-q`` / ``--log-level`` choose how much. A user error (a bad
argument, a missing file, a config key that does not exist) ends with one line naming the
thing and the fix, and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# command name -> (module, one-line help), in the order data flows through them
COMMANDS: dict[str, tuple[str, str]] = {
    "manifest": ("msaflow.datasets.manifest", "read a dataset and write the normalized clip manifest"),
    "segment": ("msaflow.datasets.speech_segments",
                "cut long videos into utterances from their recognised speech (segments.csv)"),
    "extract": ("msaflow.pipeline.extraction.extract",
                "decode clips, detect faces, compute fbank/tokens (raw or features mode)"),
    "frontends": ("msaflow.pipeline.extraction.frontends_cli", "list the registered front-ends and their weights"),
    "shards": ("msaflow.pipeline.data.shards", "pack extracted clips into WebDataset shards per split"),
    "train": ("msaflow.pipeline.training.train_cli", "train EMT-DLFR or a baseline"),
    "evaluate": ("msaflow.pipeline.training.evaluate",
                 "metrics at every missing rate (or noise level) and their AUILC"),
    "predict": ("msaflow.pipeline.training.predict",
                "sentiment score for one video, a folder or a manifest with a trained run"),
    "export-text": ("msaflow.pipeline.training.export_text",
                    "a run's fine-tuned text encoder as a Hugging Face folder (warm start)"),
    "results": ("msaflow.pipeline.reporting.results",
                "one results table (CSV) across training runs, appended and deduplicated"),
    "report": ("msaflow.pipeline.reporting.report", "robustness curves, face-crop contact sheet, failures, timings"),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A mistake of the caller (argument, file, config key): one line naming it and the fix."""


class UserExit(SystemExit):
    """Exit status 2 after a user error was reported; `str()` is the message (for callers in-process)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USER_ERROR)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'msaflow train: error: ... (msaflow train --help)', status 2."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _ConsoleHandler(logging.Handler):
    """INFO and below on stdout, WARNING and above on stderr; the streams are looked up at each
    record, so a redirected sys.stdout / sys.stderr (tests, notebooks) gets the lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # pragma: no cover
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR and not message.startswith(("msaflow", "error")):
            return f"error: {message}"
        if record.levelno == logging.WARNING and not message.startswith(("note:", "warning:", "msaflow")):
            return f"warning: {message}"
        return message


def setup_logging(level: str | int = "info") -> logging.Logger:
    """The `msaflow` logger with one console handler (idempotent)."""
    logger = logging.getLogger("msaflow")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(_Format())
        logger.addHandler(handler)
    logger.propagate = False
    return logger


def _version() -> str:
    from msaflow import __version__

    return __version__


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(prog="msaflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"msaflow {_version()}")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=None, help="how much to say (default: info)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages too (= --log-level debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (= --log-level warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the command being run pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def log_level(args: argparse.Namespace) -> str:
    if args.log_level:
        return args.log_level
    return "debug" if args.verbose else "warning" if args.quiet else "info"


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. Errors a command leaves to this level end with one line
    and a status: a user error (UserError, DataError, a config that does not parse) and the
    machine's (OSError: no space, permission, I/O error, naming the file) and a folder in use by
    another process (LockError) exit with 2, a stop by a signal with 128 + the signal's number;
    the run can be started again and resumes."""
    from msaflow.lock import LockError, Stopped
    from msaflow.pipeline.api import quiet_third_party  # the API's commands are quiet the same way

    quiet_third_party()

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # --help, --version, a usage error (one line, status 2)
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USER_ERROR
    logger = setup_logging(log_level(args))
    module = importlib.import_module(COMMANDS[args.command][0])
    prefix = f"msaflow {args.command}: error:"
    try:
        return int(module.main(args) or 0)
    except LockError as exc:
        logger.error(f"{prefix} {exc}")
        return EXIT_USER_ERROR
    except OSError as exc:
        logger.error(f"{prefix} {_describe_os_error(exc)}")
        return EXIT_USER_ERROR
    except Stopped as exc:
        logger.error(f"msaflow {args.command}: {exc}")
        return 128 + exc.signum
    except SystemExit as exc:  # a command's own `raise SystemExit("message")`: a user error, one line, status 2
        if isinstance(exc.code, str):
            logger.error(f"{prefix} {exc.code}")
            raise UserExit(exc.code) from None
        raise
    except ValueError as exc:  # UserError, DataError and the config readers' errors
        if not _is_user_error(exc):
            raise
        logger.error(f"{prefix} {_one_line(exc)}")
        return EXIT_USER_ERROR


def _is_user_error(exc: ValueError) -> bool:
    from msaflow.pipeline.data.sources import DataError

    return isinstance(exc, (UserError, DataError))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _describe_os_error(exc: OSError) -> str:
    """'FILE: problem' on one line (no traceback: the machine's fault, not a bug)."""
    problem = exc.strerror or str(exc) or type(exc).__name__
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(names)}: {problem}" if names else problem


if __name__ == "__main__":
    sys.exit(main())
