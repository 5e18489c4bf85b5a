"""The curation flow: plan shards, process them in parallel, report.

Only wiring lives here; every stage is a plain function in `facedata/`, testable without Prefect.
Resume comes from the shards' own done markers, so Prefect's result caching is off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from facedata.config import Config
from facedata.download_stage import run_download_shard
from facedata.reader import ShardPlan, plan_shards
from facedata.shards import atomic_write_bytes
from facedata.summary import write_run_report

log = logging.getLogger("facedata.flow")


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards_task(cfg: Config, run_dir: str) -> list[ShardPlan]:
    plans = plan_shards(cfg.input, cfg.shards.samples_per_shard, Path(run_dir) / "_plan")
    log.info("%d samples planned in %d shards", sum(p.n_samples for p in plans), len(plans))
    return plans


@task(name="download-shard", cache_policy=NO_CACHE, task_run_name="download-shard-{plan.shard_id:05d}")
def download_shard_task(plan: ShardPlan, cfg: Config, run_dir: str, progress: bool) -> dict:
    return run_download_shard(plan, cfg, Path(run_dir) / "shards", progress=progress)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: Config, run_dir: str) -> dict:
    return write_run_report(Path(run_dir), cfg.output.contact_sheet_max, cfg.output.contact_sheet)


@flow(name="curate")
def curate(config: dict, run_dir: str, progress: bool = True) -> dict:
    cfg = Config.model_validate(config)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(run_dir) / "config.yaml", yaml.safe_dump(config, sort_keys=False).encode())
    plans = plan_shards_task(cfg, run_dir)
    futures = download_shard_task.with_options(retries=cfg.runner.task_retries).map(
        plans, unmapped(cfg), unmapped(run_dir), unmapped(progress)
    )
    outcomes = [future.result(raise_on_failure=False) for future in futures]
    failed = [(plan, out) for plan, out in zip(plans, outcomes) if isinstance(out, BaseException)]
    summary = report_task(cfg, run_dir)
    if failed:
        names = ", ".join(f"{plan.shard_id:05d} ({err})" for plan, err in failed[:5])
        raise RuntimeError(f"{len(failed)} of {len(plans)} shards failed; rerun to resume: {names}")
    return summary


def run_curation(cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """Run the flow with the task runner the config asks for."""
    runner = ThreadPoolTaskRunner(max_workers=cfg.runner.max_workers)
    return curate.with_options(task_runner=runner)(cfg.model_dump(mode="json"), str(run_dir), progress)
