"""The small real run that tests/test_explore.py browses (kept apart so a benchmark or a person can
build the same run by hand: `python -m tests.explore_fixture OUT`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests.conftest import openpeople_photos

# Captions with markup: the page must show them as text, never run them.
HOSTILE_CAPTION = 'smiling <script>window.__pwned = 1</script> "><img src=x onerror="window.__pwned = 2"> at the beach'

# A user's filter with two reasons of its own, one of them in the explore page's unsafe set: the
# funnel must list both without code changes, and never show the unsafe-flagged image.
SAFETY_STEP = '''
from facedata.core.step import Filter


class SafetyFlags(Filter):
    name = "safety"
    reasons = {"unsafe": "flagged unsafe (test marker in the caption)",
               "blurry_caption": "caption says blurry (test marker)"}

    def keep(self, sample):
        caption = sample.get("caption") or ""
        if "UNSAFE-MARK" in caption:
            return "unsafe"
        if "BLURRY-MARK" in caption:
            return "blurry_caption"
        return True
'''


def make_explore_run(root: Path) -> Path:
    """3 people x 3 photos plus a fourth person's photo in the opt-out gallery, folder input with
    caption sidecars (one hostile, one flagged unsafe, one flagged by the second reason), one shard
    of 4 samples so the grid pages and several shards exist. Returns the run directory."""
    from facedata.pipeline import curate

    photos = root / "photos"
    gallery = root / "optout"
    photos.mkdir(parents=True)
    gallery.mkdir()
    all_photos = openpeople_photos()
    people = sorted({p.parents[1].name for p in all_photos})
    chosen = [p for p in all_photos if p.parents[1].name in people[:3] and p.stem != "amateur_posture"]
    for i, path in enumerate(chosen):
        target = photos / f"{path.parents[1].name}_{path.name}"
        shutil.copy(path, target)
        words = path.stem.replace("_", " ")
        caption = {0: HOSTILE_CAPTION, 4: f"a {words} UNSAFE-MARK", 7: f"a {words} BLURRY-MARK"}.get(i, f"a {words} photo")
        target.with_suffix(".txt").write_text(caption)
    # The opted-out person: in the gallery, and one photo of them in the input (-> optout_match).
    optout_person = [p for p in all_photos if p.parents[1].name == people[3]]
    shutil.copy(optout_person[0], gallery / "person.jpg")
    shutil.copy(optout_person[1], photos / f"{people[3]}_{optout_person[1].name}")
    (photos / f"{people[3]}_{optout_person[1].name}").with_suffix(".txt").write_text("a portrait in a park")
    step_file = root / "safety_step.py"
    step_file.write_text(SAFETY_STEP)
    config = {
        "input": {"path": str(photos), "format": "folder"},
        "shards": {"samples_per_shard": 4},
        "steps": ["download", "faces", {"step": f"{step_file}:SafetyFlags"}, "identity", "captions"],
        "identity": {"drop_outliers": False, "optout_gallery": str(gallery)},
        "output": {"contact_sheet": False},
    }
    run = root / "run"
    curate(config, run)
    return run


if __name__ == "__main__":
    print(make_explore_run(Path(sys.argv[1])))
