"""Scale: URL+caption rows through the whole curation flow (download, filter, faces, identity,
captions, report, publish), at 10k and 100k rows, with 1 and 2 workers.

    .venv/bin/python benchmarks/scale.py --quick                              # 1,000 rows, 2 workers
    .venv/bin/python benchmarks/scale.py --rows 10000 --workers 1 --workers 2 --alone
    .venv/bin/python benchmarks/scale.py --rows 100000 --workers 2
    .venv/bin/python benchmarks/scale.py --report                             # the table of every saved run

What it does, all under benchmarks/_work/ (gitignored):

1. Builds a pool of distinct real photos, one per row (reused across runs): openpeople's 60 photos
   of 10 people, each variant cropped (70-100% of each side), rotated up to 10 degrees, sometimes
   mirrored, with brightness, contrast and colour jittered, scaled to 400-800 px on the longer side
   and saved at JPEG quality 70-92. Every row is a different file with different pixels, so no
   stage gets a cached or exactly repeated input.
2. Serves the pool with `facedata.demo.server.LoopbackServer` in a process of its own (its CPU is
   reported apart). 5% of the rows are broken, one in five each of: 404, 500 (retried once, then
   failed), an HTML page where an image was expected, a body cut in half, and a reply slower than the timeout.
3. Runs `facedata run` (Prefect flow, `runner.kind: dask` by default, `max_workers` 1 or 2, one
   thread per Dask worker) on the list and publishes to a folder. Samples the RSS of every process
   in the run's tree every 0.1 s (benchmarks/download.py's sampler): the peak of the sum, and the
   peak of each process.
4. `--alone`: the same stages called one after the other in one plain Python process (no Prefect,
   no Dask, one shard at a time), each timed on its own: the reference for the orchestration
   overhead. Compare it with the 1-worker flow run of the same size.

Identity settings: near-duplicate removal is off. The corpus is 60 photos seen through augmentations,
so most variants of one photo are near-duplicates of each other (ArcFace cosine > 0.95); with the
removal on, the caption stage would describe a few hundred faces and the run would not measure it.

Results go to benchmarks/_work/scale-{rows}-{workers}w.json and scale-{rows}-alone.json; the
table is printed from every saved result, so sizes can be run in separate invocations.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
POOL = WORK / "scale_pool"
# Distinct variants; larger lists serve them again under other URLs. Making one costs ~20 ms of CPU,
# and no stage caches by content (near-duplicate removal is off), so a repeat costs what a new one does.
POOL_SIZE = 20_000
SHARD_SIZE = 1000
BROKEN_EVERY = 20  # 5% of the rows
BROKEN_KINDS = ("status/404", "status/500", "html", "truncate/{file}", "slow/6/{file}")

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from download import RunResult, ServerProcess, measure, tool_env  # noqa: E402

from facedata.core.packages import package_dir  # noqa: E402

# ---------------------------------------------------------------- the corpus

_sources: list[Image.Image] = []


def _load_sources() -> list[Image.Image]:
    """openpeople's photos, decoded once per pool process and kept at <= 1024 px."""
    if not _sources:
        for path in sorted(package_dir("openpeople").glob("data/curated/*/assets/*.jpg")):
            with Image.open(path) as src:
                img = ImageOps.exif_transpose(src).convert("RGB")
            img.thumbnail((1024, 1024), Image.Resampling.LANCZOS)
            _sources.append(img)
    return _sources


def pool_file(i: int) -> str:
    return f"{i // 1000:03d}/{i:06d}.jpg"


def _make_variant(i: int) -> None:
    path = POOL / pool_file(i)
    if path.exists():
        return
    rng = random.Random(i)
    sources = _load_sources()
    img = sources[rng.randrange(len(sources))]
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((left, top, left + cw, top + ch))
    img.thumbnail((rng.randint(400, 800),) * 2, Image.Resampling.BILINEAR)  # first: the rest is per pixel
    img = img.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.75, 1.25))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.7, 1.3))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    img.save(tmp, "JPEG", quality=rng.randint(70, 92))
    tmp.rename(path)


def make_pool(n: int) -> None:
    """Variants 0..n-1 (only the missing ones are made), on every core."""
    missing = [i for i in range(n) if not (POOL / pool_file(i)).exists()]
    if not missing:
        return
    print(f"making {len(missing):,} photo variants in {POOL} ...", flush=True)
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for done, _ in enumerate(pool.imap_unordered(_make_variant, missing, chunksize=64), 1):
            if done % 10_000 == 0:
                print(f"  {done:,}/{len(missing):,}", flush=True)
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)


def write_url_list(path: Path, base_url: str, n_rows: int) -> None:
    """Every URL distinct (the query string numbers the row); every 20th one broken."""
    urls, captions = [], []
    for i in range(n_rows):
        file = pool_file(i % POOL_SIZE)
        if i % BROKEN_EVERY == BROKEN_EVERY - 1:
            kind = BROKEN_KINDS[(i // BROKEN_EVERY) % len(BROKEN_KINDS)]
            urls.append(f"{base_url}{kind.format(file=file)}?i={i}")
        else:
            urls.append(f"{base_url}{file}?i={i}")
        captions.append(f"a photo of a person, picture {i}")
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def flow_config(url_list: Path, out_dir: Path, workers: int, runner: str) -> dict:
    return {
        "input": {"path": str(url_list), "format": "parquet", "url_col": "url", "caption_col": "caption"},
        "shards": {"samples_per_shard": SHARD_SIZE},
        "download": {"concurrency": 16, "timeout": 3.0, "retries": 1, "backoff": 0.2},
        "image": {"min_side": 200, "max_aspect": 3.0},
        "faces": {"filter": {"min_score": 0.6, "min_face_side": 48, "max_faces": 8}},
        "identity": {"drop_near_duplicates": False},
        "runner": {"kind": runner, "max_workers": workers, "task_retries": 1},
        "output": {"dir": str(out_dir / "run"), "contact_sheet": True, "contact_sheet_max": 48},
        "publish": {"to": str(out_dir / "dataset")},
    }


# ---------------------------------------------------------------- measuring


@dataclass
class ScaleResult(RunResult):
    workers: int = 0
    mode: str = "flow"  # flow | alone
    runner: str = "dask"
    stage_seconds: dict = field(default_factory=dict)
    stage_cpu_seconds: dict = field(default_factory=dict)
    funnel: list = field(default_factory=list)
    process_peaks: list = field(default_factory=list)  # [(label, peak RSS bytes)], largest first
    published: int = 0


def _task_seconds(summary: dict) -> dict:
    """Seconds the stage tasks themselves report, summed over shards (what each stage cost)."""
    seconds = {"download": summary.get("process_seconds", 0.0)}
    for step in summary["funnel"]:
        if "seconds" in step:
            seconds[step["stage"]] = step["seconds"]
    return seconds


def _published_rows(dataset: Path) -> int:
    manifest = dataset / "manifest.json"
    if not manifest.exists():
        return 0
    return json.loads(manifest.read_text())["n_samples"]


def prepare_run(out_dir: Path, rows: int, workers: int, runner: str, server: ServerProcess) -> Path:
    """A fresh OUT_DIR with the URL list and the run's config; returns the config's path."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    url_list = out_dir / "urls.parquet"
    write_url_list(url_list, server.base_url, rows)
    config_path = out_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(flow_config(url_list, out_dir, workers, runner), sort_keys=False))
    return config_path


def run_flow(rows: int, workers: int, runner: str, server: ServerProcess) -> ScaleResult:
    out_dir = WORK / "scale_runs" / f"{rows}-{workers}w"
    config_path = prepare_run(out_dir, rows, workers, runner, server)
    env = tool_env(PREFECT_HOME=str(WORK / "prefect-home"))
    cmd = [sys.executable, "-m", "facedata.cli", "run", str(config_path), "--no-progress"]
    result = ScaleResult("facedata", rows, workers=workers, runner=runner)
    sampler_peaks: dict = {}
    measure(cmd, env, out_dir / "run.log", server, result, process_peaks=sampler_peaks)
    result.process_peaks = sorted(sampler_peaks.values(), key=lambda p: -p[1])
    summary_path = out_dir / "run" / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result.ok = summary["n_ok"]
        result.status_counts = summary["status_counts"]
        result.funnel = summary["funnel"]
        result.stage_seconds = _task_seconds(summary)
    result.published = _published_rows(out_dir / "dataset")
    result.stage_seconds.update(_report_publish_seconds(out_dir / "run", out_dir / "dataset"))
    return result


def _report_publish_seconds(run_dir: Path, dataset: Path) -> dict:
    """The report's and the publish step's wall time in a flow run, from when each finished writing:
    the report runs after the last caption shard, the publish step after the report."""
    summary, manifest = run_dir / "summary.json", dataset / "manifest.json"
    captions = list((run_dir / "captions").glob("*.stats.json"))
    if not (summary.exists() and manifest.exists() and captions):
        return {}
    summary_at = summary.stat().st_mtime
    return {"report": round(summary_at - max(p.stat().st_mtime for p in captions), 2),
            "publish": round(manifest.stat().st_mtime - summary_at, 2)}


def _stages_alone(config_path: str, out_json: str) -> None:
    """In this process, no Prefect: each stage over every shard in turn, timed on its own."""
    from facedata.pipeline import run_shard
    from facedata.core.config import load_config
    from facedata.pipeline import run_global
    from facedata.publish.writer import publish
    from facedata.ingest.reader import plan_shards
    from facedata.report.summary import write_run_report

    cfg = load_config(config_path)
    run_dir = Path(cfg.output.dir)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(stage: str, fn, *args, **kwargs):
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall[stage] = wall.get(stage, 0.0) + time.perf_counter() - started_wall
        cpu[stage] = cpu.get(stage, 0.0) + time.process_time() - started_cpu
        return out

    plans = timed("plan", plan_shards, cfg.input, cfg.shards.samples_per_shard, run_dir / "_plan")
    for plan in plans:
        timed("download", run_shard, "download", plan, cfg, run_dir, progress=False)
    for plan in plans:
        timed("faces", run_shard, "faces", plan.shard_id, cfg, run_dir, progress=False)
    timed("identity", run_global, "identity", cfg, run_dir, [p.shard_id for p in plans])
    for plan in plans:
        timed("captions", run_shard, "captions", plan.shard_id, cfg, run_dir, progress=False)
    summary = timed("report", write_run_report, run_dir, True, cfg.output.contact_sheet_max, cfg.output.contact_sheet)
    p = cfg.publish
    timed("publish", publish, run_dir, p.to, private=p.private, overwrite=True, crops=p.crops,
          embeddings=p.embeddings, samples_per_shard=p.samples_per_shard, progress=False)
    Path(out_json).write_text(json.dumps({
        "wall": wall, "cpu": cpu, "n_ok": summary["n_ok"], "status_counts": summary["status_counts"],
        "funnel": summary["funnel"], "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def run_alone(rows: int, server: ServerProcess) -> ScaleResult:
    out_dir = WORK / "scale_runs" / f"{rows}-alone"
    config_path = prepare_run(out_dir, rows, 1, "thread", server)
    stages_json = out_dir / "stages.json"
    cmd = [sys.executable, __file__, "_alone", str(config_path), str(stages_json)]
    result = ScaleResult("facedata", rows, workers=1, mode="alone")
    peaks: dict = {}
    measure(cmd, tool_env(), out_dir / "run.log", server, result, process_peaks=peaks)
    result.process_peaks = sorted(peaks.values(), key=lambda p: -p[1])
    if stages_json.exists():
        stages = json.loads(stages_json.read_text())
        result.stage_seconds = {k: round(v, 2) for k, v in stages["wall"].items()}
        result.stage_cpu_seconds = {k: round(v, 2) for k, v in stages["cpu"].items()}
        result.ok = stages["n_ok"]
        result.status_counts = stages["status_counts"]
        result.funnel = stages["funnel"]
    result.published = _published_rows(out_dir / "dataset")
    return result


# ---------------------------------------------------------------- report


def _result_path(r: ScaleResult) -> Path:
    if r.mode == "alone":
        return WORK / f"scale-{r.rows}-alone.json"
    return WORK / f"scale-{r.rows}-{r.workers}w{'' if r.runner == 'dask' else '-' + r.runner}.json"


def load_results() -> list[ScaleResult]:
    return [ScaleResult(**json.loads(p.read_text())) for p in sorted(WORK.glob("scale-*.json"))]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def format_report(results: list[ScaleResult]) -> str:
    results = sorted(results, key=lambda r: (r.rows, r.mode != "alone", r.workers))
    lines = [f"{'run':<16}{'rows':>8}{'wall s':>9}{'rows/s':>8}{'kept':>7}{'published':>10}{'CPU s':>8}"
             f"{'rows/CPU-s':>11}{'RSS sum MiB':>12}{'largest MiB':>12}{'server CPU s':>13}{'load':>6}"]
    for r in results:
        name = "stages alone" if r.mode == "alone" else f"{r.runner} {r.workers} worker{'s' if r.workers > 1 else ''}"
        lines.append(f"{name:<16}{r.rows:>8,}{r.wall_s:>9.0f}{r.rows / r.wall_s:>8.1f}{r.ok:>7,}{r.published:>10,}"
                     f"{r.cpu_s:>8.0f}{r.rows / r.cpu_s:>11.2f}{_mib(r.peak_rss_tree):>12}"
                     f"{_mib(r.peak_rss_single):>12}{r.server_cpu_s:>13.0f}{r.load_before:>6.1f}")
    lines.append("\nstage seconds (flow: summed over the stage's tasks, report and publish their wall; alone: wall of each stage by itself)")
    stages = ["download", "faces", "identity", "captions", "report", "publish"]
    lines.append(f"{'run':<22}" + "".join(f"{s:>10}" for s in stages) + f"{'sum':>10}{'wall':>10}")
    for r in results:
        name = f"{r.rows:,} " + ("alone" if r.mode == "alone" else f"{r.runner} {r.workers}w")
        values = [r.stage_seconds.get(s) for s in stages]
        total = sum(v for v in values if v)
        lines.append(f"{name:<22}" + "".join(f"{v:>10.1f}" if v is not None else f"{'-':>10}" for v in values)
                     + f"{total:>10.1f}{r.wall_s:>10.1f}")
    lines.append("\nlargest processes (peak RSS MiB, CPU s)")
    for r in results:
        top = ", ".join(f"{label} {_mib(rss)} MiB" + (f" {more[0]:.0f} s" if more else "")
                        for label, rss, *more in r.process_peaks[:5])
        lines.append(f"  {r.rows:,} {'alone' if r.mode == 'alone' else r.runner} {r.workers}w: {top}")
    lines.append("")
    for rows in sorted({r.rows for r in results}):
        alone = next((r for r in results if r.rows == rows and r.mode == "alone"), None)
        for runner in sorted({r.runner for r in results if r.rows == rows and r.mode == "flow"}):
            flows = {r.workers: r for r in results if (r.rows, r.mode, r.runner) == (rows, "flow", runner)}
            one, two = flows.get(1), flows.get(2)
            if one and two:
                lines.append(f"{rows:,} rows, {runner}: speed-up 2 workers / 1 worker (wall) {one.wall_s / two.wall_s:.2f}x")
            if one and alone:
                lines.append(f"{rows:,} rows, {runner}: flow 1 worker / stages alone: wall "
                             f"{one.wall_s / alone.wall_s:.2f}x, CPU {one.cpu_s / alone.cpu_s:.2f}x")
    for runner, workers in sorted({(r.runner, r.workers) for r in results if r.mode == "flow"}):
        runs = sorted((r for r in results if r.mode == "flow" and (r.runner, r.workers) == (runner, workers)),
                      key=lambda r: r.rows)
        if len(runs) >= 2:
            small, large = runs[0], runs[-1]
            lines.append(f"{runner} {workers}w peak RSS {large.rows:,} vs {small.rows:,} rows: tree sum "
                         f"{large.peak_rss_tree / small.peak_rss_tree:.2f}x, largest process "
                         f"{large.peak_rss_single / small.peak_rss_single:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="input rows (repeatable; default 10000)")
    parser.add_argument("--workers", type=int, action="append", help="runner.max_workers (repeatable; default 2)")
    parser.add_argument("--runner", choices=("dask", "process", "thread"), default="dask")
    parser.add_argument("--alone", action="store_true", help="also run the stages alone, without the flow")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 rows, 2 workers")
    parser.add_argument("--report", action="store_true", help="only print the table of saved results")
    args = parser.parse_args(argv)
    if not args.report:
        rows_list = [1000] if args.quick else (args.rows or [10_000])
        workers_list = args.workers or [2]
        make_pool(min(max(rows_list), POOL_SIZE))
        server = ServerProcess(POOL)
        try:
            for rows in rows_list:
                runs = [("alone", 1)] if args.alone else []
                runs += [("flow", w) for w in workers_list]
                for mode, workers in runs:
                    print(f"{rows:,} rows, {mode} {workers}w ...", flush=True)
                    r = run_alone(rows, server) if mode == "alone" else run_flow(rows, workers, args.runner, server)
                    _result_path(r).write_text(json.dumps(asdict(r), indent=1))
                    print(f"  {r.wall_s:.0f} s, {r.ok:,} kept, {r.published:,} published, exit {r.returncode}",
                          flush=True)
        finally:
            server.stop()
    print(format_report(load_results()))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_alone":
        _stages_alone(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
