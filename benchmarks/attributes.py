"""Caption stage throughput: the whole stage (decode, every attribute model batched, captions,
parquet) against the same models run one face at a time, on the same real faces.

    .venv/bin/python benchmarks/attributes.py              # 300 images, threads 1 and 2
    .venv/bin/python benchmarks/attributes.py --quick      # 40 images, 1 thread

Corpus: benchmarks/faces.py's augmented openpeople JPEGs (800-2752 px; portraits, selfies,
full-length shots and crops of the 6- and 16-face sheets), put through the real download and face
stages once (served on loopback) and cached under benchmarks/_work/attributes_run_N/.

Contenders, each in its own subprocess, models loaded before the clock starts:
- ours: the caption step (facedata.captions.step.CaptionStep) over every shard, as the flow runs it: faces of
  attributes.batch_size per model call, each model with `threads` intra-op threads.
- one-at-a-time: the same predictor objects, the same decoding and the same caption composer,
  but every model called with a single face, as a per-face loop would.

Figures: faces/s (wall), faces/s per core (divided by the threads given), faces per CPU-second
(steadier than wall time on a shared machine), and the seconds each model took.
Results are printed and written to benchmarks/_work/attributes.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
sys.path.insert(0, str(REPO))


def _faces_benchmark():
    spec = importlib.util.spec_from_file_location("faces_benchmark", REPO / "benchmarks" / "faces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(run: Path, threads: int = 1):
    from facedata.core.config import config_from_dict

    return config_from_dict({
        "attributes": {"threads": threads},
        "input": {"path": str(run / "corpus.parquet"), "format": "parquet"},
        "download": {"timeout": 10.0, "retries": 0, "concurrency": 8},
        "identity": {"enabled": False},
        "faces": {"filter": {"max_faces": None}},
    })


def prepare_run(n: int) -> tuple[Path, list[int]]:
    """A finished download + face run over the first n corpus images (built once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facedata.pipeline import run_shard
    from facedata.ingest.reader import plan_shards
    from facedata.demo.server import LoopbackServer

    faces_benchmark = _faces_benchmark()
    entries = faces_benchmark.build_corpus(n, seed=0)
    run = WORK / f"attributes_run_{n}"
    done = run / "prepared.json"
    if done.exists():
        return run, json.loads(done.read_text())["shards"]
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    with LoopbackServer(faces_benchmark.CORPUS) as server:
        pq.write_table(pa.table({"url": [server.url(e["file"]) for e in entries],
                                 "caption": [f"photo {i}" for i in range(len(entries))]}), run / "corpus.parquet")
        cfg = _config(run)
        plans = plan_shards(cfg.input, 100, run / "_plan")
        for plan in plans:
            run_shard("download", plan, cfg, run, progress=False)
            run_shard("faces", plan.shard_id, cfg, run, progress=False)
    shards = [p.shard_id for p in plans]
    done.write_text(json.dumps({"shards": shards}))
    return run, shards


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def worker(kind: str, run: Path, shards: list[int], threads: int) -> dict:
    import torch

    from facedata.attributes import load_predictors
    from facedata.captions.step import thresholds
    from facedata.pipeline import run_shard
    from facedata.core.run_layout import RunLayout

    torch.set_num_threads(threads)
    cfg = _config(run, threads)
    load_start = time.perf_counter()
    predictors = load_predictors(cfg.attributes, cfg.faces)
    load_s = time.perf_counter() - load_start
    shutil.rmtree(RunLayout(run).step_dir("captions"), ignore_errors=True)
    # Warm-up: the first calls of torch and onnxruntime allocate and pick kernels.
    _one_at_a_time(run, shards[:1], predictors, thresholds(cfg.attributes), cfg, limit=4)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    if kind == "ours":
        stats = [run_shard("captions", i, cfg, run, progress=False) for i in shards]
        faces = sum(s["n_faces_described"] for s in stats)
        images = sum(s["n_in"] for s in stats)
        by_step: Counter = Counter()
        for s in stats:
            by_step.update(s["seconds_by_step"])
    else:
        faces, images, by_step = _one_at_a_time(run, shards, predictors, thresholds(cfg.attributes), cfg)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    shutil.rmtree(RunLayout(run).step_dir("captions"), ignore_errors=True)
    return {
        "contender": kind, "threads": threads, "images": images, "faces": faces, "load_s": round(load_s, 2),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "faces_per_s": round(faces / wall, 2), "faces_per_s_per_core": round(faces / wall / threads, 2),
        "faces_per_cpu_s": round(faces / cpu, 2),
        "ms_per_face_by_step": {k: round(1000 * v / faces, 2) for k, v in by_step.most_common()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _one_at_a_time(run, shards, predictors, needed, cfg, limit=None) -> tuple[int, int, Counter]:
    """The stage's work with every model called on one face at a time."""
    import pyarrow.parquet as pq

    from facedata.core import records
    from facedata.captions.step import decode_faces, describe, described_faces
    from facedata.captions.compose import compose_caption
    from facedata.core.run_layout import RunLayout
    from facedata.core.shards import shard_name, tar_images

    by_step: Counter = Counter()
    faces = images = 0
    for shard in shards:
        name = shard_name(shard)
        rows = pq.read_table(RunLayout(run).step_dir("faces") / f"{name}.parquet",
                             columns=["key", "status", "width", "height", "ext", "faces", "primary_face",
                                      "n_faces"]).to_pylist()
        kept = {r["key"]: r for r in rows if r["status"] == records.OK and r["faces"]}
        for key, data in tar_images(run / "shards" / f"{name}.tar", {k: r["ext"] for k, r in kept.items()}):
            row = kept[key]
            ids = described_faces(row["faces"], row["primary_face"], cfg.attributes.max_faces)
            start = time.perf_counter()
            inputs = decode_faces(data, row, ids, cfg.image.max_pixels)
            by_step["decode"] += time.perf_counter() - start
            attrs = [describe(predictors, [face], needed, by_step)[0] for face in inputs]
            compose_caption(attrs, row["n_faces"], seed=key)
            faces += len(inputs)
            images += 1
            if limit and images >= limit:
                return faces, images, by_step
    return faces, images, by_step


def run_worker(kind: str, images: int, threads: int) -> dict:
    out = WORK / f"attributes-{kind}-{threads}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, __file__, "--worker", kind, "--images", str(images), "--threads", str(threads),
                    "--out", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="40 images, 1 thread")
    parser.add_argument("--worker", choices=["ours", "one-at-a-time"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.quick:
        args.images, args.threads = 40, [1]
    if args.worker:
        run, shards = prepare_run(args.images)
        Path(args.out).write_text(json.dumps(worker(args.worker, run, shards, args.threads[0])))
        return
    run, _ = prepare_run(args.images)
    rows = []
    for threads in args.threads:
        for kind in ("ours", "one-at-a-time"):
            rows.append(run_worker(kind, args.images, threads))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'contender':<15}{'threads':>8}{'faces':>7}{'faces/s':>9}{'/core':>8}{'/CPU-s':>8}{'RSS MB':>8}")
    for r in rows:
        print(f"{r['contender']:<15}{r['threads']:>8}{r['faces']:>7}{r['faces_per_s']:>9}"
              f"{r['faces_per_s_per_core']:>8}{r['faces_per_cpu_s']:>8}{r['peak_rss_mb']:>8}")
    for threads in args.threads:
        ours, single = (next(r for r in rows if r["contender"] == k and r["threads"] == threads)
                        for k in ("ours", "one-at-a-time"))
        print(f"threads {threads}: ours / one-at-a-time = {ours['faces_per_s'] / single['faces_per_s']:.2f}x "
              f"(per CPU-second {ours['faces_per_cpu_s'] / single['faces_per_cpu_s']:.2f}x); "
              f"goal >= 20 faces/s per core: {ours['faces_per_s_per_core']}")
        for r in (ours, single):
            print(f"  {r['contender']:<15} ms/face: " + ", ".join(f"{k} {v}" for k, v in r["ms_per_face_by_step"].items()))
    (WORK / "attributes.json").write_text(json.dumps({"images": args.images, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
