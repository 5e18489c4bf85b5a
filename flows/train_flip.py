"""The FLIP training flow: load the config, train, report.

Only wiring lives here; training is `facedata.flip.train.train`, a plain function testable
without Prefect. Resume comes from the run's own checkpoints (rerun the same command), so
Prefect's result caching is off and the training task is not retried by Prefect. torch and
open_clip are imported inside the tasks, not when this module is imported.
"""

from __future__ import annotations

import logging

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from facedata.flip.config import TrainConfig

log = logging.getLogger("facedata.flow")


@task(name="train-flip", cache_policy=NO_CACHE)
def train_task(cfg: TrainConfig, progress: bool) -> dict:
    from facedata.flip.train import train

    return train(cfg, progress=progress)


@task(name="report", cache_policy=NO_CACHE)
def report_task(metrics: dict, output_dir: str) -> dict:
    from facedata.flip.train import write_report

    path = write_report(metrics, output_dir)
    speed = f"{metrics['samples_per_s']:.1f} samples/s" if metrics["samples_per_s"] else "no new steps"
    log.info("trained to step %d, loss %s, %s; report: %s", metrics["steps"], metrics["final_loss"], speed, path)
    return metrics


@flow(name="train-flip")
def train_flip(config: dict, progress: bool = True) -> dict:
    cfg = TrainConfig.model_validate(config)
    metrics = train_task(cfg, progress)
    return report_task(metrics, cfg.output.dir)


def run_training(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run the flow. Inputs are checked first, so a missing split or checkpoint is one line for
    the user rather than a failed flow run."""
    from facedata.flip.train import check_inputs
    from facedata.core.prefect_env import start_api_server

    check_inputs(cfg)
    start_api_server()
    return train_flip(cfg.model_dump(mode="json"), progress)
