"""The embedded demo: a small real web corpus on 127.0.0.1, curated end to end, offline.

The photos are real files that registry packages ship: openpeople's synthetic photoreal people
(MIT; portraits, selfies, full-body shots, emotion sheets) and scikit-image's sample images
(BSD/public domain; mostly without faces). The captions are written here from openpeople's own
metadata (age range, sex, hair) and from what the scikit-image pictures show, in the style of web
alt text: honest about the picture, never a name.

A few entries are broken on purpose, so the run shows how each failure is recorded: a 404, a slow
URL past the timeout, a truncated JPEG, an HTML page served as image/jpeg, an image too small for the
filter, a panorama past the aspect limit, an opted-out image (X-Robots-Tag: noai) and a repeated URL.
The face stage then keeps only pictures with a usable face: the scikit-image pictures without a
person end as no_face, the emotion sheets (sixteen faces) as too_many_faces, and a small snapshot
of a person far away as face_too_small. The identity stage then removes every photo of one person
who is in the demo's opt-out gallery (optout_match) and a smaller repost of a headshot
(near_duplicate).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facedata.core.config import load_config
from facedata.core.packages import package_dir
from facedata.demo.server import LoopbackServer

log = logging.getLogger(__name__)

# Whose photos the demo's opt-out gallery holds (openpeople's person id, never shown or logged).
OPTED_OUT_PERSON = "P009"
# The shipped configs: facedata/configs is a symlink to the top-level configs/ folder in a checkout,
# and a folder of the wheel (package data) in an installed copy.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
FLIP_CONFIG = CONFIGS / "flip_tiny.yaml"

# openpeople asset -> how a web page might describe it ({who} is filled from the person's metadata).
_PERSON_SHOTS = {
    "studio_portrait": "Studio headshot of {who} against a plain grey background",
    "amateur_selfie": "Casual selfie of {who}",
    "amateur_posture": "Snapshot of {who} standing outdoors",
    "studio_posture": "Full-length studio photo of {who}",
}
_EMOTION_SHEET = "Grid of sixteen close-ups of {who} showing different facial expressions"

# scikit-image sample -> (caption, expected status). astronaut and camera show a person; the rest
# show none, so the face stage drops them.
_SKIMAGE_PICTURES = {
    "astronaut.png": ("Official portrait of an astronaut in a spacesuit holding a helmet, flag behind", "ok"),
    "camera.png": ("Black and white photo of a photographer with a camera on a tripod", "ok"),
    "coffee.png": ("A cup of coffee with latte art on a saucer", "no_face"),
    "chelsea.png": ("A tabby cat looking to the side", "no_face"),
    "rocket.jpg": ("A rocket on the launch pad before lift-off", "no_face"),
    "coins.png": ("Greyscale photo of old coins on a table", "no_face"),
    "motorcycle_left.png": ("A motorcycle parked in a studio", "no_face"),
    "hubble_deep_field.jpg": ("Deep field image of distant galaxies", "no_face"),
}


@dataclass
class CorpusEntry:
    url_path: str  # path on the demo server, fault route included
    caption: str
    expect: str  # the status the demo expects, shown next to the result


def _describe_person(meta: dict) -> str:
    demo = meta["character_details"]["demographics"]
    noun = {"female": "a woman", "male": "a man"}.get(demo["sex"], "a person")
    return f"{noun} aged {demo['age_range']}"


def build_demo_corpus(web_root: Path) -> list[CorpusEntry]:
    """Copy the demo photos under `web_root` and list the corpus, broken entries included."""
    img_dir = web_root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries: list[CorpusEntry] = []

    people = sorted((package_dir("openpeople") / "data" / "curated").glob("P*"))
    for i, person_dir in enumerate(people):
        who = _describe_person(json.loads((person_dir / "metadata.json").read_text()))
        shots = dict(_PERSON_SHOTS)
        if i < 3:  # a few many-face images, over the demo's faces.filter.max_faces
            shots["emotions_sheet"] = _EMOTION_SHEET
        for shot, template in shots.items():
            name = f"{person_dir.name.lower()}_{shot}.jpg"
            shutil.copyfile(person_dir / "assets" / f"{shot}.jpg", img_dir / name)
            expect = "too_many_faces" if shot == "emotions_sheet" else "ok"
            if person_dir.name == OPTED_OUT_PERSON and shot != "emotions_sheet":
                expect = "optout_match"
            entries.append(CorpusEntry(f"img/{name}", template.format(who=who), expect))

    skimage_data = package_dir("skimage") / "data"
    for name, (caption, expect) in _SKIMAGE_PICTURES.items():
        shutil.copyfile(skimage_data / name, img_dir / name)
        entries.append(CorpusEntry(f"img/{name}", caption, expect))

    # Broken on purpose.
    portrait = "img/p001_studio_portrait.jpg"
    with Image.open(img_dir / "p002_studio_portrait.jpg") as im:
        im.convert("RGB").resize((120, 120)).save(img_dir / "thumbnail.jpg", quality=85)
        w, h = im.size
        im.convert("RGB").crop((0, h // 2 - h // 8, w, h // 2 + h // 8)).save(img_dir / "banner.jpg", quality=85)
    with Image.open(img_dir / "p005_amateur_posture.jpg") as im:
        # A person far away: 300 x 447 px, the face about 40 px, under min_face_side.
        im.convert("RGB").resize((300, 447), Image.Resampling.LANCZOS).save(img_dir / "far_away.jpg", quality=90)
    with Image.open(img_dir / "p006_studio_portrait.jpg") as im:
        # The same shot again, smaller and re-encoded: the identity stage keeps the larger one.
        im.convert("RGB").resize((700, 700), Image.Resampling.LANCZOS).save(img_dir / "repost.jpg", quality=80)
    (web_root / "article.html").write_text("<html><body><p>Not an image.</p></body></html>")
    entries += [
        CorpusEntry("status/404", "Photo that has since been deleted", "http_404"),
        CorpusEntry(f"slow/30/{portrait}", "Portrait on a very slow server", "timeout"),
        CorpusEntry("truncate/img/p003_studio_portrait.jpg", "Portrait whose download breaks off", "truncated"),
        CorpusEntry("as/image/jpeg/article.html", "Link that serves a web page instead of a photo", "not_image"),
        CorpusEntry("img/thumbnail.jpg", "Tiny thumbnail of a headshot", "too_small"),
        CorpusEntry("img/banner.jpg", "Wide banner cropped from a portrait", "bad_aspect"),
        CorpusEntry("img/far_away.jpg", "Small snapshot of a person far away", "face_too_small"),
        CorpusEntry("optout/noai/img/p004_studio_portrait.jpg", "Portrait whose site opts out of AI use", "opted_out"),
        CorpusEntry(portrait, "The same headshot linked a second time", "duplicate_url"),
        CorpusEntry("img/repost.jpg", "Smaller copy of a studio headshot reposted elsewhere", "near_duplicate"),
    ]
    return entries


def build_optout_gallery(folder: Path) -> Path:
    """One person asked to be left out: a photo of them that is not in the corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    person = package_dir("openpeople") / "data" / "curated" / OPTED_OUT_PERSON
    with Image.open(person / "assets" / "character_sheet.jpg") as im:
        # The sheet's front view (top left), cropped so the photo holds one face.
        im.convert("RGB").crop((30, 70, 560, 660)).save(folder / "request-0001.jpg", quality=90)
    return folder


def write_corpus(entries: list[CorpusEntry], server: LoopbackServer, path: Path) -> Path:
    table = pa.table({
        "url": [server.url(e.url_path) for e in entries],
        "caption": [e.caption for e in entries],
        "expected_status": [e.expect for e in entries],
    })
    pq.write_table(table, path)
    return path


def train_demo_model(dataset: Path, output: Path, progress: bool = True) -> dict:
    """Train the tiny FLIP model briefly on the published demo dataset, then evaluate it against the
    same architecture at random initialisation; returns the evaluation, written to OUTPUT/eval.json."""
    from facedata.flip.config import load_train_config
    from facedata.flip.evaluate import evaluate, format_eval_table
    from facedata.core.shards import write_json
    from flows.train_flip import run_training

    cfg = load_train_config(FLIP_CONFIG, [f"data.dir={Path(dataset).resolve()}", f"output.dir={Path(output).resolve()}"])
    run_training(cfg, progress=progress)
    # The probe is left out: with eight held-out faces it would say nothing, and it costs seconds.
    results = evaluate(cfg.output.dir, dataset, probe=False, progress=progress)
    write_json(Path(output) / "eval.json", results)
    print(format_eval_table(results))
    return results


def run_demo(output: Path, progress: bool = True, train: bool = True) -> dict:
    """Build the corpus, serve it, run the curation flow on it (which publishes it), print what
    happened, then train and evaluate the tiny FLIP model on the published dataset."""
    from facedata.report.summary import format_summary
    from flows.curate import run_curation

    output = Path(output)
    # The server's port changes every run, so the corpus (and its plan) does too: start clean.
    if output.exists():
        shutil.rmtree(output)
    entries = build_demo_corpus(output / "web")
    with LoopbackServer(output / "web") as server:
        corpus = write_corpus(entries, server, (output / "corpus.parquet").resolve())
        log.info("demo corpus: %d entries served at %s", len(entries), server.url(""))
        gallery = build_optout_gallery(output / "optout")
        cfg = load_config(DEMO_CONFIG, [f"input.path={corpus}", f"output.dir={output / 'run'}",
                                        f"identity.optout_gallery={gallery.resolve()}",
                                        f"publish.to={(output / 'dataset').resolve()}"])
        summary = run_curation(cfg, Path(cfg.output.dir), progress=progress)
    print(format_summary(summary))
    print(f"run directory: {cfg.output.dir}")
    if summary.get("contact_sheet"):
        print(f"contact sheet of kept images: {summary['contact_sheet']}")
    if summary.get("captions_sheet"):
        print(f"faces with their captions and attributes: {summary['captions_sheet']}")
    if summary.get("published"):
        print(f"published dataset (parquet, webdataset, dataset card): {summary['published']}")
        if train:
            train_demo_model(Path(summary["published"]), output / "flip", progress)
            print(f"FLIP model, metrics and loss curve: {output / 'flip'}")
    return summary
