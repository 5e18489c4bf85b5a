"""Fault drills: a curation run meets a killed Dask worker, a killed flow, a restarted Prefect server
and a full disk.

Each drill injects its fault at a real mid-run point, found by polling the run directory (a finished
stage file) or the run's processes (a worker with a shard's temp file open), never after a fixed
sleep. It then checks how the faulty run ended (completed despite the fault, or failed with a last
line naming the cause and the file), and that a rerun completes with every sample of the corpus
exactly once, in the download, caption and published records, with the statuses and captions of an
uninterrupted run of the same corpus.

The corpus: eight real photos served with a delay (so a run lasts long enough to be hit mid-run), a
404, a large picture without a face, a repeated URL; two samples per shard, six shards. Every run
reports to one real `prefect server start` (the drill of restarting it needs one, and a run then
starts in a third of the CPU time a temporary server of its own costs); tests/test_flow.py kills and
resumes a run on its temporary server.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from facedata.core import records
from facedata.report.prefect_artifacts import artifact_key
from tests.conftest import REPO, PrefectServer, facedata_cmd
from tests.test_flow import check_run_consistent, write_config, write_corpus
from tests.test_run_artifacts import READ_RUN_ARTIFACTS, check_funnel

pytestmark = pytest.mark.slow

SAMPLES_PER_SHARD = 2
# Seconds the web server takes to serve each picture: with one download at a time per shard, a shard
# of two takes ~1 s, and the six shards keep two workers downloading for ~2 s after the first is done.
DELAY = 0.5
SHARD_STAGE_DIRS = ("shards", "faces", "captions")
RUN_TIMEOUT = 240


# ------------------------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, web, web_root) -> dict:
    photos = sorted(p.name for p in web_root.glob("*_amateur_selfie.jpg"))[:4]
    photos += sorted(p.name for p in web_root.glob("*_studio_portrait.jpg"))[:4]
    rows = [(web.url(f"slow/{DELAY}/{name}"), f"photo {i}") for i, name in enumerate(photos)]
    rows += [(web.url("status/404"), "gone"),
             # ~470 KB, several times a photo: the file size limit drill needs one large shard.
             (web.url(f"slow/{DELAY}/coffee.png"), "coffee"),
             (rows[0][0], "repeat")]
    folder = tmp_path_factory.mktemp("drill_corpus")
    path = write_corpus(folder / "corpus.parquet", rows)
    config = write_config(folder / "run.yaml", path, shards={"samples_per_shard": SAMPLES_PER_SHARD},
                          download={"concurrency": 1, "timeout": 20.0},
                          attributes={"predictors": ["geometry"]}, output={"contact_sheet": False})
    large_shard = [caption for _, caption in rows].index("coffee") // SAMPLES_PER_SHARD
    return {"config": config, "n_samples": len(rows), "n_shards": math.ceil(len(rows) / SAMPLES_PER_SHARD),
            "large_shard": large_shard}


class DrillServer(PrefectServer):
    def flow_runs(self, run_dir: Path) -> list[dict]:
        """The flow runs into RUN_DIR the server knows of, oldest first."""
        runs = self.request("POST", "/flow_runs/filter", json={})
        return sorted((r for r in runs if r["parameters"].get("run_dir") == str(run_dir)), key=lambda r: r["created"])


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, cli_env) -> Iterator[DrillServer]:
    server = DrillServer(tmp_path_factory.mktemp("drill_prefect_home"), cli_env)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(cli_env, prefect_server) -> dict:
    """The environment of the drills' `facedata run`: reporting to the module's Prefect server."""
    return {**cli_env, "PREFECT_API_URL": prefect_server.api}


def run_cmd(corpus: dict, run_dir: Path, dataset: Path, *overrides: str) -> list[str]:
    """`facedata run` of the drill corpus into RUN_DIR, publishing to DATASET."""
    sets = [arg for item in (f"publish.to={dataset}", *overrides) for arg in ("--set", item)]
    return facedata_cmd("run", str(corpus["config"]), "--output", str(run_dir), "--no-progress", *sets)


def outcome(run_dir: Path, dataset: Path, n_samples: int) -> dict:
    """What a finished run holds: key -> (status, face caption) of its final records, after checking
    that every planned sample is in the download and final records exactly once (check_run_consistent),
    and key -> (face caption, split) of the published dataset, which holds each key once."""
    final = check_run_consistent(run_dir, n_samples)
    published = [row for path in sorted((dataset / "data").glob("*.parquet"))
                 for row in pq.read_table(path, columns=["key", "face_caption", "split"]).to_pylist()]
    keys = [row["key"] for row in published]
    assert len(keys) == len(set(keys)), "a sample published twice"
    return {"records": {r["key"]: (r["status"], r["face_caption"])
                        for r in final.select(["key", "status", "face_caption"]).to_pylist()},
            "published": {row["key"]: (row["face_caption"], row["split"]) for row in published}}


@pytest.fixture(scope="module")
def reference(corpus, env, tmp_path_factory) -> dict:
    """An uninterrupted run of the corpus: the outcome every drill's rerun must reproduce."""
    out = tmp_path_factory.mktemp("drill_reference")
    run_dir, dataset = out / "run", out / "dataset"
    proc = subprocess.run(run_cmd(corpus, run_dir, dataset), env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = outcome(run_dir, dataset, corpus["n_samples"])
    statuses = sorted(status for status, _ in expected["records"].values())
    assert statuses == sorted([records.OK] * 8 + ["http_404", records.NO_FACE, records.DUPLICATE_URL])
    assert set(expected["published"]) == {k for k, (s, _) in expected["records"].items() if s == records.OK}
    return {**expected, "run_dir": run_dir}


def assert_matches_reference(run_dir: Path, dataset: Path, corpus: dict, reference: dict) -> None:
    got = outcome(run_dir, dataset, corpus["n_samples"])
    assert got["records"] == reference["records"]
    assert got["published"] == reference["published"]
    assert not temp_files(run_dir), "temp files left in the run directory"
    assert not list(dataset.parent.glob(f".{dataset.name}.publish-*")), "a publish temp folder left"


# ------------------------------------------------------------------------------------------- helpers


def done_markers(run_dir: Path) -> dict[str, int]:
    """The done marker of every finished shard stage and of the identity stage, with its modification
    time (a redone stage writes its marker again)."""
    markers = [p for d in SHARD_STAGE_DIRS for p in (run_dir / d).glob("*.stats.json")]
    markers += list((run_dir / "identity").glob("identity.json"))
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in markers}


def temp_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp"))


def poll(check: Callable, what: str, proc: subprocess.Popen, timeout: float = 180):
    """check()'s first truthy result, polled while PROC runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_run(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_run(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def rerun(cmd: list[str], env: dict, run_dir: Path) -> None:
    """Run CMD again: it completes, and every stage the first run finished is kept, not redone."""
    before = done_markers(run_dir)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = done_markers(run_dir)
    assert {name: after.get(name) for name in before} == before, "a finished stage was redone"


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------- 1. Dask


def test_dask_worker_killed_mid_shard(corpus, reference, env, tmp_path):
    """SIGKILL a Dask worker while it writes a download shard: its nanny starts a new worker, Dask gives
    the lost task to a live one, which redoes the shard from its plan; the run completes."""
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    shard_dir = run_dir / "shards"
    cmd = run_cmd(corpus, run_dir, dataset, "runner.kind=dask")
    proc = start_run(cmd, env, tmp_path / "run.log")

    def worker_mid_shard() -> tuple[int, int, float] | None:
        """(pid, shard id, when seen) of a worker writing a shard's tar (its `.NNNNN.tar.*.tmp` open),
        once some shard is done."""
        if not list(shard_dir.glob("*.stats.json")):
            return None
        for worker in psutil.Process(proc.pid).children():
            seen_at = time.time()
            try:
                for f in worker.open_files():
                    path = Path(f.path)
                    if path.parent == shard_dir and path.name.endswith(".tmp") and ".tar." in path.name:
                        return worker.pid, int(path.name[1:6]), seen_at
            except psutil.Error:  # a process that ended meanwhile
                continue
        return None

    victim, shard_id, seen_unfinished_at = poll(worker_mid_shard, "a worker writing a shard", proc)
    os.kill(victim, signal.SIGKILL)
    rc = wait_run(proc)
    log = (tmp_path / "run.log").read_text()
    assert rc == 0, log[-3000:]
    assert "Restarting worker" in log  # the nanny saw its worker die
    # The shard the worker was writing is finished now, not lost (and the records below match).
    assert (shard_dir / f"{shard_id:05d}.stats.json").stat().st_mtime > seen_unfinished_at
    assert_matches_reference(run_dir, dataset, corpus, reference)

    rerun(run_cmd(corpus, run_dir, dataset, "runner.kind=thread"), env, run_dir)
    assert_matches_reference(run_dir, dataset, corpus, reference)


# ------------------------------------------------------------------------------------------- 2. the flow


def test_flow_killed_mid_run(corpus, reference, env, tmp_path):
    """SIGKILL the run's process group (the CLI and the flow in it) once a face shard is done; the same
    command again keeps the finished shards and completes the rest."""
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    cmd = run_cmd(corpus, run_dir, dataset)
    proc = start_run(cmd, env, tmp_path / "run.log")
    poll(lambda: list((run_dir / "faces").glob("*.stats.json")), "a finished face shard", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert wait_run(proc) == -signal.SIGKILL
    n_downloaded = len(list((run_dir / "shards").glob("*.stats.json")))
    assert 1 <= len(list((run_dir / "faces").glob("*.stats.json"))) <= n_downloaded < corpus["n_shards"], \
        "the kill should land mid-run"
    assert not (run_dir / "summary.json").exists() and not dataset.exists()

    rerun(cmd, env, run_dir)
    assert_matches_reference(run_dir, dataset, corpus, reference)


def test_ctrl_c_stops_at_once_with_one_line(corpus, reference, env, tmp_path):
    """Ctrl-C (SIGINT to the run's process group, as a terminal sends it) once a face shard is done:
    the run stops within seconds with one line and no temp file; the same command again completes
    it, keeping the finished shards."""
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    cmd = run_cmd(corpus, run_dir, dataset)
    proc = start_run(cmd, env, tmp_path / "run.log")
    poll(lambda: list((run_dir / "faces").glob("*.stats.json")), "a finished face shard", proc)
    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.perf_counter()
    assert proc.wait(30) == 130
    seconds = time.perf_counter() - interrupted
    log = (tmp_path / "run.log").read_text()
    # Lines logged before the interrupt stay; after it comes exactly one line, and no traceback.
    assert log.rstrip().splitlines()[-1] == "facedata: interrupted; rerun the same command to resume"
    assert "Traceback" not in log and seconds < 10, (seconds, log[-2000:])
    assert not temp_files(run_dir)
    assert len(list((run_dir / "shards").glob("*.stats.json"))) < corpus["n_shards"], "the interrupt should land mid-run"

    rerun(cmd, env, run_dir)
    assert_matches_reference(run_dir, dataset, corpus, reference)


# A user's own step, from a file outside the package, named in the config alone (19 lines).
USER_STEP = """
from pydantic import BaseModel

from facedata.core.step import Filter


class CaptionWords(Filter):
    \"\"\"Drops samples whose web caption holds one of the given words.\"\"\"

    name = "caption_words"
    reasons = {"banned_word": "the web caption holds a word of caption_words.words"}

    class Options(BaseModel):
        words: list[str] = []

    def keep(self, sample):
        words = set((sample["caption"] or "").lower().split())
        return not words & set(self.options.words) or "banned_word"
"""


def test_user_step_runs_resumes_and_shows_everywhere(corpus, env, prefect_server, tmp_path):
    """A filter written outside the package and named in `steps` runs in the flow between the face
    and identity steps; killed mid-run, the same command resumes it; its status reaches the records,
    the funnel, the dataset card and the run's Prefect report."""
    step_file = tmp_path / "my_steps.py"
    step_file.write_text(USER_STEP)
    assert len(USER_STEP.strip().splitlines()) <= 20
    steps = f"steps=[download, faces, {{step: '{step_file}:CaptionWords', options: {{words: ['2', '5']}}}}, " \
            "identity, captions]"
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    cmd = run_cmd(corpus, run_dir, dataset, steps)
    proc = start_run(cmd, env, tmp_path / "run.log")
    poll(lambda: list((run_dir / "caption_words").glob("*.stats.json")), "a finished caption_words shard", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    assert wait_run(proc) == -signal.SIGKILL
    assert len(list((run_dir / "caption_words").glob("*.stats.json"))) < corpus["n_shards"], "kill lands mid-run"
    rerun(cmd, env, run_dir)

    final = check_run_consistent(run_dir, corpus["n_samples"]).to_pylist()
    faced = {r["key"]: r["status"] for path in sorted((run_dir / "faces").glob("0*.parquet"))
             for r in pq.read_table(path, columns=["key", "status"]).to_pylist()}
    banned = {r["key"] for r in final if r["caption"] in ("photo 2", "photo 5") and faced[r["key"]] == records.OK}
    assert banned and {r["key"] for r in final if r["status"] == "banned_word"} == banned
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = [row["stage"] for row in summary["funnel"]]
    assert stages.index("faces") < stages.index("caption_words") < stages.index("identity")
    row = summary["funnel"][stages.index("caption_words")]
    assert row["dropped_by_status"] == {"banned_word": len(banned)}
    card = (dataset / "README.md").read_text()
    assert "`banned_word`" in card and "a word of caption_words.words" in card
    assert not any(r["key"] in banned for r in pq.read_table(dataset / "data").to_pylist())

    found = subprocess.run([sys.executable, "-c", READ_RUN_ARTIFACTS, str(run_dir.resolve())], env=env,
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert found.returncode == 0, found.stderr[-3000:]
    artifacts = {a["key"]: a for a in json.loads(found.stdout)["artifacts"]}
    report = artifacts[artifact_key(run_dir, "report")]["data"]
    check_funnel(report, summary)
    assert artifacts[artifact_key(run_dir, "caption_words-progress")]["data"] == 100.0


def test_killed_run_stops_its_temporary_prefect_server(corpus, cli_env, tmp_path):
    """Without PREFECT_API_URL a run starts a temporary Prefect server, which Prefect stops at exit.
    A run killed outright (kill -9, the OOM killer) gets no exit: its watchdog stops the server."""
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    proc = start_run(run_cmd(corpus, run_dir, dataset), cli_env, tmp_path / "run.log")

    def temporary_server() -> psutil.Process | None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "prefect.server.api.server:create_app" in child.cmdline():
                    return child
            except psutil.Error:
                continue
        return None

    server = poll(temporary_server, "the temporary Prefect server", proc)
    try:
        poll(lambda: list((run_dir / "shards").glob("*.stats.json")), "a finished download shard", proc)
        os.kill(proc.pid, signal.SIGKILL)  # the CLI process only, as the OOM killer would
        assert proc.wait(10) == -signal.SIGKILL
        _, alive = psutil.wait_procs([server], timeout=20)
        assert not alive, "the killed run's temporary Prefect server is still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            server.kill()


# ------------------------------------------------------------------------------------------- 3. Prefect server


def test_prefect_server_restarted_mid_run(corpus, reference, env, prefect_server, tmp_path):
    """Stop the run's Prefect server once a shard is done and start it again on the same port and
    database. Prefect's client retries a lost connection (PREFECT_CLIENT_MAX_RETRIES, 5 by default, after
    2, 4, 8, 16 and 32 s), so the run waits for the server and completes; the server records the flow
    run as completed. (Task-run events sent while it was down can be lost: Prefect logs an EventsWorker
    error, so their states are not relied on here.)"""
    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    cmd = run_cmd(corpus, run_dir, dataset)
    proc = start_run(cmd, env, tmp_path / "run.log")
    poll(lambda: list((run_dir / "shards").glob("*.stats.json")), "a finished shard", proc)
    prefect_server.stop()
    try:
        assert proc.poll() is None, "the server should go down mid-run"
    finally:
        prefect_server.start()  # on the same port and database
    assert proc.poll() is None and not (run_dir / "summary.json").exists(), \
        "the run should still be going when the server is back"
    rc = wait_run(proc)
    assert rc == 0, (tmp_path / "run.log").read_text()[-3000:]
    [flow_run] = prefect_server.flow_runs(run_dir)
    assert flow_run["state"]["type"] == "COMPLETED"
    assert_matches_reference(run_dir, dataset, corpus, reference)

    rerun(cmd, env, run_dir)
    assert_matches_reference(run_dir, dataset, corpus, reference)
    assert [r["state"]["type"] for r in prefect_server.flow_runs(run_dir)] == ["COMPLETED", "COMPLETED"]


# ------------------------------------------------------------------------------------------- 4. full disk


@contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of SIZE at MOUNT_POINT (skips the test where mounting is not permitted)."""
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def test_output_disk_full(corpus, reference, env, tmp_path):
    """The run and its published dataset on a 400 KiB disk, which the large shard alone overflows: the
    run fails with the cause and the file on its last line, and leaves no partial file holding space;
    with the disk grown, the same command completes."""
    with tmpfs(tmp_path / "disk", "400k") as disk:
        run_dir, dataset = disk / "run", disk / "dataset"
        cmd = run_cmd(corpus, run_dir, dataset)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert proc.returncode > 0, proc.stderr[-3000:]
        line = last_line(proc.stderr)
        assert "No space left on device" in line and str(disk) in line, line
        assert list((run_dir / "shards").glob("*.stats.json")), "the disk should fill mid-run"
        assert not (run_dir / "shards" / f"{corpus['large_shard']:05d}.stats.json").exists()
        assert not temp_files(run_dir), "a failed write left its partial file"

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        rerun(cmd, env, run_dir)
        assert_matches_reference(run_dir, dataset, corpus, reference)


FILE_SIZE_LIMIT = 200_000


def test_output_file_size_limit(corpus, reference, env, prefect_server, tmp_path):
    """Without root: a file size limit (RLIMIT_FSIZE, a quota-like limit) the large shard's tar
    exceeds. Python ignores SIGXFSZ, so the write fails with EFBIG, the same path as a full disk.
    The Prefect server runs outside the limit (its database outgrows it). Lifted, the rerun completes."""
    ref_tars = {p.name: p.stat().st_size for p in (reference["run_dir"] / "shards").glob("*.tar")}
    large_tar = f"{corpus['large_shard']:05d}.tar"
    assert ref_tars.pop(large_tar) > FILE_SIZE_LIMIT > max(ref_tars.values())

    run_dir, dataset = tmp_path / "run", tmp_path / "dataset"
    cmd = run_cmd(corpus, run_dir, dataset)
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT)))
    assert proc.returncode > 0, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "File too large" in line and str(run_dir / "shards" / large_tar) in line, line
    # Every other shard was finished: the limit stopped exactly the one shard.
    assert len(list((run_dir / "shards").glob("*.stats.json"))) == corpus["n_shards"] - 1
    assert not temp_files(run_dir), "a failed write left its partial file"

    rerun(cmd, env, run_dir)
    assert_matches_reference(run_dir, dataset, corpus, reference)


_GATHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from facedata.identity.step import gather_faces
    gather_faces(Path(sys.argv[1]), list(range(int(sys.argv[2]))), Path(sys.argv[3]))
""")


def test_disk_full_at_identity_stage_fails_cleanly(corpus, reference, tmp_path):
    """The identity stage maps its embeddings file into memory. On a disk one page short of the file,
    creating it succeeds (it is sparse), and a store to a page the disk has no room for would kill the
    whole process (SIGBUS, no message); the stage reserves the space first, so this is an OSError
    naming the file, and the partial file is gone."""
    page = os.sysconf("SC_PAGE_SIZE")
    needed = math.ceil((reference["run_dir"] / "identity" / "embeddings.npy").stat().st_size / page)
    assert needed >= 3, "the embeddings should span pages between the first and the last"
    with tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "identity" / "embeddings.npy"
        out.parent.mkdir()
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - (needed - 1) * page))
        proc = subprocess.run([sys.executable, "-c", _GATHER, str(reference["run_dir"]), str(corpus["n_shards"]),
                               str(out)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
        assert last_line(proc.stderr) == f"OSError: [Errno 28] No space left on device: '{out}'"
        assert not list(out.parent.iterdir())
