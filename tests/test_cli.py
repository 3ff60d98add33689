"""The command line: one-line user errors (exit status 2, nothing created), --version,
--list-models alone, logging and progress lines, the per-epoch CSV, what a run records about
its data (hash, extraction settings, modalities used), and `msaflow evaluate`'s data checks
and pooling rules."""

from __future__ import annotations

import csv
import pickle
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loader_shards import write_split

from msaflow.pipeline.cli import main as cli

FAST = ["--model", "emt", "--freeze-text", "--epochs", "1", "--batch-size", "4", "--grad-accum", "1",
        "--threads", "1", "--device", "cpu"]


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and errors[0].startswith(f"msaflow {command}: error:"), err
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_shards")
    write_split(root, "train", "features", [6, 4], seed=1)
    write_split(root, "valid", "features", [4], seed=2, first_number=100)
    write_split(root, "test", "features", [5], seed=3, first_number=200)
    return root


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_runs") / "s0"
    assert cli(["train", "--data", str(shards), "-o", str(out), *FAST]) == 0
    return out


# ---------------------------------------------------------------- small things


def test_version_and_list_models_alone(capsys):
    from msaflow import __version__

    assert cli(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"msaflow {__version__}"
    assert cli(["train", "--list-models"]) == 0
    models = capsys.readouterr().out.split()
    assert {"emt-dlfr", "end-to-end", "tfn-style", "text-only"} <= set(models)


def test_quiet_silences_the_info_lines_of_every_command(tmp_path, capsys):
    """-q: a command's status and summary lines (logged at info level) leave stdout empty; without it
    they are there (`msaflow manifest` on the packaged demo dataset, the cheapest command)."""
    import msaflow.datasets

    demo = Path(msaflow.datasets.__file__).resolve().parent / "demo"
    assert cli(["-q", "manifest", str(demo), "-o", str(tmp_path / "quiet.csv")]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and (tmp_path / "quiet.csv").is_file()
    assert cli(["manifest", str(demo), "-o", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'm.csv'}: 11 clips read as mmsa-raw" in out and "all " in out  # line and summary table
    assert cli(["--log-level", "warning", "manifest", str(demo), "-o", str(tmp_path / "w.csv")]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("case", ["unknown model", "missing pickle", "optim typo", "model typo", "bad yaml",
                                  "unknown section", "no data", "bad rates"])
def test_user_errors_are_one_line_status_2_and_create_nothing(case, shards, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "c.yaml"
    args = ["train", "--data", str(shards), "-o", str(out), *FAST]
    expect = {"unknown model": "unknown model 'emt-dlf' (did you mean 'emt-dlfr'?)",
              "missing pickle": "nope.pkl: no such file", "optim typo": "optim: unknown key 'lr_txt' (did you mean "
              "'lr_text'?)", "model typo": "model: unknown key 'd_modle'", "bad yaml": "not valid YAML at line 2",
              "unknown section": "unknown section(s) ['optm']", "no data": "required: --data",
              "bad rates": "--valid-rates"}[case]
    if case == "unknown model":
        args[args.index("emt")] = "emt-dlf"
    elif case == "missing pickle":
        args[2] = str(tmp_path / "nope.pkl")
    elif case == "no data":
        args = ["train", "-o", str(out)]
    elif case == "bad rates":
        args += ["--valid-rates", "0:1:0"]
    else:
        config.write_text({"optim typo": "optim:\n  lr_txt: 1.0\n", "model typo": "model:\n  d_modle: 8\n",
                           "bad yaml": "optim: [\n", "unknown section": "optm:\n  lr_text: 1.0\n"}[case])
        args += ["--config", str(config)]
    assert cli(args) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert expect in line
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps({"train": {}})], ids=["garbage", "no splits"])
def test_a_file_that_is_not_an_mmsa_pickle_is_one_line(command, content, request, tmp_path, capsys):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(content)
    out = tmp_path / "run" if command == "train" else tmp_path / "e.json"
    args = (["train", "--data", str(bad), "-o", str(out), *FAST] if command == "train"
            else ["evaluate", str(request.getfixturevalue("finished")), "--data", str(bad), "-o", str(out)])
    code = cli(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(bad) in one_error_line(err, command)
    assert not out.exists()


def test_third_party_progress_bars_are_silenced(shards, tmp_path):
    """A whole `msaflow train` in a fresh process (the text encoder loads): no "Loading weights" bar;
    progress lines land in a log file (no terminal) on stdout, the per-epoch CSV in the run folder."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "train", "--data", str(shards), "-o",
                           str(out), "--model", "emt", "--epochs", "2", "--batch-size", "4", "--grad-accum", "1",
                           "--threads", "1", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout
    assert "epoch 1/2:" in proc.stdout and "epoch 2/2:" in proc.stdout
    assert "scored test" in proc.stdout and "done:" in proc.stdout
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and {"train_loss", "valid_loss", "seconds"} <= set(rows[0])
    quiet = subprocess.run([sys.executable, "-m", "msaflow.pipeline.cli", "-q", "train", "--data", str(shards),
                            "-o", str(out), "--model", "emt", "--epochs", "2", "--batch-size", "4", "--grad-accum",
                            "1", "--threads", "1", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stdout == ""  # -q: warnings and errors only


def test_epoch_progress_lines_when_no_terminal(caplog):
    import logging

    from msaflow.pipeline.training.train import EpochProgress

    progress = EpochProgress(0, 10, enabled=True, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="msaflow.train"):
        for step in range(3):
            progress(step)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["epoch 1: 1/10 batches", "epoch 1: 2/10 batches"]


# ---------------------------------------------------------------- what a run records


def test_run_records_data_hash_and_modalities(finished, shards):
    from msaflow.pipeline.training.evaluate import data_fingerprint

    config = json.loads((finished / "config.json").read_text())
    assert config["data_hash"] == data_fingerprint(shards) and len(config["data_hash"]) == 64
    assert config["modalities"] == {"data": ["text", "audio", "vision"], "used": ["text", "audio", "vision"],
                                    "unused": []}


def test_a_model_leaving_modalities_unused_says_so(shards, tmp_path, capsys):
    out = tmp_path / "text"
    args = ["train", "--data", str(shards), "-o", str(out), *FAST]
    args[args.index("emt")] = "text-only"
    assert cli(args) == 0
    assert "model text-only uses text; audio, vision in the data are not used" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["modalities"]["unused"] == ["audio", "vision"]


@pytest.mark.parametrize("model", ["tfn-style", "emt-dlfr"])
def test_raw_shards_need_end_to_end(model, tmp_path, capsys):
    """Raw shards hold face crops and audio only end-to-end front-ends read: another model would
    train on the text alone, so the run is refused before its folder exists."""
    root = tmp_path / "raw"
    write_split(root, "train", "raw", [3], seed=1)
    write_split(root, "valid", "raw", [1], seed=2, first_number=100)
    write_split(root, "test", "raw", [1], seed=3, first_number=200)
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "-o", str(out), *FAST]
    args[args.index("emt")] = model
    assert cli(args) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "use --model end-to-end" in line and "face crops and audio" in line
    assert not out.exists()


def _extract_settings():
    from msaflow.pipeline.extraction.settings import ExtractConfig

    return ExtractConfig(mode="features", fps=5.0, detect_every=2, threads=1).model_dump(mode="json")


def _stamp(shard_dir: Path, settings: dict, in_index: bool) -> None:
    from msaflow.pipeline.extraction.settings import extract_config_hash

    for split in ("train", "valid", "test"):
        path = shard_dir / split / "index.json"
        index = json.loads(path.read_text())
        index["config_hash"] = extract_config_hash(settings)
        if in_index:
            index["extract"] = settings
        path.write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["index", "chunk summary"])
def test_a_run_made_by_hand_records_the_shards_extraction_settings(where, shards, tmp_path):
    """No --config: the settings come from the shards' index.json (or, for shards written before
    it recorded them, the extraction folder's chunk summary beside them), and predict accepts them."""
    from msaflow.pipeline.training.predict import extract_config

    copy = tmp_path / "results" / "shards"
    shutil.copytree(shards, copy)
    settings = _extract_settings()
    _stamp(copy, settings, in_index=where == "index")
    if where == "chunk summary":
        chunks = tmp_path / "results" / "extract-0123456789ab" / "chunks"
        chunks.mkdir(parents=True)
        (chunks / "1-of-1.json").write_text(json.dumps({"config": settings}))
    out = tmp_path / "run"
    assert cli(["train", "--data", str(copy), "-o", str(out), *FAST]) == 0
    run = json.loads((out / "config.json").read_text())
    assert run["extract"] == settings
    cfg = extract_config(run, None, run["model"])  # checked against the shards' config hash
    assert cfg.fps == 5.0 and cfg.mode == "features"


# ---------------------------------------------------------------- evaluate


def test_evaluate_rescores_other_data_and_names_what_it_scored(finished, shards, tmp_path, capsys):
    out = tmp_path / "same.json"
    assert cli(["evaluate", str(finished), "--data", str(shards), "-o", str(out)]) == 0
    same = json.loads(out.read_text())
    assert same["reused_run_metrics"] == [str(finished)]
    assert same["data"] == str(shards) and same["model"] == "emt" and same["runs"] == [str(finished)]
    assert same["data_hash"] == json.loads((finished / "config.json").read_text())["data_hash"]

    other = tmp_path / "other"  # the same layout, other samples: a different test split
    write_split(other, "train", "features", [6, 4], seed=1)
    write_split(other, "valid", "features", [4], seed=2, first_number=100)
    write_split(other, "test", "features", [3], seed=9, first_number=300)
    capsys.readouterr()
    out2 = tmp_path / "other.json"
    assert cli(["evaluate", str(finished), "--data", str(other), "-o", str(out2)]) == 0
    scored = json.loads(out2.read_text())
    assert scored["reused_run_metrics"] == [] and scored["n_test"] == 3  # scored afresh, on its own test split
    assert "other data than it trained on" in capsys.readouterr().out


def test_evaluate_refuses_to_pool_different_models(finished, shards, tmp_path, capsys):
    other = tmp_path / "late"
    args = ["train", "--data", str(shards), "-o", str(other), *FAST]
    args[args.index("emt")] = "late-fusion"
    assert cli(args) == 0
    capsys.readouterr()
    out = tmp_path / "m.json"
    assert cli(["evaluate", str(finished), str(other), "--data", str(shards), "-o", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert "differ in model" in line and "'emt' vs 'late-fusion'" in line
    assert not out.exists()


def test_evaluate_pools_seeds(finished, shards, tmp_path):
    seed1 = tmp_path / "s1"
    assert cli(["train", "--data", str(shards), "-o", str(seed1), *FAST, "--seed", "1"]) == 0
    out = tmp_path / "m.json"
    assert cli(["evaluate", str(finished), str(seed1), "--data", str(shards), "-o", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["seeds"] == [0, 1] and metrics["n_runs_per_rate"]["0.0"] == 2
