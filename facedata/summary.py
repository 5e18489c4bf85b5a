"""Run-level results: the funnel over the stages, a printable table and a contact sheet."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from facedata import records
from facedata.contact_sheet import Box, make_contact_sheet
from facedata.face_stage import face_dir
from facedata.identity_stage import DONE_FILE, identity_dir, is_identity_done
from facedata.shards import write_json


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
    run_dir = Path(run_dir)
    downloads = {i: json.loads(p.read_text()) for i, p in _stats_files(run_dir / "shards").items()}
    face_stats = {i: json.loads(p.read_text()) for i, p in _stats_files(face_dir(run_dir)).items()} if faces else {}
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

    n_downloaded = download_counts.get(records.OK, 0)
    funnel = [
        {"stage": "input", "kept": total["n_samples"]},
        {
            "stage": "download",
            "kept": n_downloaded,
            "dropped": total["n_samples"] - n_downloaded,
            "dropped_by_status": _drops(download_counts),
        },
    ]
    summary = {**total, "n_ok": final_counts.get(records.OK, 0), "status_counts": dict(final_counts.most_common())}
    if faces:
        face_counts: Counter = Counter()
        for stats in face_stats.values():
            face_counts.update(stats["face_status_counts"])
        n_analyzed = sum(s["n_analyzed"] for s in face_stats.values())
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
    if faces and is_identity_done(run_dir):
        identity = json.loads((identity_dir(run_dir) / DONE_FILE).read_text())
        counts = Counter(identity["identity_status_counts"])
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
    summary["funnel"] = funnel
    return summary


def format_summary(summary: dict) -> str:
    n = summary["n_samples"] or 1
    lines = [f"{'stage':<10}{'status':<22}{'samples':>9}{'share':>8}"]
    for step in summary["funnel"]:
        if step["stage"] == "input":
            lines.append(f"{'input':<10}{'':<22}{step['kept']:>9}")
            continue
        for status, count in step["dropped_by_status"].items():
            lines.append(f"{step['stage']:<10}{status:<22}{count:>9}{count / n:>8.1%}")
        lines.append(f"{step['stage']:<10}{'-> kept':<22}{step['kept']:>9}{step['kept'] / n:>8.1%}")
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
    for role, info in summary.get("models", {}).items():
        lines.append(f"face {role}: {info['name']} {info['version']} ({info['licence']})")
    return "\n".join(lines)


def iter_kept_samples(run_dir: Path, limit: int, faces: bool) -> Iterator[tuple[bytes, str, list[Box]]]:
    """(image bytes, caption, face boxes) of the first `limit` samples the run kept, in key order.

    Images live in the download shards' tars; with the face stage on, what was kept and the boxes
    come from its records.
    """
    run_dir = Path(run_dir)
    if faces:
        records_dir = identity_dir(run_dir) if is_identity_done(run_dir) else face_dir(run_dir)
    else:
        records_dir = run_dir / "shards"
    produced = 0
    for shard_id in _stats_files(run_dir / "shards"):
        name = f"{shard_id:05d}"
        columns = ["key", "status", "caption", "ext"] + (["width", "height", "faces"] if faces else [])
        table = pq.read_table(records_dir / f"{name}.parquet", columns=columns)
        kept = {row["key"]: row for row in table.to_pylist() if row["status"] == records.OK}
        images: dict[str, bytes] = {}
        with tarfile.open(run_dir / "shards" / f"{name}.tar") as tar:
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
            yield images[key], row["caption"] or "", boxes
            produced += 1
            if produced >= limit:
                return


def write_run_report(run_dir: Path, faces: bool, max_sheet_items: int, contact_sheet: bool = True) -> dict:
    """summary.json (and contact_sheet.png of the kept samples, faces boxed) in the run directory."""
    run_dir = Path(run_dir)
    summary = summarize_run(run_dir, faces)
    if contact_sheet and summary["n_ok"]:
        sheet = make_contact_sheet(
            iter_kept_samples(run_dir, max_sheet_items, faces),
            run_dir / "contact_sheet.png",
            title=f"{run_dir.name}: {summary['n_ok']} kept of {summary['n_samples']}",
            max_items=max_sheet_items,
        )
        summary["contact_sheet"] = str(sheet) if sheet else None
    write_json(run_dir / "summary.json", summary)
    return summary
