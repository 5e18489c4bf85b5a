"""Publishing a real finished run (the embedded demo): parquet read back with `datasets`, webdataset tars
read back with `webdataset`, embeddings, manifest, idempotent republish, refusing and overwriting, partial
runs and face crops."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from facedata.core.errors import UserError
from facedata.download.imaging import decode_rgb
from facedata.publish.writer import NotAPublishError, crop_box, publish_run, strip_userinfo
from tests.conftest import facedata_cmd

publish = importlib.import_module("facedata.publish.writer")  # the module, whatever `facedata.publish.writer` names

pytestmark = pytest.mark.slow

SPLITS = ("train", "validation", "test")
PER_SHARD = 8  # the demo keeps 38 samples (train 30): several output shards per split


def run_records(run_dir: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """The run's kept records by key (status ok in captions/NNNNN.parquet)."""
    kept = {}
    for path in sorted((run_dir / "captions").glob("[0-9]*.parquet")):
        if path.stem in skip:
            continue
        for r in pq.read_table(path).to_pylist():
            if r["status"] == "ok":
                kept[r["key"]] = r
    return kept


def fast_card(dest: Path, **kwargs) -> Path:
    (dest / "README.md").write_text(f"# {kwargs['name']}\n")
    return dest / "README.md"


@pytest.fixture
def quick_card(monkeypatch):
    """The dataset card replaced by a one-line README (its plots take a few seconds)."""
    import facedata.publish.card

    monkeypatch.setattr(facedata.publish.card, "write_dataset_card", fast_card)


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*")) if p.is_file()}


def fs_state(root: Path) -> dict[str, tuple | None]:
    """Every file (mtime, size, content hash), link (target) and folder (None) under root."""
    state: dict[str, tuple | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            state[rel] = ("link", str(p.readlink()))
        elif p.is_file():
            state[rel] = (p.stat().st_mtime_ns, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            state[rel] = None
    return state


@pytest.fixture(scope="module")
def published(demo_run, tmp_path_factory):
    """The demo run published once with embeddings, the real dataset card's inputs recorded."""
    import facedata.publish.card

    calls = []
    real = facedata.publish.card.write_dataset_card

    def spy(dest, **kwargs):
        calls.append(kwargs)
        return real(dest, **kwargs)

    dest = tmp_path_factory.mktemp("published") / "demo-faces"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(facedata.publish.card, "write_dataset_card", spy)
        manifest = publish_run(demo_run, dest, samples_per_shard=PER_SHARD, embeddings=True, progress=False)
    assert manifest["status"] == "written" and len(calls) == 1
    return dest, manifest, calls[0]


def test_load_dataset_round_trip(published, demo_run, tmp_path):
    import datasets

    dest, manifest, _ = published
    expected = run_records(demo_run)
    assert len(expected) == 38
    counts = {s: sum(r["split"] == s for r in expected.values()) for s in SPLITS}
    for split, n in counts.items():
        n_shards = -(-n // PER_SHARD)
        names = sorted(p.name for p in (dest / "data").glob(f"{split}-*.parquet"))
        assert names == [f"{split}-{i:05d}-of-{n_shards:05d}.parquet" for i in range(n_shards)]
        assert manifest["splits"][split]["num_examples"] == n

    by_folder = datasets.load_dataset(str(dest), cache_dir=str(tmp_path / "hf"))  # the card's YAML configs
    by_parquet = datasets.load_dataset("parquet", data_dir=str(dest / "data"), cache_dir=str(tmp_path / "hf2"))
    for loaded in (by_folder, by_parquet):
        assert sorted(loaded) == sorted(SPLITS)
        assert {s: loaded[s].num_rows for s in SPLITS} == counts
        assert isinstance(loaded["train"].features["image"], datasets.Image)
    first = by_folder["train"][0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (first["width"], first["height"])

    stored = {}
    for tar_path in sorted((demo_run / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            stored.update((m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers()
                          if m.name.split(".")[0] in expected and not m.name.endswith((".txt", ".json")))
    identities: dict[str, set] = {s: set() for s in SPLITS}
    seen = []
    for split in SPLITS:
        rows = by_folder[split].cast_column("image", datasets.Image(decode=False))
        for row in rows:
            rec = expected[row["key"]]
            seen.append(row["key"])
            assert row["split"] == rec["split"] == split
            assert (row["face_caption"], row["caption"], row["url"], row["source_url"]) == \
                (rec["face_caption"], rec["caption"], rec["url"], rec["url"])
            assert (row["width"], row["height"], row["n_faces"], row["identity_id"], row["source_sha256"]) == \
                (rec["width"], rec["height"], rec["n_faces"], rec["identity_id"], rec["sha256"])
            assert row["license"] is None  # the demo corpus has no licence column
            image = row["image"]["bytes"]
            assert hashlib.sha256(image).hexdigest() == row["sha256"]
            assert image == stored[row["key"]]  # the run's stored image, byte for byte
            with Image.open(io.BytesIO(image)) as im:
                assert im.size == (rec["width"], rec["height"])
            assert len(row["faces"]) == len(rec["faces"]) == rec["n_faces"]
            described = {a["face"]: a for a in rec["face_attributes"]}
            for i, (face, src) in enumerate(zip(row["faces"], rec["faces"])):
                assert np.allclose(face["bbox"], src["bbox"]) and np.allclose(face["landmarks"], src["kps"])
                assert face["score"] == pytest.approx(src["score"]) and face["primary"] == src["primary"]
                ident = rec["face_identity_ids"][i]
                assert face["identity_id"] == (ident if ident >= 0 else None)
                if i in described:
                    assert face["attributes"] == described[i]["values"]
                    assert face["confidences"] == pytest.approx(described[i]["confidences"])
                else:
                    assert face["attributes"] is None and face["confidences"] is None
            assert row["faces"][rec["primary_face"]]["primary"]
            identities[split].add(row["identity_id"])
    assert sorted(seen) == sorted(expected)
    assert not identities["train"] & identities["validation"]
    assert not identities["train"] & identities["test"]
    assert not identities["validation"] & identities["test"]


def test_webdataset_tars_hold_the_same_samples(published):
    import webdataset as wds

    dest, _, _ = published
    for split in SPLITS:
        parquet_rows = []
        for path in sorted((dest / "data").glob(f"{split}-*.parquet")):
            parquet_rows += pq.read_table(path).to_pylist()
        tars = sorted(str(p) for p in (dest / "webdataset").glob(f"{split}-*.tar"))
        assert len(tars) == len(list((dest / "data").glob(f"{split}-*.parquet")))
        samples = list(wds.WebDataset(tars, shardshuffle=False))
        assert [s["__key__"] for s in samples] == [r["key"] for r in parquet_rows]  # same order too
        for s, row in zip(samples, parquet_rows):
            image = row.pop("image")
            key, ext = image["path"].rsplit(".", 1)
            assert key == row["key"] and ext in ("jpg", "png", "webp") and s[ext] == image["bytes"]
            assert s["txt"].decode() == row["face_caption"]
            assert json.loads(s["json"]) == row


def test_embeddings_follow_the_data_shards(published, demo_run):
    dest, manifest, _ = published
    expected = run_records(demo_run)
    for rel in manifest["files"]:
        if not rel.startswith("data/"):
            continue
        split, index = Path(rel).stem.split("-")[:2]
        keys = pq.read_table(dest / rel, columns=["key"]).column("key").to_pylist()
        order = pq.read_table(dest / "embeddings" / f"{split}-{index}.parquet").to_pylist()
        vectors = np.load(dest / "embeddings" / f"{split}-{index}.npy")
        assert vectors.dtype == np.float16 and vectors.shape == (len(keys), 512)
        assert [r["key"] for r in order] == keys
        for key, row, vector in zip(keys, order, vectors):
            rec = expected[key]
            assert row["face"] == rec["primary_face"]
            shard = next(p.stem for p in (demo_run / "captions").glob("[0-9]*.parquet")
                         if key in {r["key"] for r in pq.read_table(p, columns=["key"]).to_pylist()})
            run_vectors = np.load(demo_run / "faces" / f"{shard}.embeddings.npy")
            assert np.array_equal(vector, run_vectors[rec["faces"][rec["primary_face"]]["embedding_index"]])


def test_manifest_and_card(published, demo_run):
    dest, manifest, card = published
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk == {k: v for k, v in manifest.items() if k != "status"}
    assert manifest["run_dir"] == str(demo_run.resolve())
    assert manifest["code"]["facedata"] and manifest["code"]["git_commit"]  # the repo is a git checkout
    assert manifest["config"]["identity"]["enabled"] is True
    assert manifest["models"]["detector"]["licence"]
    assert manifest["n_samples"] == 38 and manifest["skipped_shards"] == []
    assert manifest["crops"] == {"enabled": False}
    assert "README.md" in manifest["files"] and (dest / "README.md").exists()
    for rel, info in manifest["files"].items():
        data = (dest / rel).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    listed = set(manifest["files"]) | {"manifest.json"}
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} == listed
    assert not list(dest.parent.glob(".demo-faces.*"))  # no temp folder left beside DEST

    samples = card["samples"]
    assert card["name"] == "demo-faces" and card["manifest"]["fingerprint"] == manifest["fingerprint"]
    assert card["summary"]["n_ok"] == 38 and card["config"] == manifest["config"]
    assert len(samples) == 38
    for column in ("split", "width", "height", "n_faces", "face_side", "age", "gender", "expression",
                   "caption_words"):
        assert column in samples.columns
    assert samples["split"].value_counts().to_dict() == {s: v["num_examples"] for s, v in manifest["splits"].items()}
    assert (samples["face_side"] > 0).all() and (samples["caption_words"] > 0).all()
    assert 1 <= len(card["examples"]) <= 12
    image, caption = card["examples"][0]
    assert isinstance(image, bytes) and caption in set(r["face_caption"] for r in run_records(demo_run).values())


def test_republish_is_idempotent(published, demo_run):
    dest, manifest, _ = published
    before = tree_state(dest)
    again = publish_run(demo_run, dest, samples_per_shard=PER_SHARD, embeddings=True, progress=False)
    assert again["status"] == "unchanged" and again["fingerprint"] == manifest["fingerprint"]
    assert tree_state(dest) == before


def test_other_content_is_refused_unless_overwrite(published, demo_run, tmp_path, quick_card):
    dest = tmp_path / "copy"
    shutil.copytree(published[0], dest)
    before = tree_state(dest)
    with pytest.raises(UserError, match=r"exists with different content; pass --overwrite") as err:
        publish_run(demo_run, dest, samples_per_shard=16, progress=False)
    assert "\n" not in str(err.value) and str(dest) in str(err.value)
    assert tree_state(dest) == before

    # A publish that dies before its end (here in the card) leaves DEST as it was and no temp folder;
    # a temp folder left by a killed publish is removed by the next one.
    import facedata.publish.card

    def broken_card(dest, **kwargs):
        raise RuntimeError("killed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(facedata.publish.card, "write_dataset_card", broken_card)
        with pytest.raises(RuntimeError, match="killed"):
            publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    assert tree_state(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
    (tmp_path / ".copy.publish-0123abcd" / "data").mkdir(parents=True)

    replaced = publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    assert replaced["status"] == "written" and replaced["fingerprint"] != published[1]["fingerprint"]
    assert sorted(p.name for p in (dest / "data").glob("train-*")) == \
        ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert not (dest / "embeddings").exists()
    assert json.loads((dest / "manifest.json").read_text())["fingerprint"] == replaced["fingerprint"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # the old folder and temp folder are gone

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a published dataset")
    with pytest.raises(NotAPublishError, match="no manifest.json of a facedata publish"):
        publish_run(demo_run, stray, progress=False)
    assert [p.name for p in stray.iterdir()] == ["notes.txt"]


def user_photos(root: Path) -> Path:
    """A folder of a user's own files: photos, a subfolder, a symbolic link, an empty folder and a
    manifest.json that is not a publish's."""
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "holiday.jpg")
    (root / "2024").mkdir()
    Image.new("RGB", (8, 8), "blue").save(root / "2024" / "beach.png")
    (root / "2024" / "notes.txt").write_text("not a dataset")
    (root / "manifest.json").write_text(json.dumps({"files": {"holiday.jpg": {}}}))  # some other tool's
    (root / "empty").mkdir()
    (root / "latest.jpg").symlink_to("holiday.jpg")
    return root


def test_overwrite_refuses_anything_but_an_earlier_publish(demo_run, tmp_path, quick_card):
    """Issue 15: --overwrite replaced any folder, a user's photos included. Now only an earlier publish is
    replaced; anything else is one line and nothing there is touched."""
    photos = user_photos(tmp_path / "photos")
    before = fs_state(photos)
    for overwrite in (True, False):
        with pytest.raises(NotAPublishError) as err:
            publish_run(demo_run, photos, overwrite=overwrite, progress=False)
        message = str(err.value)
        assert message.startswith(f"{photos} holds files but no manifest.json of a facedata publish")
        assert "nothing there was touched" in message and "\n" not in message
        assert isinstance(err.value, UserError)
        assert fs_state(photos) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp folder beside it either

    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    link = tmp_path / "a-link"
    link.symlink_to(photos)
    for dest, what in ((a_file, "is a file"), (link, "is a symbolic link")):
        with pytest.raises(NotAPublishError, match=f"{dest} {what}: publish only replaces an earlier publish"):
            publish_run(demo_run, dest, overwrite=True, progress=False)
    assert a_file.read_text() == "mine" and link.readlink() == photos and fs_state(photos) == before


def test_replacing_a_publish_deletes_only_what_it_wrote(published, demo_run, tmp_path, quick_card):
    """--overwrite over an earlier publish deletes the files its manifest lists (and the folders left empty);
    a search index, a user's notes and an empty folder the publish did not make stay, byte for byte."""
    dest = tmp_path / "ds"
    shutil.copytree(published[0], dest)
    old_files = set(published[1]["files"])
    assert any(f.startswith("embeddings/") for f in old_files)
    (dest / "search" / "0123abcd").mkdir(parents=True)
    (dest / "search" / "0123abcd" / "index.faiss").write_bytes(b"an index")
    (dest / "data" / "my-notes.txt").write_text("notes")
    (dest / "embeddings" / "keep.npy").write_bytes(b"mine")  # in a folder the new publish does not make
    (dest / "empty").mkdir()
    ours = {rel: state for rel, state in fs_state(dest).items()
            if rel.startswith(("search", "empty")) or rel in ("data/my-notes.txt", "embeddings/keep.npy")}
    replaced = publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    assert replaced["status"] == "written"
    after = fs_state(dest)
    assert {rel: after.get(rel) for rel in ours} == ours  # kept, same content and times
    for rel, info in replaced["files"].items():  # the new publish is whole
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == info["sha256"]
    for rel in old_files - set(replaced["files"]):
        assert not (dest / rel).exists()  # the earlier publish's own files are gone
    assert sorted(p.name for p in (dest / "embeddings").iterdir()) == ["keep.npy"]
    assert not set(replaced["files"]) & set(ours)  # the new manifest lists only what it wrote
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing left beside it

    # A user's file at a path the new publish writes: refused, nothing touched.
    clash = dest / "data" / "train-00000-of-00001.parquet"
    clash.write_text("mine")
    before = fs_state(dest)
    with pytest.raises(NotAPublishError, match="not written by the earlier publish, and the new one writes"):
        publish_run(demo_run, dest, samples_per_shard=64, progress=False, overwrite=True)
    assert fs_state(dest) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_a_replacement_killed_midway_loses_nothing(published, demo_run, tmp_path, quick_card, monkeypatch):
    """Killed between moving the earlier publish aside and renaming the new one in: the next publish puts the
    earlier one back first. Killed before the earlier one was removed: the next publish removes its files
    only, never a user's."""
    dest = tmp_path / "demo-faces"  # the name is part of the fingerprint
    shutil.copytree(published[0], dest)
    (dest / "notes.txt").write_text("mine")
    aside = tmp_path / ".demo-faces.publish-old-0123abcd"
    dest.rename(aside)  # as if killed right after the first rename
    again = publish_run(demo_run, dest, samples_per_shard=PER_SHARD, embeddings=True, progress=False)
    assert again["status"] == "unchanged" and (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-faces"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:  # killed after the swap, before the earlier publish was removed
        mp.setattr(publish, "_remove_publish", killed)
        with pytest.raises(KeyboardInterrupt):
            publish_run(demo_run, dest, samples_per_shard=16, progress=False, overwrite=True)
    (left,) = [p for p in tmp_path.iterdir() if p.name != "demo-faces"]
    assert left.name.startswith(".demo-faces.publish-old-") and (left / "manifest.json").exists()
    (left / "stranger.txt").write_text("someone's")  # not the publish's, not in DEST: must stay
    assert publish_run(demo_run, dest, samples_per_shard=16, progress=False)["status"] == "unchanged"
    assert (dest / "notes.txt").read_text() == "mine"
    assert [p.relative_to(left).as_posix() for p in left.rglob("*")] == ["stranger.txt"]


def test_unfinished_shard_is_named_or_skipped(demo_run, tmp_path, quick_card):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "captions" / "00001.stats.json").unlink()
    with pytest.raises(UserError) as err:
        publish_run(run, tmp_path / "out", progress=False)
    message = str(err.value)
    assert str(run / "captions" / "00001.stats.json") in message and "--skip-partial" in message
    assert "\n" not in message and not (tmp_path / "out").exists()

    manifest = publish_run(run, tmp_path / "out", skip_partial=True, progress=False)
    expected = run_records(run, skip=("00001",))
    assert manifest["skipped_shards"] == [{"shard": "00001", "missing": "captions/00001.stats.json"}]
    assert manifest["n_samples"] == len(expected) < 38
    keys = []
    for path in sorted((tmp_path / "out" / "data").glob("*.parquet")):
        keys += pq.read_table(path, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(expected)

    with pytest.raises(UserError, match="not a run directory"):
        publish_run(tmp_path / "out", tmp_path / "out2", progress=False)
    with pytest.raises(UserError, match="outside the run directory"):
        publish_run(run, run / "published", progress=False)


def test_crops_give_the_primary_face(demo_run, tmp_path, quick_card):
    import webdataset as wds

    expected = run_records(demo_run)
    manifest = publish_run(demo_run, tmp_path / "crops", crops=True, samples_per_shard=64, progress=False)
    assert manifest["crops"]["enabled"] and manifest["crops"]["scale"] == publish.CROP_SCALE
    tars = sorted(str(p) for p in (tmp_path / "crops" / "webdataset").glob("*.tar"))
    whole_images = {}  # crops change only the tars: the parquet keeps the whole image
    for path in (tmp_path / "crops" / "data").glob("*.parquet"):
        rows = pq.read_table(path, columns=["key", "image"]).to_pylist()
        whole_images.update((r["key"], r["image"]["bytes"]) for r in rows)
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        n += 1
        rec = expected[sample["__key__"]]
        meta = json.loads(sample["json"])
        bbox = rec["faces"][rec["primary_face"]]["bbox"]
        box = crop_box(bbox, rec["width"], rec["height"])
        assert meta["crop_box"] == list(box) and meta["crop_face"] == rec["primary_face"]
        x1, y1, x2, y2 = box
        assert x1 <= bbox[0] and y1 <= bbox[1] and x2 >= bbox[2] and y2 >= bbox[3]  # the whole face
        side = 1.5 * max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        assert max(x2 - x1, y2 - y1) <= round(side) + 1
        if x1 > 0 and y1 > 0 and x2 < rec["width"] and y2 < rec["height"]:
            assert x2 - x1 == y2 - y1  # square unless clipped by the image border
        crop = Image.open(io.BytesIO(sample["jpg"]))
        assert crop.format == "JPEG" and crop.size == (x2 - x1, y2 - y1)
        full = decode_rgb(whole_images[rec["key"]], 10**9)
        assert full.size == (rec["width"], rec["height"])
        diff = np.abs(np.asarray(full.crop(box), np.int16) - np.asarray(crop.convert("RGB"), np.int16))
        assert diff.mean() < 4  # the same pixels, re-encoded
    assert n == 38



@pytest.mark.parametrize("url, expected", [
    ("https://example.org/a.jpg", "https://example.org/a.jpg"),  # no userinfo: unchanged
    ("https://alice:s3cret@example.org/a.jpg", "https://example.org/a.jpg"),
    ("https://alice@example.org/a.jpg", "https://example.org/a.jpg"),  # a user only
    ("http://alice:pw@example.org:8080/a.jpg", "http://example.org:8080/a.jpg"),  # the port stays
    ("http://u:p@[2001:db8::1]:8443/x.png", "http://[2001:db8::1]:8443/x.png"),  # IPv6 keeps its brackets
    ("http://[2001:db8::1]/x.png", "http://[2001:db8::1]/x.png"),
    ("https://u:p@host/a.jpg?sig=abc&by=me@x.org#frag", "https://host/a.jpg?sig=abc&by=me@x.org#frag"),
    ("https://host/people/@alice/a.jpg?q=1", "https://host/people/@alice/a.jpg?q=1"),  # '@' in the path
    ("https://u:p@ss@host/a.jpg", "https://host/a.jpg"),  # an unescaped '@' in the password
    ("https://u:p%40ss@host/a%20b.jpg?x=%2F", "https://host/a%20b.jpg?x=%2F"),  # escapes kept as they were
    ("HTTPS://U:P@Host.Example/A.jpg", "HTTPS://Host.Example/A.jpg"),  # case kept
    ("https://@host/a.jpg", "https://host/a.jpg"),  # empty userinfo
    ("//u:p@host/a.jpg", "//host/a.jpg"),  # scheme-relative
    ("http://u:p@[::1/a.jpg", "http://[::1/a.jpg"),  # unparseable (unclosed bracket): still stripped
    ("mailto:alice@example.org", "mailto:alice@example.org"),  # no authority, no userinfo
    ("/data/img@2x.jpg", "/data/img@2x.jpg"),
    ("", ""),
    (None, None),
])
def test_strip_userinfo(url, expected):
    assert strip_userinfo(url) == expected


def test_urls_are_published_without_credentials(demo_run, tmp_path, quick_card):
    """Issue 15: URLs with user:password@ were published verbatim. Parquet, webdataset JSON, the manifest's
    config and its count (which the card states) all go without them; the rest of each URL is kept."""
    import webdataset as wds
    import pyarrow as pa
    import yaml

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "fingerprints.json").unlink(missing_ok=True)  # the run's records are edited below, on purpose
    path = run / "captions" / "00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    secret = {}
    for i, row in enumerate(r for r in rows if r["status"] == "ok"):
        if i < 3:
            parts = row["url"].split("://", 1)
            row["url"] = f"{parts[0]}://user{i}:pa55word{i}@{parts[1]}?token=ok&by=a@b"
            secret[row["key"]] = row["url"]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["input"]["path"] = "https://reader:hunter2@data.example.org:8443/corpus.parquet?v=2"
    (run / "config.yaml").write_text(yaml.safe_dump(config))

    dest = tmp_path / "out"
    manifest = publish_run(run, dest, samples_per_shard=64, progress=False)
    assert manifest["url_credentials_stripped"] == 3
    assert manifest["config"]["input"]["path"] == "https://data.example.org:8443/corpus.parquet?v=2"
    parquet = {r["key"]: r for p in sorted((dest / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()}
    tars = sorted(str(p) for p in (dest / "webdataset").glob("*.tar"))
    webdataset = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(tars, shardshuffle=False)}
    assert len(parquet) == len(webdataset) == 38
    for key, url in secret.items():
        clean = strip_userinfo(url)
        assert "pa55word" not in clean and clean.endswith("?token=ok&by=a@b")
        for row in (parquet[key], webdataset[key]):
            assert row["url"] == row["source_url"] == clean
    for key, row in parquet.items():
        if key not in secret:
            assert row["url"] == run_records(demo_run)[key]["url"]  # the others unchanged
    published_bytes = b"".join(p.read_bytes() for p in dest.rglob("*") if p.is_file())
    assert b"pa55word" not in published_bytes and b"hunter2" not in published_bytes


def test_dry_run_writes_nothing(demo_run, tmp_path, quick_card, capsys):
    """Issue 15: `publish --dry-run` wrote the staging folder RUN-published. Now a dry run builds the dataset in
    a temporary folder and removes it: a folder destination, the staging folder and the run stay as they were."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    before = fs_state(tmp_path)
    folder = publish.publish(run, str(tmp_path / "new" / "out"), dry_run=True, progress=False)
    assert folder["manifest"]["status"] == "dry run" and folder["manifest"]["n_samples"] == 38
    hub = publish.publish(run, repo="someone/faces", dry_run=True, progress=False)
    assert hub["manifest"]["status"] == "dry run" and hub["upload"]["files"] == len(hub["manifest"]["files"]) + 1
    assert hub["upload"]["plan"]["folder"] == str(tmp_path / "run-published")
    assert "upload plan: " + str(tmp_path / "run-published") in capsys.readouterr().out
    assert fs_state(tmp_path) == before

    # A staging folder that already holds this publish is planned from as it is, untouched.
    staging = publish.staging_dir(run)
    publish_run(run, staging, name="someone/faces", progress=False)
    before = fs_state(tmp_path)
    again = publish.publish(run, repo="someone/faces", dry_run=True, progress=False)
    assert again["manifest"]["status"] == "unchanged" and again["upload"]["files"] == hub["upload"]["files"]
    assert fs_state(tmp_path) == before

    # A file the staging folder holds besides the publish stays there, so it goes up too: the plan says so.
    (staging / "notes.txt").write_text("mine")
    before = fs_state(tmp_path)
    capsys.readouterr()
    other = publish.publish(run, repo="someone/faces", dry_run=True, progress=False, samples_per_shard=8)
    assert other["manifest"]["status"] == "dry run"
    assert other["upload"]["files"] == len(other["manifest"]["files"]) + 2  # + manifest.json, notes.txt
    assert " notes.txt\n" in capsys.readouterr().out
    assert fs_state(tmp_path) == before


def test_licence_column_of_the_input_is_published():
    record = {"key": "000000007", "url": "https://example.org/a.jpg", "caption": "a face", "face_caption": "x",
              "width": 10, "height": 10, "n_faces": 0, "faces": [], "identity_id": None, "sha256": "ab",
              "licence": "CC-BY-4.0"}
    row = publish.sample_row(record, "train", b"image")
    assert row["license"] == "CC-BY-4.0" and row["source_url"] == record["url"]
    assert row["source_sha256"] == "ab" and row["sha256"] == hashlib.sha256(b"image").hexdigest()
    assert publish.sample_row({**record, "licence": None}, "train")["license"] is None
    row = publish.sample_row({**record, "url": "https://me:pw@example.org:81/a.jpg?x=1"}, "train")
    assert row["url"] == row["source_url"] == "https://example.org:81/a.jpg?x=1"


def test_cli_publishes_to_a_folder_and_plans_a_hub_upload(demo_run, tmp_path, cli_env):
    """`facedata publish`: a folder, then the same run planned for the Hub without a token or a
    network call (the Hub itself is unreachable here; the upload call is tested in test_hub.py)."""
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    env = {**cli_env, "HF_TOKEN": ""}
    dest = tmp_path / "out"
    proc = subprocess.run(facedata_cmd("publish", str(run), "--to", str(dest), "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n = json.loads((dest / "manifest.json").read_text())["n_samples"]
    assert f"{n} samples" in proc.stdout and "written" in proc.stdout
    before = fs_state(tmp_path)
    proc = subprocess.run(facedata_cmd("publish", str(run), "--repo", "someone/faces", "--dry-run", "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data/train-00000-of-00001.parquet" in proc.stdout
    assert "1. create_repo: dataset repo someone/faces" in proc.stdout and "2. upload_folder: " in proc.stdout
    assert f"not written (dry run), would go to: {tmp_path / 'run-published'}" in proc.stdout
    assert fs_state(tmp_path) == before  # issue 15: no staging folder, no temp folder, the run untouched

    photos = user_photos(tmp_path / "photos")
    before = fs_state(photos)
    proc = subprocess.run(facedata_cmd("publish", str(run), "--to", str(photos), "--overwrite", "--no-progress"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"facedata: error: {photos} holds files but no manifest.json of a facedata publish")
    assert "nothing there was touched" in proc.stderr
    assert fs_state(photos) == before  # every user file still there, unchanged
    proc = subprocess.run(facedata_cmd("publish", str(run), "--to", "hf://models/a/b"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "hf://datasets/OWNER/NAME" in proc.stderr
