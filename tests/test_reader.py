"""Ingest: every input format read into normalised batches, input problems flagged, shards planned."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import package_dir

from facedata.core import records
from facedata.core.config import InputConfig
from facedata.ingest.reader import SAMPLE_COLUMNS, InputError, iter_samples, load_plan, plan_shards

SKIMAGE_DATA = package_dir("skimage") / "data"


def read_all(path, batch_rows: int = 8192, **settings) -> pa.Table:
    return pa.concat_tables(iter_samples(InputConfig(path=str(path), **settings), batch_rows))


def input_error(path, **settings) -> str:
    """The message of the InputError that reading raises; it must be one line."""
    with pytest.raises(InputError) as excinfo:
        read_all(path, **settings)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def url_rows(n: int) -> list[dict]:
    return [{"url": f"http://example.com/{i}.jpg", "caption": f"photo {i}"} for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:09d}" for i in range(start, start + n)]


# --- table formats ----------------------------------------------------------------------------


def test_parquet_custom_columns_extras_as_strings_and_clash_prefix(tmp_path):
    path = write_parquet(tmp_path / "laion.parquet", [
        {"URL": " http://a.example/1.jpg ", "TEXT": "  a smiling woman ", "status": "success", "key": "x1",
         "width": 640, "similarity": 0.25, "tags": ["face", "smile"]},
        {"URL": "http://a.example/2.jpg", "TEXT": "", "status": "failed", "key": "x2",
         "width": None, "similarity": 0.5, "tags": []},
    ])
    table = read_all(path, url_col="URL", caption_col="TEXT")
    assert table.column_names == [*SAMPLE_COLUMNS, "source_status", "source_key", "width", "similarity", "tags"]
    assert all(table.schema.field(name).type == pa.string() for name in table.column_names[6:])
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys(2)
    assert rows[0]["url"] == "http://a.example/1.jpg"
    assert rows[0]["caption"] == "a smiling woman"
    assert rows[1]["caption"] is None
    assert [r["status"] for r in rows] == [None, None]
    assert (rows[0]["source_status"], rows[0]["source_key"]) == ("success", "x1")
    assert (rows[0]["width"], rows[0]["similarity"], rows[0]["tags"]) == ("640", "0.25", '["face", "smile"]')
    assert rows[1]["width"] is None
    assert rows[0]["image"] is None and rows[0]["path"] is None


def test_parquet_extra_cols_selects_and_must_exist(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", [{**row, "width": 10, "height": 20} for row in url_rows(3)])
    table = read_all(path, extra_cols=["height"])
    assert table.column_names == [*SAMPLE_COLUMNS, "height"]
    assert table.column("height").to_pylist() == ["20"] * 3
    message = input_error(path, extra_cols=["height", "nsfw"])
    assert message.startswith(f"{path}: column 'nsfw' not found (columns: url, caption, width, height)")
    assert "input.extra_cols" in message


def test_parquet_folder_and_glob_read_files_in_order_with_contiguous_keys(tmp_path):
    rows = url_rows(7)
    write_parquet(tmp_path / "part-0.parquet", rows[:3])
    write_parquet(tmp_path / "part-1.parquet", rows[3:])
    (tmp_path / "README.md").write_text("not data")
    for path in (tmp_path, tmp_path / "part-*.parquet"):
        table = read_all(path)
        assert table.column("key").to_pylist() == keys(7)
        assert table.column("url").to_pylist() == [r["url"] for r in rows]


def test_csv_custom_columns_quoted_newlines_and_bad_utf8(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"IMG,TEXT,source\n"
        b"http://e.com/1.jpg,\"a face, smiling\nsecond line\",web\n"
        b"http://e.com/2.jpg,caf\xe9 \xff portrait,scan\n"
        b"http://e.com/3.jpg,  plain  ,42\n"
    )
    rows = read_all(path, url_col="IMG", caption_col="TEXT").to_pylist()
    assert [r["key"] for r in rows] == keys(3)
    assert rows[0]["caption"] == "a face, smiling\nsecond line"
    assert rows[1]["caption"] == "caf\ufffd \ufffd portrait"  # bad bytes replaced, the row stays
    assert rows[2]["caption"] == "plain"
    assert [r["source"] for r in rows] == ["web", "scan", "42"]
    assert [r["status"] for r in rows] == [None] * 3


def test_tsv_splits_on_tabs_only(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text(
        "caption\turl\tlicense\n"
        "a man, outdoors\thttp://e.com/1.jpg\tcc-by\n"
        "portrait\thttp://e.com/2.jpg\t\n"
    )
    rows = read_all(path).to_pylist()
    assert [(r["caption"], r["url"], r["license"]) for r in rows] == [
        ("a man, outdoors", "http://e.com/1.jpg", "cc-by"),
        ("portrait", "http://e.com/2.jpg", ""),
    ]


def test_jsonl_sparse_records_mixed_types_and_bad_utf8(tmp_path, caplog):
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"url": "http://e.com/1.jpg", "caption": "one", "n": 1, "meta": {"w": 3}}\n'
        b"\n"
        b'{"url": "http://e.com/2.jpg", "caption": "tw\xff\xfeo", "n": "two", "flag": true}\n'
        b'{"caption": "no url here", "n": null}\n'
    )
    table = read_all(path, batch_rows=1)
    assert table.column_names == [*SAMPLE_COLUMNS, "n", "meta"]  # `flag` first appears after batch one
    assert "flag" in caplog.text and "input.extra_cols" in caplog.text
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == keys(3)
    assert rows[1]["caption"] == "tw\ufffd\ufffdo"
    assert [r["n"] for r in rows] == ["1", "two", None]
    assert rows[0]["meta"] == '{"w": 3}'
    assert [r["status"] for r in rows] == [None, None, records.MISSING_URL]
    assert read_all(path, batch_rows=1, extra_cols=["flag"]).column("flag").to_pylist() == [None, "true", None]


def test_jsonl_malformed_lines_and_missing_fields(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"url": "http://e.com/1.jpg", "caption": "ok"}\n{"url": "http://e.com/2.jpg", caption}\n')
    assert input_error(broken).startswith(f"{broken}: line 2: not valid JSON")
    listed = tmp_path / "list.jsonl"
    listed.write_text('["http://e.com/1.jpg"]\n')
    assert input_error(listed) == f"{listed}: line 1: expected a JSON object, got list"
    no_url = tmp_path / "no_url.jsonl"
    no_url.write_text('{"link": "http://e.com/1.jpg", "caption": "x"}\n')
    assert input_error(no_url) == (
        f"{no_url}: field 'url' not found in the first records (fields: link, caption); set input.url_col"
    )


# --- image-carrying formats ---------------------------------------------------------------------


def test_hf_saved_dataset_with_image_column_carries_bytes(tmp_path):
    images = [SKIMAGE_DATA / "rocket.jpg", SKIMAGE_DATA / "camera.png"]
    ds = datasets.Dataset.from_dict(
        {"image": [str(p) for p in images], "text": [" a rocket ", "a cameraman"], "label": [3, 7]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    rows = read_all(tmp_path / "ds", caption_col="text").to_pylist()
    assert [r["image"] for r in rows] == [p.read_bytes() for p in images]
    assert [r["caption"] for r in rows] == ["a rocket", "a cameraman"]
    assert [r["label"] for r in rows] == ["3", "7"]
    assert [(r["url"], r["path"], r["status"]) for r in rows] == [(None, None, None)] * 2
    assert list(rows[0]) == [*SAMPLE_COLUMNS, "label"]


def test_hf_saved_dataset_dict_with_urls_picks_the_split(tmp_path):
    split = datasets.Dataset.from_dict({"url": ["http://e.com/1.jpg", "ftp://e.com/2.jpg"], "caption": ["a", "b"],
                                        "score": [0.5, 0.25]})
    datasets.DatasetDict({"train": split.select([0]), "validation": split}).save_to_disk(str(tmp_path / "dd"))
    rows = read_all(tmp_path / "dd", hf_split="validation").to_pylist()
    assert [(r["url"], r["caption"], r["score"], r["status"]) for r in rows] == [
        ("http://e.com/1.jpg", "a", "0.5", None),
        ("ftp://e.com/2.jpg", "b", "0.25", records.INVALID_URL),
    ]
    assert input_error(tmp_path / "dd", hf_split="test") == (
        f"{tmp_path / 'dd'}: split 'test' not found (splits: train, validation); set input.hf_split"
    )


def test_folder_of_images_with_sidecar_captions(tmp_path):
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    (tmp_path / "a.jpg").write_bytes((SKIMAGE_DATA / "rocket.jpg").read_bytes())
    (tmp_path / "a.txt").write_text("  a rocket on the pad \n")
    (tmp_path / "b" / "cam.PNG").write_bytes((SKIMAGE_DATA / "camera.png").read_bytes())
    (tmp_path / "b" / "deeper" / "coins.png").write_bytes((SKIMAGE_DATA / "coins.png").read_bytes())
    (tmp_path / "b" / "deeper" / "coins.txt").write_bytes(b"old co\xefns")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"ignored")
    rows = read_all(tmp_path).to_pylist()
    assert [r["path"] for r in rows] == [
        str(tmp_path / "a.jpg"), str(tmp_path / "b" / "cam.PNG"), str(tmp_path / "b" / "deeper" / "coins.png")
    ]
    assert all(Path(r["path"]).is_absolute() for r in rows)
    assert [r["caption"] for r in rows] == ["a rocket on the pad", None, "old co\ufffdns"]
    assert [(r["url"], r["image"], r["status"]) for r in rows] == [(None, None, None)] * 3
    assert [r["key"] for r in rows] == keys(3)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_group_members_by_key(tmp_path):
    rocket = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    camera = (SKIMAGE_DATA / "camera.png").read_bytes()
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "00000.tar", "w") as tar:
        add_member(tar, "s/000.jpg", rocket)
        add_member(tar, "s/000.txt", b" a rocket ")
        meta = {"url": "http://e.com/r.jpg", "width": 427, "status": "success"}
        add_member(tar, "s/000.json", json.dumps(meta).encode())
        add_member(tar, "s/001.png", camera)
        add_member(tar, "s/001.txt", b"a cameraman")
        add_member(tar, "s/002.json", json.dumps({"url": "http://e.com/only-url.jpg"}).encode())
    with tarfile.open(tmp_path / "wds" / "00001.tar", "w") as tar:
        add_member(tar, "003.seg.png", camera)  # key is up to the first dot: "003", ext "seg.png" unused
        add_member(tar, "003.txt", b"segmented")
        add_member(tar, "004.jpg", rocket)
    rows = read_all(tmp_path / "wds").to_pylist()
    assert [r["key"] for r in rows] == keys(5)
    assert [r["image"] for r in rows] == [rocket, camera, None, None, rocket]
    assert [r["caption"] for r in rows] == ["a rocket", "a cameraman", None, "segmented", None]
    assert [r["url"] for r in rows] == ["http://e.com/r.jpg", None, "http://e.com/only-url.jpg", None, None]
    # Embedded images need no URL; the sample without image or URL is flagged.
    assert [r["status"] for r in rows] == [None, None, None, records.MISSING_URL, None]
    assert (rows[0]["width"], rows[0]["source_status"]) == ("427", "success")
    assert rows[1]["width"] is None


# --- input problems ----------------------------------------------------------------------------


def test_url_problems_get_statuses_and_rows_stay(tmp_path):
    urls = ["http://e.com/a.jpg", " http://e.com/a.jpg ", "ftp://e.com/b.jpg", "", "   ", "not a url",
            "http://", "http://e.com:99999/c.jpg", "HTTPS://E.com/d.jpg", "http://e.com/a.jpg?v=2"]
    path = write_parquet(tmp_path / "urls.parquet", [{"url": u, "caption": "c"} for u in urls])
    table = read_all(path)
    assert table.num_rows == len(urls)
    assert table.column("status").to_pylist() == [
        None, records.DUPLICATE_URL, records.INVALID_URL, records.MISSING_URL, records.MISSING_URL,
        records.INVALID_URL, records.INVALID_URL, records.INVALID_URL, None, None,
    ]
    assert table.column("url").to_pylist()[1] == "http://e.com/a.jpg"
    assert read_all(path, dedupe_urls=False).column("status").to_pylist()[1] is None


def test_duplicates_are_found_across_batches_and_files(tmp_path):
    write_parquet(tmp_path / "0.parquet", url_rows(3))
    write_parquet(tmp_path / "1.parquet", url_rows(3)[::-1])
    statuses = read_all(tmp_path, batch_rows=2).column("status").to_pylist()
    assert statuses == [None] * 3 + [records.DUPLICATE_URL] * 3


def test_missing_columns_empty_and_absent_inputs(tmp_path):
    path = tmp_path / "part-0.csv"
    path.write_text("URL,TEXT\nhttp://e.com/1.jpg,hi\n")
    assert input_error(path) == f"{path}: column 'url' not found (columns: URL, TEXT); set input.url_col"
    assert input_error(path, url_col="URL") == (
        f"{path}: column 'caption' not found (columns: URL, TEXT); set input.caption_col (null: no captions)"
    )
    assert read_all(path, url_col="URL", caption_col=None).column("caption").to_pylist() == [None]
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert input_error(empty) == f"{empty}: file is empty"
    header_only = tmp_path / "header.csv"
    header_only.write_text("url,caption\n")
    assert input_error(header_only) == f"{header_only}: no samples found (a header line and no rows)"
    missing = tmp_path / "nowhere.parquet"
    assert input_error(missing).startswith(f"{missing}: not found")
    assert input_error(tmp_path / "*.tsv") == f"{tmp_path / '*.tsv'}: no files match this pattern"
    write_parquet(tmp_path / "x.parquet", url_rows(1))
    assert input_error(tmp_path) == f"{tmp_path}: holds several input formats (csv, parquet); set input.format"


def test_keys_contiguous_and_schema_fixed_across_batches(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", [{**row, "n": i} for i, row in enumerate(url_rows(25))])
    batches = list(iter_samples(InputConfig(path=str(path)), batch_rows=4))
    assert [b.num_rows for b in batches] == [4, 4, 4, 4, 4, 4, 1]
    assert len({b.schema for b in batches}) == 1
    assert pa.concat_tables(batches).column("key").to_pylist() == keys(25)


# --- shard planning ----------------------------------------------------------------------------


PLANNED_FILES = ["00000.parquet", "00001.parquet", "00002.parquet", "plan.json"]


def snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_plan_shards_splits_exactly_and_writes_plan_last(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", url_rows(25))
    plan_dir = tmp_path / "run" / "_plan"
    shards = plan_shards(InputConfig(path=str(path)), 10, plan_dir)
    assert [(s.shard_id, Path(s.path).name, s.n_samples) for s in shards] == [
        (0, "00000.parquet", 10), (1, "00001.parquet", 10), (2, "00002.parquet", 5)
    ]
    assert sorted(p.name for p in plan_dir.iterdir()) == PLANNED_FILES
    shard_keys = [pq.read_table(s.path).column("key").to_pylist() for s in shards]
    assert shard_keys == [keys(10), keys(10, 10), keys(5, 20)]
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert (plan["input"], plan["format"], plan["n_samples"], plan["n_shards"]) == (str(path), "parquet", 25, 3)
    assert load_plan(plan_dir) == shards


def test_plan_is_reused_when_input_unchanged(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", url_rows(25))
    cfg = InputConfig(path=str(path))
    first = plan_shards(cfg, 10, tmp_path / "plan")
    before = snapshot(tmp_path / "plan")
    assert plan_shards(cfg, 10, tmp_path / "plan") == first
    assert snapshot(tmp_path / "plan") == before


def test_plan_of_another_input_or_settings_is_refused(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", url_rows(25))
    plan_shards(InputConfig(path=str(path)), 10, tmp_path / "plan")
    for cfg, per_shard in ((InputConfig(path=str(path)), 5), (InputConfig(path=str(path), dedupe_urls=False), 10)):
        with pytest.raises(InputError, match="belongs to another input or settings"):
            plan_shards(cfg, per_shard, tmp_path / "plan")
    write_parquet(path, url_rows(30))
    os.utime(path, ns=(1, 1))
    with pytest.raises(InputError, match=rf"plan\.json: planned input file {path} changed \(size or mtime\)"):
        plan_shards(InputConfig(path=str(path)), 10, tmp_path / "plan")


def plan_rows(shards) -> list[dict]:
    return pa.concat_tables(pq.read_table(s.path) for s in shards).select(["key", "url", "status", "source"]).to_pylist()


def test_plan_grows_by_new_input_files(tmp_path):
    """A nightly job adds files to the input folder: the next run plans only the new files, after
    the planned shards, as one planning of all files would (keys, dedupe, extra columns)."""
    folder = tmp_path / "input"
    folder.mkdir()
    first = [{**row, "source": "a"} for row in url_rows(25)]
    write_parquet(folder / "a.parquet", first)
    cfg = InputConfig(path=str(folder))
    planned = plan_shards(cfg, 10, tmp_path / "plan")
    before = snapshot(tmp_path / "plan")
    # Two URLs seen in a.parquet, a column a.parquet lacks (not carried: the run's extras are fixed).
    second = [{"url": f"http://example.com/new{i}.jpg", "caption": f"new {i}", "source": "b", "late": "x"}
              for i in range(10)] + [{**first[3], "source": "b", "late": "x"}, {**first[20], "source": "b", "late": "x"}]
    write_parquet(folder / "b.parquet", second)
    grown = plan_shards(cfg, 10, tmp_path / "plan")

    assert grown[:3] == planned
    assert [(s.shard_id, Path(s.path).name, s.n_samples) for s in grown[3:]] == [(3, "00003.parquet", 10),
                                                                                 (4, "00004.parquet", 2)]
    after = snapshot(tmp_path / "plan")
    assert {name: after[name] for name in before if name != "plan.json"} == \
        {name: mtime for name, mtime in before.items() if name != "plan.json"}  # planned shards untouched
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert (plan["n_samples"], plan["n_shards"], len(plan["files"])) == (37, 5, 2)
    assert load_plan(tmp_path / "plan") == grown
    # The same rows as one planning of both files: keys go on, repeats of planned URLs are duplicates.
    fresh = plan_shards(cfg, 10, tmp_path / "fresh")
    assert plan_rows(grown) == plan_rows(fresh)
    assert [r["status"] for r in plan_rows(grown)[35:]] == [records.DUPLICATE_URL] * 2
    assert pq.read_table(grown[3].path).schema == pq.read_table(grown[0].path).schema
    # Unchanged since: reused as is.
    assert plan_shards(cfg, 10, tmp_path / "plan") == grown
    assert snapshot(tmp_path / "plan") == after


def test_grown_plan_refuses_changed_or_removed_files_and_cleans_a_killed_append(tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    write_parquet(folder / "a.parquet", url_rows(15))
    cfg = InputConfig(path=str(folder))
    plan_dir = tmp_path / "plan"
    plan_shards(cfg, 10, plan_dir)
    # An append killed before plan.json: its shard files are not planned, and are redone.
    (plan_dir / "00002.parquet").write_bytes(b"half a shard from a killed append")
    (plan_dir / "00003.parquet.tmp").write_bytes(b"stale")
    write_parquet(folder / "b.parquet", [{"url": "http://example.com/b.jpg", "caption": "b"}])
    grown = plan_shards(cfg, 10, plan_dir)
    assert sorted(p.name for p in plan_dir.iterdir()) == PLANNED_FILES
    assert pq.read_table(grown[2].path).column("key").to_pylist() == keys(1, 15)

    (folder / "b.parquet").unlink()
    with pytest.raises(InputError, match=rf"planned input file {folder / 'b.parquet'} was removed; a run's input "
                                         "may only grow by new files"):
        plan_shards(cfg, 10, plan_dir)
    write_parquet(folder / "a.parquet", url_rows(16))
    with pytest.raises(InputError, match=rf"planned input file {folder / 'a.parquet'} changed"):
        plan_shards(cfg, 10, plan_dir)


def test_image_folder_input_cannot_grow(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rocket = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    (folder / "a.jpg").write_bytes(rocket)
    cfg = InputConfig(path=str(folder), format="folder")
    plan_shards(cfg, 10, tmp_path / "plan")
    (folder / "b.jpg").write_bytes(rocket)
    with pytest.raises(InputError, match=r"has new files, and input.format folder cannot add them to planned shards"):
        plan_shards(cfg, 10, tmp_path / "plan")


def test_partial_plan_without_plan_json_is_redone(tmp_path):
    path = write_parquet(tmp_path / "in.parquet", url_rows(25))
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "00000.parquet").write_bytes(b"half a shard from a killed run")
    (plan_dir / "00007.parquet").write_bytes(b"stale")
    (plan_dir / "00001.parquet.tmp").write_bytes(b"stale")
    shards = plan_shards(InputConfig(path=str(path)), 10, plan_dir)
    assert sorted(p.name for p in plan_dir.iterdir()) == PLANNED_FILES
    assert pq.read_table(shards[0].path).column("key").to_pylist() == keys(10)


def test_plan_of_image_input_keeps_bytes(tmp_path):
    rocket = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for i in range(3):
            add_member(tar, f"{i:03d}.jpg", rocket)
    shards = plan_shards(InputConfig(path=str(tmp_path / "in.tar")), 2, tmp_path / "plan")
    assert [s.n_samples for s in shards] == [2, 1]
    assert pq.read_table(shards[1].path).column("image").to_pylist() == [rocket]
