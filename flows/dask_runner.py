"""The Dask task runner (`runner.kind: dask`): shard tasks on a Dask cluster.

Kept out of `flows.curate` so that processes which never use Dask (the CLI with another runner,
process-runner workers) do not import `distributed` (~1 s, ~45 MiB).

Each worker process is long-lived, so it loads the face and attribute models once (their loaders
cache per process) and reuses them for every shard it is given. Before any task runs there, a
worker plugin points the worker at this flow's Prefect API server (without it, every worker would
start a temporary server of its own, ~200 MiB and seconds each) and gives `facedata` logs this
process's level. The plugin stays registered on the scheduler, so a worker that is restarted or
joins later gets it too.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# distributed logs every worker start and stop at INFO; read when distributed is first imported,
# here and in the worker processes (they inherit the environment).
os.environ.setdefault("DASK_DISTRIBUTED__LOGGING__DISTRIBUTED", "warning")

import dask
from distributed.diagnostics.plugin import WorkerPlugin
from prefect_dask import DaskTaskRunner
from prefect_dask.client import PrefectDaskClient

from facedata.core.config import RunnerConfig
from facedata.core.errors import UserError
from facedata.core.prefect_env import is_loopback

PLUGIN_NAME = "facedata-worker-setup"


class WorkerSetup(WorkerPlugin):
    """Runs in each worker process when it starts (or when registered, for running workers)."""

    idempotent = False  # re-registering (a new flow run on the same cluster) updates the URL

    def __init__(self, api_url: str | None, log_level: int):
        self.api_url = api_url
        self.log_level = log_level

    def setup(self, worker) -> None:
        from facedata.core.prefect_env import QUIET_DEFAULTS

        for key, value in QUIET_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if self.api_url:
            # Prefect reads the environment again for each task run it hydrates here.
            os.environ["PREFECT_API_URL"] = self.api_url
        logging.getLogger("facedata").setLevel(self.log_level)


class FacedataDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's runner, plus the worker setup above when its client first connects."""

    @property
    def client(self) -> PrefectDaskClient:
        if self._client is None:
            try:
                client = super().client
            except OSError as err:
                where = f"the Dask scheduler at {self.address}" if self.address else "a local Dask cluster"
                raise UserError(f"runner.kind dask: cannot connect to {where}: {err}") from err
            api_url = _flow_api_url()
            if self.address and is_loopback(api_url) and not is_loopback(self.address):
                logging.getLogger("facedata.flow").warning(
                    "Prefect API %s is on this machine only; Dask workers on other hosts cannot report to it "
                    "(set PREFECT_API_URL to a server they can reach)", api_url)
            try:
                level = logging.getLogger("facedata").getEffectiveLevel()
                client.register_plugin(WorkerSetup(api_url, level), name=PLUGIN_NAME)
            except Exception as err:  # unpickling on a worker without facedata, most often
                where = self.address or "the local Dask cluster"
                raise UserError(
                    f"Dask workers of {where} could not be set up ({type(err).__name__}: {err}); the "
                    "workers need facedata installed (pip install -e .) or on their PYTHONPATH"
                ) from err
            return client
        return self._client


def _flow_api_url() -> str | None:
    """The API URL this flow run talks to: the user's server, or the temporary one started for it."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.client is not None:
        return str(ctx.client.api_url).rstrip("/")
    return PREFECT_API_URL.value()


def dask_task_runner(cfg: RunnerConfig) -> FacedataDaskTaskRunner:
    """A local cluster of max_workers single-thread worker processes (no dashboard), or the
    cluster at cfg.dask_address."""
    if cfg.dask_address:
        return FacedataDaskTaskRunner(address=cfg.dask_address)
    # The nanny starts each worker with MALLOC_TRIM_THRESHOLD_=65536 (dask's default, to hand freed
    # memory back sooner). Setting it switches off glibc's adaptive mmap threshold, so every large
    # buffer (decoded images, model tensors) is mmapped and unmapped again: the caption stage ran
    # 17% slower and decoding 2x slower in such a worker. None leaves it unset.
    environ = dask.config.get("distributed.nanny.pre-spawn-environ")
    dask.config.set({"distributed.nanny.pre-spawn-environ": {**environ, "MALLOC_TRIM_THRESHOLD_": None}})
    return FacedataDaskTaskRunner(cluster_kwargs=local_cluster_kwargs(cfg))


def local_cluster_kwargs(cfg: RunnerConfig) -> dict[str, Any]:
    # One thread per worker: the stages already use their threads (downloads) or one ONNX thread
    # per model call, and a worker process per shard slot gives each its own GIL.
    return {"n_workers": cfg.max_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
