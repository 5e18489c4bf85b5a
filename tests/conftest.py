"""Shared fixtures: real photos from registry packages, a loopback web server, Prefect settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facedata.core.packages import package_dir
from facedata.demo.server import LoopbackServer
from facedata.pipeline import run_shard

REPO = Path(__file__).resolve().parent.parent


def openpeople_photos() -> list[Path]:
    """Every openpeople single-person photo (portraits, selfies, full-body), 10 people x 4."""
    curated = package_dir("openpeople") / "data" / "curated"
    shots = ("studio_portrait", "amateur_selfie", "amateur_posture", "studio_posture")
    return [p / "assets" / f"{s}.jpg" for p in sorted(curated.glob("P*")) for s in shots]


def download_and_find_faces(web_root: Path, run: Path, rows: list[dict], make_config, samples_per_shard: int) -> list[int]:
    """Serve web_root on loopback, write run/corpus.parquet from `rows` (each: `file` under web_root,
    plus the corpus's other columns) and run the real download and face stages over every shard.
    `make_config(corpus_path)` gives the run's Config. Returns the shard ids."""
    from facedata.ingest.reader import plan_shards

    with LoopbackServer(web_root) as server:
        columns = {"url": [server.url(row["file"]) for row in rows]}
        for name in rows[0]:
            if name != "file":
                columns[name] = [row[name] for row in rows]
        pq.write_table(pa.table(columns), run / "corpus.parquet")
        cfg = make_config(run / "corpus.parquet")
        plans = plan_shards(cfg.input, samples_per_shard, run / "_plan")
        for plan in plans:
            run_shard("download", plan, cfg, run, progress=False)
            run_shard("faces", plan.shard_id, cfg, run, progress=False)
    return [p.shard_id for p in plans]


def copy_faced_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of a run's download and face stages, for a test that runs later stages on it."""
    target = tmp_path / "run"
    for part in ("shards", "faces"):
        shutil.copytree(run / part, target / part)
    return target


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
def runner_reference(tmp_path_factory, web, web_root, cli_env) -> dict:
    """A small corpus and its records after a run on the thread runner, run once per session: what
    the Dask and Ray runners' runs are compared with (tests/test_dask_runner.py)."""
    from tests.test_dask_runner import prepare_runner_reference

    return prepare_runner_reference(tmp_path_factory.mktemp("runner_reference"), web, web_root, cli_env)


@pytest.fixture(scope="session")
def prefect_settings(tmp_path_factory):
    """Quiet Prefect settings, in a temporary home, for tests that use Prefect in this process.
    Prefect reads them when first imported: the first test to ask sets them for the session."""
    from facedata.core.prefect_env import configure_prefect

    configure_prefect(tmp_path_factory.mktemp("prefect_home"))


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll `check()` until it returns something true (an HTTP error counts as not yet); fail if
    `proc` exits first or `timeout` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGINT to a process started with start_new_session, SIGKILL if it is still there after 20 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class PrefectServer:
    """A real `prefect server start` on a free port with its own home (database), which can be
    stopped and started again on the same port."""

    def __init__(self, home: Path, env: dict):
        from facedata.core.prefect_env import QUIET_DEFAULTS

        home.mkdir(parents=True, exist_ok=True)
        self.home, self.port = home, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**env, **QUIET_DEFAULTS, "PREFECT_HOME": str(home), "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import httpx

        with (self.home / "server.log").open("a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-ui", "--analytics-off"],
                env=self.env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        wait_for(lambda: httpx.get(f"{self.api}/health", timeout=2).status_code == 200, 90, "prefect server",
                 self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def request(self, method: str, path: str, **kwargs):
        """The JSON of an API call, retried on the codes Prefect's own client retries (429, 502,
        503: a busy SQLite database answers 503); any other error fails with the server's answer."""
        import httpx

        for attempt in range(6):
            r = httpx.request(method, f"{self.api}{path}", timeout=10, **kwargs)
            if r.status_code not in (429, 502, 503):
                break
            time.sleep(0.5 * 2**attempt)
        assert r.is_success, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json()


def read_records(step_dir: Path) -> pa.Table:
    """Every finished shard's records in a step's folder, in shard order."""
    tables = [pq.read_table(stats.with_name(stats.name.split(".")[0] + ".parquet"))
              for stats in sorted(Path(step_dir).glob("*.stats.json"))]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
