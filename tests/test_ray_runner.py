"""The Ray task runner: a real curation run on a local Ray instance through the CLI.

Model loads are counted in the Ray worker processes themselves: the CLI's environment names this
module's `add_load_counting` as Ray's runtime-env hook (RAY_RUNTIME_ENV_HOOK, called by ray.init
in the CLI process), which makes `count_model_loads` the setup hook each worker process runs when
it starts. That wraps the real model loaders (the Dask test's preload hook does the wrapping) so
that each call appends "PID KIND" to the file named by $FACEDATA_TEST_LOAD_LOG.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

from facedata.core.config import RunnerConfig, config_from_dict
from tests.conftest import REPO
from tests.test_dask_runner import (
    _log_load,
    check_models_loaded_once_per_worker,
    dask_setup,
    run_and_compare,
)
from tests.test_flow import write_config, write_corpus

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("prefect_ray") is None,
    reason="runner.kind ray needs pip install 'facedata[ray]'")


def add_load_counting(runtime_env: dict) -> dict:
    """RAY_RUNTIME_ENV_HOOK: run count_model_loads in each worker process when it starts."""
    runtime_env["worker_process_setup_hook"] = "tests.test_ray_runner.count_model_loads"
    return runtime_env


def count_model_loads() -> None:
    dask_setup(worker=None)  # wraps the model loaders and logs "PID worker"; the worker is unused
    _log_load(f"api={os.environ['PREFECT_API_URL']}")


@needs_ray
def test_runner_settings(prefect_settings):
    from flows.curate import task_runner
    from flows.ray_runner import FacedataRayTaskRunner, local_instance_kwargs

    cfg = RunnerConfig(kind="ray", max_workers=3)
    runner = task_runner(cfg)
    assert isinstance(runner, FacedataRayTaskRunner) and runner.address is None
    assert runner.init_kwargs == {**local_instance_kwargs(cfg), "namespace": "prefect"}
    assert runner.init_kwargs["num_cpus"] == 3 and runner.init_kwargs["include_dashboard"] is False
    remote = task_runner(RunnerConfig(kind="ray", ray_address="ray://10.0.0.5:10001"))
    assert remote.address == "ray://10.0.0.5:10001" and "num_cpus" not in remote.init_kwargs
    # The flow engine enters a copy of the runner (Prefect's duplicate()): still ours.
    assert type(runner.duplicate()) is FacedataRayTaskRunner


def test_config_rejects_bad_ray_address():
    from facedata.core.config import ConfigError

    base = {"input": {"path": "x.parquet"}}
    with pytest.raises(ConfigError, match="runner.ray_address"):
        config_from_dict({**base, "runner": {"kind": "ray", "ray_address": "headnode"}})
    for address in ("auto", "ray://head:10001", "10.0.0.5:6379"):
        assert config_from_dict({**base, "runner": {"kind": "ray", "ray_address": address}}).runner.ray_address


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_missing_ray_is_one_line_error(tmp_path, cli_env):
    corpus = write_corpus(tmp_path / "corpus.parquet", [("http://127.0.0.1:9/cat.png", "cat")])
    cfg = write_config(tmp_path / "run.yaml", corpus, faces={"enabled": False})
    # The CLI in a process where `import ray` fails, as it does where ray is not installed.
    code = (f"import sys; sys.modules['ray'] = None; from facedata.cli import main; "
            f"sys.exit(main(['run', {str(cfg)!r}, '--output', {str(tmp_path / 'run')!r}, "
            f"'--no-progress', '--set', 'runner.kind=ray']))")
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("facedata: error: runner.kind ray needs pip install 'facedata[ray]' (")
    assert proc.stderr.count("\n") == 1


@needs_ray
def test_unreachable_address_fails_at_once(prefect_settings):
    # What the flow engine does first with the runner; a UserError from there reaches the CLI as
    # its one-line error. (ray.init itself would retry the address for minutes.)
    from facedata.core.errors import UserError
    from flows.curate import task_runner

    address = f"127.0.0.1:{_closed_port()}"
    runner = task_runner(RunnerConfig(kind="ray", ray_address=address))
    message = f"runner.kind ray: cannot connect to the Ray cluster at {address}: [Errno 111] Connection refused"
    with pytest.raises(UserError) as raised, runner:
        pass
    assert str(raised.value) == message


@needs_ray
@pytest.mark.slow
@pytest.mark.timeout(900)  # a whole run, and the thread runner's when first; Ray starts in 10-20 s when busy
def test_ray_runner_matches_thread_runner(tmp_path, runner_reference, cli_env):
    worker_env = {"RAY_RUNTIME_ENV_HOOK": "tests.test_ray_runner.add_load_counting"}
    _, output, loads = run_and_compare("ray", runner_reference, tmp_path, cli_env, worker_env, timeout=600)
    # The workers' per-shard INFO lines reach the terminal (their level is this process's), each
    # one (Ray would fold lines that differ only in numbers into one), without colour codes.
    assert output.count("captions shard 0000") == 3, output[-3000:]
    assert "\x1b[" not in output

    workers = {pid for pid, kind in loads if kind == "worker"}
    # Two task slots; Ray starts spare worker processes as it sees fit (3 and 4 seen), so the check
    # of model loads is per worker process: however many tasks it ran, it loaded each model once.
    assert len(workers) >= 2, loads
    # Every worker reports to the flow's own API server (the CLI's temporary one), none starts its own.
    api_urls = {kind for _, kind in loads if kind.startswith("api=")}
    assert len(api_urls) == 1 and api_urls.pop().startswith("api=http://127.0.0.1:"), loads
    check_models_loaded_once_per_worker(loads, workers)
