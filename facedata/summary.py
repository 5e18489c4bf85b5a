"""Run-level results: the status funnel over all shards, a printable table and a contact sheet."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from facedata.contact_sheet import make_contact_sheet
from facedata.shards import write_json


def summarize_shards(shard_dir: Path) -> dict:
    """Add up every finished shard's stats."""
    counts: Counter = Counter()
    total = dict(n_shards=0, n_samples=0, n_ok=0, bytes_downloaded=0, bytes_stored=0, process_seconds=0.0)
    for stats_file in sorted(Path(shard_dir).glob("*.stats.json")):
        stats = json.loads(stats_file.read_text())
        counts.update(stats["status_counts"])
        total["n_shards"] += 1
        for key in ("n_samples", "n_ok", "bytes_downloaded", "bytes_stored", "process_seconds"):
            total[key] += stats.get(key) or 0
    total["process_seconds"] = round(total["process_seconds"], 3)
    total["status_counts"] = dict(counts.most_common())
    return total


def format_summary(summary: dict) -> str:
    n = summary["n_samples"] or 1
    lines = [f"{'status':<22}{'samples':>9}{'share':>8}"]
    for status, count in summary["status_counts"].items():
        lines.append(f"{status:<22}{count:>9}{count / n:>8.1%}")
    lines.append(f"{'total':<22}{summary['n_samples']:>9}")
    lines.append(
        f"{summary['n_ok']} kept of {summary['n_samples']} in {summary['n_shards']} shards; "
        f"{summary['bytes_downloaded'] / 1e6:.1f} MB read, {summary['bytes_stored'] / 1e6:.1f} MB stored"
    )
    return "\n".join(lines)


def iter_kept_samples(shard_dir: Path, limit: int):
    """(image bytes, caption) of the first `limit` kept samples, reading the shard tars in order."""
    produced = 0
    for tar_path in sorted(Path(shard_dir).glob("*.tar")):
        images: dict[str, bytes] = {}
        captions: dict[str, str] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == "txt":
                    captions[key] = data.decode("utf-8", "replace")
                elif ext != "json":
                    images[key] = data
        for key in sorted(images):
            yield images[key], captions.get(key, "")
            produced += 1
            if produced >= limit:
                return


def write_run_report(run_dir: Path, max_sheet_items: int, contact_sheet: bool = True) -> dict:
    """summary.json (and contact_sheet.png of kept samples) in the run directory."""
    run_dir = Path(run_dir)
    summary = summarize_shards(run_dir / "shards")
    if contact_sheet and summary["n_ok"]:
        sheet = make_contact_sheet(
            iter_kept_samples(run_dir / "shards", max_sheet_items),
            run_dir / "contact_sheet.png",
            title=f"{run_dir.name}: {summary['n_ok']} kept of {summary['n_samples']}",
            max_items=max_sheet_items,
        )
        summary["contact_sheet"] = str(sheet) if sheet else None
    write_json(run_dir / "summary.json", summary)
    return summary


