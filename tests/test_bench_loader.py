"""benchmarks/bench_loader.py on the CPU with tiny settings: its Markdown table and its JSON."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"
FACE_BYTES = 75 * 112 * 112 * 3  # 3 s of 112x112 RGB uint8 crops at 25 fps


def bench(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, mode -> row cells) of the printed Markdown table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")]
    return rows[0], {r[0]: r for r in rows[1:]}


def check_loader_rows(result: dict, workers: list[int], samples: int) -> None:
    assert [r["workers"] for r in result["loader"]] == workers
    assert result["epoch_samples"] == samples
    for row in result["loader"]:
        assert row["epoch_samples"] == samples
        assert row["over_cpu_count"] == (row["workers"] > os.cpu_count())
        host = row["host"]
        assert host["samples"] == samples and host["whole_epoch"]
        assert host["samples_per_s"] > 0 and host["seconds"] > 0 and host["first_batch_s"] >= 0
        assert "device" not in row  # the copy to a GPU: cuda only
    assert result["warm_pass"]["samples"] == samples
    assert result["best_workers"] in workers and result["best_loader_samples_per_s"] > 0


def test_loader_sweep_synthetic_then_shards(tmp_path):
    """Loader only (--steps 0): worker counts (one above the CPU count, flagged), --repeat,
    then --shards on the written folder (mode from its index), --limit, and a mode mismatch."""
    over = (os.cpu_count() or 1) + 1
    work, out = tmp_path / "work", tmp_path / "out"
    proc = bench("--modes", "raw", "--raw-samples", "8", "--raw-batch", "2", "--workers", f"0,1,{over}",
                 "--steps", "0", "--work", str(work), "--json", str(out / "a.json"))
    header, rows = table(proc.stdout)
    assert header[:5] == ["mode", "batch", "epoch samples", "loader 0 workers", "loader 1 worker"]
    assert header[5] == f"loader {over} workers*" and f"more workers than the {os.cpu_count()} CPUs" in proc.stdout
    assert set(rows) == {"raw"} and rows["raw"][1:3] == ["2", "8"]
    assert all(float(c.rstrip(" †")) > 0 for c in rows["raw"][3:6]) and rows["raw"][6:] == ["-"] * 4
    data = json.loads((out / "a.json").read_text())
    assert data["device"] == "cpu" and data["workers"] == [0, 1, over] and data["date"]
    assert data["machine"]["cpu_count"] == os.cpu_count() and data["machine"]["gpu"] is None
    assert data["machine"]["torch"] and data["machine"]["node"]
    raw = data["modes"]["raw"]
    assert raw["synthetic"] and raw["batch"] == 2 and raw["repeat"] == 1 and "step" not in raw
    check_loader_rows(raw, [0, 1, over], 8)
    assert raw["loader"][0]["host"]["bytes_per_sample"] > FACE_BYTES

    tars = sorted((work / "raw" / "train").glob("train-*.tar"))
    stamps = [t.stat().st_mtime_ns for t in tars]
    bench("--modes", "raw", "--raw-samples", "8", "--raw-batch", "2", "--repeat", "2", "--workers", "0",
          "--steps", "0", "--work", str(work), "--json", str(out / "r.json"))
    check_loader_rows(json.loads((out / "r.json").read_text())["modes"]["raw"], [0], 16)
    assert [t.stat().st_mtime_ns for t in tars] == stamps  # the index lists them twice, not rewritten

    proc = bench("--shards", str(work / "raw"), "--limit", "6", "--raw-batch", "2", "--workers", "0,2",
                 "--steps", "0", "--json", str(out / "b.json"))
    _, rows = table(proc.stdout)
    assert set(rows) == {"raw"} and rows["raw"][1:3] == ["2", "6"]
    raw = json.loads((out / "b.json").read_text())["modes"]["raw"]
    assert not raw["synthetic"] and raw["shards"] == str(work / "raw") and raw["limit"] == 6
    check_loader_rows(raw, [0, 2], 6)

    proc = bench("--shards", str(work / "raw"), "--modes", "features", "--steps", "0", expect=2)
    assert "'raw' mode" in proc.stderr


def test_features_step(tmp_path):
    """In-memory and fed steps (features mode: quick on a CPU), synthetic then --shards."""
    work, out = tmp_path / "work", tmp_path / "out"
    proc = bench("--modes", "features", "--features-samples", "8", "--features-batch", "2", "--workers", "0",
                 "--steps", "1", "--fed-steps", "0", "--work", str(work), "--json", str(out / "f.json"))
    header, rows = table(proc.stdout)
    assert header[-4:] == ["step (in memory)", "step fed by loader", "fed / in memory", "loader (best) / step"]
    row = rows["features"]
    assert float(row[4]) > 0 and row[5].endswith("(0 workers)") and float(row[6]) > 0 and row[7].endswith("x")
    step = json.loads((out / "f.json").read_text())["modes"]["features"]["step"]
    assert step["in_memory"]["steps"] == 1 and step["in_memory"]["samples"] == 2
    assert step["fed"]["steps"] == 4 and step["fed"]["samples"] == 8 and step["fed"]["workers"] == 0  # one epoch
    assert step["in_memory"]["samples_per_s"] > 0 and step["fed"]["samples_per_s"] > 0
    assert step["fed_over_in_memory"] == pytest.approx(step["fed"]["samples_per_s"] / step["in_memory"]["samples_per_s"])
    assert "gpu_idle_fraction" not in step["fed"]


@pytest.mark.slow
def test_steps_over_shards(tmp_path):
    """--shards with steps: features (widths from the index; fed over two epochs, one worker), then
    raw as in the GPU run (the end-to-end model: tens of seconds a step on a small CPU)."""
    work, out = tmp_path / "work", tmp_path / "out"
    bench("--modes", "features", "--features-samples", "8", "--steps", "0", "--workers", "0", "--work", str(work))
    bench("--shards", str(work / "features"), "--features-batch", "2", "--workers", "0,1", "--steps", "1",
          "--fed-steps", "6", "--fed-workers", "1", "--json", str(out / "s.json"))
    step = json.loads((out / "s.json").read_text())["modes"]["features"]["step"]
    assert step["fed"]["steps"] == 6 and step["fed"]["samples"] == 12 and step["fed"]["workers"] == 1  # 2 epochs

    proc = bench("--modes", "raw", "--raw-samples", "8", "--raw-batch", "2", "--workers", "0,1", "--steps", "1",
                 "--work", str(work), "--json", str(out / "x.json"))
    _, rows = table(proc.stdout)
    assert rows["raw"][1:3] == ["2", "8"] and float(rows["raw"][5]) > 0
    raw = json.loads((out / "x.json").read_text())["modes"]["raw"]
    check_loader_rows(raw, [0, 1], 8)
    assert raw["step"]["in_memory"]["samples"] == 2 and raw["step"]["fed"]["samples"] == 2
    assert raw["step"]["fed"]["workers"] == raw["best_workers"]
    assert raw["step"]["in_memory"]["samples_per_s"] > 0 and raw["step"]["fed"]["samples_per_s"] > 0

    bench("--shards", str(work / "raw"), "--raw-batch", "2", "--workers", "1", "--steps", "1",
          "--json", str(out / "y.json"))
    raw = json.loads((out / "y.json").read_text())["modes"]["raw"]
    check_loader_rows(raw, [1], 8)
    assert raw["step"]["fed"]["samples"] == 2 and raw["step"]["fed"]["workers"] == 1


# ---------------------------------------------------------------- the cuda code paths, without a GPU


class FakeEvent:
    """torch.cuda.Event on the host clock: elapsed_time in ms between two record() calls."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t - self.t) * 1000.0


@pytest.fixture
def fake_cuda(monkeypatch):
    """The script with torch.cuda faked: host-clock events, no-op synchronize, copies left on the host,
    and no pinning (`module.pin_requests` records what make_loader was asked)."""
    spec = importlib.util.spec_from_file_location("bench_loader_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.setattr(module, "to_device", lambda batch, device: batch)
    real_make_loader, module.pin_requests = module.make_loader, []

    def make_loader(*args, pin_memory: bool = False, **kwargs):
        module.pin_requests.append((kwargs.get("num_workers", 0), pin_memory))
        return real_make_loader(*args, **kwargs)

    monkeypatch.setattr(module, "make_loader", make_loader)
    return module


class SleepyModel(torch.nn.Module):
    """A 'step' of `seconds` on the host, with the model interface train_step uses."""

    def __init__(self, seconds: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seconds = seconds

    def simulate_missing(self, batch, rate, seed=None):
        return batch

    def compute_loss(self, complete, incomplete):
        time.sleep(self.seconds)
        return (self.w * complete["label"]).sum(), {}


def test_gpu_idle_fraction(fake_cuda):
    """Idle = the gaps between one step's end and the next one's start: here half of each step cycle."""
    model = SleepyModel(0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def slow_batches():
        while True:
            time.sleep(0.05)
            yield {"id": ["a", "b"], "label": torch.ones(2)}

    out = fake_cuda.timed_steps(model, optimizer, slow_batches(), 5, torch.device("cuda"))
    assert out["steps"] == 5 and out["samples"] == 10
    assert 0.3 < out["gpu_idle_fraction"] < 0.6  # 4 gaps of 50 ms in a span of 5 x 50 + 4 x 50 ms
    ready = itertools.repeat({"id": ["a", "b"], "label": torch.ones(2)})
    assert fake_cuda.timed_steps(model, optimizer, ready, 5, torch.device("cuda"))["gpu_idle_fraction"] < 0.1


def test_cuda_loader_sweep_table_and_json(fake_cuda, tmp_path, capsys):
    """--device cuda, loader only: host and +copy passes per worker count, in the table and the JSON."""
    assert fake_cuda.main(["--device", "cuda", "--modes", "raw", "--raw-samples", "8", "--raw-batch", "2",
                           "--workers", "0,1", "--steps", "0", "--work", str(tmp_path / "w"),
                           "--json", str(tmp_path / "g.json")]) == 0
    stdout = capsys.readouterr().out
    header, rows = table(stdout)
    assert header[-1] == "GPU idle in memory / fed" and "Fake GPU" in stdout
    for cell in rows["raw"][3:5]:
        host, copied = cell.split(" / ")
        assert float(host) > 0 and float(copied) > 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["device"] == "cuda" and data["machine"]["gpu"] == "Fake GPU"
    for row in data["modes"]["raw"]["loader"]:
        assert row["host"]["samples"] == row["device"]["samples"] == 8
        assert row["device"]["device_dtypes"]["face"] == "uint8" and row["device"]["gb_per_s"] > 0
    assert fake_cuda.pin_requests == [(1, False), (0, True), (1, True)]  # warm-up pass, then the sweep pinned
    assert data["modes"]["raw"]["best_loader_samples_per_s"] == max(
        r["device"]["samples_per_s"] for r in data["modes"]["raw"]["loader"])


class PlacedSleepyModel(SleepyModel):
    def to(self, *args, **kwargs):  # stays on the host: the batches do too (fake_cuda's to_device)
        return self


def test_cuda_steps_table_and_json(fake_cuda, tmp_path, capsys, monkeypatch):
    """--device cuda with steps: in memory vs fed (pinned loader, the sweep's best count), GPU idle fractions."""
    monkeypatch.setattr(fake_cuda, "build_step_model", lambda mode, dims=None: PlacedSleepyModel(0.01))
    sgd = torch.optim.SGD  # Adam.step asks the (fake) CUDA runtime about graph capture
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: sgd(params, lr=lr))
    assert fake_cuda.main(["--device", "cuda", "--modes", "raw", "--raw-samples", "8", "--raw-batch", "2",
                           "--workers", "0", "--steps", "2", "--fed-steps", "3", "--work", str(tmp_path / "w"),
                           "--json", str(tmp_path / "g.json")]) == 0
    _, rows = table(capsys.readouterr().out)
    in_memory_idle, fed_idle = rows["raw"][-1].split(" / ")
    assert in_memory_idle.endswith("%") and fed_idle.endswith("%")
    step = json.loads((tmp_path / "g.json").read_text())["modes"]["raw"]["step"]
    assert step["in_memory"]["samples"] == 4 and step["fed"]["samples"] == 6 and step["fed"]["workers"] == 0
    assert 0 <= step["in_memory"]["gpu_idle_fraction"] <= 1 and 0 <= step["fed"]["gpu_idle_fraction"] <= 1
    assert fake_cuda.pin_requests[-1] == (0, True)  # the fed loader pins
