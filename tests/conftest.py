"""Shared fixtures: real photos from registry packages, a loopback web server, Prefect settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from facedata.packages import package_dir
from facedata.webserver import LoopbackServer

REPO = Path(__file__).resolve().parent.parent


def openpeople_photos() -> list[Path]:
    """Every openpeople single-person photo (portraits, selfies, full-body), 10 people x 4."""
    curated = package_dir("openpeople") / "data" / "curated"
    shots = ("studio_portrait", "amateur_selfie", "amateur_posture", "studio_posture")
    return [p / "assets" / f"{s}.jpg" for p in sorted(curated.glob("P*")) for s in shots]


@pytest.fixture(scope="session")
def web_root(tmp_path_factory) -> Path:
    """A folder of small real JPEGs (openpeople photos downscaled to 320 px) and skimage pictures."""
    root = tmp_path_factory.mktemp("web")
    for src in openpeople_photos()[:24]:
        with Image.open(src) as im:
            im.thumbnail((320, 320))
            im.save(root / f"{src.parent.parent.name}_{src.stem}.jpg", quality=90)
    skimage_data = package_dir("skimage") / "data"
    for name in ("coffee.png", "chelsea.png", "astronaut.png"):
        (root / name).write_bytes((skimage_data / name).read_bytes())
    (root / "page.html").write_text("<html><body>not an image</body></html>")
    return root


@pytest.fixture(scope="session")
def web(web_root):
    with LoopbackServer(web_root) as server:
        yield server


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict:
    """Environment for `facedata` subprocesses: one quiet Prefect home shared by the session."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    env["PYTHONPATH"] = str(REPO)
    return env


def facedata_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "facedata.cli", *args]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, cli_env) -> Path:
    """A finished run of the embedded demo (`facedata demo`, about 40 s), made once per session.
    Shared: copy it (shutil.copytree) before changing anything in it."""
    out = tmp_path_factory.mktemp("demo_run") / "demo"
    proc = subprocess.run(facedata_cmd("demo", "--output", str(out), "--no-progress"), env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"facedata demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (out / "stdout.txt").write_text(proc.stdout)
    run_dir = out / "run"
    assert (run_dir / "summary.json").exists()
    return run_dir
