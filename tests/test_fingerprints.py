"""Step fingerprints: a rerun redoes exactly the steps whose settings changed and the ones after them,
and a run directory never holds outputs made under settings other than the ones it records."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, openpeople_photos
from facedata.core.config import config_from_dict
from facedata.core.fingerprints import Fingerprint, StaleRunError, check_current, step_fingerprints
from facedata.core.run_layout import RunLayout

STEPS = ("download", "faces", "identity", "captions")
# Model infos as the loaders report them: the fingerprints take them as data.
MODELS = {"detector": {"name": "det", "version": "1"}, "embedder": {"name": "emb", "version": "1"},
          "attributes": {"Parsing": {"name": "parser", "version": "1"}}}


def test_fingerprints_chain_and_name_what_changed():
    base = config_from_dict({"input": {"path": "x.parquet"}})
    before = step_fingerprints(base, MODELS)
    assert list(before) == list(STEPS)
    # Speed-only options change nothing.
    faster = config_from_dict({"input": {"path": "x.parquet"}, "download": {"concurrency": 3},
                               "faces": {"batch_size": 2}, "attributes": {"batch_size": 4, "threads": 2},
                               "runner": {"max_workers": 7}})
    assert {s: f.digest for s, f in step_fingerprints(faster, MODELS).items()} == {s: f.digest for s, f in before.items()}

    stricter = config_from_dict({"input": {"path": "x.parquet"}, "faces": {"filter": {"min_score": 0.8}}})
    after = step_fingerprints(stricter, MODELS)
    assert after["download"].digest == before["download"].digest
    assert all(after[s].digest != before[s].digest for s in ("faces", "identity", "captions"))
    assert after["faces"].why_stale(before["faces"].as_dict()) == "settings changed (faces.filter.min_score 0.6 -> 0.8)"
    assert after["identity"].why_stale(before["identity"].as_dict()) == "faces changed"
    assert after["faces"].why_stale(after["faces"].as_dict()) is None
    assert after["faces"].why_stale(None) == "made before fingerprints were recorded"

    # A new model version is a change of the steps that run it.
    newer = {**MODELS, "embedder": {"name": "emb", "version": "2"}}
    assert step_fingerprints(base, newer)["faces"].why_stale(before["faces"].as_dict()) == \
        "settings changed (models.embedder emb 1 -> emb 2)"
    # Steps switched off leave the list.
    assert list(step_fingerprints(config_from_dict({"input": {"path": "x"}, "identity": {"enabled": False}}),
                                  MODELS)) == ["download", "faces", "captions"]


def _stamps(run: Path) -> dict[str, dict]:
    layout = RunLayout(run)
    out = {step: {p.name: p.stat().st_mtime_ns for p in layout.step_dir(step).glob("*.stats.json")}
           for step in ("download", "faces", "captions")}
    out["identity"] = {"identity.json": layout.identity_report.stat().st_mtime_ns}
    return out


def _redone(before: dict, after: dict) -> set[str]:
    return {step for step in STEPS if before[step] != after[step]}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A small real run (2 people x 3 photos in 2 shards, folder input), made in this process."""
    from facedata.pipeline import curate

    root = tmp_path_factory.mktemp("fingerprints")
    photos = root / "photos"
    photos.mkdir()
    people = sorted({p.parents[1].name for p in openpeople_photos()})[:2]
    for path in [p for p in openpeople_photos() if p.parents[1].name in people and p.stem != "amateur_posture"]:
        target = photos / f"{path.parents[1].name}_{path.name}"
        shutil.copy(path, target)
        target.with_suffix(".txt").write_text(f"a photo, {path.stem.replace('_', ' ')}")
    data = {"input": {"path": str(photos), "format": "folder"}, "shards": {"samples_per_shard": 3},
            "identity": {"drop_outliers": False}, "output": {"contact_sheet": False}}
    run = root / "run"
    curate(data, run)
    return data, run


def _rerun(base_run, tmp_path, **sections) -> tuple[Path, set[str], dict]:
    from facedata.pipeline import curate

    data, run = base_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = _stamps(copy)
    changed = json.loads(json.dumps(data))
    for section, values in sections.items():
        for key, value in values.items():
            node = changed.setdefault(section, {})
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    summary = curate(changed, copy)
    return copy, _redone(before, _stamps(copy)), summary


def _records(run: Path, step: str) -> list[dict]:
    return [r for p in sorted(RunLayout(run).step_dir(step).glob("0*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_unchanged_rerun_redoes_nothing(base_run, tmp_path, caplog):
    caplog.set_level("INFO", logger="facedata")
    run, redone, _ = _rerun(base_run, tmp_path)
    assert redone == set()
    lines = [r.getMessage() for r in caplog.records if r.name == "facedata.pipeline"]
    assert lines == ["download: 2 reused", "faces: 2 reused", "identity: reused", "captions: 2 reused"]


def test_caption_settings_redo_captions_only_and_the_card_states_them(base_run, tmp_path, caplog):
    from facedata.publish.writer import publish

    caplog.set_level("INFO", logger="facedata")
    run, redone, _ = _rerun(base_run, tmp_path, attributes={"include": ["gender"], "thresholds": {"gender": 0.99}})
    assert redone == {"captions"}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("captions:"))
    assert line.startswith("captions: settings changed (attributes.include null -> [\"gender\"], "
                           "attributes.thresholds.gender unset -> 0.99, ") and line.endswith("more), redoing 2 shards")
    faces = [f for r in _records(run, "captions") for f in (r["face_attributes"] or [])]
    assert faces
    for face in faces:
        stated = {k for k, v in face["values"].items() if v is not None}
        assert stated <= {"gender"}
        assert all(face["confidences"][k] >= 0.99 for k in stated)
    card = (Path(publish(run, tmp_path / "dataset", progress=False)["destination"]) / "README.md").read_text()
    # The card states the thresholds that were applied: gender's own, every other attribute unstated.
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ")}
    assert "0.99 (set by the config)" in rows["gender"] and "gender 0.99" in card
    assert all("not stated" in rows[name] for name in ("age", "hair_color", "expression"))


def test_identity_settings_redo_identity_and_captions(base_run, tmp_path):
    run, redone, _ = _rerun(base_run, tmp_path, identity={"threshold": 0.9})
    assert redone == {"identity", "captions"}
    assert json.loads(RunLayout(run).identity_report.read_text())["config"]["threshold"] == 0.9


def test_face_settings_redo_faces_and_after(base_run, tmp_path):
    run, redone, _ = _rerun(base_run, tmp_path, faces={"filter.min_score": 0.8})
    assert redone == {"faces", "identity", "captions"}
    scores = [f["score"] for r in _records(run, "faces") for f in (r["faces"] or [])]
    assert scores and min(scores) >= 0.8


def test_image_settings_redo_everything(base_run, tmp_path):
    # A shorter-side limit between the photos' own sizes, so that some are now too small.
    sides = sorted(min(r["orig_width"], r["orig_height"]) for r in _records(base_run[1], "download"))
    limit = sides[len(sides) // 2] + 1
    assert limit <= sides[-1]
    run, redone, summary = _rerun(base_run, tmp_path, image={"min_side": limit})
    assert redone == set(STEPS)
    rows = _records(run, "download")
    assert [r["status"] == "too_small" for r in rows] == [min(r["orig_width"], r["orig_height"]) < limit for r in rows]


def test_a_run_stopped_after_a_settings_change_cannot_be_published(base_run, tmp_path):
    """The new config is recorded before any step redoes its outputs: until they are redone, the run
    reads as stale, and publishing it (whose card would state the new settings) is refused."""
    from facedata.core.fingerprints import model_infos
    from facedata.pipeline import begin_run
    from facedata.publish.writer import publish

    data, run = base_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    layout = RunLayout(copy)
    check_current(layout)
    changed = config_from_dict({**data, "attributes": {"min_confidence": 0.95}})
    begin_run(layout, changed.model_dump(mode="json"), step_fingerprints(changed, model_infos(changed)), [0, 1])
    with pytest.raises(StaleRunError, match=r"captions: settings changed \(attributes.min_confidence 0.85 -> 0.95"):
        publish(copy, tmp_path / "dataset", progress=False)
    assert not (tmp_path / "dataset").exists()


def test_dry_run_prints_what_would_be_redone(base_run, tmp_path):
    data, run = base_run
    config = tmp_path / "run.yaml"
    import yaml

    config.write_text(yaml.safe_dump(data))
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "facedata"), "run", str(config), "--output", str(run),
                           "--dry-run", "--set", "identity.k=8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:4] == [
        "download: 2 reused", "faces: 2 reused", "identity: settings changed (identity.k 32 -> 8), redoing",
        "captions: identity changed, redoing 2 shards"]


def test_fingerprint_round_trips_through_its_dict():
    fp = step_fingerprints(config_from_dict({"input": {"path": "x"}}), MODELS)["captions"]
    assert Fingerprint(**fp.as_dict()) == fp


def test_python_api_opens_a_run(base_run):
    import facedata

    data, run = base_run
    table = facedata.open_run(run)
    assert table.num_rows == 6 and set(table.column("step").to_pylist()) == {"captions"}
    assert sorted(table.column("key").to_pylist()) == sorted(_records(run, "download")[i]["key"] for i in range(6))
    assert "face_caption" in table.column_names and "identity_id" in table.column_names


USER_STEP = '''
from pydantic import BaseModel

from facedata.core.step import Filter


class CaptionWords(Filter):
    name = "caption_words"
    reasons = {"banned_word": "the web caption holds a word of caption_words.words"}

    class Options(BaseModel):
        words: list[str] = []

    def keep(self, sample):
        return not set((sample["caption"] or "").lower().split()) & set(self.options.words) or "banned_word"
'''


def test_a_user_step_appended_runs_alone_and_ends_the_run(base_run, tmp_path):
    """A user's filter after the caption step: only it runs (the steps before keep their
    fingerprints), its drops reach the final records, the funnel and the dataset card."""
    from facedata.publish.writer import publish

    (tmp_path / "my_steps.py").write_text(USER_STEP)
    step = {"step": f"{tmp_path / 'my_steps.py'}:CaptionWords", "options": {"words": ["selfie"]}}
    run, redone, summary = _rerun(base_run, tmp_path)  # a fresh copy, nothing redone
    assert redone == set()
    data = {**base_run[0], "steps": ["download", "faces", "identity", "captions", step]}
    import facedata

    before = _stamps(run)
    summary = facedata.curate(data, run)
    assert _redone(before, _stamps(run)) == set()
    table = facedata.open_run(run)
    assert set(table.column("step").to_pylist()) == {"caption_words"}
    selfies = {r["key"] for r in table.to_pylist() if "selfie" in r["caption"]}
    assert selfies and {r["key"] for r in table.to_pylist() if r["status"] == "banned_word"} == selfies
    assert summary["funnel"][-1]["stage"] == "caption_words"
    assert summary["funnel"][-1]["dropped_by_status"] == {"banned_word": len(selfies)}
    assert summary["n_ok"] == 6 - len(selfies)
    card = (Path(publish(run, tmp_path / "dataset", progress=False)["destination"]) / "README.md").read_text()
    assert "`banned_word`" in card and "a word of caption_words.words" in card
    published = [r["key"] for p in (tmp_path / "dataset" / "data").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert sorted(published) == sorted(set(table.column("key").to_pylist()) - selfies)

    # Its options are part of its fingerprint: a new word list redoes it alone.
    step["options"]["words"] = ["portrait"]
    before = _stamps(run)
    facedata.curate(data, run)
    assert _redone(before, _stamps(run)) == set()
    assert len(list((run / "caption_words").glob("*.stats.json"))) == 2
    assert {r["status"] for r in facedata.open_run(run).to_pylist() if "portrait" in r["caption"]} == {"banned_word"}


@pytest.mark.parametrize("steps, message", [
    (["download", "faces", "captions"], "expected the built-in steps download, faces, identity, captions once each"),
    (["faces", "download", "identity", "captions"], "expected the built-in steps"),
    (["download", "faces", "identity", "captions", "nowhere_module:Step"], "cannot import nowhere_module"),
    (["download", "faces", "identity", "captions", "facedata.core.step:Filter"], "has no `name`"),
    (["download", "faces", "identity", "captions", "facedata.core.config:Config"], "is not a facedata.core.step.ShardStep"),
])
def test_bad_steps_are_one_line_config_errors(steps, message):
    from facedata.core.config import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        config_from_dict({"input": {"path": "x.parquet"}, "steps": steps})
    assert "\n" not in str(err.value) and str(err.value).startswith("<config>: steps")


def test_bad_user_step_options_are_one_line(tmp_path):
    from facedata.core.config import ConfigError

    (tmp_path / "my_steps.py").write_text(USER_STEP)
    step = {"step": f"{tmp_path / 'my_steps.py'}:CaptionWords", "options": {"words": "x", "other": 1}}
    with pytest.raises(ConfigError, match=r"step caption_words \(.*\): options.words: expected a valid list$"):
        config_from_dict({"input": {"path": "x"}, "steps": ["download", "faces", "identity", "captions", step]})


def test_a_filter_before_download_fetches_nothing_for_the_rows_it_drops(base_run, tmp_path):
    """A filter on the input rows alone, placed before download: the rows it drops are never
    fetched, keep its reason, and the funnel shows it between the input and the download."""
    import facedata

    (tmp_path / "my_steps.py").write_text(USER_STEP)
    step = {"step": f"{tmp_path / 'my_steps.py'}:CaptionWords", "options": {"words": ["selfie"]}}
    run = tmp_path / "run"
    summary = facedata.curate({**base_run[0], "steps": [step, "download", "faces", "identity", "captions"]}, run)
    downloaded = _records(run, "download")
    selfies = {r["key"] for r in downloaded if "selfie" in r["caption"]}
    assert selfies and len(downloaded) == 6
    for r in downloaded:
        if r["key"] in selfies:
            assert r["status"] == "banned_word" and r["bytes_downloaded"] is None and r["sha256"] is None
        else:
            assert r["status"] == "ok" and r["bytes_downloaded"] > 0
    stats = [json.loads(p.read_text()) for p in sorted((run / "shards").glob("*.stats.json"))]
    assert sum(s["n_in"] for s in stats) == 6 - len(selfies)
    stages = [row["stage"] for row in summary["funnel"]]
    assert stages[:3] == ["input", "caption_words", "download"]
    assert summary["funnel"][1]["dropped_by_status"] == {"banned_word": len(selfies)}
    assert summary["funnel"][2]["kept"] == 6 - len(selfies) and summary["funnel"][2]["dropped"] == 0
    assert {r["status"] for r in facedata.open_run(run).to_pylist() if r["key"] in selfies} == {"banned_word"}


def test_a_step_that_needs_images_cannot_come_before_download(tmp_path):
    from facedata.core.config import ConfigError

    (tmp_path / "image_step.py").write_text(
        "from facedata.core.step import ShardStep\n\n\nclass Sizes(ShardStep):\n    name = 'sizes'\n    needs_images = True\n")
    with pytest.raises(ConfigError, match="it needs images, so it must come after download$"):
        config_from_dict({"input": {"path": "x"}, "steps": [f"{tmp_path / 'image_step.py'}:Sizes", "download", "faces",
                                                            "identity", "captions"]})


def test_the_shipped_filters_run_as_the_readme_names_them(base_run, tmp_path):
    """The README's `steps` example with the shipped filters: text filters before download (a French
    caption is dropped and never fetched), the NSFW classifier after it (no people photo is unsafe);
    each records its verdict column, and the classifier its model, in its stats."""
    import facedata

    photos = tmp_path / "photos"
    shutil.copytree(base_run[0]["input"]["path"], photos)
    texts = sorted(photos.glob("*.txt"))
    for i, text in enumerate(texts):
        text.write_text(f"A portrait photograph of a person looking at the camera, picture number {i} of the series.")
    texts[0].write_text("Une photographie d'une personne qui regarde l'appareil devant un mur blanc.")
    french = texts[0].stem
    steps = [{"step": "facedata.filters.caption_language:CaptionLanguage", "options": {"keep_languages": ["en"]}},
             {"step": "facedata.filters.caption_text:CaptionText"},
             "download",
             {"step": "facedata.filters.nsfw:UnsafeImages", "options": {"max_score": 0.5}},
             "faces", "identity", "captions"]
    data = {**base_run[0], "input": {"path": str(photos), "format": "folder"}, "steps": steps}
    summary = facedata.curate(data, tmp_path / "run")
    stages = [row["stage"] for row in summary["funnel"]]
    assert stages[:5] == ["input", "caption_language", "caption_text", "download", "nsfw"]
    assert summary["funnel"][1]["dropped_by_status"] == {"caption_language": 1}
    records = facedata.open_run(tmp_path / "run").to_pylist()
    dropped = [r for r in records if r["status"] == "caption_language"]
    assert len(dropped) == 1 and french in dropped[0]["path"] and dropped[0]["bytes_downloaded"] is None
    fetched = [r for r in records if r["bytes_downloaded"]]
    assert len(fetched) == 5 and all(r["caption_text_status"] == "ok" for r in fetched)
    assert all(r["nsfw_status"] == "ok" and 0 <= r["nsfw_score"] < 0.5 for r in fetched)
    stats = json.loads(next((tmp_path / "run" / "nsfw").glob("*.stats.json")).read_text())
    assert stats["models"] and all(m["licence"] for m in stats["models"].values())


def test_run_wide_duplicates_drop_copies_across_shards(base_run, tmp_path):
    """The phash step and the run-wide duplicates step named in `steps`: an exact copy and a
    re-encoded copy (in other shards than their originals) are dropped, each naming the image kept
    in its place; the originals and every other photo stay."""
    import io

    from PIL import Image

    import facedata

    photos = tmp_path / "photos"
    shutil.copytree(base_run[0]["input"]["path"], photos)
    originals = sorted(photos.glob("*.jpg"))[:2]
    shutil.copy(originals[0], photos / "zz_exact_copy.jpg")
    buffer = io.BytesIO()
    Image.open(originals[1]).save(buffer, "JPEG", quality=40)
    (photos / "zz_reencoded.jpg").write_bytes(buffer.getvalue())
    steps = ["download", {"step": "facedata.filters.perceptual_hash:PerceptualHash"},
             {"step": "facedata.filters.duplicates:Duplicates", "options": {"radius": 8}},
             "faces", "identity", "captions"]
    data = {**base_run[0], "input": {"path": str(photos), "format": "folder"}, "steps": steps}
    summary = facedata.curate(data, tmp_path / "run")
    records = {Path(r["path"]).name: r for r in facedata.open_run(tmp_path / "run").to_pylist()}
    assert len(records) == 8
    assert records["zz_exact_copy.jpg"]["status"] == "duplicate_exact"
    assert records["zz_reencoded.jpg"]["status"] == "duplicate_near"
    assert records["zz_exact_copy.jpg"]["duplicate_of"] == records[originals[0].name]["key"]
    assert records["zz_reencoded.jpg"]["duplicate_of"] == records[originals[1].name]["key"]
    assert {r["duplicates_status"] for name, r in records.items() if not name.startswith("zz_")} == {"ok"}
    row = next(r for r in summary["funnel"] if r["stage"] == "duplicates")
    assert row["dropped_by_status"] == {"duplicate_exact": 1, "duplicate_near": 1} and row["shards_done"] == 3
