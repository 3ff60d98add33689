"""Does `msaflow evaluate` hold more memory on a bigger test split at a fixed scoring batch?

Writes two features-mode shard sets exactly as `msaflow shards` lays them out
(tests/loader_shards.py: clips of 1.2-4 s, 25 fps, 100 Hz), with 100 and 1,600 test clips,
trains one small EMT-DLFR run on the first (1 epoch), then scores it on both test splits at
scoring batches 1 and 8, each `msaflow evaluate` its own process (peak RSS from /usr/bin/time).

    python benchmarks/bench_eval_memory.py [--out /tmp/msaflow-evalmem]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MSAFLOW = str(Path(sys.executable).parent / "msaflow")
sys.path.insert(0, str(REPO / "tests"))


def peak(cmd: list[str]) -> float:
    done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", *cmd], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return int(re.findall(r"maxrss_kb=(\d+)", done.stderr)[-1]) / 1024


def main() -> int:
    from loader_shards import write_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/msaflow-evalmem"))
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    sizes = {"N": 100, "16N": 1600}
    for name, n in sizes.items():
        root = args.out / name
        write_split(root, "train", "features", [40], seed=1)
        write_split(root, "valid", "features", [20], seed=2, first_number=10000)
        write_split(root, "test", "features", [n // 4] * 4, seed=3, first_number=20000)
    run = args.out / "run"
    subprocess.run([MSAFLOW, "train", "--data", str(args.out / "N"), "--model", "emt-dlfr", "--freeze-text",
                    "--epochs", "1", "--batch-size", "8", "--threads", "2", "-o", str(run)], check=True,
                   capture_output=True)
    print("| scoring batch | N (100 test clips) peak MB | 16N (1,600) peak MB | 16N / N |\n|---:|---:|---:|---:|")
    for batch in (1, 8):
        mb = {name: peak([MSAFLOW, "evaluate", str(run), "--data", str(args.out / name), "--rates", "0.0",
                          "--rescore", "--batch-size", str(batch), "-o", str(args.out / f"{name}-{batch}.json")])
              for name in sizes}
        print(f"| {batch} | {mb['N']:.0f} | {mb['16N']:.0f} | {mb['16N'] / mb['N']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
