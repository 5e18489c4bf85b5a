"""Run observability: the per-stage progress counters (alone, and in a real flow run whose shard
tasks fail), the run report, and what a real curation run (the demo's) leaves in the Prefect API:
the report and funnel artifacts, the progress artifacts and the per-shard progress lines in the
run's logs."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO

# Reads, from the Prefect API of the PREFECT_HOME it is given, the flow run whose report artifact
# names the run directory argv[1]: that run's artifacts and its log lines, as JSON.
READ_RUN_ARTIFACTS = """
import json, sys
from facedata.core.prefect_env import configure_prefect
configure_prefect()
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                            LogFilter, LogFilterFlowRunId)
from prefect.client.schemas.sorting import LogSort
from facedata.report.prefect_artifacts import artifact_key

run_dir = sys.argv[1]
client = get_client(sync_client=True)
report_key = artifact_key(run_dir, "report")
reports = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[report_key])))
runs = [a.flow_run_id for a in reports if f"Run directory: `{run_dir}`" in a.data]
artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs)))
logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs)), sort=LogSort.TIMESTAMP_ASC)
print(json.dumps({
    "flow_runs": [str(r) for r in runs],
    "artifacts": [{"key": a.key, "type": a.type, "data": a.data, "description": a.description} for a in artifacts],
    "logs": [{"name": entry.name, "message": entry.message} for entry in logs],
}))
"""
SHARD_STAGES = ("download", "faces", "captions")
PROGRESS_LINE = re.compile(r"^(download|faces|captions) (\d+)/(\d+) shards, \d+ (samples|images), \d+ kept")


pytestmark = pytest.mark.usefixtures("prefect_settings")

def _download(n: int, ok: int, seconds: float, finished_at: float) -> dict:
    return {"n_samples": n, "n_ok": ok, "status_counts": {"ok": ok, "http_404": n - ok},
            "seconds": seconds, "finished_at": finished_at}


def test_progress_counts_rates_and_resumed_shards(tmp_path, caplog):
    from facedata.report.prefect_artifacts import RunProgress

    now = [1000.0]
    tracker = RunProgress(tmp_path / "run", clock=lambda: now[0])
    download = tracker.open("download", 3)
    tracker.open("faces", 3)
    assert download.artifact_id is None, "outside a flow run there is no progress artifact"
    with caplog.at_level(logging.INFO, logger="facedata.flow"):
        # Done by an earlier run (it finished before this run started): counted, not timed.
        tracker.shard_done("download", _download(10, 8, seconds=50.0, finished_at=900.0))
        now[0] = 1004.0
        tracker.shard_done("download", _download(10, 9, seconds=4.0, finished_at=1003.9))
        now[0] = 1006.0  # started at 1001: the window stays 1000-1006, with 30 samples processed
        tracker.shard_done("download", _download(20, 20, seconds=5.0, finished_at=1005.9))
        tracker.shard_done("faces", {"n_in": 7, "step_status_counts": {"ok": 5, "no_face": 2},
                                     "seconds": 2.0, "finished_at": 1005.9})
        tracker.shard_failed("faces")
    assert [r.getMessage() for r in caplog.records if r.name == "facedata.flow"] == [
        "download 1/3 shards, 10 samples, 8 kept (1 resumed)",
        "download 2/3 shards, 20 samples, 17 kept, 2.5 samples/s (1 resumed)",
        "download 3/3 shards, 40 samples, 37 kept, 5.0 samples/s (1 resumed)",
        "faces 1/3 shards, 7 images, 5 kept, 3.5 images/s",
        "faces 2/3 shards, 7 images, 5 kept, 3.5 images/s (1 failed)",
    ]
    assert download.percent == 100.0 and tracker.stages["faces"].percent == pytest.approx(200 / 3)
    assert tracker.stage_seconds() == {
        "download": {"unit": "samples", "shards": 3, "shards_done": 3, "shards_resumed": 1, "shards_failed": 0,
                     "processed": 30, "seconds": 6.0, "per_second": 5.0},
        "faces": {"unit": "images", "shards": 3, "shards_done": 1, "shards_resumed": 0, "shards_failed": 1,
                  "processed": 7, "seconds": 2.0, "per_second": 3.5},
    }


def test_failed_shard_tasks_in_a_flow_run(tmp_path):
    """A real Prefect flow run on the thread runner: a failed download, the face task that never
    starts behind it, both counted as finished; the progress artifacts still end at 100 %."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    from facedata.ingest.reader import ShardPlan
    from facedata.report.prefect_artifacts import RunProgress, artifact_key

    @task
    def download(plan: ShardPlan) -> dict:
        if plan.shard_id == 1:
            raise RuntimeError("connection refused")
        return _download(4, 3, seconds=0.01, finished_at=time.time())

    @task
    def faces(plan: ShardPlan, downloaded: dict) -> dict:
        return {"n_in": downloaded["n_ok"], "step_status_counts": {"ok": 2}, "seconds": 0.01,
                "finished_at": time.time()}

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def shards(run_dir: str):
        tracker = RunProgress(run_dir)
        tracker.open("download", 3)
        tracker.open("faces", 3)
        submitted = []
        for i in range(3):
            plan = ShardPlan(i, f"{run_dir}/{i}.parquet", 4)
            downloaded = download.submit(plan)
            submitted += [("download", plan, downloaded), ("faces", plan, faces.submit(plan, downloaded))]
        return FlowRunContext.get().flow_run.id, tracker.wait(submitted), tracker.stage_seconds()

    run_id, failed, walls = shards(str(tmp_path / "run"))
    failed_download, failed_faces = sorted(failed)
    assert failed_download == "download 00001 (Task run encountered an exception RuntimeError: connection refused)"
    assert failed_faces == "faces 00001 (not run: its download failed)"
    assert walls["download"]["shards_done"] == 2 and walls["download"]["processed"] == 8
    assert walls["faces"]["shards_done"] == 2 and walls["faces"]["shards_failed"] == 1
    with get_client(sync_client=True) as client:
        in_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        artifacts = client.read_artifacts(artifact_filter=in_run)
    progress = {a.key: a for a in artifacts}
    assert set(progress) == {artifact_key(tmp_path / "run", f"{stage}-progress") for stage in ("download", "faces")}
    for stage, counts in (("download", "8 samples, 6 kept"), ("faces", "6 images, 4 kept")):
        artifact = progress[artifact_key(tmp_path / "run", f"{stage}-progress")]
        assert artifact.data == 100.0
        assert artifact.description.startswith(f"{stage} 3/3 shards, {counts}, ")
        assert artifact.description.endswith("(1 failed)")


def test_artifact_keys_are_valid_prefect_keys(tmp_path):
    from prefect.client.schemas.actions import ArtifactCreate

    from facedata.report.prefect_artifacts import artifact_key

    for name in ("run", "Run_2024-05-01.v2", "démo run", "---", "x" * 300):
        key = artifact_key(tmp_path / name, "captions-progress")
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key) and len(key) <= 100, key
        assert ArtifactCreate(key=key).key == key  # Prefect's own validation
    assert artifact_key(tmp_path / "Run_2024-05-01.v2", "report") == "facedata-run-2024-05-01-v2-report"


def _funnel_table(markdown: str) -> dict[str, dict[str, int]]:
    """stage -> {status: samples} from the report's funnel table."""
    section = markdown.split("## Funnel", 1)[1].split("## Stats", 1)[0]
    table: dict[str, dict[str, int]] = {}
    for line in section.splitlines()[3:]:  # after the blank line, the header and the separator
        if line.startswith("| "):
            stage, status, samples, _ = (cell.strip() for cell in line.strip("|").split("|"))
            table.setdefault(stage, {})[status] = int(samples)
    return table


def check_funnel(markdown: str, summary: dict) -> None:
    expected = {"input": {"": summary["n_samples"]}}
    for step in summary["funnel"][1:]:
        expected[step["stage"]] = {**step["dropped_by_status"], "-> kept": step["kept"]}
    assert _funnel_table(markdown) == expected


def check_images(markdown: str, summary: dict) -> None:
    """The contact sheet, the captions sheet and the identity gallery, each a JPEG data URI that
    decodes to an image of the PNG's aspect, with the PNG's path beside it."""
    from facedata.report.prefect_artifacts import MAX_IMAGE_URI_CHARS

    images = re.findall(r"Full size: `([^`]+)`\n\n!\[[^\]]*\]\((data:image/jpeg;base64,([A-Za-z0-9+/=]+))\)", markdown)
    assert [Path(path) for path, _, _ in images] == [
        Path(summary[field]) for field in ("contact_sheet", "captions_sheet", "identity_gallery")]
    for path, uri, data in images:
        assert len(uri) <= MAX_IMAGE_URI_CHARS
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as thumb:
            thumb.load()
            assert thumb.format == "JPEG"
            with Image.open(path) as full:
                assert thumb.width / thumb.height == pytest.approx(full.width / full.height, rel=0.02)


def test_report_markdown_holds_the_run(demo_run):
    from facedata.report.prefect_artifacts import publish_run_artifacts, report_markdown
    from facedata.report.summary import format_summary

    summary = json.loads((demo_run / "summary.json").read_text())
    markdown = report_markdown(summary, demo_run)
    check_funnel(markdown, summary)
    check_images(markdown, summary)
    identity = next(step for step in summary["funnel"] if step["stage"] == "identity")
    assert f"**identities** {identity['n_identities']} ({identity['n_singletons']} singletons" in markdown
    assert "| face detector | SCRFD-500M" in markdown and "InsightFace non-commercial research only" in markdown
    assert f"{summary['caption_stats']['n']} captions" in markdown
    # The flow's wall window per shard stage, in the summary, its printout and the report.
    walls = summary["stage_seconds"]
    assert set(walls) == set(SHARD_STAGES)
    for stage, wall in walls.items():
        assert wall["shards"] == wall["shards_done"] == summary["n_shards"] and not wall["shards_failed"]
        assert wall["seconds"] > 0
        assert wall["per_second"] == pytest.approx(wall["processed"] / wall["seconds"], rel=0.01)
        assert re.search(rf"^\| {stage} \| {summary['n_shards']} \| 0 \| 0 \| {wall['processed']} {wall['unit']} \|",
                         markdown, re.MULTILINE)
    assert walls["download"]["processed"] == summary["n_samples"]
    wall_line = re.compile(r"^wall time: download [\d.]+ s at [\d.]+ samples/s, faces [\d.]+ s at [\d.]+ images/s, "
                           r"captions [\d.]+ s at [\d.]+ images/s$", re.MULTILINE)
    assert wall_line.search(format_summary(summary))
    assert wall_line.search((demo_run.parent / "stdout.txt").read_text())
    assert publish_run_artifacts(summary, demo_run) == {}, "outside a flow run nothing is published"


def test_flow_run_artifacts_in_prefect_api(demo_run, cli_env):
    """The demo's flow run, read back from the Prefect API it ran against."""
    from facedata.report.prefect_artifacts import artifact_key
    from facedata.report.summary import funnel_rows

    proc = subprocess.run([sys.executable, "-c", READ_RUN_ARTIFACTS, str(demo_run.resolve())], env=cli_env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert len(found["flow_runs"]) == 1, found["flow_runs"]
    artifacts = {a["key"]: a for a in found["artifacts"]}
    summary = json.loads((demo_run / "summary.json").read_text())

    report = artifacts[artifact_key(demo_run, "report")]
    assert report["type"] == "markdown"
    assert report["description"] == (
        f"facedata run {demo_run.resolve()}: {summary['n_ok']} kept of {summary['n_samples']}")
    check_funnel(report["data"], summary)
    check_images(report["data"], summary)

    funnel = artifacts[artifact_key(demo_run, "funnel")]
    assert funnel["type"] == "table"
    # summary.json keeps its keys sorted, so compare the rows in any order.
    assert sorted((r["stage"], r["status"], r["samples"]) for r in json.loads(funnel["data"])) == sorted(
        (r["stage"], r["status"], r["samples"]) for r in funnel_rows(summary))

    # Each shard stage's progress artifact reached 100 %, and the run's logs hold one progress
    # line per finished shard, counting up to the last.
    n_shards = summary["n_shards"]
    lines = [PROGRESS_LINE.match(entry["message"]) for entry in found["logs"] if entry["name"] == "facedata.flow"]
    lines = [m for m in lines if m]
    for stage in SHARD_STAGES:
        progress = artifacts[artifact_key(demo_run, f"{stage}-progress")]
        assert progress["type"] == "progress" and progress["data"] == 100.0
        assert progress["description"].startswith(f"{stage} {n_shards}/{n_shards} shards, ")
        counts = [int(m.group(2)) for m in lines if m.group(1) == stage]
        assert counts == list(range(1, n_shards + 1)), (stage, counts)
        assert {m.group(3) for m in lines if m.group(1) == stage} == {str(n_shards)}
    assert len(artifacts) == 5, sorted(artifacts)
