"""Run-level results: the funnel over the stages, a printable table and a contact sheet."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from facedata.core import records
from facedata.captions.compose import caption_stats
from facedata.report.contact_sheet import Box, make_contact_sheet
from facedata.core.run_layout import RunLayout
from facedata.core.shards import write_json


def _stats_files(shard_dir: Path) -> dict[int, Path]:
    return {int(p.name.split(".")[0]): p for p in sorted(Path(shard_dir).glob("*.stats.json"))}


def _drops(counts: Counter) -> dict[str, int]:
    return {status: n for status, n in counts.most_common() if status != records.OK}


def summarize_run(run_dir: Path, faces: bool) -> dict:
    """Add up every finished shard's stats into the funnel: input rows -> downloaded and decoded
    -> with usable faces (when the face stage is on), with what each stage dropped and why.

    Top-level `n_ok` and `status_counts` are the run's final result: a shard counts with its face
    stage's records once that is done, with its download's records until then.
    """
    layout = RunLayout(run_dir)
    downloads = {i: json.loads(p.read_text()) for i, p in _stats_files(layout.step_dir("download")).items()}
    face_stats = {i: json.loads(p.read_text()) for i, p in _stats_files(layout.step_dir("faces")).items()} if faces else {}
    face_stats = {i: s for i, s in face_stats.items() if i in downloads}

    download_counts: Counter = Counter()
    final_counts: Counter = Counter()
    total = dict(n_shards=0, n_samples=0, bytes_downloaded=0, bytes_stored=0, process_seconds=0.0)
    for shard_id, stats in downloads.items():
        download_counts.update(stats["status_counts"])
        final_counts.update(face_stats.get(shard_id, stats)["status_counts"])
        total["n_shards"] += 1
        for key in ("n_samples", "bytes_downloaded", "bytes_stored", "process_seconds"):
            total[key] += stats.get(key) or 0
    total["process_seconds"] = round(total["process_seconds"], 3)

    # Rows that steps before download dropped (on their input rows alone) have their own funnel rows.
    before_download: Counter = Counter()
    order = layout.step_order() if layout.fingerprints_file.exists() else []
    for step in order[:order.index("download")] if "download" in order else []:
        for shard_id, path in _stats_files(layout.step_dir(step)).items():
            if shard_id in downloads:
                before_download.update({k: v for k, v in json.loads(path.read_text())["step_status_counts"].items()
                                        if k != records.OK})
    download_counts.subtract(before_download)
    download_counts = +download_counts
    n_downloaded = download_counts.get(records.OK, 0)
    funnel = [
        {"stage": "input", "kept": total["n_samples"]},
        {
            "stage": "download",
            "kept": n_downloaded,
            "dropped": total["n_samples"] - sum(before_download.values()) - n_downloaded,
            "dropped_by_status": _drops(download_counts),
        },
    ]
    summary = {**total, "n_ok": final_counts.get(records.OK, 0), "status_counts": dict(final_counts.most_common())}
    if faces:
        face_counts: Counter = Counter()
        for stats in face_stats.values():
            face_counts.update(stats["step_status_counts"])
        n_analyzed = sum(s["n_in"] for s in face_stats.values())
        seconds = sum(s["seconds"] for s in face_stats.values())
        n_faces_ok = face_counts.get(records.OK, 0)
        funnel.append({
            "stage": "faces",
            "kept": n_faces_ok,
            "dropped": n_analyzed - n_faces_ok,
            "dropped_by_status": _drops(face_counts),
            "shards_done": len(face_stats),
            "n_faces": sum(s["n_faces"] for s in face_stats.values()),
            "n_embeddings": sum(s["n_embeddings"] for s in face_stats.values()),
            "seconds": round(seconds, 3),
            "images_per_second": round(n_analyzed / seconds, 2) if seconds else None,
        })
        if face_stats:
            first = next(iter(face_stats.values()))
            summary["models"] = first["models"]
            summary["embedding_dim"] = first["embedding_dim"]
    if faces and layout.identity_report.exists():
        identity = json.loads(layout.identity_report.read_text())
        counts = Counter(identity["step_status_counts"])
        funnel.append({
            "stage": "identity",
            "kept": counts.get(records.OK, 0),
            "dropped": sum(counts.values()) - counts.get(records.OK, 0),
            "dropped_by_status": _drops(counts),
            **{k: identity[k] for k in ("n_identities", "n_singletons", "largest_identity", "n_optout_faces",
                                        "splits", "seconds")},
        })
        summary["status_counts"] = identity["status_counts"]
        summary["n_ok"] = counts.get(records.OK, 0)
        summary["identity_gallery"] = identity["gallery"]
        if "metrics" in identity:
            summary["identity_metrics"] = identity["metrics"]
    caption_stats_files = {i: p for i, p in _stats_files(layout.step_dir("captions")).items() if i in downloads} if faces else {}
    if caption_stats_files:
        _add_captions(summary, funnel, run_dir, caption_stats_files, len(downloads))
    _add_user_steps(summary, funnel, layout, downloads)
    summary["funnel"] = funnel
    return summary


def _add_user_steps(summary: dict, funnel: list[dict], layout: RunLayout, downloads: dict) -> None:
    """A funnel row for each of a user's steps (facedata.core.step), after the step it follows, with the
    meaning of each status it gives; the last step's records are the run's final result."""
    from facedata.core.step import BUILTIN_STEPS

    if not layout.fingerprints_file.exists():
        return
    order = layout.step_order()
    for position, step in enumerate(order):
        if step in BUILTIN_STEPS:
            continue
        if layout.global_report(step).exists():  # a run-wide step: one report for every shard
            shard_stats = [json.loads(layout.global_report(step).read_text())]
        else:
            shard_stats = [json.loads(p.read_text()) for i, p in _stats_files(layout.step_dir(step)).items()
                           if i in downloads]
        counts: Counter = Counter()
        for stats in shard_stats:
            counts.update(stats["step_status_counts"])
        kept = counts.get(records.OK, 0)
        row = {"stage": step, "kept": kept, "dropped": sum(counts.values()) - kept, "dropped_by_status": _drops(counts),
               "reasons": shard_stats[0]["reasons"] if shard_stats else {},
               "shards_done": len(shard_stats[0]["shard_ids"]) if "shard_ids" in (shard_stats or [{}])[0] else len(shard_stats)}
        earlier = set(order[:position])
        at = max((i for i, r in enumerate(funnel) if r["stage"] in earlier or r["stage"] == "input"), default=0)
        funnel.insert(at + 1, row)
        summary.setdefault("step_reasons", {}).update(row["reasons"])
        if position == len(order) - 1 and shard_stats:
            final: Counter = Counter()
            for stats in shard_stats:
                final.update(stats["status_counts"])
            summary["status_counts"] = dict(final.most_common())
            summary["n_ok"] = final.get(records.OK, 0)


def _add_captions(summary: dict, funnel: list[dict], run_dir: Path, stats_files: dict[int, Path], n_shards: int) -> None:
    """The caption stage's funnel step, its models, and caption statistics over the whole run."""
    shard_stats = [json.loads(p.read_text()) for p in stats_files.values()]
    counts: Counter = Counter()
    attributes: Counter = Counter()
    seconds_by_step: Counter = Counter()
    for stats in shard_stats:
        counts.update(stats["step_status_counts"])
        attributes.update(stats["attribute_counts"])
        seconds_by_step.update(stats["seconds_by_step"])
    n_faces = sum(s["n_faces_described"] for s in shard_stats)
    seconds = sum(s["seconds"] for s in shard_stats)
    captions: list[str] = []
    labels: list[int] = []
    for shard_id in stats_files:
        table = pq.read_table(RunLayout(run_dir).records_file("captions", shard_id),
                              columns=["face_caption", "n_valid_labels"])
        for caption, n in zip(*(table.column(c).to_pylist() for c in ("face_caption", "n_valid_labels"))):
            if caption is not None:
                captions.append(caption)
                labels.append(n)
    funnel.append({
        "stage": "captions",
        "kept": counts.get(records.OK, 0),
        "dropped": sum(counts.values()) - counts.get(records.OK, 0),
        "dropped_by_status": _drops(counts),
        "shards_done": len(shard_stats),
        "n_faces_described": n_faces,
        "attribute_counts": dict(attributes.most_common()),
        "seconds": round(seconds, 3),
        "seconds_by_step": {k: round(v, 3) for k, v in seconds_by_step.most_common()},
        "faces_per_second": round(n_faces / seconds, 2) if seconds else None,
    })
    summary["caption_stats"] = caption_stats(captions, labels)
    summary["attribute_models"] = shard_stats[0]["models"]
    # The thresholds the caption step applied (its fingerprint keeps them the same in every shard).
    summary["attribute_thresholds"] = shard_stats[0].get("thresholds")
    if len(shard_stats) == n_shards:
        final: Counter = Counter()
        for stats in shard_stats:
            final.update(stats["status_counts"])
        summary["status_counts"] = dict(final.most_common())
        summary["n_ok"] = final.get(records.OK, 0)


def funnel_rows(summary: dict) -> list[dict]:
    """The funnel as table rows (stage, status, samples, share of the input): the input, then per
    stage what it dropped, by status, and what it kept."""
    n = summary["n_samples"] or 1
    rows = []
    for step in summary["funnel"]:
        if step["stage"] == "input":
            rows.append({"stage": "input", "status": "", "samples": step["kept"], "share": None})
            continue
        for status, count in step["dropped_by_status"].items():
            rows.append({"stage": step["stage"], "status": status, "samples": count, "share": count / n})
        rows.append({"stage": step["stage"], "status": "-> kept", "samples": step["kept"], "share": step["kept"] / n})
    return rows


def stage_walls(summary: dict) -> list[tuple[str, dict]]:
    """(stage, the flow's wall time and throughput for it) in funnel order, for the stages it timed."""
    walls = summary.get("stage_seconds", {})
    return [(step["stage"], walls[step["stage"]]) for step in summary["funnel"] if step["stage"] in walls]


def format_summary(summary: dict) -> str:
    lines = [f"{'stage':<10}{'status':<22}{'samples':>9}{'share':>8}"]
    for row in funnel_rows(summary):
        share = f"{row['share']:>8.1%}" if row["share"] is not None else ""
        lines.append(f"{row['stage']:<10}{row['status']:<22}{row['samples']:>9}{share}")
    lines.append(
        f"{summary['n_ok']} kept of {summary['n_samples']} in {summary['n_shards']} shards; "
        f"{summary['bytes_downloaded'] / 1e6:.1f} MB read, {summary['bytes_stored'] / 1e6:.1f} MB stored"
    )
    identity = next((step for step in summary["funnel"] if step["stage"] == "identity"), None)
    if identity:
        splits = ", ".join(f"{name} {v['images']} images/{v['identities']} identities"
                           for name, v in identity["splits"].items())
        lines.append(f"{identity['n_identities']} identities ({identity['n_singletons']} singletons); {splits}")
        if identity["n_optout_faces"]:
            lines.append(f"{identity['n_optout_faces']} faces matched the opt-out gallery and were removed")
    faces = next((step for step in summary["funnel"] if step["stage"] == "faces"), None)
    if faces:
        rate = f"; {faces['images_per_second']:.1f} images/s per face task" if faces["images_per_second"] else ""
        lines.append(f"{faces['n_faces']} faces found, {faces['n_embeddings']} embedded{rate}")
    captions = next((step for step in summary["funnel"] if step["stage"] == "captions"), None)
    if captions:
        stats = summary["caption_stats"]
        rate = f" ({captions['faces_per_second']:.1f} faces/s per caption task)" if captions["faces_per_second"] else ""
        lines.append(f"{captions['n_faces_described']} faces described{rate}; {stats['n']} captions, "
                     f"{stats['mean_words']:.1f} words on average, vocabulary {stats['vocabulary']}, "
                     f"distinct-2 {stats['distinct_2']:.3f}, {stats['duplicate_share']:.1%} exact duplicates")
    walls = []
    for stage, wall in stage_walls(summary):
        if wall["per_second"] is not None:
            walls.append(f"{stage} {wall['seconds']:.1f} s at {wall['per_second']:.1f} {wall['unit']}/s")
        elif wall["shards_resumed"]:
            walls.append(f"{stage} resumed")
    if walls:
        lines.append("wall time: " + ", ".join(walls))
    for role, info in summary.get("models", {}).items():
        lines.append(f"face {role}: {info['name']} {info['version']} ({info['licence']})")
    for info in summary.get("attribute_models", {}).values():
        lines.append(f"attributes: {info['name']} {info['version']} ({info['licence']})")
    return "\n".join(lines)


def attribute_chips(values: dict, confidences: dict) -> list[str]:
    """Short labels for a face's confident attributes, as shown on the caption contact sheet."""
    chips = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        if name == "age":
            chips.append(f"~{value:.0f} y")
        elif value is True:
            chips.append(name.replace("_", " "))
        else:
            chips.append(f"{value} {confidences[name]:.2f}" if name in ("gender", "expression") else str(value))
    return chips


def iter_kept_samples(
    run_dir: Path, limit: int, faces: bool
) -> Iterator[tuple[bytes, str, list[Box], list[str]]]:
    """(image bytes, caption, face boxes, chips) of the first `limit` samples the run kept, in key order.

    Images live in the download shards' tars; with the face stage on, what was kept and the boxes
    come from the latest stage's records. Once a shard is captioned, the caption is the face
    caption and the chips are its primary face's attributes; before that, the web caption and none.
    """
    layout = RunLayout(run_dir)
    produced = 0
    for shard_id in _stats_files(layout.step_dir("download")):
        # The shard's latest records: a step after captions (a user's filter) may drop more.
        step = layout.latest_step(shard_id)
        table = pq.read_table(layout.records_file(step, shard_id))
        columns = ["key", "status", "caption", "ext"]
        if faces and "faces" in table.column_names:
            columns += ["width", "height", "faces"]
            if "face_caption" in table.column_names:
                columns += ["face_caption", "face_attributes"]
        table = table.select(columns)
        kept = {row["key"]: row for row in table.to_pylist() if row["status"] == records.OK}
        images: dict[str, bytes] = {}
        with tarfile.open(layout.images_tar(shard_id)) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key in kept and ext == kept[key]["ext"]:
                    images[key] = tar.extractfile(member).read()
        for key in sorted(images):
            row = kept[key]
            boxes: list[Box] = [
                (x1 / row["width"], y1 / row["height"], x2 / row["width"], y2 / row["height"], face["primary"])
                for face in row.get("faces") or ()
                for x1, y1, x2, y2 in [face["bbox"]]
            ]
            described = row.get("face_attributes")
            chips = attribute_chips(described[0]["values"], described[0]["confidences"]) if described else []
            yield images[key], row.get("face_caption") or row["caption"] or "", boxes, chips
            produced += 1
            if produced >= limit:
                return


def write_run_report(run_dir: Path, faces: bool, max_sheet_items: int, contact_sheet: bool = True,
                     stage_seconds: dict | None = None) -> dict:
    """summary.json (and contact_sheet.png of the kept samples, faces boxed) in the run directory;
    `stage_seconds`, the flow's per-stage wall times and throughput, goes into the summary as is."""
    run_dir = Path(run_dir)
    summary = summarize_run(run_dir, faces)
    if stage_seconds:
        summary["stage_seconds"] = stage_seconds
    if contact_sheet and summary["n_ok"]:
        sheet = make_contact_sheet(
            iter_kept_samples(run_dir, max_sheet_items, faces),
            run_dir / "contact_sheet.png",
            title=f"{run_dir.name}: {summary['n_ok']} kept of {summary['n_samples']}",
            max_items=max_sheet_items,
        )
        summary["contact_sheet"] = str(sheet) if sheet else None
        if "caption_stats" in summary:
            faces_sheet = make_contact_sheet(
                iter_kept_samples(run_dir, max_sheet_items, faces),
                run_dir / "captions_sheet.png",
                title=f"{run_dir.name}: face captions and attributes",
                max_items=max_sheet_items,
                zoom_to_primary=True,
            )
            summary["captions_sheet"] = str(faces_sheet) if faces_sheet else None
    write_json(RunLayout(run_dir).summary_file, summary)
    return summary
