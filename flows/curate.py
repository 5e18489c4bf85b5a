"""The curation flow: plan shards, download them, find their faces, group identities, caption
the faces, report, and publish when `publish.to` is set.

Only wiring lives here; every stage is a plain function in `facedata/`, testable without Prefect.
Resume comes from the shards' own done markers, so Prefect's result caching is off.

The shard is the unit of work: each shard's face task takes its download task's result, so it
starts as soon as that shard is downloaded, while other shards still download. The identity
stage needs every shard's faces at once; the caption tasks, one per shard again, follow it.

Stage modules are imported inside the tasks: with `runner.kind: process` every worker process
imports this module, and a worker that only downloads should not load onnxruntime, OpenCV and
faiss (~120 MiB and a second of CPU each).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from facedata.core.config import Config, RunnerConfig
from facedata.core.errors import UserError
from facedata.core.fingerprints import Fingerprint, model_infos, step_fingerprints
from facedata.pipeline import begin_run
from facedata.core.prefect_env import start_api_server
from facedata.ingest.reader import ShardPlan, check_input, plan_shards
from facedata.report.prefect_artifacts import RunProgress, publish_run_artifacts
from facedata.core.run_layout import RunLayout
from facedata.core.step import is_global

log = logging.getLogger("facedata.flow")


class RunIncomplete(UserError):
    """Some shard tasks failed; what finished is kept and a rerun resumes."""


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards_task(cfg: Config, run_dir: str) -> list[ShardPlan]:
    plans = plan_shards(cfg.input, cfg.shards.samples_per_shard, RunLayout(run_dir).plan_dir)
    log.info("%d samples planned in %d shards", sum(p.n_samples for p in plans), len(plans))
    return plans


@task(name="shard-step", cache_policy=NO_CACHE, task_run_name="{step}-shard-{plan.shard_id:05d}")
def shard_step_task(step: str, plan: ShardPlan, previous: dict | None, cfg: Config, run_dir: str, progress: bool,
                    fingerprint: Fingerprint) -> dict:
    # `previous` (the shard's stats from the step before) is taken only so Prefect runs this task after it.
    from facedata.pipeline import run_shard

    return run_shard(step, plan, cfg, Path(run_dir), progress, fingerprint)


@task(name="global-step", task_run_name="{step}", cache_policy=NO_CACHE)
def global_step_task(step: str, cfg: Config, run_dir: str, shard_ids: list[int], fingerprint: Fingerprint) -> dict:
    """A run-wide step (identity, duplicates) over every shard."""
    from facedata.pipeline import run_global

    return run_global(step, cfg, run_dir, shard_ids, fingerprint)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: Config, run_dir: str, stage_seconds: dict) -> dict:
    from facedata.report.summary import write_run_report

    return write_run_report(
        Path(run_dir), cfg.faces.enabled, cfg.output.contact_sheet_max, cfg.output.contact_sheet, stage_seconds
    )


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(cfg: Config, run_dir: str, progress: bool) -> dict:
    from facedata.pipeline import publish

    return publish(run_dir, cfg, progress)


def _submit_shards(
    plans: list[ShardPlan], steps: list[str], cfg: Config, run_dir: str, progress: bool,
    fingerprints: dict[str, Fingerprint],
) -> list[tuple[str, ShardPlan, PrefectFuture]]:
    """Queue every shard's tasks for `steps` (shard steps, in order: each shard's task of a step
    takes the task of the step before as its input); returns (step, plan, future) for each.

    The task runner's workers take tasks in the order they were queued, so each shard's face task
    is queued `max_workers` downloads after its own download: by the time a worker picks it up,
    that download has usually finished, and the downloads queued after it keep the network busy
    while it runs. (Queuing all downloads first would hold every face task back to the last one.)
    """
    shard_step = shard_step_task.with_options(retries=cfg.runner.task_retries)
    submitted: list[tuple[str, ShardPlan, PrefectFuture]] = []
    last: list[PrefectFuture | None] = [None] * len(plans)

    def queue(i: int, chain: list[str]) -> None:
        for step in chain:
            last[i] = shard_step.submit(step, plans[i], last[i], cfg, run_dir, progress, fingerprints[step])
            submitted.append((step, plans[i], last[i]))

    split = steps.index("faces") if "faces" in steps else len(steps)
    before_faces, from_faces = steps[:split], steps[split:]
    lag = cfg.runner.max_workers if from_faces else 0
    for i in range(len(plans)):
        queue(i, before_faces)
        if from_faces and i >= lag:
            queue(i - lag, from_faces)
    for i in range(max(0, len(plans) - lag), len(plans)):
        queue(i, from_faces)
    return submitted


@flow(name="curate")
def curate(config: dict, run_dir: str, progress: bool = True, models: dict | None = None) -> dict:
    """`models`: the run's model infos (checked_model_infos) when the caller has them already."""
    if not logging.getLogger("facedata").level:
        # A run started by `facedata serve` is a fresh process where only Prefect's root level
        # (WARNING) applies: keep our per-shard INFO lines in the run's logs.
        logging.getLogger("facedata").setLevel(logging.INFO)
    cfg = Config.model_validate(config)
    layout = RunLayout(run_dir)
    fingerprints = step_fingerprints(cfg, models if models is not None else checked_model_infos(cfg))
    plans = plan_shards_task(cfg, run_dir)
    shard_ids = [plan.shard_id for plan in plans]
    begin_run(layout, config, fingerprints, shard_ids)
    # Shard steps run per shard, chained; a run-wide step sees every shard at once: a barrier.
    tracker = RunProgress(run_dir)

    def run_shard_steps(chain: list[str]) -> list[str]:
        for step in chain:
            tracker.open(step, len(plans))
        return tracker.wait(_submit_shards(plans, chain, cfg, run_dir, progress, fingerprints)) if chain else []

    failed: list[str] = []
    chained: list[str] = []
    for step in [*fingerprints, None]:
        if step is not None and not is_global(cfg, step):
            chained.append(step)
            continue
        failed = run_shard_steps(chained)
        chained = []
        if failed:
            break
        if step is not None:
            global_step_task(step, cfg, run_dir, shard_ids, fingerprints[step])
    try:
        summary = report_task(cfg, run_dir, tracker.stage_seconds())
    except Exception as err:
        if not failed:
            raise
        # The shard failures come first: the report most often fails for the same reason (a full disk).
        failed.append(f"report ({err})")
    else:
        # Before a failure is raised too: the report then shows how far the run got.
        publish_run_artifacts(summary, run_dir)
    if failed:
        raise RunIncomplete(f"{len(failed)} tasks failed; rerun to resume: {'; '.join(failed[:5])}")
    if cfg.publish.to:
        summary["published"] = publish_task(cfg, run_dir, progress)["destination"]
    return summary


def task_runner(cfg: RunnerConfig) -> TaskRunner:
    """The Prefect task runner for the shard tasks.

    thread: one process; the download threads of every shard share one GIL, so about one core.
    process: one spawned worker process per shard slot (Prefect's ProcessPoolTaskRunner), each
    with its own GIL. Workers live for the whole run, so their start-up (imports, a few seconds)
    is paid once, and a worker that runs face tasks loads the models once.
    dask: the shard tasks on a Dask cluster (flows/dask_runner.py): a local one of max_workers
    single-thread worker processes, or an existing one at dask_address. Shards stay the unit of
    work; task results are the stages' small stats dicts (the identity stage reads the
    embeddings from the run directory), so only those travel back to this process.
    """
    if cfg.kind == "dask":
        from flows.dask_runner import dask_task_runner

        return dask_task_runner(cfg)
    if cfg.kind == "ray":
        from flows.ray_runner import ray_task_runner

        return ray_task_runner(cfg)
    if cfg.kind == "process":
        # Spawned workers start with default logging; give them this process's level for our logs.
        facedata_log = logging.getLogger("facedata")
        return ProcessPoolTaskRunner(
            max_workers=cfg.max_workers, initializer=facedata_log.setLevel, initargs=(facedata_log.level,)
        )
    return ThreadPoolTaskRunner(max_workers=cfg.max_workers)


def checked_model_infos(cfg: Config) -> dict:
    """Load every model the run uses and return their infos (for the steps' fingerprints): a missing
    or unreadable file is then one line for the user before the flow starts, not a crashed flow run
    and a failed task per shard."""
    if cfg.runner.kind == "thread" or not cfg.faces.enabled:
        return model_infos(cfg)  # the tasks run in this process and reuse the loaded (cached) models
    # The tasks load their own models in their worker processes; loading them here too would
    # hold ~1 GB in this process for the whole run, so a short-lived process checks them.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(model_infos, cfg).result()


def run_curation(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """Check the input and the models, then run the flow with the task runner the config asks for."""
    check_input(cfg.input)
    flow_with_runner = curation_flow(cfg)  # a runner that cannot be had (ray not installed) is one line now
    log.info("loading the models and starting Prefect")
    # Prefect's temporary server starts in its own process: it comes up while the models load. A
    # daemon thread waits for it, so that a model error is reported without waiting for the server.
    server_error: list[BaseException] = []

    def start_server() -> None:
        try:
            start_api_server()
        except BaseException as err:  # noqa: BLE001 - re-raised in the flow's thread below
            server_error.append(err)

    starting = threading.Thread(target=start_server, name="prefect-server-start", daemon=True)
    starting.start()
    models = checked_model_infos(cfg)
    starting.join()
    if server_error:
        raise server_error[0]
    return flow_with_runner(cfg.model_dump(mode="json"), str(run_dir), progress, models)


def curation_flow(cfg: Config):
    """The curate flow with the config's task runner and flow retry policy (also what
    `facedata serve` deploys)."""
    return curate.with_options(task_runner=task_runner(cfg.runner), retries=cfg.runner.flow_retries,
                               retry_delay_seconds=cfg.runner.flow_retry_delay_s)
