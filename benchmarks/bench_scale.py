"""Training, evaluation and prediction at corpus scale: peak memory must not grow with the corpus.

Reads the corpora `benchmarks/scale_corpus.py` built (OUT/scale.json: N, 4N, 16N clips of
real media, raw and features shards) and runs, per corpus and mode, as separate processes
whose peak RSS is read by /usr/bin/time:

- train: a fixed number of steps (`--epoch-steps`), then one full validation pass and the
  test split scored once (per-rate protocol, one rate). Raw mode: `--model end-to-end`
  (FER face CNN trained, CREPE-tiny frozen, EMT-DLFR fusion); features mode: `emt-dlfr`
  with the text encoder frozen. samples/s = trained samples / training-phase seconds.
- evaluate: the run scored again on its test split (`--rescore`), at two rates.
- predict: one real clip through the run's extraction and model.

    python benchmarks/bench_scale.py --scale /tmp/msaflow-scale [--steps 20] [--batch 8]

Prints one table and writes SCALE/bench_scale.json. Run folders go under SCALE/bench-runs/.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MSAFLOW = str(Path(sys.executable).parent / "msaflow")
PREDICT_CLIP = REPO.parent / "shared" / "data" / "raw" / "grid" / "bbaf2n.mpg"

MODELS = {
    "raw": ("end-to-end", {"model": {"extra": {"end_to_end": {
        "fusion": "emt-dlfr", "frontends": {"vision": "fer", "audio": "crepe-tiny"},
        "policies": {"vision": "trained"}, "lr": {"vision": 1e-4}}}}}),
    "features": ("emt-dlfr", {}),
}


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, its output to `log`; fails loudly."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    kb = int(re.findall(r"maxrss_kb=(\d+)", text)[-1])
    return time.perf_counter() - t0, kb / 1024


def bench(corpus: str, mode: str, shards: Path, runs: Path, steps: int, batch: int, eval_batch: int,
          eval_rates: str) -> dict:
    model, config = MODELS[mode]
    run = runs / f"{corpus}-{mode}"
    cfg = runs / f"{mode}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    train = [MSAFLOW, "train", "--data", str(shards), "--model", model, "--config", str(cfg), "--epochs", "1",
             "--epoch-steps", str(steps), "--batch-size", str(batch), "--grad-accum", "1", "--protocol", "per-rate",
             "--missing-rate", "0.3", "--threads", "2", "--device", "cpu", "-o", str(run)]
    if mode == "features":
        train.append("--freeze-text")
    if (run / "metrics.json").is_file():  # a finished run is a resume that does nothing: train afresh
        subprocess.run(["rm", "-rf", str(run)], check=True)
    train_s, train_mb = timed(train, runs / f"{corpus}-{mode}-train.log")
    record = json.loads((run / "history.json").read_text())[0]
    index = {s: json.loads((shards / s / "index.json").read_text())["n_samples"] for s in ("train", "valid", "test")}
    eval_s, eval_mb = timed([MSAFLOW, "evaluate", str(run), "--data", str(shards), "--rates", eval_rates,
                             "--rescore", "--batch-size", str(eval_batch), "-o", str(run / "eval.json")],
                            runs / f"{corpus}-{mode}-evaluate.log")
    pred_s, pred_mb = timed([MSAFLOW, "predict", str(PREDICT_CLIP), "--checkpoint", str(run), "--text",
                             "bin blue at f two now", "--json"], runs / f"{corpus}-{mode}-predict.log")
    return {"corpus": corpus, "mode": mode, "samples": index, "train_peak_mb": round(train_mb),
            "train_samples_per_s": round(record["train_samples"] / max(record["train_seconds"], 1e-9), 2),
            "train_s": round(train_s, 1), "valid_and_test_s": round(record["seconds"] - record["train_seconds"], 1),
            "eval_peak_mb": round(eval_mb), "eval_s": round(eval_s, 1),
            "predict_peak_mb": round(pred_mb), "predict_s": round(pred_s, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=Path, default=Path("/tmp/msaflow-scale"), help="scale_corpus.py's --out")
    p.add_argument("--steps", type=int, default=20, help="training steps per run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default="features,raw")
    p.add_argument("--corpora", help="e.g. n100,n1600 (default: every corpus of scale.json)")
    p.add_argument("--eval-batch", type=int, default=8, help="evaluation batch: the same for every corpus")
    p.add_argument("--eval-rates", default="0.0,0.5")
    p.add_argument("--out-name", default="bench_scale.json")
    args = p.parse_args()
    corpora = json.loads((args.scale / "scale.json").read_text())
    runs = args.scale / "bench-runs"
    runs.mkdir(exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        for corpus, info in sorted(((k, v) for k, v in corpora.items() if k.startswith("n")),
                                   key=lambda kv: kv[1]["clips"]):
            if mode not in info or (args.corpora and corpus not in args.corpora.split(",")):
                continue
            rows.append(bench(corpus, mode, Path(info[mode]["shards_dir"]), runs, args.steps, args.batch,
                              args.eval_batch, args.eval_rates))
            print(json.dumps(rows[-1]), flush=True)
    header = ("corpus", "mode", "train/valid/test", "train peak MB", "train samples/s", "valid+test s",
              "eval peak MB", "eval s", "predict peak MB")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        s = r["samples"]
        print(f"| {r['corpus']} | {r['mode']} | {s['train']}/{s['valid']}/{s['test']} | {r['train_peak_mb']} | "
              f"{r['train_samples_per_s']} | {r['valid_and_test_s']} | {r['eval_peak_mb']} | {r['eval_s']} | "
              f"{r['predict_peak_mb']} |")
    for mode in {r["mode"] for r in rows}:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            print(f"{mode}: {last['corpus']} / {first['corpus']} peak RSS: train "
                  f"{last['train_peak_mb'] / first['train_peak_mb']:.2f}x, evaluate "
                  f"{last['eval_peak_mb'] / first['eval_peak_mb']:.2f}x, predict "
                  f"{last['predict_peak_mb'] / first['predict_peak_mb']:.2f}x")
    (args.scale / args.out_name).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                             "steps": args.steps, "batch": args.batch,
                                                             "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
