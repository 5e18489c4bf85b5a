"""What a curation run shows while it runs and when it ends.

While the shard tasks finish, `RunProgress` keeps per-stage counters (shards finished, samples
or images processed and kept, throughput over the stage's wall window so far), logs one line per
finished shard and, inside a flow run, keeps a Prefect progress artifact per stage up to date.
At the end, `publish_run_artifacts` turns the run's summary into Prefect artifacts: a markdown
report (the funnel, the stats, the contact sheets and the identity gallery) and a table of the
funnel.

A stage's wall window runs from the start of its earliest shard processed in this run to the end
of its latest. A shard's start is the moment the flow saw it finish less the shard's own
processing seconds (its stats' `seconds`), so the window needs no clock but the flow's. Shards a
stage had finished before this run (a resumed run) count as done but not in the throughput:
their task only read their stats. They are told apart by their stats' `finished_at` being
earlier than this run's start, the one place a worker's clock meets the flow's: a resumed shard
finished a whole earlier run ago, far beyond any clock skew between machines.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, as_completed

from facedata.core import markdown

from facedata.core import records
from facedata.ingest.reader import ShardPlan

# facedata.report.summary is imported where it is used: it imports the stage modules (onnxruntime,
# OpenCV), and every worker process of the process runner imports this module via flows.curate.

log = logging.getLogger("facedata.flow")

# Per shard stage: (the unit it counts, its stats' count of items processed, its stats' status
# counts over those items).
# Every step after download counts the records still kept when it began (facedata.core.step).
STAGES = {
    "download": ("samples", "n_samples", "status_counts"),
    "faces": ("images", "n_in", "step_status_counts"),
    "captions": ("images", "n_in", "step_status_counts"),
}


def _stage_fields(stage: str) -> tuple[str, str, str]:
    """(unit, the stats field of items seen, the stats field of statuses given) of a stage."""
    return STAGES.get(stage, ("samples", "n_in", "step_status_counts"))


# The markdown report's images: (summary field, heading).
REPORT_IMAGES = (
    ("contact_sheet", "Contact sheet: kept samples, faces boxed"),
    ("captions_sheet", "Captions sheet: faces with their captions and attributes"),
    ("identity_gallery", "Identity gallery: largest identities and outliers"),
)
# The largest data URI embedded per image: the report stays a few hundred KB in the API's database.
MAX_IMAGE_URI_CHARS = 200_000


def artifact_key(run_dir: str | Path, suffix: str) -> str:
    """A Prefect artifact key for this run directory: lowercase letters, digits and dashes only.

    Keys name an artifact across runs (Prefect keeps each run's version), so runs written to a
    directory of the same name share theirs."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(run_dir).resolve().name.lower()).strip("-")[:60].strip("-")
    suffix = re.sub(r"[^a-z0-9]+", "-", suffix.lower()).strip("-")  # e.g. a user's step_name-progress
    return f"facedata-{slug or 'run'}-{suffix}"


def _in_flow_run() -> bool:
    return FlowRunContext.get() is not None


@dataclass
class StageProgress:
    """One stage's counters; `n_items`/`n_kept` count every finished shard, resumed ones too,
    `n_processed` only the items of the shards processed in this run (what the rate counts)."""

    stage: str
    unit: str
    n_shards: int
    shards_done: int = 0
    shards_resumed: int = 0
    shards_failed: int = 0
    n_items: int = 0
    n_kept: int = 0
    n_processed: int = 0
    window_start: float | None = None
    window_end: float | None = None
    artifact_id: UUID | None = None

    @property
    def shards_finished(self) -> int:
        return self.shards_done + self.shards_failed

    @property
    def seconds(self) -> float | None:
        if self.window_start is None:
            return None
        return self.window_end - self.window_start

    @property
    def per_second(self) -> float | None:
        seconds = self.seconds
        return self.n_processed / seconds if seconds else None

    @property
    def percent(self) -> float:
        return 100.0 * self.shards_finished / self.n_shards if self.n_shards else 100.0

    def line(self) -> str:
        """e.g. "faces 12/100 shards, 11873 images, 342 kept, 15.2 images/s"."""
        text = (f"{self.stage} {self.shards_finished}/{self.n_shards} shards, {self.n_items} {self.unit}, "
                f"{self.n_kept} kept")
        if self.per_second is not None:
            text += f", {self.per_second:.1f} {self.unit}/s"
        notes = [f"{n} {what}" for n, what in ((self.shards_resumed, "resumed"), (self.shards_failed, "failed")) if n]
        return f"{text} ({', '.join(notes)})" if notes else text

    def as_dict(self) -> dict:
        seconds, rate = self.seconds, self.per_second
        return {
            "unit": self.unit,
            "shards": self.n_shards,
            "shards_done": self.shards_done,
            "shards_resumed": self.shards_resumed,
            "shards_failed": self.shards_failed,
            "processed": self.n_processed,
            "seconds": round(seconds, 3) if seconds is not None else None,
            "per_second": round(rate, 2) if rate is not None else None,
        }


class RunProgress:
    """Per-stage progress of one flow run, fed by the shard tasks' results as they finish."""

    def __init__(self, run_dir: str | Path, clock: Callable[[], float] = time.time):
        self.run_dir = Path(run_dir)
        self.clock = clock
        # A shard whose stats say it finished before this moment was done by an earlier run.
        self.started_at = clock()
        self.stages: dict[str, StageProgress] = {}

    def open(self, stage: str, n_shards: int) -> StageProgress:
        """Start counting a stage of `n_shards` shard tasks (and its progress artifact, in a flow run)."""
        progress = StageProgress(stage, _stage_fields(stage)[0], n_shards)
        if _in_flow_run():
            progress.artifact_id = create_progress_artifact(
                progress=progress.percent,
                key=artifact_key(self.run_dir, f"{stage}-progress"),
                description=progress.line(),
            )
        self.stages[stage] = progress
        return progress

    def shard_done(self, stage: str, stats: dict) -> None:
        """Count a shard the stage finished, from the stats its task returned."""
        progress = self.stages[stage]
        now = self.clock()
        _, items_field, counts_field = _stage_fields(stage)
        progress.shards_done += 1
        progress.n_items += stats[items_field]
        progress.n_kept += stats[counts_field].get(records.OK, 0)
        if stats["finished_at"] < self.started_at:
            progress.shards_resumed += 1
        else:
            progress.n_processed += stats[items_field]
            start = now - stats["seconds"]
            progress.window_start = start if progress.window_start is None else min(progress.window_start, start)
            progress.window_end = now
        self._report(progress)

    def shard_failed(self, stage: str) -> None:
        progress = self.stages[stage]
        progress.shards_failed += 1
        self._report(progress)

    def _report(self, progress: StageProgress) -> None:
        line = progress.line()
        log.info("%s", line)
        if progress.artifact_id is not None:
            update_progress_artifact(progress.artifact_id, progress.percent, description=line)

    def wait(self, submitted: list[tuple[str, ShardPlan, PrefectFuture]]) -> list[str]:
        """Wait for the (stage, plan, future) shard tasks in the order they finish, counting each;
        returns one description per task that did not complete (it failed, or never started
        because the task it takes its input from failed)."""
        where = {future: (stage, plan) for stage, plan, future in submitted}
        failed = []
        failed_downloads = set()
        for future in as_completed(list(where)):
            stage, plan = where[future]
            future.wait()
            if future.state.is_completed():
                self.shard_done(stage, future.result())
                continue
            self.shard_failed(stage)
            if stage == "download":
                failed_downloads.add(plan.shard_id)
            # Prefect's own words for a task whose input task failed name only a task run id.
            why = "not run: its download failed" if stage != "download" and plan.shard_id in failed_downloads \
                else future.state.message
            failed.append(f"{stage} {plan.shard_id:05d} ({why})")
        return failed

    def stage_seconds(self) -> dict[str, dict]:
        """Per stage: shards, processed items, wall seconds and throughput (for the run summary)."""
        return {stage: progress.as_dict() for stage, progress in self.stages.items()}


# ---------------------------------------------------------------------------------------------
# The end-of-run report


def jpeg_data_uri(path: Path, max_chars: int = MAX_IMAGE_URI_CHARS) -> str:
    """The image as a JPEG data URI of at most `max_chars` characters, downscaled until it fits."""
    from PIL import Image

    with Image.open(path) as im:
        image = im.convert("RGB")
    side = 1600
    while True:
        thumb = image.copy()
        thumb.thumbnail((side, side))
        buf = io.BytesIO()
        thumb.save(buf, "JPEG", quality=80)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        if len(uri) <= max_chars:
            return uri
        if side <= 64:
            raise ValueError(f"{path}: no {side} px JPEG fits in {max_chars} characters")
        side = side * 3 // 4


def _stats_lines(summary: dict, walls: list[tuple[str, dict]]) -> list[str]:
    steps = {step["stage"]: step for step in summary["funnel"]}
    lines = [(
        f"- **kept** {summary['n_ok']} of {summary['n_samples']} samples in {summary['n_shards']} shards; "
        f"{summary['bytes_downloaded'] / 1e6:.1f} MB read, {summary['bytes_stored'] / 1e6:.1f} MB stored"
    )]
    if "faces" in steps:
        faces = steps["faces"]
        rate = f", {faces['images_per_second']:.1f} images/s per face task" if faces["images_per_second"] else ""
        lines.append(f"- **faces** {faces['n_faces']} found, {faces['n_embeddings']} embedded{rate}")
    if "identity" in steps:
        identity = steps["identity"]
        lines.append(f"- **identities** {identity['n_identities']} ({identity['n_singletons']} singletons, "
                     f"largest {identity['largest_identity']} images); {identity['n_optout_faces']} faces "
                     "matched the opt-out gallery")
        lines.append("- **splits** " + ", ".join(f"{name} {v['images']} images / {v['identities']} identities"
                                                 for name, v in identity["splits"].items()))
    if "captions" in steps:
        captions, stats = steps["captions"], summary["caption_stats"]
        rate = f" ({captions['faces_per_second']:.1f} faces/s per caption task)" if captions["faces_per_second"] else ""
        lines.append(f"- **captions** {captions['n_faces_described']} faces described{rate}; {stats['n']} captions, "
                     f"{stats['mean_words']:.1f} words on average (max {stats['max_words']}), vocabulary "
                     f"{stats['vocabulary']}, distinct-2 {stats['distinct_2']:.3f}, "
                     f"{stats['duplicate_share']:.1%} exact duplicates")
    if walls:
        lines += ["", "Wall time per stage (throughput over the shards processed in this run):", ""]
        lines += markdown.table(
            ["stage", "shards", "resumed", "failed", "processed", "seconds", "throughput"],
            [[stage, s["shards"], s["shards_resumed"], s["shards_failed"], f"{s['processed']} {s['unit']}",
              f"{s['seconds']:.1f}" if s["seconds"] is not None else "-",
              f"{s['per_second']:.1f} {s['unit']}/s" if s["per_second"] is not None else "-"]
             for stage, s in walls],
            "lrrrrrr",
        )
    models = [[f"face {role}", info["name"], info["version"], info["licence"]]
              for role, info in summary.get("models", {}).items()]
    models += [["attributes", info["name"], info["version"], info["licence"]]
               for info in summary.get("attribute_models", {}).values()]
    if models:
        lines += ["", "Models:", ""] + markdown.table(["role", "model", "version", "licence"], models, "llll")
    return lines


def report_markdown(summary: dict, run_dir: str | Path) -> str:
    """The run report: the funnel table, the stats, and the sheets as embedded JPEG thumbnails
    (Prefect stores no files) with the paths of the full-size PNGs."""
    from facedata.report.summary import funnel_rows, stage_walls

    run_dir = Path(run_dir)
    lines = [f"# facedata run `{run_dir.name}`", "", f"Run directory: `{run_dir.resolve()}`", "", "## Funnel", ""]
    lines += markdown.table(
        ["stage", "status", "samples", "share"],
        [[row["stage"], row["status"], row["samples"], f"{row['share']:.1%}" if row["share"] is not None else ""]
         for row in funnel_rows(summary)],
        "llrr",
    )
    lines += ["", "## Stats", ""] + _stats_lines(summary, stage_walls(summary))
    images = [(heading, Path(summary[field])) for field, heading in REPORT_IMAGES if summary.get(field)]
    if images:
        lines += ["", "## Images"]
    for heading, path in images:
        lines += ["", f"### {heading}", "", f"Full size: `{path}`", "", f"![{heading}]({jpeg_data_uri(path)})"]
    return "\n".join(lines) + "\n"


def publish_run_artifacts(summary: dict, run_dir: str | Path) -> dict[str, str]:
    """Attach the run report (markdown) and the funnel (table) to the current flow run; returns
    {artifact key: artifact id}. Outside a flow run there is nothing to attach to: returns {}."""
    if not _in_flow_run():
        log.info("not in a Prefect flow run: no run artifacts")
        return {}
    from facedata.report.summary import funnel_rows

    description = f"facedata run {Path(run_dir).resolve()}: {summary['n_ok']} kept of {summary['n_samples']}"
    report_key, funnel_key = artifact_key(run_dir, "report"), artifact_key(run_dir, "funnel")
    report_id = create_markdown_artifact(report_markdown(summary, run_dir), key=report_key, description=description)
    funnel = [{**row, "share": round(row["share"], 4) if row["share"] is not None else None}
              for row in funnel_rows(summary)]
    funnel_id = create_table_artifact(funnel, key=funnel_key, description=description)
    return {report_key: str(report_id), funnel_key: str(funnel_id)}
