"""Identity clustering at scale: facedata's faiss k-NN graph + clustering against scikit-learn's
DBSCAN (cosine) and HDBSCAN, on synthetic face embeddings with known identities.

    .venv/bin/python benchmarks/cluster.py                     # ours at 20k, 50k, 100k, 1M; sklearn at 20k, 50k
    .venv/bin/python benchmarks/cluster.py --sizes 100000 --baseline-sizes 20000
    .venv/bin/python benchmarks/cluster.py --quick             # 5k-face smoke run

The embeddings mimic ArcFace identity structure (512-d, unit norm, stored as float16 .npy files
under benchmarks/_work/, memory-mapped like the run's face shards):

- identity sizes follow a power law, P(size) ~ size^-2 on [2, 2000] (many small identities, a few
  with hundreds to thousands of faces);
- identity centres are random directions pulled towards one of 64 shared "look" directions, so
  faces of different identities have cosine ~0 across looks and ~0.1-0.25 within one;
- a face is sqrt(w) * centre + sqrt(1 - w) * random direction, with w drawn per identity in
  [0.5, 0.8] (plus jitter per face), so two faces of one identity have cosine ~0.5-0.8;
- 10% of identity faces are hard (profile, blur, occlusion): w in [0.2, 0.5], so they match their
  own identity at only ~0.3-0.6;
- 5% of faces are noise, each its own identity: half random directions, half blends of two
  identities of the same look (cosine ~0.4-0.5 to both, the bridges that chain clusters).

Every method runs in its own subprocess, so its peak RSS (VmHWM) is its own, and so is its CPU
time (all threads; on a busy machine compare it rather than the wall times). Ours reports the
k-NN graph, clustering and summary (cluster size, centre similarity, outliers) times separately;
scikit-learn's do everything in fit(). scikit-learn's parameters are picked by a small grid on a
separate tuning set (best pairwise F), ours are the defaults of IdentityConfig. A baseline that
runs past --baseline-timeout at one size is not tried at larger ones.

Results are printed as a table and written to benchmarks/_work/cluster.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
DIM = 512
CHUNK = 65_536
GENERATOR_VERSION = 1

sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------- data


def identity_sizes(n_faces: int, rng: np.random.Generator, alpha: float = 2.0, max_size: int = 2000) -> np.ndarray:
    """Sizes summing to n_faces, drawn from P(s) ~ s^-alpha on [2, max_size] (inverse CDF)."""
    sizes: list[np.ndarray] = []
    total = 0
    a = 1 - alpha
    while total < n_faces:
        u = rng.random(4096)
        s = np.floor(((max_size**a - 2**a) * u + 2**a) ** (1 / a)).astype(np.int64)
        sizes.append(s)
        total += int(s.sum())
    sizes_all = np.concatenate(sizes)
    cut = int(np.searchsorted(np.cumsum(sizes_all), n_faces)) + 1
    sizes_all = sizes_all[:cut]
    sizes_all[-1] -= int(sizes_all.sum()) - n_faces
    return sizes_all[sizes_all > 0]


def make_embeddings(
    n: int,
    seed: int = 0,
    noise_frac: float = 0.05,
    hard_frac: float = 0.10,
    looks: int = 64,
    look_pull: float = 0.3,
) -> tuple[Path, Path]:
    """Write (or reuse) benchmarks/_work/cluster_data/v*_{n}_{seed}.{emb,labels}.npy; return their paths."""
    folder = WORK / "cluster_data"
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"v{GENERATOR_VERSION}_{n}_{seed}"
    emb_path, label_path = Path(f"{stem}.emb.npy"), Path(f"{stem}.labels.npy")
    if emb_path.exists() and label_path.exists():
        return emb_path, label_path
    rng = np.random.default_rng(seed)
    n_noise = int(round(n * noise_frac))
    sizes = identity_sizes(n - n_noise, rng)
    n_ids = len(sizes)
    look_of = rng.integers(0, looks, n_ids)
    look_dirs = _unit(rng.standard_normal((looks, DIM), dtype=np.float32))
    centres = np.sqrt(look_pull) * look_dirs[look_of]
    centres += np.sqrt(1 - look_pull) * _unit(rng.standard_normal((n_ids, DIM), dtype=np.float32))
    centres = _unit(centres)
    within = rng.uniform(0.5, 0.8, n_ids).astype(np.float32)
    labels = np.concatenate([np.repeat(np.arange(n_ids), sizes), n_ids + np.arange(n_noise)])
    labels = labels[rng.permutation(n)]
    # Noise faces: half random directions, half blends of two identities of one look.
    same_look = np.argsort(look_of, kind="stable")
    emb = np.lib.format.open_memmap(f"{stem}.tmp.npy", mode="w+", dtype=np.float16, shape=(n, DIM))
    for start in range(0, n, CHUNK):
        lab = labels[start : start + CHUNK]
        m = len(lab)
        is_face = lab < n_ids
        ident = np.where(is_face, lab, rng.integers(0, n_ids, m))
        w = within[ident] + rng.normal(0, 0.05, m).astype(np.float32)
        hard = rng.random(m) < hard_frac
        w[hard] = rng.uniform(0.2, 0.5, int(hard.sum()))
        w = np.clip(w, 0.2, 0.95)
        centre = centres[ident]
        blend = ~is_face & (rng.random(m) < 0.5)
        partner = same_look[np.clip(np.searchsorted(look_of[same_look], look_of[ident[blend]]) + 1, 0, n_ids - 1)]
        centre[blend] = _unit(centre[blend] + centres[partner])
        w = np.where(is_face, w, np.where(blend, 0.5, 0.0))[:, None]
        noise = _unit(rng.standard_normal((m, DIM), dtype=np.float32))
        emb[start : start + m] = _unit(np.sqrt(w) * centre + np.sqrt(1 - w) * noise)
    emb.flush()
    del emb
    np.save(label_path, labels)
    os.replace(f"{stem}.tmp.npy", emb_path)
    return emb_path, label_path


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------- workers (one per subprocess)


def _usage() -> dict:
    """Peak RSS and CPU seconds (all threads) of this process so far. The peak is VmHWM, which
    starts afresh at exec; ru_maxrss would also count the driver's memory at fork time."""
    status = Path("/proc/self/status").read_text()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": peak_kb / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def run_ours(emb_path: Path, label_path: Path, params: dict) -> list[dict]:
    """One k-NN graph, then both clustering methods on it (components after Chinese Whispers, so
    the peak RSS of the Chinese Whispers row is its own)."""
    from facedata.identity.metrics import clustering_metrics
    from facedata.identity.clustering import cluster, cluster_summary
    from facedata.core.config import IdentityConfig
    from facedata.identity.knn import build_knn

    cfg = IdentityConfig(**params)
    emb = np.load(emb_path, mmap_mode="r")
    labels_true = np.load(label_path)
    t0 = time.perf_counter()
    graph = build_knn(emb, k=cfg.k, index=cfg.index, exact_max=cfg.exact_max, nprobe=cfg.nprobe, seed=cfg.seed)
    knn_s = time.perf_counter() - t0
    rows = []
    for method in ("chinese_whispers", "components"):
        t1 = time.perf_counter()
        labels = cluster(graph, method, cfg.threshold, seed=cfg.seed)
        t2 = time.perf_counter()
        summary = cluster_summary(emb, labels, cfg.outlier_threshold)
        t3 = time.perf_counter()
        rows.append({
            "name": f"facedata {method}",
            "knn_s": knn_s,
            "cluster_s": t2 - t1,
            "summary_s": t3 - t2,
            "total_s": knn_s + t3 - t1,
            "outliers": int(summary.outlier.sum()),
            **clustering_metrics(labels_true, labels),
            **_usage(),
        })  # fmt: skip
    return rows


def run_sklearn(emb_path: Path, label_path: Path, method: str, params: dict) -> list[dict]:
    from sklearn.cluster import DBSCAN, HDBSCAN

    from facedata.identity.metrics import clustering_metrics

    t0 = time.perf_counter()
    x = np.asarray(np.load(emb_path, mmap_mode="r"), dtype=np.float32)
    labels_true = np.load(label_path)
    if method == "dbscan":
        model = DBSCAN(metric="cosine", n_jobs=-1, **params)
    else:
        # Euclidean distance on unit vectors orders pairs exactly as cosine does, and lets HDBSCAN use
        # a tree instead of a dense N x N cosine matrix (20 GB at 50k).
        model = HDBSCAN(metric="euclidean", n_jobs=-1, copy=False, **params)
    labels = model.fit_predict(x)
    total = time.perf_counter() - t0
    # Noise (-1) points are each their own identity.
    noise = labels < 0
    labels = labels.astype(np.int64)
    labels[noise] = labels.max(initial=0) + 1 + np.arange(int(noise.sum()))
    return [{
        "name": NAMES[method],
        "knn_s": None,
        "cluster_s": total,
        "summary_s": None,
        "total_s": total,
        **clustering_metrics(labels_true, labels),
        **_usage(),
    }]  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    params = json.loads(args.params)
    emb_path, label_path = Path(args.emb), Path(args.labels)
    if args.worker == "ours":
        rows = run_ours(emb_path, label_path, params)
    else:
        rows = run_sklearn(emb_path, label_path, args.worker, params)
    print(json.dumps(rows))


# ---------------------------------------------------------------- driver

NAMES = {"ours": "facedata", "dbscan": "sklearn DBSCAN", "hdbscan": "sklearn HDBSCAN"}


def run_method(method: str, n: int, params: dict, timeout: float | None, seed: int) -> list[dict]:
    """Run one method in a subprocess (ours gives a row per clustering method); timeout None
    waits as long as it takes."""
    emb_path, label_path = make_embeddings(n, seed)
    cmd = [
        sys.executable, __file__, "--worker", method, "--emb", str(emb_path), "--labels", str(label_path),
        "--params", json.dumps(params),
    ]  # fmt: skip
    row = {"method": method, "name": NAMES[method], "n": n, "params": params}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [{**row, "status": f"timeout after {timeout:.0f} s"}]
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return [{**row, "status": f"failed: {why}"}]
    return [{**row, "status": "ok", **result} for result in json.loads(done.stdout.strip().splitlines()[-1])]


BASELINE_GRIDS = {
    "dbscan": [{"eps": eps, "min_samples": m} for eps in (0.5, 0.6, 0.7) for m in (2, 4)],
    "hdbscan": [{"min_cluster_size": m} for m in (2, 4)],
}


def tune(method: str, n: int, timeout: float) -> tuple[dict, list[dict]]:
    """The grid setting with the best pairwise F on a separate tuning set (seed 1)."""
    rows = [row for params in BASELINE_GRIDS[method] for row in run_method(method, n, params, timeout, seed=1)]
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["pairwise_f"])["params"] if ok else BASELINE_GRIDS[method][0]
    return best, rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    ours = {r["n"]: r for r in rows if r["name"] == "facedata chinese_whispers" and r["status"] == "ok"}
    head = f"{'method':<28}{'faces':>9}{'kNN s':>8}{'cluster s':>11}{'total s':>9}{'CPU s':>8}{'peak RSS MB':>13}"
    head += f"{'pair F':>8}{'BCubed F':>10}{'clusters':>10}{'time/ours':>11}"
    print(head)
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['name']:<28}{r['n']:>9}  {r['status']}")
            continue
        ratio = r["total_s"] / ours[r["n"]]["total_s"] if r["n"] in ours and r["method"] != "ours" else None
        print(
            f"{r['name']:<28}{r['n']:>9}{_fmt(r['knn_s'], '.1f'):>8}{_fmt(r['cluster_s'], '.1f'):>11}"
            f"{r['total_s']:>9.1f}{r['cpu_s']:>8.0f}{r['peak_rss_mb']:>13.0f}{r['pairwise_f']:>8.3f}{r['bcubed_f']:>10.3f}"
            f"{r['n_clusters']:>10}{_fmt(ratio, '.1f'):>11}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="sizes for ours only")
    ap.add_argument("--baseline-sizes", type=int, nargs="*", default=[20_000, 50_000])
    ap.add_argument("--tune-size", type=int, default=10_000)
    ap.add_argument("--baseline-timeout", type=float, default=900, help="seconds per scikit-learn run")
    ap.add_argument("--methods", nargs="+", default=["ours", "dbscan", "hdbscan"], choices=["ours", "dbscan", "hdbscan"])
    ap.add_argument("--quick", action="store_true", help="5k faces, tuning on 2k")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--emb", help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.sizes, args.baseline_sizes, args.tune_size = [5_000], [5_000], 2_000
    baselines = [m for m in ("dbscan", "hdbscan") if m in args.methods]
    report: dict = {"cpu_count": os.cpu_count(), "tuning": {}, "rows": []}
    chosen = {}
    for method in baselines:
        chosen[method], report["tuning"][method] = tune(method, args.tune_size, args.baseline_timeout)
        print(f"{method}: tuned on {args.tune_size} faces -> {chosen[method]}", flush=True)
    finished = dict.fromkeys(baselines, True)
    for n in sorted(set(args.sizes) | set(args.baseline_sizes)):
        jobs = [("ours", {})] if "ours" in args.methods else []
        if n in args.baseline_sizes:
            jobs += [(m, chosen[m]) for m in baselines if finished[m]]
        for method, params in jobs:
            timeout = None if method == "ours" else args.baseline_timeout
            for row in run_method(method, n, params, timeout, seed=0):
                if method != "ours" and row["status"] != "ok":
                    finished[method] = False
                report["rows"].append(row)
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                print(json.dumps(shown), flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "cluster.json").write_text(json.dumps(report, indent=2))
    print()
    print_table(report["rows"])
    print(f"\nwritten to {WORK / 'cluster.json'}")


if __name__ == "__main__":
    main()
