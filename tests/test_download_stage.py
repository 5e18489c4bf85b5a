"""The download stage without Prefect: plan in, shard out, statuses, resume."""

from __future__ import annotations

import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from facedata.core import records
from facedata.core.config import config_from_dict
from facedata.download.step import RECORD_FIELDS
from facedata.ingest.reader import plan_shards
from facedata.pipeline import run_shard
from tests.conftest import read_records


def make_config(path, **sections):
    data = {"input": {"path": str(path)}, "download": {"timeout": 1.0, "retries": 0}, "image": {"min_side": 64}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def test_shard_records_statuses_and_tar(tmp_path, web, web_root):
    photos = sorted(p.name for p in web_root.glob("*.jpg"))[:3]
    urls = [web.url(p) for p in photos] + [web.url("status/503"), web.url("slow/5/coffee.png"), "ftp://x/y.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))],
                             "license": ["cc-by"] * len(urls)}), tmp_path / "in.parquet")
    cfg = make_config(tmp_path / "in.parquet")
    (plan,) = plan_shards(cfg.input, 100, tmp_path / "plan")
    stats = run_shard("download", plan, cfg, tmp_path, progress=False)

    table = read_records(tmp_path / "shards")
    rows = {r["url"]: r for r in table.to_pylist()}
    assert [rows[u]["status"] for u in urls] == ["ok"] * 3 + ["http_503", "timeout", "invalid_url"]
    assert set(RECORD_FIELDS) <= set(table.column_names) and "license" in table.column_names
    ok = [rows[u] for u in urls[:3]]
    assert all(r["width"] >= 64 and r["sha256"] and r["ext"] == "jpg" for r in ok)
    assert stats["status_counts"] == {"ok": 3, "http_503": 1, "timeout": 1, "invalid_url": 1}
    assert stats["bytes_downloaded"] == sum(r["bytes_downloaded"] for r in ok)
    with tarfile.open(tmp_path / "shards" / "00000.tar") as tar:
        names = sorted(tar.getnames())
        by_key = {r["key"]: r for r in ok}
        assert names == sorted(f"{k}.{ext}" for k in by_key for ext in ("jpg", "json", "txt"))
        for key, row in by_key.items():
            assert tar.extractfile(f"{key}.txt").read().decode() == row["caption"]
            assert tar.extractfile(f"{key}.jpg").read() == (web_root / rows[row["url"]]["url"].rsplit("/", 1)[1]).read_bytes()


def test_done_shard_is_skipped_and_unfinished_one_redone(tmp_path, web, web_root):
    photos = sorted(p.name for p in web_root.glob("*.jpg"))[:4]
    pq.write_table(pa.table({"url": [web.url(p) for p in photos], "caption": photos}), tmp_path / "in.parquet")
    cfg = make_config(tmp_path / "in.parquet")
    (plan,) = plan_shards(cfg.input, 10, tmp_path / "plan")
    shard_dir = tmp_path / "shards"
    first = run_shard("download", plan, cfg, tmp_path, progress=False)
    done_mtime = (shard_dir / "00000.stats.json").stat().st_mtime_ns
    assert run_shard("download", plan, cfg, tmp_path, progress=False) == first
    assert (shard_dir / "00000.stats.json").stat().st_mtime_ns == done_mtime

    # A killed attempt: no stats file, a half-written temp tar beside a stale parquet.
    (shard_dir / "00000.stats.json").unlink()
    (shard_dir / ".00000.tar.abc123.tmp").write_bytes(b"partial")
    shutil.copy(shard_dir / "00000.parquet", shard_dir / "stale-copy")
    second = run_shard("download", plan, cfg, tmp_path, progress=False)
    assert second["n_ok"] == 4 and second["status_counts"] == first["status_counts"]
    assert not list(shard_dir.glob(".*.tmp"))
    assert read_records(shard_dir).column("key").to_pylist() == [f"{i:09d}" for i in range(4)]


def test_local_folder_and_missing_file(tmp_path, web_root):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in sorted(p.name for p in web_root.glob("*.jpg"))[:2]:
        shutil.copy(web_root / name, folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}")
    cfg = make_config(folder, input={"format": "folder"})
    (plan,) = plan_shards(cfg.input, 10, tmp_path / "plan")
    # The file vanishes between planning and processing.
    victim = sorted(folder.glob("*.jpg"))[1]
    victim.unlink()
    run_shard("download", plan, cfg, tmp_path, progress=False)
    rows = read_records(tmp_path / "shards").to_pylist()
    assert [r["status"] for r in rows] == [records.OK, records.FILE_NOT_FOUND]
    assert rows[0]["caption"].startswith("caption of") and str(victim) in rows[1]["error"]
