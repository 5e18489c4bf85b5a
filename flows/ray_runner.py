"""The Ray task runner (`runner.kind: ray`): shard tasks on Ray, through prefect-ray.

Optional (pip install 'facedata[ray]'), and kept out of `flows.curate` so that processes which
never use Ray do not import it.

Ray keeps a job's worker processes and gives each new task to an idle one, so a worker loads the
face and attribute models once (their loaders cache per process) and reuses them for every shard
it is given. The job's runtime environment, which Ray applies to every worker process it starts
for this run (on this machine or on a cluster's other nodes), points the workers at this flow's
Prefect API server (without it, every worker would start a temporary server of its own, ~200 MiB
and seconds each), carries the quiet Prefect settings and this process's level for `facedata`
logs, which each task sets in its worker before it runs.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from facedata.core.config import RunnerConfig
from facedata.core.errors import UserError
from facedata.core.prefect_env import QUIET_DEFAULTS, is_loopback

if TYPE_CHECKING:
    from typing_extensions import Self  # typing's own from Python 3.11

# Ray reports usage statistics to an outside server unless told not to (read when ray starts its
# processes, which inherit the environment), and prints one of several worker log lines that
# differ only in numbers, such as shard ids (read when ray is imported).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if not sys.stderr.isatty():
    # Ray colours the "(task pid=N)" prefix of worker log lines even in a log file.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")

try:
    import ray  # prefect_ray imports it only when first used: fail here instead
    from prefect_ray import RayTaskRunner
except ImportError as err:
    raise UserError(f"runner.kind ray needs pip install 'facedata[ray]' ({err})") from err

LOG_LEVEL_ENV = "FACEDATA_LOG_LEVEL"
# Room for the task arguments and results that pass through Ray (configs and the stages' small
# stats dicts); Ray's default, 30% of the memory, would reserve 7 GiB of /dev/shm on 24 GiB.
OBJECT_STORE_BYTES = 256 * 2**20
CONNECT_TIMEOUT_S = 5


class FacedataRayTaskRunner(RayTaskRunner):
    """prefect-ray's runner, connecting (or starting Ray) with this flow run's worker environment."""

    def __enter__(self) -> Self:
        # Entered by the flow engine once its Prefect client exists, before the first task; and
        # again in the workers, for each task (Prefect rebuilds the flow run's context there),
        # where Ray is already running and prefect-ray uses it as it is.
        if ray.is_initialized():
            return super().__enter__()
        api_url = _flow_api_url()
        if self.address:
            _check_reachable(self.address)
            if is_loopback(api_url) and not is_loopback(self.address):
                # Terminal only: the flow run's context, which the API log handler needs, comes later.
                logging.getLogger("facedata.flow").warning(
                    "Prefect API %s is on this machine only; Ray workers on other hosts cannot report to it "
                    "(set PREFECT_API_URL to a server they can reach)", api_url, extra={"send_to_api": False})
        self.init_kwargs = {**self.init_kwargs, "runtime_env": worker_runtime_env(api_url)}
        try:
            return super().__enter__()
        except ConnectionError as err:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            hint = ""
            if self.address and self.address.startswith("ray://") and "RAY_AUTH_MODE" not in os.environ:
                # Ray Client does not look for a token unless told to (ray.init with a cluster
                # address does); token authentication is the default for a new cluster.
                hint = " (a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here)"
            raise UserError(f"runner.kind ray: cannot connect to {where}: {err}{hint}") from err

    @staticmethod
    def _run_prefect_task(*upstream_ray_obj_refs: Any, **kwargs: Any) -> Any:
        # prefect-ray's entry point in the worker, for each task. (A worker_process_setup_hook
        # would run once per worker process instead, but Ray Client ignores it.)
        level = os.environ.get(LOG_LEVEL_ENV)
        if level:
            logging.getLogger("facedata").setLevel(int(level))
        return RayTaskRunner._run_prefect_task(*upstream_ray_obj_refs, **kwargs)


def worker_runtime_env(api_url: str | None) -> dict[str, Any]:
    # The user's own values of the quiet settings win, as they do in this process.
    env_vars = {key: os.environ.get(key, value) for key, value in QUIET_DEFAULTS.items()}
    if api_url:
        env_vars["PREFECT_API_URL"] = api_url
    env_vars[LOG_LEVEL_ENV] = str(logging.getLogger("facedata").getEffectiveLevel())
    return {"env_vars": env_vars}


def _flow_api_url() -> str | None:
    """The API URL this flow run talks to: the user's server, or the temporary one started for it."""
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_API_URL

    ctx = SyncClientContext.get()
    if ctx is not None:
        return str(ctx.client.api_url).rstrip("/")
    return PREFECT_API_URL.value()


def _check_reachable(address: str) -> None:
    """Fail in seconds: ray.init retries an unreachable cluster address for minutes."""
    if address == "auto":
        return  # ray.init finds this node's cluster, or fails at once
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise UserError(f"runner.kind ray: cannot connect to the Ray cluster at {address}: {err}") from err


def ray_task_runner(cfg: RunnerConfig) -> FacedataRayTaskRunner:
    """A local Ray instance of max_workers CPUs (no dashboard), or the cluster at cfg.ray_address."""
    if cfg.ray_address:
        return FacedataRayTaskRunner(address=cfg.ray_address, init_kwargs={"logging_level": logging.WARNING})
    return FacedataRayTaskRunner(init_kwargs=local_instance_kwargs(cfg))


def local_instance_kwargs(cfg: RunnerConfig) -> dict[str, Any]:
    # "local": a new instance even when RAY_ADDRESS names a cluster. Each shard task asks for one
    # CPU (Ray's default), so max_workers of them run at once, one per worker process.
    return {"address": "local", "num_cpus": cfg.max_workers, "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES, "logging_level": logging.WARNING}
