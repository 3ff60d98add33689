"""`msaflow train`'s options (pipeline/training/options.py): one owner of every default, flags over
the `train:` section of a workflow `--config` over the defaults, a note for every override, and
the workflow's short train command equal to the flag-string form."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from loader_shards import write_split

from msaflow.pipeline.cli import build_parser, setup_logging
from msaflow.pipeline.cli import main as cli
from msaflow.pipeline.data.sources import DataError
from msaflow.pipeline.training.options import TrainOptions, TrainSection, merge_options, read_config


def parsed(*argv: str):
    return build_parser(["train", *argv]).parse_args(["train", *argv])


def options(*argv: str) -> tuple[TrainOptions, list[str]]:
    from msaflow.pipeline.training.train_cli import options_from_args

    return options_from_args(parsed(*argv))


def workflow_config(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({"run_name": "t", "pickle": "x.pkl", "train": train}))
    return path


def test_one_owner_of_the_defaults():
    import msaflow.device
    from msaflow.model.missing import CORRUPTIONS
    from msaflow.pipeline.config import WorkflowConfig
    from msaflow.pipeline.training.options import DEVICES, EvaluateSection
    from msaflow.pipeline.training.rates import CORRUPTIONS as NAMES
    from msaflow.pipeline.training.run_config import RunConfig

    assert WorkflowConfig.model_fields["train"].annotation is TrainSection
    assert WorkflowConfig.model_fields["evaluate"].annotation is EvaluateSection
    default, run, section = TrainOptions(), RunConfig(data="x.pkl"), TrainSection()
    assert default.protocol == section.protocol == run.protocol == "single-model"
    assert (run.model, run.dataset, run.threads, run.seed) == (default.model, default.preset, default.threads, 0)
    assert DEVICES == msaflow.device.DEVICES and NAMES == tuple(CORRUPTIONS)
    args = vars(parsed())
    assert not set(args) & set(TrainOptions.model_fields)  # a flag not given is absent: the model's default holds


def test_flags_over_the_config_section_over_the_defaults(tmp_path, capsys):
    config = workflow_config(tmp_path / "w.yaml", model="late-fusion", epochs=5, batch_size=4, freeze_text=True,
                             seeds=[7])
    setup_logging()  # the command's console handler: notes on stderr
    opts, config_file = options("--config", str(config), "--epochs", "2", "--batch-size", "4", "--data", "d")
    assert (opts.model, opts.epochs, opts.batch_size, opts.freeze_text) == ("late-fusion", 2, 4, True)
    assert (opts.seed, opts.protocol, opts.threads) == (7, "single-model", 2)  # seeds: [7]; defaults
    assert config_file.section.model == "late-fusion"
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"note: --epochs 2 overrides train.epochs: 5 of {config}"]  # --batch-size 4 = the section's


def test_a_sweep_gives_a_single_run_its_point_only_when_it_is_one():
    section = TrainSection(protocol="per-rate", seeds=[0, 1], rates=[0.3])
    opts, notes = merge_options({"seed": 1}, section, "w.yaml")
    assert (opts.seed, opts.missing_rate, notes) == (1, 0.3, [])
    _, notes = merge_options({"seed": 5}, section, "w.yaml")
    assert notes == ["note: --seed 5 is not one of train.seeds [0, 1] of w.yaml"]
    with pytest.raises(ValueError, match=r"train.seeds lists 2 values \[0, 1\]: a single run needs --seed"):
        merge_options({}, section, "w.yaml")
    # single-model runs do not read the rates; the flags alone, without a section
    opts, _ = merge_options({"seed": 0}, TrainSection(rates=[0.1, 0.2]), "w.yaml")
    assert opts.missing_rate == 0.0
    opts, notes = merge_options({"preset": "sims", "protocol": "lnln"}, None)
    assert (opts.preset, opts.protocol, notes) == ("sims", "lnln", [])


def test_section_and_flag_mistakes_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"train.epoch: Extra inputs are not permitted \(did you mean 'epochs'\?\)"):
        read_config(workflow_config(tmp_path / "a.yaml", epoch=3), DataError)
    with pytest.raises(DataError, match=r"train.protocol: Input should be"):
        read_config(workflow_config(tmp_path / "b.yaml", protocol="every-rate"), DataError)
    with pytest.raises(DataError, match=r"--complete-share: Input should be less than or equal to 1"):
        options("--complete-share", "1.5")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("option_shards")
    write_split(root, "train", "features", [6, 4], seed=1)
    write_split(root, "valid", "features", [4], seed=2, first_number=100)
    write_split(root, "test", "features", [5], seed=3, first_number=200)
    return root


def flag_string(t: TrainSection, seed: int, rate: float | None) -> list[str]:
    """The `msaflow train` arguments the workflow built from its train section, flag by flag."""
    args = ["--model", t.model, "--dataset", t.preset, "--protocol", t.protocol, "--seed", str(seed)]
    args += [] if rate is None else ["--missing-rate", str(rate)]
    for flag, value in (("--epochs", t.epochs), ("--patience", t.patience), ("--batch-size", t.batch_size),
                        ("--grad-accum", t.grad_accum)):
        args += [] if value is None else [flag, str(value)]
    return args + (["--freeze-text"] if t.freeze_text else []) + (["--valid-rates", t.valid_rates]
                                                                   if t.valid_rates else [])


def test_the_short_workflow_command_trains_the_run_of_the_flag_string(shards, tmp_path, capsys):
    config = workflow_config(tmp_path / "w.yaml", model="emt", preset="mosi", protocol="per-rate", rates=[0.0, 0.3],
                             seeds=[0, 1], epochs=1, batch_size=4, grad_accum=1, freeze_text=True,
                             valid_rates="0.0,0.5", threads=1, model_settings={"d_model": 32, "n_layers": 1})
    section = read_config(config).section
    common = ["train", "--data", str(shards), "--config", str(config), "--threads", "1", "--device", "cpu"]
    long, short = tmp_path / "long", tmp_path / "short"
    assert cli([*common, "-o", str(long), *flag_string(section, 1, 0.3)]) == 0
    assert cli([*common, "-o", str(short), "--seed", "1", "--missing-rate", "0.3"]) == 0
    assert "overrides" not in capsys.readouterr().err  # the flag string repeats the section: no notes
    read = lambda run, name: json.loads((run / name).read_text())  # noqa: E731
    assert read(short, "config.json") == read(long, "config.json")
    assert read(short, "config.json")["protocol"] == "per-rate" and read(short, "config.json")["missing_rate"] == 0.3
    assert read(short, "metrics.json")["rates"] == read(long, "metrics.json")["rates"]


def test_more_threads_than_usable_cores_is_warned_about(shards, tmp_path, capsys):
    from msaflow.device import oversubscription, usable_cores

    cores = usable_cores()
    assert oversubscription(cores) is None and oversubscription(1, cores) is None
    assert f"use --threads {max(1, cores // 2)}" in oversubscription(cores, 2)
    common = ["train", "--data", str(shards), "--model", "emt", "--epochs", "1", "--batch-size", "4",
              "--freeze-text", "--device", "cpu"]
    assert cli([*common, "-o", str(tmp_path / "fits"), "--threads", str(cores)]) == 0
    assert "usable CPU core" not in capsys.readouterr().err
    assert cli([*common, "-o", str(tmp_path / "too_many"), "--threads", str(cores + 1)]) == 0  # a warning, not an error
    assert f"{cores + 1} torch thread(s) x 1 process(es) on {cores} usable CPU core(s)" in capsys.readouterr().err


def test_unlabeled_clips_are_refused_naming_them(tmp_path, capsys):
    """A folder of videos without labels.csv gives clips without labels: a one-line error, not a NaN loss."""
    from msaflow.pipeline.data.sources import open_source

    common = ["train", "--model", "emt", "--epochs", "1", "--batch-size", "4", "--freeze-text", "--device", "cpu",
              "--threads", "1"]

    def corpus(root: Path, unlabeled) -> list:
        clips = write_split(root, "train", "features", [6, 4], seed=1, unlabeled=unlabeled)
        write_split(root, "valid", "features", [4], seed=2, first_number=100)
        write_split(root, "test", "features", [5], seed=3, first_number=200)
        return clips

    corpus(tmp_path / "none", range(10))
    assert cli([*common, "--data", str(tmp_path / "none"), "-o", str(tmp_path / "run_none")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"train split: 8 clip\(s\) of a batch of 8 have no label \(\S+/\d, .* \.\.\.\): training "
                     r"needs a label on every train and valid clip", err), err
    assert "labels CSV" in err and not (tmp_path / "run_none").exists()  # refused before the run folder
    # one unlabeled clip outside the first batch that the up-front check reads: found when training reaches it
    clips = corpus(tmp_path / "some", ())
    first = set(open_source(tmp_path / "some").first_batch("train", 8)["id"])
    late = next(c for c in clips if c.id not in first)
    corpus(tmp_path / "some", {late.number})
    assert cli([*common, "--data", str(tmp_path / "some"), "-o", str(tmp_path / "run_some")]) == 2
    assert f"train split: 1 clip(s) of a batch of 4 have no label ({late.id})" in capsys.readouterr().err
