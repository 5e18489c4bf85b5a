"""facedata: face-centric image-text datasets as resumable pipelines.

The Python API (the command line does the same):

    import facedata
    summary = facedata.curate("configs/demo.yaml", output="runs/x")   # the pipeline, in this process
    facedata.dry_run("configs/demo.yaml", output="runs/x")            # what a rerun would redo
    table = facedata.open_run("runs/x")                               # every record, as a pyarrow Table
    facedata.publish_run("runs/x", to="/data/faces-v1")               # parquet, tars, dataset card

Imports are deferred to the first call: `import facedata` stays cheap.
"""

from __future__ import annotations

__all__ = ["curate", "dry_run", "open_run", "publish_run"]


def curate(config, output=None, progress: bool = False) -> dict:
    """Run the curation pipeline without Prefect; see facedata.pipeline.curate."""
    from facedata.pipeline import curate as _curate

    return _curate(config, output, progress)


def dry_run(config, output) -> list[str]:
    """One line per step: what a run into `output` would reuse and redo."""
    from facedata.pipeline import dry_run as _dry_run

    return _dry_run(config, output)


def open_run(run_dir):
    """Every record of a run (each shard at its latest finished step), as a pyarrow Table."""
    from facedata.pipeline import open_run as _open_run

    return _open_run(run_dir)


def publish_run(run_dir, to, **options) -> dict:
    """Publish a finished run to a folder or a Hub repo; see facedata.publish.writer.publish. (Not named
    `publish`: importing the facedata.publish.writer module would replace it.)"""
    from facedata.publish.writer import publish as _publish

    return _publish(run_dir, to, **options)
