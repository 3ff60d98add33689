"""benchmarks/bench_end_to_end.py: its pure helpers, and a tiny CPU run of the whole script
(tables, profiler files, JSON) as the GPU session will run it."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_end_to_end.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_end_to_end", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_config_names_parse_into_flags():
    assert bench.parse_config("trained") == bench.Spec("trained")
    assert bench.parse_config("trained+bf16+channels_last") == bench.Spec("trained", bf16=True, channels_last=True)
    for name in bench.CONFIGS:
        policy, bf16, ckpt = bench.CONFIGS[name]
        assert bench.parse_config(name) == bench.Spec(policy, bf16=bf16, ckpt=ckpt)
    for bad in ("trainee", "trained+fp8", "trained+bf16+bf16", ""):
        with pytest.raises(ValueError):
            bench.parse_config(bad)


def test_compile_adds_a_twin_of_each_config():
    assert bench.expand_configs(["frozen", "trained+bf16"], False) == ["frozen", "trained+bf16"]
    assert bench.expand_configs(["trained", "trained+compile"], True) == ["trained", "trained+compile"]
    assert bench.expand_configs(["frozen", "trained+bf16"], True) == [
        "frozen", "trained+bf16", "frozen+compile", "trained+bf16+compile"]


def test_flops_are_counted_on_a_config_doing_the_plain_trained_work():
    assert bench.flops_config(["frozen", "trained+bf16", "trained"]) == "trained"
    assert bench.flops_config(["frozen", "trained+ckpt", "trained+bf16+channels_last"]) == "trained+bf16+channels_last"
    assert bench.flops_config(["frozen", "trained+ckpt", "trained+compile"]) is None  # a process of its own


def test_batches_list_and_single_batch_alias():
    assert bench.parse_batches("8,32,128", 4) == [8, 32, 128]
    assert bench.parse_batches(None, 8) == [8]  # gpu_check.sh's --batch 8
    with pytest.raises(ValueError):
        bench.parse_batches("0", 4)


def test_batches_larger_than_the_clips_cycle_them():
    assert bench.batch_indices(10, 8) == [[0, 1, 2, 3, 4, 5, 6, 7]]  # as before: whole slices only
    assert bench.batch_indices(4, 2) == [[0, 1], [2, 3]]
    (big,) = bench.batch_indices(10, 128)
    assert len(big) == 128 and big[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert bench.batch_indices(2, 3) == [[0, 1, 0]]


def test_union_of_intervals_counts_overlaps_once():
    assert bench.union_length([]) == 0
    assert bench.union_length([(0, 1), (2, 3)]) == 2
    assert bench.union_length([(0, 2), (1, 3), (1.5, 1.7), (5, 6)]) == 4
    assert bench.union_length([(4, 5), (0, 10)]) == 10


class FakeEvent:
    def __init__(self, device, start_us, end_us, kind):
        self._device, self._start, self._end, self._kind = device, start_us * 1000, end_us * 1000, kind

    def device_type(self):
        return self._device

    def start_ns(self):
        return self._start

    def end_ns(self):
        return self._end

    def activity_type(self):
        return self._kind


class FakeProfile:
    """The parts of torch.profiler.profile that device_busy reads, as a CUDA run fills them."""

    def __init__(self, events, self_device_us):
        self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))
        self._averages = [SimpleNamespace(self_device_time_total=us) for us in self_device_us]

    def key_averages(self):
        return self._averages


def test_gpu_busy_is_the_union_of_kernel_intervals_over_wall_time():
    from torch.autograd import DeviceType

    events = [FakeEvent(DeviceType.CPU, 0, 1000, "cpu_op"),  # host ops do not count
              FakeEvent(DeviceType.CUDA, 100, 300, "kernel"),
              FakeEvent(DeviceType.CUDA, 200, 400, "kernel"),  # overlaps the first: counted once
              FakeEvent(DeviceType.CUDA, 500, 600, "gpu_memcpy")]  # a copy: device activity, not a kernel
    busy = bench.device_busy(FakeProfile(events, [200, 200]), wall_s=0.001, n_steps=2)
    assert busy["gpu_kernel_s_per_step"] == pytest.approx(150e-6)
    assert busy["gpu_active_s_per_step"] == pytest.approx(200e-6)
    assert busy["gpu_self_time_s_per_step"] == pytest.approx(200e-6)
    assert busy["gpu_busy"] == pytest.approx(0.3)
    assert busy["gpu_busy_measure"] == "union of CUDA kernel intervals"


def test_gpu_busy_without_cuda_events_is_no_measurement():
    from torch.autograd import DeviceType

    busy = bench.device_busy(FakeProfile([FakeEvent(DeviceType.CPU, 0, 10, "cpu_op")], []), 0.001, 1)
    assert busy["gpu_busy"] is None and busy["gpu_busy_measure"].startswith("sum of self CUDA time")


def test_failure_reasons():
    assert bench.failure_reason("Traceback\ntorch.OutOfMemoryError: CUDA out of memory. Tried") == "out of memory"
    assert bench.failure_reason("timeout after 600 s\n...") == "timeout after 600 s"
    assert bench.failure_reason("killed by signal 6\ndouble free or corruption") == \
        "killed by signal 6: double free or corruption"
    assert bench.failure_reason("x\nRuntimeError: boom\n") == "RuntimeError: boom"


def test_breakdown_sum_needs_every_part():
    rows = [{"module": "a", "in_sum": True, "fp32_ms": 1.0, "bf16_ms": 2.0},
            {"module": "b", "in_sum": True, "fp32_ms": 3.0, "bf16_ms": None},
            {"module": "c", "in_sum": False, "fp32_ms": 100.0, "bf16_ms": 100.0}]
    total = bench.breakdown_sum(rows)
    assert total["fp32_ms"] == 4.0 and total["bf16_ms"] is None


@pytest.fixture(scope="module")
def grid_data(shared_data: Path) -> Path:
    if not all((shared_data / "raw" / "grid" / f"{n}.mpg").is_file() for n in bench.GRID[:2]):
        pytest.skip(f"GRID clips not found under {shared_data / 'raw' / 'grid'}")
    return shared_data


@pytest.mark.slow
def test_cpu_run_writes_tables_profiles_and_json(grid_data: Path, tmp_path: Path):
    from msaflow.model.end_to_end import cpu_bf16_problem

    configs = ["trained"] if cpu_bf16_problem() else ["trained", "trained+bf16"]
    profile, out_json = tmp_path / "profile", tmp_path / "x.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--clips", "2", "--batches", "2", "--steps", "1",
           "--threads", "2", "--configs", ",".join(configs), "--profile", str(profile), "--profile-steps", "1",
           "--breakdown", "--breakdown-reps", "1", "--json", str(out_json), "--work", str(tmp_path / "work")]
    env = {**os.environ, "MSAFLOW_SHARED_DATA": str(grid_data), "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout
    for name in configs:
        line = next((x for x in table.splitlines() if x.startswith(f"| {name} | 2 |")), None)
        assert line is not None and "failed" not in line, table
        for suffix in (".txt", ".json.gz"):
            path = profile / f"{name}-b2{suffix}"
            assert path.is_file() and path.stat().st_size > 0, path
    assert "FLOPs per training sample:" in table and "| module | fp32 ms | bf16 ms | bf16/fp32 |" in table
    assert "aten::" in (profile / "trained-b2.txt").read_text()
    trace = json.loads(gzip.decompress((profile / "trained-b2.json.gz").read_bytes()))
    assert trace["traceEvents"]

    result = json.loads(out_json.read_text())
    assert result["flops"]["flops_per_sample"] > 0 and result["flops"]["config"] == "trained"
    assert [r["config"] for r in result["rows"]] == configs
    assert all(r["samples_per_s"] > 0 and r["peak_mib"] > 0 for r in result["rows"])
    assert result["machine"]["torch"] and result["machine"]["date"]
    modules = {r["module"]: r for r in result["breakdown"]["rows"]}
    assert any(m.startswith("vision: fer front-end (NCHW") for m in modules)
    assert any(m.startswith("audio: crepe-tiny front-end") for m in modules)
    assert any(m.startswith("fusion: emt-dlfr") for m in modules)
    assert all(r["fp32_ms"] > 0 for r in modules.values() if r["note"] is None)
    assert result["breakdown"]["sum"]["fp32_ms"] > 0
