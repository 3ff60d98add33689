"""EMT-DLFR (or EMT) on a 60-s clip: one training step at the default length caps vs uncapped.

A 60-s clip in features mode is 6,000 audio steps (CREPE-tiny, 258-d at 100 Hz), 1,500
vision frames (FER, 135-d at 25 fps) and up to 128 text tokens (MiniLM, 384-d). The batch
holds `--batch` such clips, made by the same length control the loader applies
(`msaflow.pipeline.data.lengths.control_sample`), each setting in its own process so that its
peak RSS is its own. One step = compute_loss on (complete, incomplete at r = 0.5) +
backward; the median of `--steps` steps after one warm-up step.

    python benchmarks/bench_lengths.py [--batch 4] [--steps 3]
    python benchmarks/bench_lengths.py --model emt --batch 1 --settings default,uncapped

`--model emt` (no DLFR) trains on a batch of one clip, which DLFR's BatchNorm refuses.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SECONDS, AUDIO_HZ, FPS, TOKENS = 60.0, 100, 25, 128
DIMS = {"text": 384, "audio": 258, "vision": 135}
SETTINGS = {
    "default caps (text 128, audio 1000, vision 500)": {},
    "uncapped": {"text": {"max_steps": 0, "how": "truncate"}, "audio": {"max_steps": 0}, "vision": {"max_steps": 0}},
    "audio pooled to 10 Hz, caps 1000/500": {"audio": {"max_steps": 1000, "pool_hz": 10.0}},
}


def one_setting(name: str, batch: int, steps: int, model_name: str = "emt-dlfr") -> dict:
    import numpy as np
    import torch

    from msaflow.model.config import ModelConfig
    from msaflow.model.missing import simulate_missing
    from msaflow.model.registry import build_model
    from msaflow.pipeline.data.lengths import LengthConfig, control_sample
    from msaflow.pipeline.data.loader import collate
    from msaflow.pipeline.data.shard_reader import Sample

    torch.set_num_threads(2)
    cfg = LengthConfig.model_validate(SETTINGS[name])
    rng = np.random.default_rng(0)
    n_a, n_v = int(SECONDS * AUDIO_HZ), int(SECONDS * FPS)
    samples = []
    for i in range(batch):
        arrays = {
            "text_ids.npy": np.concatenate([[101], rng.integers(1000, 2000, TOKENS - 2), [102]]).astype(np.int64),
            "text.npy": rng.standard_normal((TOKENS, DIMS["text"])).astype(np.float32),
            "audio.npy": rng.standard_normal((n_a, DIMS["audio"])).astype(np.float32),
            "audio_mask.npy": np.ones(n_a, bool),
            "vision.npy": rng.standard_normal((n_v, DIMS["vision"])).astype(np.float32),
            "vision_mask.npy": np.ones(n_v, bool),
        }
        arrays = control_sample(arrays, "features", cfg, {"audio.npy": AUDIO_HZ, "vision.npy": FPS})
        samples.append(Sample(f"c{i}", {"id": f"c{i}", "label": 0.5}, arrays, 1.0))
    members = tuple(samples[0].arrays)
    order = ("text_ids.npy", "text.npy", "audio.npy", "audio_mask.npy", "vision.npy", "vision_mask.npy")
    batch_dict = collate(samples, tuple(m for m in order if m in members))
    model = build_model(model_name, ModelConfig(d_text=DIMS["text"], d_audio=DIMS["audio"], d_vision=DIMS["vision"],
                                                freeze_text=True))
    model.train()
    times = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        incomplete = simulate_missing(batch_dict, 0.5, generator=torch.Generator().manual_seed(step))
        loss, _ = model.compute_loss(batch_dict, incomplete)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    return {"setting": name, "steps": {m: int(batch_dict[m].shape[1]) for m in ("text_ids", "audio", "vision")},
            "step_s": round(statistics.median(times), 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default="emt-dlfr", choices=("emt-dlfr", "emt"))
    p.add_argument("--settings", default="", help="comma-separated first words of the settings to run "
                                                  "(default, uncapped, audio; default: all)")
    p.add_argument("--setting", help=argparse.SUPPRESS)  # internal: run one setting in this process
    args = p.parse_args()
    if args.setting:
        print(json.dumps(one_setting(args.setting, args.batch, args.steps, args.model)))
        return 0
    wanted = [w for w in args.settings.split(",") if w]
    rows = []
    for name in SETTINGS:
        if wanted and name.split()[0] not in wanted:
            continue
        done = subprocess.run([sys.executable, __file__, "--setting", name, "--batch", str(args.batch),
                               "--steps", str(args.steps), "--model", args.model], capture_output=True, text=True)
        if done.returncode:
            why = "killed (out of memory?)" if done.returncode in (-9, 137) else done.stderr.strip().splitlines()[-1]
            rows.append({"setting": name, "error": f"exit {done.returncode}: {why}"})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model} training step, batch of {args.batch} clip(s) of {SECONDS:.0f} s (features mode), 2 threads\n")
    print("| setting | text / audio / vision steps | step s | peak RSS MB |\n|---|---|---:|---:|")
    base = rows[0].get("step_s")
    for r in rows:
        if "error" in r:
            print(f"| {r['setting']} | - | failed: {r['error']} | - |")
            continue
        s = r["steps"]
        ratio = f" ({r['step_s'] / base:.1f}x)" if base else ""
        print(f"| {r['setting']} | {s['text_ids']} / {s['audio']} / {s['vision']} | {r['step_s']}{ratio} | "
              f"{r['peak_rss_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
