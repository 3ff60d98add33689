"""The GRID audiovisual sentence corpus: the sentence a file name encodes, and the demo dataset.

A GRID file name spells its sentence with one character per word of the grammar
`command colour preposition letter digit adverb`, e.g. `bbaf2n` = "bin blue at f two now".
Names may carry a prefix (`id2_vcd_swwp2s`): the code is the last `_`-separated part.

`python -m msaflow.datasets.grid SRC_DIR OUT_DIR` lays GRID `.mpg` files out as an MMSA raw
dataset (bytes unchanged) with a `label.csv`; that is how `datasets/demo` was made.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import string
import sys
from pathlib import Path

COMMANDS = {"b": "bin", "l": "lay", "p": "place", "s": "set"}
COLOURS = {"b": "blue", "g": "green", "r": "red", "w": "white"}
PREPOSITIONS = {"a": "at", "b": "by", "i": "in", "w": "with"}
LETTERS = {c: c for c in string.ascii_lowercase if c != "w"}
# GRID writes zero as `z` in file names (`lwbsza` = "lay white by s zero again").
DIGITS = dict(zip("z123456789", ["zero", "one", "two", "three", "four", "five", "six", "seven",
                                 "eight", "nine"]))
ADVERBS = {"a": "again", "n": "now", "p": "please", "s": "soon"}
GRAMMAR = (COMMANDS, COLOURS, PREPOSITIONS, LETTERS, DIGITS, ADVERBS)
# These sentences carry no sentiment: every demo clip is neutral. The demo shows the plumbing.
NEUTRAL = 0.0
DEMO_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
DEMO_SPLIT_SEED = 0


def grid_sentence(name: str) -> str:
    """The sentence a GRID file name (stem) encodes; ValueError if it is not a GRID code."""
    code = name.rsplit("_", 1)[-1]
    if len(code) != len(GRAMMAR):
        raise ValueError(f"{name!r}: a GRID code has {len(GRAMMAR)} characters, got {code!r}")
    words = []
    for position, (char, words_of_slot) in enumerate(zip(code, GRAMMAR), start=1):
        if char not in words_of_slot:
            raise ValueError(f"{name!r}: {char!r} is not a valid word code at position {position}")
        words.append(words_of_slot[char])
    return " ".join(words)


def make_demo(src: Path, out: Path) -> list[dict[str, str]]:
    """Copy GRID clips into `out/Raw/<stem>/1.mpg` and write `out/label.csv`; returns its rows.

    Each GRID file is one recording, so its stem is the video id and it has one clip, `1`.
    Splits: a seeded split of the video ids (DEMO_SPLIT_FRACTIONS; 7/2/2 for 11 clips).
    """
    from msaflow.datasets.manifest import by_video_split

    clips = sorted(src.glob("*.mpg"))
    if not clips:
        raise FileNotFoundError(f"no GRID .mpg files in {src}")
    splits = by_video_split([p.stem for p in clips], DEMO_SPLIT_SEED, DEMO_SPLIT_FRACTIONS)
    rows = []
    for clip in clips:
        target = out / "Raw" / clip.stem / "1.mpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, target)
        rows.append({"video_id": clip.stem, "clip_id": "1", "text": grid_sentence(clip.stem),
                     "label": str(NEUTRAL), "annotation": "Neutral", "mode": splits[clip.stem]})
    with open(out / "label.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lay GRID .mpg clips out as an MMSA raw dataset")
    parser.add_argument("src", type=Path, help="folder with GRID .mpg files")
    parser.add_argument("out", type=Path, help="dataset root to write")
    args = parser.parse_args(argv)
    rows = make_demo(args.src, args.out)
    print(f"{args.out}: {len(rows)} clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
