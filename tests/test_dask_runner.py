"""The Dask task runner: a real curation run on a local Dask cluster through the CLI.

Model loads are counted in the Dask worker processes themselves: the run's workers preload this
module (dask's `distributed.worker.preload`, set through the environment the CLI's local cluster
passes on), whose `dask_setup` wraps the real model loaders so that each call appends
"PID KIND" to the file named by $FACEDATA_TEST_LOAD_LOG.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from facedata.core import records
from facedata.core.config import RunnerConfig, config_from_dict
from tests.conftest import facedata_cmd
from tests.test_flow import check_run_consistent, write_config, write_corpus

LOAD_LOG_ENV = "FACEDATA_TEST_LOAD_LOG"


def _log_load(kind: str) -> None:
    with open(os.environ[LOAD_LOG_ENV], "a") as f:
        f.write(f"{os.getpid()} {kind}\n")


def _counting(kind: str, loader):
    @functools.wraps(loader)
    def wrapper(*args, **kwargs):
        _log_load(kind)
        return loader(*args, **kwargs)

    return wrapper


def dask_setup(worker) -> None:
    """Dask worker preload hook: count real model loads in this worker process."""
    if LOAD_LOG_ENV not in os.environ:
        return
    from facedata.faces import models as face_models
    from facedata.attributes import age_gender

    # The face models' loader, called by load_models on a cache miss only.
    face_models._vectron_models = _counting("faces", face_models._vectron_models)
    # Looked up in its module by facedata.attributes._load (an lru_cache) on each cache miss.
    age_gender.load_age_gender = _counting("attributes", age_gender.load_age_gender)
    # The stage functions, looked up in their modules by each shard task: tasks per worker.
    from facedata.captions import step as caption_stage
    from facedata.faces import step as face_stage

    face_stage.FaceStep.run = _counting("faces-task", face_stage.FaceStep.run)
    caption_stage.CaptionStep.run = _counting("attributes-task", caption_stage.CaptionStep.run)
    _log_load("worker")
    _log_load(f"malloc_trim_threshold={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}")


def test_local_cluster_settings(prefect_settings):
    from flows.curate import task_runner
    from flows.dask_runner import FacedataDaskTaskRunner

    runner = task_runner(RunnerConfig(kind="dask", max_workers=3))
    assert isinstance(runner, FacedataDaskTaskRunner) and runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                     "dashboard_address": None}
    remote = task_runner(RunnerConfig(kind="dask", dask_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs
    # Workers rebuild the runner from its settings (Prefect's duplicate()): still ours.
    assert type(runner.duplicate()) is FacedataDaskTaskRunner


def test_config_rejects_bad_address():
    from facedata.core.config import ConfigError

    base = {"input": {"path": "x.parquet"}}
    with pytest.raises(ConfigError, match="runner.dask_address"):
        config_from_dict({**base, "runner": {"kind": "dask", "dask_address": "scheduler"}})
    cfg = config_from_dict({**base, "runner": {"kind": "dask", "flow_retries": 2}})
    assert cfg.runner.flow_retries == 2 and cfg.runner.flow_retry_delay_s == 60


def _final_records(run_dir: Path, n_samples: int) -> dict[str, tuple]:
    """key -> (status, face caption) of the run's final records, after the consistency checks."""
    table = check_run_consistent(run_dir, n_samples)
    return {r["key"]: (r["status"], r["face_caption"])
            for r in table.select(["key", "status", "face_caption"]).to_pylist()}


def _run_cli(cfg: Path, run_dir: Path, runner: str, env: dict, timeout: float) -> str:
    """`facedata run` of CFG into RUN_DIR with runner `runner` on two workers; its terminal output."""
    proc = subprocess.run(
        facedata_cmd("run", str(cfg), "--output", str(run_dir), "--no-progress",
                     "--set", f"runner.kind={runner}", "--set", "runner.max_workers=2"),
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def prepare_runner_reference(folder: Path, web, web_root, cli_env: dict) -> dict:
    """The corpus the task-runner tests share: seven rows (five portraits, a 404, a cat photo) in
    three shards, and the final records of its run on the thread runner, which the run on every
    other runner must equal."""
    photos = sorted(p.name for p in web_root.glob("*_studio_portrait.jpg"))[:5]
    rows = [(web.url(name), f"photo {i}") for i, name in enumerate(photos)]
    rows += [(web.url("status/404"), "gone"), (web.url("chelsea.png"), "cat")]
    corpus = write_corpus(folder / "corpus.parquet", rows)
    # Three shards on two workers: one worker takes a second shard's face and caption tasks.
    # Face parsing left out: its model takes ~10 s to load, in each worker.
    cfg = write_config(folder / "run.yaml", corpus, shards={"samples_per_shard": 3},
                       attributes={"predictors": ["age_gender", "expression", "geometry"]},
                       output={"contact_sheet": False})
    _run_cli(cfg, folder / "thread", "thread", cli_env, timeout=240)
    thread = _final_records(folder / "thread", len(rows))
    statuses = Counter(status for status, *_ in thread.values())
    assert statuses == {records.OK: len(photos), "http_404": 1, records.NO_FACE: 1}
    return {"config": cfg, "n_samples": len(rows), "records": thread}


def run_and_compare(kind: str, reference: dict, tmp_path: Path, cli_env: dict, worker_env: dict,
                    timeout: float) -> tuple[Path, str, Counter]:
    """Run the reference corpus with runner `kind` on two workers, whose environment gets
    `worker_env` (the load counting); check that it ends with the thread runner's records and
    statuses. Returns the run's folder, its terminal output and its "PID KIND" load-log counts."""
    load_log = tmp_path / "loads.txt"
    run_dir = tmp_path / kind
    output = _run_cli(reference["config"], run_dir, kind, {**cli_env, **worker_env, LOAD_LOG_ENV: str(load_log)},
                      timeout)
    assert _final_records(run_dir, reference["n_samples"]) == reference["records"]
    assert len(list((run_dir / "shards").glob("*.tar"))) == 3
    return run_dir, output, Counter(tuple(line.split()) for line in load_log.read_text().splitlines())


def check_models_loaded_once_per_worker(loads: Counter, workers: set[str]) -> None:
    """Each worker that ran face (caption) tasks loaded their models exactly once, however many of
    the three shards' tasks it ran."""
    for kind in ("faces", "attributes"):
        tasks = {pid: n for (pid, k), n in loads.items() if k == f"{kind}-task"}
        loaded = {pid: n for (pid, k), n in loads.items() if k == kind}
        assert sum(tasks.values()) == 3 and set(tasks) <= workers, loads
        assert loaded == dict.fromkeys(tasks, 1), loads


@pytest.mark.slow
def test_dask_runner_matches_thread_runner(tmp_path, runner_reference, cli_env):
    worker_env = {"DASK_DISTRIBUTED__WORKER__PRELOAD": "['tests.test_dask_runner']"}
    _, output, loads = run_and_compare("dask", runner_reference, tmp_path, cli_env, worker_env, timeout=240)
    # Worker start and stop chatter from distributed stays out of the user's terminal.
    assert "distributed.nanny" not in output and "distributed.scheduler" not in output

    workers = {pid for pid, kind in loads if kind == "worker"}
    assert len(workers) == 2, loads
    # glibc's adaptive mmap threshold stays on in the workers (dask's nanny would switch it off).
    assert {(pid, "malloc_trim_threshold=unset") for pid in workers} <= set(loads), loads
    check_models_loaded_once_per_worker(loads, workers)
