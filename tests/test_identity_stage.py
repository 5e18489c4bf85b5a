"""The identity stage on a real run: openpeople's ten people, through the real download and face
stages, then clustering, cleaning, opt-out and splits."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facedata.core import records
from facedata.core.config import config_from_dict
from facedata.core.errors import UserError
from facedata.pipeline import run_global
from facedata.core.run_layout import RunLayout
from tests.conftest import copy_faced_run, download_and_find_faces, package_dir, read_records

SHOTS = ("studio_portrait", "amateur_selfie", "amateur_posture", "studio_posture")
PEOPLE = [f"P{i:03d}" for i in range(1, 11)]


def person_photo(person: str, shot: str) -> Path:
    return package_dir("openpeople") / "data" / "curated" / person / "assets" / f"{shot}.jpg"


def make_config(run_input: Path, **identity):
    return config_from_dict({
        "input": {"path": str(run_input), "format": "parquet"},
        "download": {"timeout": 5.0, "retries": 0},
        "image": {"resize_max_side": 800},
        "identity": {"label_col": "person", **identity},
    })


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished download + face stage over 10 people x 4 photos, a repost, an astronaut."""
    root = tmp_path_factory.mktemp("identity_web")
    rows = []
    for person in PEOPLE:
        for shot in SHOTS:
            with Image.open(person_photo(person, shot)) as im:
                im.convert("RGB").resize((im.width // 2, im.height // 2)).save(root / f"{person}_{shot}.jpg", quality=90)
            rows.append({"file": f"{person}_{shot}.jpg", "caption": f"photo of {person}", "person": person})
    with Image.open(root / "P006_studio_portrait.jpg") as im:  # the same shot, smaller
        im.resize((600, 600), Image.Resampling.LANCZOS).save(root / "repost.jpg", quality=80)
    rows.append({"file": "repost.jpg", "caption": "photo of P006", "person": "P006"})
    shutil.copy(package_dir("skimage") / "data" / "astronaut.png", root / "astronaut.png")
    rows.append({"file": "astronaut.png", "caption": "photo of astronaut", "person": "astronaut"})
    run = tmp_path_factory.mktemp("identity_run")
    return run, download_and_find_faces(root, run, rows, make_config, samples_per_shard=16)


def fresh_copy(base_run, tmp_path) -> Path:
    return copy_faced_run(base_run[0], tmp_path)


def final_rows(run) -> list[dict]:
    return [row for path in sorted(RunLayout(run).step_dir("identity").glob("0*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_identities_match_the_people(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    report = run_global("identity", make_config(run / "corpus.parquet"), run, base_run[1])
    assert report["metrics"]["pairwise_f"] >= 0.95
    rows = [r for r in final_rows(run) if r["identity_id"] is not None]
    by_person: dict[str, set] = {}
    for row in rows:
        by_person.setdefault(row["person"], set()).add(row["identity_id"])
    owners: dict[int, set] = {}
    for person, ids in by_person.items():
        for identity in ids:
            owners.setdefault(identity, set()).add(person)
    assert all(len(people) == 1 for people in owners.values()), "two people merged"
    assert all(len(by_person[p]) == 1 for p in PEOPLE), "a person split"
    assert report["n_identities"] == 11  # ten people and the astronaut


def test_cleaning_near_duplicate_splits_and_statuses(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    report = run_global("identity", make_config(run / "corpus.parquet"), run, base_run[1])
    rows = {r["url"].rsplit("/", 1)[1]: r for r in final_rows(run)}
    assert rows["repost.jpg"]["status"] == records.NEAR_DUPLICATE
    assert rows["P006_studio_portrait.jpg"]["status"] == records.OK  # the larger copy stays
    kept = [r for r in rows.values() if r["status"] == records.OK]
    assert report["step_status_counts"] == {"ok": len(kept), "near_duplicate": 1}
    split_of: dict[int, set] = {}
    for row in kept:
        split_of.setdefault(row["identity_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values()), "an identity crosses splits"
    assert {s for (s,) in split_of.values()} == {"train", "validation", "test"}
    assert all(r["split"] is None for r in rows.values() if r["status"] != records.OK)
    face_ids = rows["P001_studio_portrait.jpg"]["face_identity_ids"]
    assert rows["P001_studio_portrait.jpg"]["identity_id"] in face_ids
    assert (RunLayout(run).step_dir("identity") / "gallery.png").stat().st_size > 0


def test_cap_and_singletons(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    cfg = make_config(run / "corpus.parquet", max_images_per_identity=2, drop_singletons=True,
                      drop_near_duplicates=False)
    run_global("identity", cfg, run, base_run[1])
    rows = final_rows(run)
    status = {r["url"].rsplit("/", 1)[1]: r["status"] for r in rows}
    assert status["astronaut.png"] == records.SINGLETON_IDENTITY
    kept_per_identity: dict[int, int] = {}
    for row in rows:
        if row["status"] == records.OK:
            kept_per_identity[row["identity_id"]] = kept_per_identity.get(row["identity_id"], 0) + 1
    assert max(kept_per_identity.values()) == 2 and len(kept_per_identity) == 10
    capped = [r for r in rows if r["status"] == records.IDENTITY_CAP]
    assert len(capped) == 10 * len(SHOTS) + 1 - 20  # P006 has one more image: the repost


def test_optout_gallery_removes_every_image_of_that_person(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    gallery = tmp_path / "optout"
    gallery.mkdir()
    with Image.open(person_photo("P003", "character_sheet")) as im:  # not one of the run's photos
        im.convert("RGB").crop((30, 70, 560, 660)).save(gallery / "request.jpg")
    report = run_global("identity", make_config(run / "corpus.parquet", optout_gallery=str(gallery)), run, base_run[1])
    rows = final_rows(run)
    p3 = [r["status"] for r in rows if r["person"] == "P003"]
    assert p3 == [records.OPTOUT_MATCH] * len(SHOTS)
    assert sum(r["status"] == records.OPTOUT_MATCH for r in rows) == len(SHOTS)
    assert report["n_optout_faces"] == len(SHOTS)
    assert all(r["identity_id"] is None for r in rows if r["person"] == "P003")


def test_optout_photo_without_a_face_and_wrong_dimension(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    gallery = tmp_path / "optout"
    gallery.mkdir()
    shutil.copy(package_dir("skimage") / "data" / "coffee.png", gallery / "coffee.png")
    with pytest.raises(UserError, match="coffee.png: no usable face"):
        run_global("identity", make_config(run / "corpus.parquet", optout_gallery=str(gallery)), run, base_run[1])
    (gallery / "coffee.png").unlink()
    np.save(gallery / "vectors.npy", np.ones((2, 128), np.float32))
    with pytest.raises(UserError, match="vectors.npy: opt-out embeddings have dimension 128"):
        run_global("identity", make_config(run / "corpus.parquet", optout_gallery=str(gallery)), run, base_run[1])


def test_shard_with_wrong_embedding_dimension_is_named(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    shard_ids = base_run[1]
    bad = run / "faces" / f"{shard_ids[-1]:05d}.embeddings.npy"
    n = len(np.load(bad))
    np.save(bad, np.ones((n, 128), np.float16))
    with pytest.raises(UserError, match=f"{shard_ids[-1]:05d}.embeddings.npy: embeddings have dimension 128"):
        run_global("identity", make_config(run / "corpus.parquet"), run, shard_ids)


def test_rerun_is_deterministic_and_done_stage_is_skipped(base_run, tmp_path):
    first = fresh_copy(base_run, tmp_path / "a")
    second = fresh_copy(base_run, tmp_path / "b")
    cfg = make_config(first / "corpus.parquet")
    run_global("identity", cfg, first, base_run[1])
    run_global("identity", cfg, second, base_run[1])
    drop = ["url"]
    a = read_records(first / "shards")  # same inputs
    assert a.num_rows == read_records(second / "shards").num_rows
    for path in sorted(RunLayout(first).step_dir("identity").glob("0*.parquet")):
        assert pq.read_table(path).drop(drop).equals(pq.read_table(RunLayout(second).step_dir("identity") / path.name).drop(drop))
    done = RunLayout(first).step_dir("identity") / "identity.json"
    mtime = done.stat().st_mtime_ns
    run_global("identity", cfg, first, base_run[1])
    assert done.stat().st_mtime_ns == mtime


def test_no_faces_at_all(base_run, tmp_path):
    run = fresh_copy(base_run, tmp_path)
    for path in (run / "faces").glob("*.embeddings.npy"):
        np.save(path, np.zeros((0, 512), np.float16))
    for path in (run / "faces").glob("*.parquet"):
        table = pq.read_table(path)
        table = table.set_column(table.column_names.index("faces"), "faces",
                                 pa.nulls(table.num_rows, table.schema.field("faces").type))
        pq.write_table(table, path)
    report = run_global("identity", make_config(run / "corpus.parquet"), run, base_run[1])
    assert report["n_faces"] == 0 and report["n_identities"] == 0


def test_gallery_shows_the_flagged_outliers_and_no_placeholder_tiles(base_run, tmp_path, monkeypatch):
    """gallery.png: a row per identity, then the images flagged identity_outlier (here a strict
    outlier_threshold flags some), each with its identity; a short row ends in plain background."""
    from facedata.identity import step as identity_stage

    run = fresh_copy(base_run, tmp_path)
    drawn: list = []
    galleries: list = []
    sheet, gallery = identity_stage.make_contact_sheet, identity_stage.write_gallery
    monkeypatch.setattr(identity_stage, "make_contact_sheet",
                        lambda items, *a, **k: sheet(drawn.extend(items) or drawn, *a, **k))
    monkeypatch.setattr(identity_stage, "write_gallery",
                        lambda *a, **k: galleries.append(gallery(*a, **k)) or galleries[-1])
    # The people's faces sit 0.80-0.95 from their identity's centre: 0.815 flags the five least central.
    report = run_global("identity", make_config(run / "corpus.parquet", outlier_threshold=0.815), run, base_run[1])
    flagged = {}
    for path in sorted(RunLayout(run).step_dir("identity").glob("0*.parquet")):
        for row, record in enumerate(pq.read_table(path).to_pylist()):
            if record["identity_outlier"]:
                flagged[(int(path.stem), row)] = record["identity_id"]
    (result,) = galleries
    assert 0 < len(flagged) and result.n_outliers == len(flagged)
    outliers = [tile for row in result.rows for tile in row if tile.outlier]
    assert {(t.shard, t.row): t.identity for t in outliers} == flagged  # every flagged image, with its identity
    assert result.rows[-1][-1].outlier and "outliers" in result.title
    identity_rows = [row for row in result.rows if not row[0].outlier]
    assert len({row[0].identity for row in identity_rows}) == len(identity_rows)
    assert all(len({t.identity for t in row}) == 1 for row in identity_rows)
    # Every face drawn is a face crop; the rest of a short row is an empty slot, not a blank image.
    images = [item for item in drawn if item[0] is not None]
    assert len(images) == sum(map(len, result.rows))
    for data, *_ in images:
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (160, 160) and im.getextrema() != ((255, 255),) * 3
    assert sum(caption.startswith("OUTLIER of identity") for _, caption in images) == len(outliers)
    gaps = len(drawn) - len(images)
    assert gaps == sum(result.columns - len(row) for row in result.rows) > 0
    assert report["gallery"] == str(RunLayout(run).step_dir("identity") / "gallery.png") == str(result.path)
