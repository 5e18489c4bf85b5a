"""Scheduled runs: serve the curation flow (and optionally the FLIP training flow) as Prefect
deployments with a cron schedule; `facedata serve CONFIG.yaml`.

The config is read once, when serving starts, and stored in the deployment as the flow's
parameters (edit the file, then restart `facedata serve`; or change a run's parameters in the
Prefect UI). Each scheduled run works in the same run directory, so it resumes what an earlier
run left unfinished and skips every shard already done: an unchanged input costs a re-plan check
and a report, nothing else. A changed input file (size or modification time) makes the run stop
with an error naming the run directory, instead of mixing two inputs in one run.

Serving needs a Prefect server that outlives the serving process (`prefect server start`, or
Prefect Cloud) in PREFECT_API_URL: the temporary server a plain `facedata run` starts has no
scheduler. Flow runs execute in subprocesses of the serving process, with the config's task
runner (`runner.kind`) and flow retry policy (`runner.flow_retries`). Only one curation run per
deployment runs at a time; a scheduled run that finds the previous one still going is cancelled
(the next one picks up where it stands).

Nothing here imports Prefect at module level: the CLI imports this module before it has set
Prefect's settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facedata.core.errors import UserError

DEFAULT_CRON = "0 2 * * *"


def _schedule(cron: str, timezone: str | None):
    """A Prefect cron schedule; a bad expression or time zone is one line for the user."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)  # Cron() does not check the time zone
    except ValidationError as err:
        e = err.errors()[0]
        option = "--timezone" if e["loc"] and e["loc"][0] == "timezone" else "--cron"
        raise UserError(f"{option}: {e['msg'].removeprefix('Value error, ')}") from None
    return Cron(cron, timezone=timezone)


def _deployment_options(name: str, cron: str | None, timezone: str | None, parameters: dict,
                        description: str | None, tags: list[str]) -> dict:
    """Keyword arguments shared by Flow.to_deployment and Runner.add_flow."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return {
        "name": name,
        "schedules": [_schedule(cron, timezone)] if cron else None,
        "parameters": parameters,
        # One run at a time per deployment: a run due while the last one still works is cancelled.
        "concurrency_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        "description": description,
        "tags": tags,
    }


def curation_spec(cfg, run_dir: Path, *, name: str, cron: str | None = DEFAULT_CRON, timezone: str | None = None,
                  description: str | None = None) -> tuple:
    """(flow, deployment options) for the curation flow: the config's task runner and flow retries,
    the config and the (absolute) run directory as parameters."""
    from flows.curate import curation_flow

    parameters = {"config": cfg.model_dump(mode="json"), "run_dir": str(Path(run_dir).resolve()), "progress": False}
    return curation_flow(cfg), _deployment_options(name, cron, timezone, parameters, description,
                                                   ["facedata", "curation"])


def training_spec(cfg, *, name: str, cron: str | None = None, timezone: str | None = None,
                  description: str | None = None) -> tuple:
    """(flow, deployment options) for the FLIP training flow: on its own cron, or on demand
    (`prefect deployment run train-flip/NAME`) when cron is None. Training resumes from its own
    checkpoints, so it gets no Prefect retries."""
    from flows.train_flip import train_flip

    parameters = {"config": cfg.model_dump(mode="json"), "progress": False}
    return train_flip, _deployment_options(name, cron, timezone, parameters, description, ["facedata", "training"])


def build_specs(args) -> list[tuple]:
    """What `facedata serve` serves, from its parsed arguments: (flow, deployment options) pairs."""
    from facedata.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    run_dir = args.output or Path(cfg.output.dir)
    specs = [curation_spec(cfg, run_dir, name=args.name or args.config.stem, cron=args.cron,
                           timezone=args.timezone, description=f"facedata curation of {args.config}")]
    if args.train_config:
        from facedata.flip.config import load_train_config

        train_cfg = load_train_config(args.train_config, [])
        specs.append(training_spec(train_cfg, name=args.train_name or args.train_config.stem, cron=args.train_cron,
                                   timezone=args.timezone,
                                   description=f"facedata FLIP training from {args.train_config}"))
    return specs


def build_deployments(args) -> list:
    """The RunnerDeployments `facedata serve` registers (for inspection; serving uses the specs)."""
    return [flow.to_deployment(**options) for flow, options in build_specs(args)]


def serve_specs(specs: list[tuple], runner_name: str) -> None:
    """Register the deployments and run their flow runs until interrupted.

    Runner.add_flow, not prefect.serve(*deployments): only add_flow keeps the flow object itself
    (with its task runner and retries) for the runs; a plain deployment's runs would load the
    module-level flow from its entrypoint, with Prefect's default task runner and no retries."""
    import asyncio

    from prefect.runner import Runner

    runner = Runner(name=runner_name)
    for flow, options in specs:
        runner.add_flow(flow, **options)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass  # the runner has paused the schedules on its way out


def add_serve_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="Serve the curation flow on a cron schedule (Prefect deployment).",
        description="Register CONFIG's curation flow as a Prefect deployment with a cron schedule and "
                    "run its scheduled runs until stopped (Ctrl-C pauses the schedule). Needs a Prefect "
                    "server in PREFECT_API_URL, e.g. `prefect server start`. Each run resumes the same run "
                    "directory: shards already done are skipped.",
    )
    p.add_argument("config", type=Path, help="curation YAML (see configs/)")
    p.add_argument("--cron", default=DEFAULT_CRON,
                   help=f"when to run, a cron expression (default: {DEFAULT_CRON!r}, 02:00 every day)")
    p.add_argument("--timezone", help="time zone of the cron expression, e.g. Europe/Paris (default: UTC)")
    p.add_argument("--name", help="deployment name (default: the config file's name without .yaml)")
    p.add_argument("--output", type=Path, help="run directory (default: the config's output.dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set runner.kind=dask (repeatable)")
    p.add_argument("--train-config", type=Path, metavar="TRAIN.yaml",
                   help="also serve the FLIP training flow with this training config")
    p.add_argument("--train-cron", help="cron schedule of the training deployment (default: none, run on demand)")
    p.add_argument("--train-name", help="training deployment name (default: the training config's name)")
    return p


def check_server() -> str:
    """The Prefect API URL to serve against; a UserError when there is none."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            "facedata serve needs a Prefect server that keeps running: start one with "
            "`prefect server start --host 127.0.0.1` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    return url


def run_serve_command(args) -> int:
    from facedata.core.config import load_config
    from facedata.ingest.reader import check_run

    # What would fail every scheduled run (a missing input, an unwritable run directory) fails now.
    cfg = load_config(args.config, args.overrides)
    check_run(cfg, args.output or Path(cfg.output.dir), "--output" if args.output else "output.dir")
    url = check_server()
    specs = build_specs(args)
    for flow, options in specs:
        when = f"cron {options['schedules'][0].cron!r}" if options["schedules"] else "on demand"
        print(f"serving {flow.name}/{options['name']} ({when}) on {url}; Ctrl-C stops", flush=True)
    serve_specs(specs, runner_name=f"facedata-{specs[0][1]['name']}")
    return 0
