"""`msaflow manifest`: the three dataset adapters on real clips, every validation error with
its file and row, the bundled GRID demo, and the command's exit status."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import msaflow.datasets
from msaflow.datasets.adapters import ADAPTERS
from msaflow.datasets.base import ManifestError
from msaflow.datasets.grid import grid_sentence
from msaflow.pipeline.cli import main as cli_main
from msaflow.datasets.manifest import (MANIFEST_COLUMNS, ManifestConfig, build_manifest, by_video_split,
                                       read_manifest, sanitize_key, write_manifest)

DEMO = Path(msaflow.datasets.__file__).resolve().parent / "demo"
MMSA_HEADER = "video_id,clip_id,text,label,label_T,label_A,label_V,annotation,mode\n"


@pytest.fixture(scope="session")
def grid(shared_data) -> dict[str, Path]:
    return {p.stem: p for p in sorted((shared_data / "raw" / "grid").glob("*.mpg"))}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put(src: Path, dst: Path) -> Path:
    """Copy a real clip into a dataset (a symlink out of the root would be an escape)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def problems_of(root: Path, cfg: ManifestConfig | None = None) -> list[str]:
    with pytest.raises(ManifestError) as info:
        build_manifest(root, cfg)
    return [str(p) for p in info.value.problems]


def assert_problem(problems: list[str], file: str, row: int | None, *words: str) -> None:
    where = f"{file}, row {row}:" if row is not None else f"{file}:"
    hits = [p for p in problems if where in p and all(w in p for w in words)]
    assert hits, f"no problem at {where!r} mentioning {words}; got:\n" + "\n".join(problems)


# --- keys, config, splits --------------------------------------------------------------------

def test_sanitize_key():
    assert sanitize_key("3g5yRhG7mFE/12") == "3g5yRhG7mFE_12"
    assert sanitize_key("video_0001/0001") == "video_0001_0001"
    assert sanitize_key("é vidéo/1.5-3") == "__vid_o_1_5-3"


def test_config_formats_are_the_registry_and_validation():
    assert set(ManifestConfig.model_json_schema()["properties"]["format"]["enum"]) == {"auto", *ADAPTERS}
    with pytest.raises(ValueError, match="label_range"):
        ManifestConfig(label_range=(3, -3))
    with pytest.raises(ValueError, match="split_fractions"):
        ManifestConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        ManifestConfig(fromat="folder")  # typo: extra keys are rejected
    assert ManifestConfig(video_extensions=("MP4", ".Avi")).video_extensions == (".mp4", ".avi")


def test_by_video_split_is_seeded_and_whole_videos():
    ids = [f"v{i:02d}" for i in range(20)]
    split = by_video_split(ids, seed=0, fractions=(0.6, 0.2, 0.2))
    assert sorted(split) == ids
    assert [list(split.values()).count(s) for s in ("train", "valid", "test")] == [12, 4, 4]
    assert split == by_video_split(list(reversed(ids)) + ids, 0, (0.6, 0.2, 0.2))
    assert split != by_video_split(ids, 1, (0.6, 0.2, 0.2))


# --- the bundled demo -------------------------------------------------------------------------

def test_grid_sentence_agrees_with_word_alignment(shared_data):
    align = (shared_data / "raw" / "grid" / "swwp2s.align").read_text().split("\n")
    words = [line.split()[2] for line in align if line.strip() and line.split()[2] != "sil"]
    assert grid_sentence("id2_vcd_swwp2s").split() == words
    assert grid_sentence("bbaf2n") == "bin blue at f two now"
    assert grid_sentence("lwbsza") == "lay white by s zero again"
    with pytest.raises(ValueError, match="position 4"):
        grid_sentence("bbawzn")  # no letter w in GRID
    with pytest.raises(ValueError, match="6 characters"):
        grid_sentence("hello")


def test_demo_dataset_manifest(grid):
    df = build_manifest(DEMO)
    assert df.attrs["format"] == "mmsa-raw"
    assert list(df.columns) == MANIFEST_COLUMNS
    assert len(df) == 11 == len(grid)
    assert dict(zip(df["video_id"], df["text"])) == {stem: grid_sentence(stem) for stem in grid}
    assert (df["label"] == 0.0).all() and df["start"].isna().all() and df["end"].isna().all()
    assert df["split"].value_counts().to_dict() == {"train": 7, "valid": 2, "test": 2}
    for row in df.itertuples():
        assert row.id == f"{row.video_id}/1" and Path(row.path).is_absolute()
        assert sha256(Path(row.path)) == sha256(grid[row.video_id])  # bytes unchanged
    assert (DEMO / "ATTRIBUTION.md").read_text().count("CC BY 4.0") >= 1


# --- adapters on real clips -------------------------------------------------------------------

def test_mmsa_raw_adapter_per_modality_labels_and_non_ascii_round_trip(tmp_path, grid, shared_data):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "vidA" / "1.mpg")
    put(grid["brbk7n"], root / "Raw" / "vidA" / "2.mpg")
    put(shared_data / "raw" / "hdtf" / "hdtf_aoc.mp4", root / "Raw" / "vidB" / "0001.mp4")
    put(grid["lbax4n"], root / "Raw" / "café 漢字" / "1.mpg")
    tricky = 'Ça "marche", vraiment?\nOui — 很好 😀 ; NA'
    write_csv(root / "label.csv", MMSA_HEADER
              + "vidA,1,bin blue at f two now,1.4,1.0,-0.5,0.2,Positive,train\n"
              + 'vidA,2,"' + tricky.replace('"', '""') + '",-2.8,,,,Negative,VAL\n'
              + "vidB,0001,,,,,,,\n"
              + "café 漢字,1,lay blue at x four now,0,,,,,test\n")
    df = build_manifest(root)
    assert df.attrs["format"] == "mmsa-raw"
    assert list(df["id"]) == ["vidA/1", "vidA/2", "vidB/0001", "café 漢字/1"]
    assert sanitize_key(df.loc[3, "id"]) == "caf_____1"
    assert list(df["split"]) == ["train", "valid", "test", "test"]  # alias, then the default split
    assert df.loc[0, ["label", "label_T", "label_A", "label_V"]].tolist() == [1.4, 1.0, -0.5, 0.2]
    assert pd.isna(df.loc[2, "label"]) and df.loc[2, "text"] == ""
    assert df.loc[2, "path"] == str((root / "Raw" / "vidB" / "0001.mp4").resolve())

    out = tmp_path / "manifest.csv"
    write_manifest(df, out)
    back = read_manifest(out)
    assert back.loc[1, "text"] == tricky  # exact, newline and quotes included
    assert back.loc[2, "text"] == "" and pd.isna(back.loc[2, "label"])
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert out.read_bytes().decode("utf-8")  # UTF-8, no other encoding


def test_segments_adapter_on_a_long_video(tmp_path, grid):
    root = tmp_path / "ds"
    root.mkdir()
    parts = "|".join(str(grid[s]) for s in ("bbaf2n", "brbk7n", "lbax4n"))
    ffmpeg("-i", f"concat:{parts}", "-c", "copy", str(root / "talk1.mpg"))  # 9 s, not re-encoded
    (root / "sub").mkdir()
    ffmpeg("-i", str(grid["sbwe5n"]), "-c", "copy", str(root / "sub" / "other.mkv"))
    write_csv(root / "segments.csv", "video_id,start,end,clip_id,text,label,split,path\n"
              "talk1,0,3,,bin blue at f two now,0.5,train,\n"
              "talk1,3.0,6.25,,bin red by k seven now,-1,test,\n"
              "talk2,0.5,2,seg01,set blue with e five now,,valid,sub/other.mkv\n")
    df = build_manifest(root)
    assert df.attrs["format"] == "segments"
    assert list(df["id"]) == ["talk1/0.000-3.000", "talk1/3.000-6.250", "talk2/seg01"]
    assert df["start"].tolist() == [0.0, 3.0, 0.5] and df["end"].tolist() == [3.0, 6.25, 2.0]
    assert df.loc[2, "path"] == str(root.resolve() / "sub" / "other.mkv")
    assert pd.isna(df.loc[2, "label"])


def test_folder_adapter_with_partial_csv_and_seeded_split(tmp_path, grid):
    root = tmp_path / "vids"
    put(grid["bbaf2n"], root / "a.mpg")
    put(grid["pwij3p"], root / "day1" / "b.mpg")
    ffmpeg("-i", str(grid["sbia1a"]), "-c", "copy", str(root / "day1" / "c.mkv"))  # remuxed
    put(grid["lrwp9a"], root / ".hidden" / "skip.mpg")
    write_csv(root / "notes.txt", "not a video\n")
    write_csv(root / "labels.csv", "file,text,label,split\n"
              "a.mpg,bin blue at f two now,2.5,train\n"
              "day1/c.mkv,set blue in a one again,-0.5,\n")
    cfg = ManifestConfig(default_split="by-video", split_seed=3)
    df = build_manifest(root, cfg)
    assert df.attrs["format"] == "folder"
    assert list(df["id"]) == ["a/whole", "day1/b/whole", "day1/c/whole"]
    assert df["label"].tolist()[::2] == [2.5, -0.5] and pd.isna(df.loc[1, "label"])
    assert df.loc[1, "text"] == ""  # no CSV row: kept, unlabeled, text missing
    assert df.loc[0, "split"] == "train" and set(df["split"]) <= {"train", "valid", "test"}
    assert df.equals(build_manifest(root, cfg))  # the seeded split is deterministic

    # the same rows matched by video id instead of file name
    write_csv(root / "labels.csv", "video_id,label\nday1/b,1.0\n")
    df = build_manifest(root, ManifestConfig(default_split="valid"))
    assert df.set_index("video_id").loc["day1/b", "label"] == 1.0
    assert set(df["split"]) == {"valid"}


def test_format_auto_detection_and_explicit_format(tmp_path, grid):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "v" / "1.mpg")
    write_csv(root / "label.csv", "video_id,clip_id,label\nv,1,0\n")
    assert build_manifest(root).attrs["format"] == "mmsa-raw"
    # an explicit format wins; the folder format reads the MMSA label.csv and says why it cannot
    assert_problem(problems_of(root, ManifestConfig(format="folder")), str(root / "label.csv"), 1,
                   "unknown column 'clip_id'")
    own = write_csv(tmp_path / "own.csv", "file,label\nRaw/v/1.mpg,1.5\n")
    folder = build_manifest(root, ManifestConfig(format="folder", labels=str(own)))
    assert folder.attrs["format"] == "folder" and list(folder["id"]) == ["Raw/v/1/whole"]
    assert folder["label"].tolist() == [1.5]
    segments = write_csv(tmp_path / "mine.csv", "video_id,start,end\nRaw/v/1,0,1\n")
    assert_problem(problems_of(root, ManifestConfig(labels=str(segments))), str(segments), 2,
                   "video_id", "escapes")


# --- validation: every error, with its file and row --------------------------------------------

def test_mmsa_raw_validation_collects_every_error(tmp_path, grid):
    root = tmp_path / "ds"
    for video in ("good", "a b", "a_b", "lab", "lab2", "lab3", "spl"):
        put(grid["bbaf2n"], root / "Raw" / video / "1.mpg")
    put(grid["brbk7n"], root / "Raw" / "amb" / "1.mp4")
    put(grid["brbk7n"], root / "Raw" / "amb" / "1.mpg")
    csv_path = write_csv(root / "label.csv", MMSA_HEADER
                         + "good,1,ok,0,,,,,train\n"          # row 2
                         + "good,9,missing,0,,,,,train\n"     # row 3: no such file
                         + "good,1,again,0,,,,,train\n"       # row 4: duplicate id
                         + "a b,1,x,0,,,,,train\n"            # row 5: fine
                         + "a_b,1,x,0,,,,,train\n"            # row 6: same key as row 5
                         + "lab,1,x,positive,,,,,train\n"     # row 7: label not a number
                         + "lab2,1,x,3.5,,,,,train\n"         # row 8: out of range
                         + "lab3,1,x,0,nan,,,,train\n"        # row 9: label_T not finite
                         + "spl,1,x,0,,,,,holdout\n"          # row 10: unknown split
                         + "..,1,x,0,,,,,train\n"             # row 11: escapes
                         + "good,../../etc/passwd,x,0,,,,,train\n"  # row 12: escapes
                         + "amb,1,x,0,,,,,train\n"            # row 13: two files match
                         + "good,2,too,few\n")                # row 14: field count
    problems = problems_of(root)
    f = str(csv_path)
    assert_problem(problems, f, 3, "missing file", "good/9.*")
    assert_problem(problems, f, 4, "duplicate id 'good/1'", "row 2")
    assert_problem(problems, f, 6, "same key 'a_b_1'", "'a b/1'", "row 5")
    assert_problem(problems, f, 7, "label 'positive' is not a number")
    assert_problem(problems, f, 8, "label 3.5 is outside", "[-3, 3]")
    assert_problem(problems, f, 9, "label_T 'nan' is not a finite number")
    assert_problem(problems, f, 10, "unknown split 'holdout'", "train, valid, test")
    assert_problem(problems, f, 11, "video_id '..' escapes the dataset root")
    assert_problem(problems, f, 12, "clip_id '../../etc/passwd' escapes the dataset root")
    assert_problem(problems, f, 13, "ambiguous", "1.mp4", "1.mpg")
    assert_problem(problems, f, 14, "4 fields, the header has 9")
    assert len(problems) == 11, problems

    # a wider label range (CH-SIMS is [-1, 1], others differ): the range is the dataset's
    assert not any("row 8" in p for p in problems_of(root, ManifestConfig(label_range=(-5, 5))))


def test_mmsa_raw_video_folder_symlinked_out_of_the_root(tmp_path, grid):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "in" / "1.mpg")
    put(grid["brbk7n"], tmp_path / "outside" / "1.mpg")
    (root / "Raw" / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    csv_path = write_csv(root / "label.csv", "video_id,clip_id\nin,1\nout,1\n")
    [problem] = problems_of(root)
    assert problem.startswith(f"{csv_path}, row 3:") and "symlink" in problem and "outside the dataset root" in problem


def test_unknown_and_missing_columns(tmp_path, grid):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "v" / "1.mpg")
    csv_path = write_csv(root / "label.csv", "video_id,clip_id,label,sentiment\nv,1,0,pos\n")
    assert_problem(problems_of(root), str(csv_path), 1, "unknown column 'sentiment'")
    write_csv(root / "label.csv", "video_id,text,label\nv,hi,0\n")
    assert_problem(problems_of(root, ManifestConfig(format="mmsa-raw")), str(csv_path), 1,
                   "missing required column 'clip_id'")


def test_latin1_csv_is_reported_with_its_row_and_a_fix(tmp_path, grid):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "v" / "1.mpg")
    put(grid["brbk7n"], root / "Raw" / "v" / "2.mpg")
    csv_path = write_csv(root / "label.csv", 'video_id,clip_id,text\nv,1,"two\nlines"\nv,2,très bien\r\n'
                         'v,3,déjà\n', encoding="latin-1")
    [problem] = problems_of(root)
    assert problem.startswith(f"{csv_path}, row 3:")  # the third record, on the fourth line
    assert "not valid UTF-8" in problem and "rows 3, 4 affected" in problem
    assert "Latin-1" in problem and "re-encode" in problem and "iconv" in problem
    # the same text as UTF-8 (with a BOM, as spreadsheet programs write it) is fine
    write_csv(root / "label.csv", "\ufeffvideo_id,clip_id,text\nv,1,plain\nv,2,très bien\n")
    assert build_manifest(root)["text"].tolist() == ["plain", "très bien"]


def test_segment_times_and_paths_outside_the_root(tmp_path, grid):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "talk.mpg")
    outside = put(grid["brbk7n"], tmp_path / "elsewhere" / "secret.mpg")
    (root / "link.mpg").symlink_to(outside)
    csv_path = write_csv(root / "segments.csv", "video_id,start,end,path\n"
                         "talk,0,1,\n"                      # row 2: fine
                         "talk,2,2,\n"                      # row 3: start == end
                         "talk,-1,1,\n"                     # row 4: negative
                         "talk,abc,1,\n"                    # row 5: not a number
                         "talk,,,\n"                        # row 6: no times
                         "x,0,1,../elsewhere/secret.mpg\n"  # row 7: ../ path
                         f"x,0,1,{outside}\n"               # row 8: absolute, outside
                         "x,0,1,link.mpg\n"                 # row 9: symlink escape
                         "y,0,1,gone.mpg\n"                 # row 10: missing file
                         "nofile,0,1,\n")                   # row 11: no <root>/nofile.*
    problems = problems_of(root)
    f = str(csv_path)
    assert_problem(problems, f, 3, "start 2 is not before end 2")
    assert_problem(problems, f, 4, "negative time")
    assert_problem(problems, f, 5, "start 'abc' is not a number")
    assert_problem(problems, f, 6, "start and end are required")
    assert_problem(problems, f, 7, "path '../elsewhere/secret.mpg' escapes the dataset root")
    assert_problem(problems, f, 8, "escapes the dataset root")
    assert_problem(problems, f, 9, "symlink", "outside the dataset root")
    assert_problem(problems, f, 10, "missing file", "gone.mpg")
    assert_problem(problems, f, 11, "missing file", "nofile.*")
    assert len(problems) == 9, problems


def test_folder_csv_errors_and_symlink_escape(tmp_path, grid):
    root = tmp_path / "vids"
    put(grid["bbaf2n"], root / "a.mpg")
    put(grid["brbk7n"], root / "a.mkv")  # same video id as a.mpg
    (root / "esc.mpg").symlink_to(grid["lbax4n"])  # points outside the root
    write_csv(root / "readme.txt", "hello\n")
    csv_path = write_csv(root / "labels.csv", "file,label,split\n"
                         "a.mpg,0.5,train\n"         # row 2: fine
                         "a.mpg,1,train\n"           # row 3: second row for the file
                         "missing.mp4,0,test\n"      # row 4: missing
                         "readme.txt,0,test\n"       # row 5: not a video
                         "../x.mp4,0,test\n"         # row 6: escapes
                         "a.mkv,1e9,test\n")         # row 7: out of range
    problems = problems_of(root)
    f = str(csv_path)
    assert_problem(problems, f, 3, "duplicate row for a.mpg", "row 2")
    assert_problem(problems, f, 4, "missing file")
    assert_problem(problems, f, 5, "'readme.txt' is not a video file")
    assert_problem(problems, f, 6, "escapes the dataset root")
    assert_problem(problems, f, 7, "outside the dataset's label range")
    assert_problem(problems, str(root / "esc.mpg"), None, "symlink", "outside the dataset root")
    assert_problem(problems, str(root / "a.mpg"), None, "a.mkv, a.mpg give the same video id 'a'")
    assert len(problems) == 7, problems


# --- the command ------------------------------------------------------------------------------

def test_cli_writes_manifest_and_exits_2_listing_every_error(tmp_path, grid, capsys):
    root = tmp_path / "ds"
    put(grid["bbaf2n"], root / "Raw" / "v" / "1.mpg")
    csv_path = write_csv(root / "label.csv", "video_id,clip_id,text,label,mode\n"
                         "v,1,ok,7,train\n" "v,2,gone,0,dev\n")
    out = tmp_path / "out" / "manifest.csv"
    assert cli_main(["manifest", str(root), "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "2 problem(s)" in err[0]
    assert err[1].strip().startswith(f"{csv_path}, row 2: label 7 is outside")
    assert err[2].strip().startswith(f"{csv_path}, row 3: missing file")
    assert not out.exists()

    # flags override the config file; the workflow config layout is understood
    config = tmp_path / "workflow.yaml"
    config.write_text(yaml.safe_dump({"run_name": "t", "dataset": {
        "root": str(root), "format": "mmsa-raw", "label_range": [-1, 1]}}))
    assert cli_main(["manifest", "-o", str(out), "--config", str(config), "--label-range", "-10", "10"]) == 2
    assert "label 7" not in capsys.readouterr().err  # now only the missing file
    write_csv(csv_path, "video_id,clip_id,text,label,mode\nv,1,ok,7,train\n")
    assert cli_main(["manifest", "-o", str(out), "--config", str(config), "--label-range", "-10", "10"]) == 0
    assert "1 clips read as mmsa-raw" in capsys.readouterr().out
    assert read_manifest(out)["label"].tolist() == [7.0]
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file

    config.write_text("format: mmsa\n")
    assert cli_main(["manifest", str(root), "-o", str(out), "--config", str(config)]) == 2
    assert "invalid config" in capsys.readouterr().err


def test_empty_dataset_is_an_error(tmp_path):
    write_csv(tmp_path / "empty" / "notes.txt", "no videos here\n")
    [problem] = problems_of(tmp_path / "empty")
    assert "no clips found (read as folder)" in problem and "Raw/<video_id>/<clip_id>" in problem
    # an MMSA label.csv without its Raw/ folder is not silently ignored
    csv_path = write_csv(tmp_path / "empty" / "label.csv", "video_id,clip_id,text\n")
    assert_problem(problems_of(tmp_path / "empty"), str(csv_path), 1, "unknown column 'clip_id'")


def test_console_script_exit_status(tmp_path):
    msaflow = Path(sys.executable).parent / "msaflow"
    proc = subprocess.run([str(msaflow), "manifest", str(tmp_path / "nope"), "-o", str(tmp_path / "m.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "dataset root is not a folder" in proc.stderr
    proc = subprocess.run([str(msaflow), "manifest", str(DEMO), "-o", str(tmp_path / "m.csv")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(read_manifest(tmp_path / "m.csv")) == 11


def test_required_labels_stop_an_unlabeled_folder_before_anything_is_written(tmp_path, grid, capsys):
    """The workflow's manifest step asks for labels on train and valid: a folder of videos without
    labels.csv stops there (naming the clips), not after hours of extraction at the training step."""
    root = tmp_path / "vids"
    for name in ("bbaf2n", "pwij3p", "sbia1a"):
        put(grid[name], root / f"{name}.mpg")
    out = tmp_path / "manifest.csv"
    base = ["manifest", str(root), "-o", str(out), "--default-split", "by-video"]
    assert cli_main([*base, "--require-labels", "train,valid"]) == 2
    err = capsys.readouterr().err
    assert "3 train,valid clip(s)" in err and "bbaf2n/whole" in err and "labels CSV" in err and not out.exists()
    assert cli_main(base) == 0 and out.exists()  # without the flag: unlabeled clips are fine (prediction)
    out.unlink()
    write_csv(root / "labels.csv", "file,label\nbbaf2n.mpg,1.0\npwij3p.mpg,-2.0\nsbia1a.mpg,0.5\n")
    assert cli_main([*base, "--require-labels", "train,valid"]) == 0 and out.exists()
    write_csv(root / "labels.csv", "file,label,split\nbbaf2n.mpg,1.0,train\npwij3p.mpg,-2.0,valid\nsbia1a.mpg,,test\n")
    assert cli_main([*base, "--require-labels", "train,valid"]) == 0  # an unlabeled test clip is allowed
