"""The curation pipeline in this process, without Prefect: the Python API and `facedata run --no-prefect`.

The same steps as the Prefect flow (flows/curate.py), one shard after another: plan, download and
faces per shard, identity over all of them, captions per shard, report, and publish when
`publish.to` is set. Both start a run with `begin_run`, so both rerun exactly what changed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from facedata.core.config import Config, config_from_dict, load_config
from facedata.core.fingerprints import Fingerprint, StepPlan, model_infos, plan_run, step_fingerprints, write_fingerprints
from facedata.ingest.reader import ShardPlan, check_input, load_plan, plan_shards
from facedata.core.run_layout import RunLayout
from facedata.core.shards import atomic_write_bytes
from facedata.core.step import BUILTIN_STEPS, builtin_step, is_global, pipeline, run_global_step, run_shard_step, source_of

log = logging.getLogger("facedata.pipeline")


def begin_run(layout: RunLayout, config: dict, fingerprints: dict[str, Fingerprint], shard_ids: list[int]) -> list[StepPlan]:
    """Say per step what the run reuses and what it redoes, then record the config and fingerprints
    the run is made under, before any output is: from then on a step output with another fingerprint
    is stale (a report or publish refuses the run until it is redone)."""
    step_plans = plan_run(layout, fingerprints, shard_ids)
    for step_plan in step_plans:
        log.info("%s", step_plan.line())
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(layout.config_file, yaml.safe_dump(config, sort_keys=False).encode())
    write_fingerprints(layout, fingerprints, shard_ids)
    return step_plans


def _config(config: Config | dict | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def dry_run(config: Config | dict | str | Path, output: str | Path) -> list[str]:
    """One line per step: what a run into `output` would reuse and redo. Nothing is written; the
    models are loaded (their versions are part of the fingerprints)."""
    cfg = _config(config)
    check_input(cfg.input)
    layout = RunLayout(output)
    fingerprints = step_fingerprints(cfg, model_infos(cfg))
    try:
        shard_ids = [plan.shard_id for plan in load_plan(layout.plan_dir)]
    except Exception:  # noqa: BLE001 - no plan yet, or one from an interrupted planning
        return [f"{layout.root}: no finished shard plan yet: every step runs on every shard"]
    lines = [step_plan.line() for step_plan in plan_run(layout, fingerprints, shard_ids)]
    return lines + [f"({len(shard_ids)} shards planned; new input files would add shards)"]


def run_shard(step: str, plan: ShardPlan | int, cfg: Config, run_dir: str | Path, progress: bool = False,
              fingerprint: Fingerprint | None = None) -> dict:
    """One shard (its plan, or its id) of one shard step, built-in or a user's, unless done under
    `fingerprint` (by default the config's); returns its stats. A built-in step's module is imported
    here: a worker process that only downloads does not load onnxruntime, OpenCV and faiss."""
    layout = RunLayout(run_dir)
    shard_id = plan if isinstance(plan, int) else plan.shard_id
    if fingerprint is None:
        fingerprint = step_fingerprints(cfg, model_infos(cfg) if step != "download" else {})[step]
    instance = builtin_step(step, cfg) if step in BUILTIN_STEPS else dict(pipeline(cfg))[step]
    source = source_of(cfg, step)
    if source is None:  # the first step reads the shard's input plan
        source = layout.plan_file(shard_id) if isinstance(plan, int) else Path(plan.path)
    return run_shard_step(instance, shard_id, layout.root, source, fingerprint, progress)


def run_global(step: str, cfg: Config, run_dir: str | Path, shard_ids: list[int],
               fingerprint: Fingerprint | None = None) -> dict:
    """A run-wide step over the run's shards, unless done over them under `fingerprint` (by default
    the config's); returns its report."""
    if fingerprint is None:
        fingerprint = step_fingerprints(cfg, model_infos(cfg))[step]
    instance = builtin_step(step, cfg) if step in BUILTIN_STEPS else dict(pipeline(cfg))[step]
    return run_global_step(instance, RunLayout(run_dir).root, shard_ids, source_of(cfg, step), fingerprint)


def curate(config: Config | dict | str | Path, output: str | Path | None = None, progress: bool = False) -> dict:
    """Run the curation pipeline in this process (no Prefect) and return the run's summary.

    `config`: a Config, a dict as in the YAML files, or a YAML path; `output`: the run directory
    (default: the config's output.dir). A rerun reuses every output whose settings did not change."""
    from facedata.report.summary import write_run_report

    cfg = _config(config)
    layout = RunLayout(output or cfg.output.dir)
    check_input(cfg.input)
    fingerprints = step_fingerprints(cfg, model_infos(cfg))
    plans = plan_shards(cfg.input, cfg.shards.samples_per_shard, layout.plan_dir)
    shard_ids = [plan.shard_id for plan in plans]
    begin_run(layout, cfg.model_dump(mode="json"), fingerprints, shard_ids)
    # Consecutive shard steps run shard by shard; a run-wide step waits for every shard before it.
    chained: list[str] = []
    for step in [*fingerprints, None]:
        if step is not None and not is_global(cfg, step):
            chained.append(step)
            continue
        for plan in plans:
            for name in chained:
                run_shard(name, plan, cfg, layout.root, progress, fingerprints[name])
        chained = []
        if step is not None:
            run_global(step, cfg, layout.root, shard_ids, fingerprints[step])
    summary = write_run_report(layout.root, cfg.faces.enabled, cfg.output.contact_sheet_max, cfg.output.contact_sheet)
    if cfg.publish.to:
        summary["published"] = publish(layout.root, cfg)["destination"]
    return summary


def publish(run_dir: str | Path, cfg: Config, progress: bool = False) -> dict:
    """Publish a finished run where `cfg.publish` says (the flow's last step)."""
    from facedata.publish.writer import holds_publish_of
    from facedata.publish.writer import publish as publish_run

    options = cfg.publish
    # A scheduled run whose input grew publishes the new version over its own earlier publish.
    overwrite = options.overwrite or holds_publish_of(Path(options.to), Path(run_dir))
    return publish_run(Path(run_dir), options.to, private=options.private, overwrite=overwrite,
                       crops=options.crops, embeddings=options.embeddings,
                       samples_per_shard=options.samples_per_shard, progress=progress)


def open_run(run_dir: str | Path):
    """Every record of a run as one pyarrow Table: each shard's records from the latest step that
    finished it (captions, identity, faces, download), with that step in a `step` column."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from facedata.core.errors import UserError

    layout = RunLayout(run_dir)
    if not layout.step_dir("download").is_dir():
        raise UserError(f"{layout.root}: not a run directory (no {layout.step_dir('download').name}/ folder)")
    tables = []
    for stats_file in sorted(layout.step_dir("download").glob("*.stats.json")):
        shard_id = json.loads(stats_file.read_text())["shard_id"]
        step = layout.latest_step(shard_id)
        table = pq.read_table(layout.records_file(step, shard_id))
        tables.append(table.append_column("step", pa.array([step] * table.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
