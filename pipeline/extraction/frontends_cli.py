"""`msaflow frontends`: the registered front-ends, their outputs and the weights they load.

Each front-end is instantiated (weights loaded from local files, never downloaded) so that
its output width and weights hash are the real ones; one whose weights or package are
missing is listed with the reason instead.
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger("msaflow.frontends")

COLUMNS = ("name", "modality", "input", "dim", "rate", "weights", "sha256", "licence")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", help="front-ends to show (default: all registered)")
    parser.add_argument("--text-model", metavar="PATH", help="local model folder to describe hf-text with")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def inspect(name: str, argument: str | None = None) -> dict:
    """One row: the description of a built front-end, or its class facts and why it cannot load."""
    from msaflow.extractors.frontends import REGISTRY

    cls = REGISTRY[name]
    row = {"name": name, "modality": cls.modality, "input": cls.input, "licence": cls.licence}
    try:
        fe = cls(argument)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, OSError) as err:
        return {**row, "dim": None, "rate": None, "weights": None, "sha256": None, "status": str(err)}
    return {**row, **fe.describe(), "weights_path": str(fe.weights_path), "status": "ok"}


def main(args: argparse.Namespace) -> int:
    from msaflow.extractors.frontends import DEFAULT_SPEC, REGISTRY

    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        log.error(f"msaflow frontends: error: unknown front-end(s) {', '.join(unknown)}; "
                  f"registered: {', '.join(sorted(REGISTRY))}")
        return 2
    names = args.names or sorted(REGISTRY, key=lambda n: (REGISTRY[n].modality, n))
    rows = [inspect(n, args.text_model if n == "hf-text" else None) for n in names]
    recognisers = [] if args.names else recogniser_rows()
    # the listing is the command's product on stdout (read, piped, parsed with --json): printed, not
    # logged, so -q keeps it
    if args.json:
        print(json.dumps({"default": DEFAULT_SPEC, "frontends": rows, "recognisers": recognisers}, indent=2))
        return 0
    print(f"default: --frontends {DEFAULT_SPEC}\n")
    for row in rows:
        rate = "per input step" if row["rate"] is None and row["status"] == "ok" else row["rate"]
        print(f"{row['name']}  ({row['modality']}, input {row['input']})")
        if row["status"] != "ok":
            print(f"  unavailable: {row['status']}")
        else:
            print(f"  dim {row['dim']}, rate {rate}")
            print(f"  weights {row['weights_path']}")
            print(f"  sha256  {row['sha256']}")
        print(f"  licence {row['licence']}\n")
    for row in recognisers:
        print(f"{row['recogniser']}  (speech recognition: extract.asr.recogniser)")
        print(f"  weights {row['weights']}\n  sha256  {row['sha256']}" if row["status"] == "ok"
              else f"  unavailable: {row['status']}")
        print(f"  licence {row['licence']}\n")
    return 0


def recogniser_rows() -> list[dict]:
    """The registered speech recognisers (extractors/asr.py), checked without loading them."""
    from msaflow.extractors.asr import ASR_REGISTRY, AsrConfig, AsrUnavailable, check_available

    rows = []
    for name, cls in sorted(ASR_REGISTRY.items()):
        try:
            rows.append({**check_available(AsrConfig(recogniser=name)), "licence": cls.licence, "status": "ok"})
        except AsrUnavailable as err:
            rows.append({"recogniser": name, "weights": None, "sha256": None, "licence": cls.licence,
                         "status": str(err)})
    return rows
