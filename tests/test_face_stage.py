"""The face stage on a real shard: real photos through the real download stage, the packaged models.

The shard holds openpeople portraits, insightface's group photo, scikit-image pictures without a
face, and awkward copies of one portrait: EXIF-rotated, grey, RGBA, 16-bit, tiny and huge.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import facedata_cmd, openpeople_photos, package_dir
from PIL import ExifTags, Image

from facedata.core import records
from facedata.core.config import config_from_dict
from facedata.faces.models import load_analyzer
from facedata.faces.step import FACE_COLUMNS, analyze_encoded, stage_analyzer
from facedata.ingest.reader import plan_shards
from facedata.report.summary import format_summary, write_run_report
from facedata.pipeline import run_shard
from facedata.core.run_layout import RunLayout

SKIMAGE = package_dir("skimage") / "data"
GROUP = package_dir("insightface") / "data" / "images" / "t1.jpg"  # 1280 x 886, a row of people
PHOTOS = {p.parent.parent.name + "_" + p.stem: p for p in openpeople_photos()}
BASE = {
    "input": {"path": "unused", "format": "folder"},
    "shards": {"samples_per_shard": 100},
    "image": {"min_side": 200},
}


def jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **params)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> image file; the names sort in the order the folder reader keys them."""
    root = tmp_path_factory.mktemp("corpus")
    with Image.open(PHOTOS["P001_studio_portrait"]) as im:
        portrait = im.convert("RGB").resize((1024, 1024), Image.Resampling.LANCZOS)
    with Image.open(PHOTOS["P002_amateur_selfie"]) as im:
        selfie = im.convert("RGB").resize((636, 948), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored turned a quarter left; shown upright
    grey = portrait.convert("L")
    files = {
        "a_portrait.jpg": jpeg(portrait),
        # The sensor's pixels lie on their side; the EXIF orientation puts them upright again.
        "b_rotated.jpg": jpeg(portrait.transpose(Image.Transpose.ROTATE_90), exif=exif),
        "c_grey.jpg": jpeg(grey),
        "d_sixteen_bit.png": png(Image.fromarray((np.asarray(grey, np.uint16) * 257))),
        "e_huge.jpg": jpeg(portrait.resize((6000, 6000), Image.Resampling.BILINEAR)),
        "f_selfie_rgba.png": png(selfie.convert("RGBA")),
        "g_group.jpg": GROUP.read_bytes(),
        "h_tiny.jpg": jpeg(portrait.resize((120, 120))),
        "i_coffee.png": (SKIMAGE / "coffee.png").read_bytes(),
        "j_chelsea.png": (SKIMAGE / "chelsea.png").read_bytes(),
        "k_astronaut.png": (SKIMAGE / "astronaut.png").read_bytes(),
    }
    with Image.open(PHOTOS["P003_studio_portrait"]) as im:
        files["l_other_person.jpg"] = jpeg(im.convert("RGB").resize((800, 800)))
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def downloaded(corpus, tmp_path_factory):
    """A run directory whose shard 00000 went through the real download stage."""
    run = tmp_path_factory.mktemp("downloaded")
    cfg = config_from_dict({**BASE, "input": {"path": str(corpus), "format": "folder"}})
    (plan,) = plan_shards(cfg.input, cfg.shards.samples_per_shard, run / "_plan")
    run_shard("download", plan, cfg, run, progress=False)
    return run


def run_faces(downloaded, run, *overrides: str):
    """Copy the download shard into `run`, run the face stage on it; (stats, rows by file stem, embeddings)."""
    if not (run / "shards").exists():
        shutil.copytree(downloaded / "shards", run / "shards")
    cfg = config_from_dict(BASE, overrides=list(overrides))
    stats = run_shard("faces", 0, cfg, run, progress=False)
    rows = pq.read_table(RunLayout(run).step_dir("faces") / "00000.parquet").to_pylist()
    by_name = {row["path"].rsplit("/", 1)[-1].split(".")[0]: row for row in rows}
    return stats, by_name, np.load(RunLayout(run).step_dir("faces") / "00000.embeddings.npy")


@pytest.fixture(scope="module")
def faced(downloaded, tmp_path_factory):
    run = tmp_path_factory.mktemp("faced")
    return (run, *run_faces(downloaded, run, "faces.save_crops=true"))


def primary(row) -> dict:
    return row["faces"][row["primary_face"]]


def embedding(row, embeddings) -> np.ndarray:
    return embeddings[primary(row)["embedding_index"]].astype(np.float32)


def test_every_record_comes_out_with_its_status(faced, downloaded):
    run, stats, rows, embeddings = faced
    source = pq.read_table(downloaded / "shards" / "00000.parquet")
    table = pq.read_table(RunLayout(run).step_dir("faces") / "00000.parquet")
    # Same rows in the same order, the download columns unchanged except status and error.
    assert table.column("key").to_pylist() == source.column("key").to_pylist()
    assert table.column_names == source.column_names + list(FACE_COLUMNS)
    for column in ("url", "caption", "path", "sha256", "width", "height", "ext"):
        assert table.column(column).to_pylist() == source.column(column).to_pylist()
    status = {name: row["status"] for name, row in rows.items()}
    assert status == {
        "a_portrait": "ok", "b_rotated": "ok", "c_grey": "ok", "d_sixteen_bit": "ok", "e_huge": "ok",
        "f_selfie_rgba": "ok", "g_group": "ok", "h_tiny": "too_small", "i_coffee": "no_face",
        "j_chelsea": "no_face", "k_astronaut": "ok", "l_other_person": "ok",
    }
    # A row the download stage dropped passes through untouched.
    tiny = rows["h_tiny"]
    assert tiny["face_status"] is None and tiny["faces"] is None and tiny["n_faces"] is None
    # A row the face stage dropped says why, in status, face_status and error.
    coffee = rows["i_coffee"]
    assert coffee["face_status"] == records.NO_FACE and coffee["n_faces"] == 0 and coffee["faces"] == []
    assert coffee["primary_face"] is None and "min_faces 1" in coffee["error"]
    assert stats["n_samples"] == 12 and stats["n_in"] == 11 and stats["n_ok"] == 9
    assert stats["status_counts"] == {"ok": 9, "no_face": 2, "too_small": 1}
    assert stats["step_status_counts"] == {"ok": 9, "no_face": 2}
    assert stats["models"]["detector"]["name"].startswith("SCRFD")
    assert stats["models"]["embedder"]["licence"] and stats["embedding_dim"] == 512
    assert json.loads((RunLayout(run).step_dir("faces") / "00000.stats.json").read_text()) == stats


def test_faces_and_embeddings(faced):
    run, stats, rows, embeddings = faced
    for name in ("a_portrait", "b_rotated", "c_grey", "d_sixteen_bit", "e_huge", "f_selfie_rgba", "l_other_person"):
        row = rows[name]
        assert row["n_faces"] == 1 and row["primary_face"] == 0 and row["faces"][0]["primary"], name
        assert row["face_detector"].startswith("SCRFD") and row["face_embedder"].startswith("ArcFace")
    group = rows["g_group"]
    assert group["n_faces"] >= 5 and group["n_faces"] == len(group["faces"])
    assert [f["primary"] for f in group["faces"]].count(True) == 1
    areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in (f["bbox"] for f in group["faces"])]
    assert group["primary_face"] == int(np.argmax(areas))

    # One embedding row per face of a kept image, numbered in record order then face order; unit norm.
    ordered = sorted(rows.values(), key=lambda r: r["key"])
    indices = [f["embedding_index"] for row in ordered if row["status"] == "ok" for f in row["faces"]]
    assert indices == list(range(len(embeddings))) and stats["n_embeddings"] == len(embeddings)
    assert stats["n_faces"] == len(embeddings) == sum(row["n_faces"] or 0 for row in rows.values())
    assert embeddings.dtype == np.float16 and embeddings.shape[1] == 512
    assert np.allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1, atol=2e-3)

    # Every copy of the portrait is the same person; another person is not.
    same = embedding(rows["a_portrait"], embeddings)
    for name in ("b_rotated", "c_grey", "d_sixteen_bit", "e_huge"):
        assert same @ embedding(rows[name], embeddings) > 0.8, name
    assert same @ embedding(rows["l_other_person"], embeddings) < 0.4


def test_boxes_are_in_the_stored_images_pixels(faced):
    _, _, rows, _ = faced
    portrait = np.array(primary(rows["a_portrait"])["bbox"])
    width, height = rows["a_portrait"]["width"], rows["a_portrait"]["height"]
    assert 0 <= portrait[0] < portrait[2] <= width and 0 <= portrait[1] < portrait[3] <= height
    assert portrait[2] - portrait[0] > 200  # a head-and-shoulders shot
    # The EXIF-rotated copy is stored upright (1024 x 1024): the same face, the same box.
    rotated = rows["b_rotated"]
    assert (rotated["width"], rotated["height"]) == (1024, 1024)
    assert np.abs(np.array(primary(rotated)["bbox"]) - portrait).max() < 12
    # The 6000 px copy was decoded at a fraction of its size; its box is still in its own pixels.
    huge = rows["e_huge"]
    assert (huge["width"], huge["height"]) == (6000, 6000)
    assert np.abs(np.array(primary(huge)["bbox"]) / (6000 / 1024) - portrait).max() < 12
    kps = np.array(primary(huge)["kps"]).reshape(5, 2) / (6000 / 1024)
    assert np.abs(kps - np.array(primary(rows["a_portrait"])["kps"]).reshape(5, 2)).max() < 8


def test_small_faces_of_a_huge_image_are_embedded_from_a_finer_decode():
    """The group photo upscaled to 6000 px: detection runs on a 1/8-scale decode where the faces
    are ~60 px, under the 112 px crop; their embeddings come from a finer decode and match those
    of the original photo analysed at full size (from the reduced decode alone: ~0.985 on average)."""
    cfg = config_from_dict(BASE).faces
    with Image.open(GROUP) as im:
        original = im.convert("RGB")
    reference = load_analyzer(cfg).analyze([np.asarray(original)])[0]
    big = original.resize((6000, 4153), Image.Resampling.BICUBIC)
    (found,) = analyze_encoded(stage_analyzer(cfg), [(jpeg(big), big.size)], cfg, 10**9)
    faces = found.faces
    assert len(faces) == len(reference) >= 5 and found.size == (6000, 4153) and found.status == "ok"
    sims = [a.embedding @ b.embedding for a, b in zip(reference, faces)]
    assert np.mean(sims) > 0.99 and min(sims) > 0.98
    for a, b in zip(reference, faces):
        assert np.abs(b.bbox * 1280 / 6000 - a.bbox).max() < 6


def test_crops_are_stored_per_face(faced):
    run, _, rows, _ = faced
    with tarfile.open(RunLayout(run).step_dir("faces") / "00000.crops.tar") as tar:
        names = sorted(tar.getnames())
        with Image.open(tar.extractfile(f"{rows['a_portrait']['key']}_0.jpg")) as crop:
            assert crop.size == (112, 112)
    expected = sorted(f"{row['key']}_{i}.jpg" for row in rows.values() for i in range(row["n_faces"] or 0))
    assert names == expected


@pytest.mark.parametrize(
    "override, expected",
    [
        # The portrait has one face, the group photo several, coffee none.
        ("faces.filter.min_faces=2", {"a_portrait": "too_few_faces", "g_group": "ok", "i_coffee": "no_face"}),
        ("faces.filter.max_faces=1", {"a_portrait": "ok", "g_group": "too_many_faces"}),
        ("faces.filter.min_faces=0", {"a_portrait": "ok", "i_coffee": "ok"}),
        ("faces.filter.min_score=0.99", {"a_portrait": "no_face", "g_group": "no_face"}),
        ("faces.filter.min_face_side=300", {"a_portrait": "ok", "e_huge": "ok", "k_astronaut": "face_too_small"}),
        ("faces.filter.min_area_ratio=0.1", {"a_portrait": "ok", "g_group": "face_ratio_too_small"}),
        ("faces.filter.max_abs_yaw=0", {"a_portrait": "face_pose", "i_coffee": "no_face"}),
    ],
)
def test_filter_thresholds(downloaded, tmp_path, override, expected):
    stats, rows, embeddings = run_faces(downloaded, tmp_path, override)
    assert {name: rows[name]["status"] for name in expected} == expected
    for name, status in expected.items():
        assert rows[name]["face_status"] == status
        if status != records.OK:
            assert rows[name]["error"], name
    # Only kept images' faces are embedded (here all of them are at least min_face_side).
    for row in rows.values():
        for face in row["faces"] or ():
            assert (face["embedding_index"] is not None) == (row["status"] == records.OK), row["path"]
    kept_faces = sum(row["n_faces"] for row in rows.values() if row["status"] == records.OK)
    assert stats["n_embeddings"] == len(embeddings) == kept_faces


def test_yunet_sface_backend(downloaded, tmp_path):
    """The commercially usable models: same records, 128-d embeddings, their licences recorded."""
    stats, rows, embeddings = run_faces(downloaded, tmp_path, "faces.backend=yunet_sface")
    assert embeddings.shape == (stats["n_embeddings"], 128) and stats["n_embeddings"] >= 10
    assert stats["models"]["detector"]["licence"] == "MIT" and stats["models"]["embedder"]["licence"] == "Apache-2.0"
    assert rows["a_portrait"]["status"] == "ok" and rows["i_coffee"]["status"] == "no_face"
    assert rows["a_portrait"]["face_embedder"].startswith("SFace")
    assert embedding(rows["a_portrait"], embeddings) @ embedding(rows["b_rotated"], embeddings) > 0.8


def test_resume_skips_done_shards_and_redoes_unfinished_ones(downloaded, tmp_path):
    run_faces(downloaded, tmp_path)
    out = RunLayout(tmp_path).step_dir("faces")
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    first = (out / "00000.parquet").read_bytes()

    run_faces(downloaded, tmp_path)  # done: skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == done

    # Killed mid-way: no stats file, a half-written parquet, a temp file left behind.
    (out / "00000.stats.json").unlink()
    (out / "00000.parquet").write_bytes(first[: len(first) // 2])
    (out / ".00000.embeddings.npy.abc123.tmp").write_bytes(b"partial")
    stats, rows, embeddings = run_faces(downloaded, tmp_path)
    assert (out / "00000.stats.json").exists() and stats["n_ok"] == 9
    assert sorted(p.name for p in out.iterdir()) == ["00000.embeddings.npy", "00000.parquet", "00000.stats.json"]
    assert pq.read_table(out / "00000.parquet").equals(pq.read_table(io.BytesIO(first)))


def test_needs_a_finished_download_shard(tmp_path):
    with pytest.raises(RuntimeError, match="00003 is not finished"):
        run_shard("faces", 3, config_from_dict(BASE), tmp_path, progress=False)


def test_run_report_funnel_and_contact_sheet(faced):
    run = faced[0]
    summary = write_run_report(run, faces=True, max_sheet_items=12)
    assert summary["n_samples"] == 12 and summary["n_ok"] == 9
    assert summary["status_counts"] == {"ok": 9, "no_face": 2, "too_small": 1}
    stages = {step["stage"]: step for step in summary["funnel"]}
    assert stages["input"]["kept"] == 12
    assert stages["download"]["kept"] == 11 and stages["download"]["dropped_by_status"] == {"too_small": 1}
    assert stages["faces"]["kept"] == 9 and stages["faces"]["dropped_by_status"] == {"no_face": 2}
    assert stages["faces"]["n_faces"] == faced[1]["n_faces"] and stages["faces"]["n_embeddings"] == len(faced[3])
    assert summary["models"]["detector"]["licence"] == faced[1]["models"]["detector"]["licence"]
    assert json.loads((run / "summary.json").read_text())["funnel"] == summary["funnel"]
    text = format_summary(summary)
    assert "no_face" in text and "too_small" in text and "SCRFD" in text
    # The sheet shows the 9 kept images, primary faces boxed in green.
    with Image.open(run / "contact_sheet.png") as sheet:
        pixels = np.asarray(sheet.convert("RGB")).reshape(-1, 3).astype(int)
    assert np.any((pixels[:, 1] > 200) & (pixels[:, 0] < 30) & (pixels[:, 2] < 120))


def test_detect_command(corpus, tmp_path, cli_env):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((corpus / "a_portrait.jpg").read_bytes()[:3000])
    paths = [corpus / "b_rotated.jpg", tmp_path / "missing.jpg", broken, corpus / "i_coffee.png",
             corpus / "g_group.jpg"]
    proc = subprocess.run(facedata_cmd("detect", *map(str, paths)), env=cli_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["path"] for o in out] == list(map(str, paths))
    rotated, missing, truncated, coffee, group = out
    assert (rotated["width"], rotated["height"]) == (1024, 1024) and len(rotated["faces"]) == 1
    face = rotated["faces"][0]
    assert len(face["bbox"]) == 4 and len(face["kps"]) == 5 and set(face["pose"]) == {"yaw", "pitch", "roll"}
    assert 0.6 <= face["score"] <= 1
    assert "No such file" in missing["error"] and "faces" not in missing
    assert truncated["error"].startswith("decode_error")
    assert coffee["faces"] == [] and len(group["faces"]) >= 5

    as_json = subprocess.run(facedata_cmd("detect", "--format", "json", str(paths[0])), env=cli_env,
                             capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout) == [rotated]

    nothing = subprocess.run(facedata_cmd("detect", str(paths[1]), str(broken)), env=cli_env,
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and len(nothing.stdout.splitlines()) == 2
