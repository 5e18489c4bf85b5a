"""Download throughput and memory: facedata against img2dataset on the same loopback URL list.

    .venv/bin/python benchmarks/download.py                      # 20,000 rows
    .venv/bin/python benchmarks/download.py --rows 20000 --rows 100000
    .venv/bin/python benchmarks/download.py --quick              # 2,000-row smoke run
    .venv/bin/python benchmarks/download.py --rows 100000 --repeat 2 --tool facedata

What it does, all under benchmarks/_work/ (gitignored):

1. Builds a pool of ~200 real JPEGs: openpeople's photos, cropped, sometimes mirrored, downscaled
   to 400-640 px on the longer side and saved at varied quality (so the server hands out distinct
   files of realistic web size, not one cached blob).
2. Serves the pool with `facedata.demo.server.LoopbackServer` in a separate process, so the server's
   CPU is in neither tool's process tree. It still shares the machine's cores with them, and its
   CPU seconds are reported beside each run.
3. Writes a URL + caption parquet of N rows; every URL is distinct (`/img/0123.jpg?i=N`).
4. Runs each tool on that list, one after the other, as a subprocess:
   - facedata: `python -m facedata.cli run` (Prefect flow; shard tasks in worker processes,
     `runner.kind: process`, or on threads in one process with `--runner thread`);
   - img2dataset 1.47.0 from its own venv (created here on first use), multiprocessing distributor.
   Settings are matched: 10,000 samples per shard, 2 shards at a time (facedata: 2 worker
   processes; img2dataset: 2 processes), the same number of download threads per shard,
   timeout 10 s, no retries, no resize, downloaded bytes stored as they are, shorter side >= 200,
   aspect <= 3, sha256 of every image, webdataset output, opt-out headers honoured.
5. Samples the RSS of each tool's whole process tree every 0.1 s from /proc and reports the peak of
   the sum, the largest single process, wall time, CPU time and images/s.

Results are printed as a table and written to benchmarks/_work/download.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
IMG2DATASET_VERSION = "1.47.0"
POOL_SIZE = 200
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL = 0.1

sys.path.insert(0, str(REPO))
from facedata.core.packages import package_dir  # noqa: E402
from facedata.demo.server import LoopbackServer  # noqa: E402


# ---------------------------------------------------------------- inputs


def make_pool(pool_dir: Path, size: int = POOL_SIZE, seed: int = 0) -> list[str]:
    """~`size` distinct web-sized JPEGs from openpeople's photos; reused when already built."""
    names = [f"{i:04d}.jpg" for i in range(size)]
    if all((pool_dir / name).exists() for name in names):
        return names
    sources = sorted(package_dir("openpeople").glob("data/curated/*/assets/*.jpg"))
    pool_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i, name in enumerate(names):
        with Image.open(sources[i % len(sources)]) as src:
            img = ImageOps.exif_transpose(src).convert("RGB")
        # Aspect 2:3..3:2 at 400-640 px keeps the shorter side over 260 px, so every file passes
        # both tools' filters and the run measures downloading, not rejecting.
        w, h = img.size
        aspect = rng.uniform(2 / 3, 3 / 2)
        scale = rng.uniform(0.6, 1.0)
        cw = int(min(w, h * aspect) * scale)
        ch = int(cw / aspect)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img.thumbnail((rng.randint(400, 640),) * 2, Image.Resampling.LANCZOS)
        img.save(pool_dir / name, "JPEG", quality=rng.randint(70, 92))
    return names


def write_url_list(path: Path, base_url: str, n_rows: int, pool: list[str]) -> None:
    """N rows of (url, caption); the query string makes every URL distinct while the pool is small."""
    urls = [f"{base_url}img/{pool[i % len(pool)]}?i={i}" for i in range(n_rows)]
    captions = [f"a photo of a person, picture {i}" for i in range(n_rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": captions}), path)


def _serve(root: str, port_pipe) -> None:
    server = LoopbackServer(root).start()
    port_pipe.send(server.port)
    threading.Event().wait()  # serve until terminated


class ServerProcess:
    """LoopbackServer in its own process, so its CPU is not charged to the tool being measured."""

    def __init__(self, root: Path) -> None:
        receiver, sender = multiprocessing.Pipe(duplex=False)
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(str(root), sender), name="loopback-server", daemon=True
        )
        self.process.start()
        self.port = receiver.recv()
        self.base_url = f"http://127.0.0.1:{self.port}/"

    def cpu_seconds(self) -> float:
        return _read_stat(self.process.pid)[1]

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


# ---------------------------------------------------------------- measuring


def _read_stat(pid: int) -> tuple[int, float, int]:
    """(parent pid, CPU seconds, RSS bytes) of one process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        # The command name is in parentheses and may hold spaces; the fields after it are fixed.
        fields = f.read().rsplit(b")", 1)[1].split()
    ppid, utime, stime, rss = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[21])
    return ppid, (utime + stime) / CLOCK_TICKS, rss * PAGE_SIZE


def _process_label(pid: int) -> str:
    """A short name for a process: its command line, without the interpreter's path."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [Path(a.decode(errors="replace")).name if i == 0 else a.decode(errors="replace")
             for i, a in enumerate(args) if a]
    return f"{pid} {' '.join(words)[:60]}"


class TreeSampler(threading.Thread):
    """Peak RSS of a process and all its descendants, sampled from /proc every SAMPLE_INTERVAL.

    The sum over the tree counts pages shared between processes once per process (as `ps` does),
    so for multi-process tools it is an upper bound; the largest single process is kept too.
    """

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.peak_tree = 0
        self.peak_single = 0
        self.peak_processes = 0
        # pid -> [label, peak RSS, CPU seconds when last seen]: each process of the tree on its own.
        self.process_peaks: dict[int, list] = {}
        self._done = threading.Event()

    def _tree(self) -> dict[int, int]:
        """RSS by pid of the root and its descendants now (and each one's CPU seconds in self._cpu)."""
        rss: dict[int, int] = {}
        children: dict[int, list[int]] = {}
        self._cpu: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    ppid, self._cpu[int(entry)], rss[int(entry)] = _read_stat(int(entry))
                except (OSError, IndexError):  # exited between listdir and open
                    continue
                children.setdefault(ppid, []).append(int(entry))
        members, frontier = {}, [self.root_pid]
        while frontier:
            pid = frontier.pop()
            if pid in rss:
                members[pid] = rss[pid]
                frontier.extend(children.get(pid, ()))
        return members

    def run(self) -> None:
        while not self._done.wait(SAMPLE_INTERVAL):
            members = self._tree()
            if members:
                self.peak_tree = max(self.peak_tree, sum(members.values()))
                self.peak_single = max(self.peak_single, max(members.values()))
                self.peak_processes = max(self.peak_processes, len(members))
                for pid, rss in members.items():
                    if pid not in self.process_peaks:
                        self.process_peaks[pid] = [_process_label(pid), 0, 0.0]
                    self.process_peaks[pid][1] = max(self.process_peaks[pid][1], rss)
                    self.process_peaks[pid][2] = self._cpu[pid]

    def stop(self) -> None:
        self._done.set()
        self.join()


@dataclass
class RunResult:
    tool: str
    rows: int
    ok: int = 0
    wall_s: float = 0.0
    # From the first shard's start to the last shard's end, as each tool records it: throughput
    # without start-up and shutdown.
    shard_window_s: float = 0.0
    cpu_s: float = 0.0  # the tool's whole tree, from wait4's rusage (children it reaped included)
    server_cpu_s: float = 0.0
    peak_rss_tree: int = 0
    peak_rss_single: int = 0
    processes: int = 0
    # 1-minute load average when the run started: above the core count, others were competing.
    load_before: float = 0.0
    returncode: int = 0
    status_counts: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def window_images_per_s(self) -> float:
        return self.ok / self.shard_window_s if self.shard_window_s else 0.0


def tool_env(**extra: str) -> dict:
    """The environment both tools run in.

    Bytecode caching is switched on, into a folder of our own: with PYTHONDONTWRITEBYTECODE set
    (as on some CI machines) every process recompiles Prefect, pandas, cv2's Python side, etc. at
    each start, seconds of CPU that a normal install never pays. The warm-up run fills the cache.
    """
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(WORK / "pycache"), **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure(cmd: list[str], env: dict, log_path: Path, server: ServerProcess, result: RunResult,
            process_peaks: dict | None = None) -> None:
    """Run `cmd` to completion, filling in wall time, CPU time, RSS peaks and the server's CPU
    (and, given `process_peaks`, each process's label and peak RSS by pid)."""
    result.load_before = os.getloadavg()[0]
    server_cpu = server.cpu_seconds()
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        # wait4 rather than wait(): its rusage covers the child and every descendant it reaped.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    result.wall_s = round(time.perf_counter() - started, 2)
    sampler.stop()
    result.server_cpu_s = round(server.cpu_seconds() - server_cpu, 1)
    result.cpu_s = round(usage.ru_utime + usage.ru_stime, 1)
    result.peak_rss_tree = sampler.peak_tree
    # ru_maxrss (KiB) catches a single-process peak that fell between two samples.
    result.peak_rss_single = max(sampler.peak_single, usage.ru_maxrss * 1024)
    result.processes = sampler.peak_processes
    if process_peaks is not None:
        process_peaks.update(sampler.process_peaks)
    result.returncode = proc.returncode
    if proc.returncode:
        tail = log_path.read_text(errors="replace")[-3000:]
        print(f"{result.tool} exited with {proc.returncode}; log {log_path}:\n{tail}", file=sys.stderr)


# ---------------------------------------------------------------- the two tools


def run_facedata(url_list: Path, out_dir: Path, rows: int, threads: int, shard_size: int, runner: str,
                 server: ServerProcess) -> RunResult:
    config = {
        "input": {"path": str(url_list), "format": "parquet", "url_col": "url", "caption_col": "caption"},
        "shards": {"samples_per_shard": shard_size},
        "download": {"concurrency": threads, "timeout": 10.0, "retries": 0},
        "image": {"min_side": 200, "max_aspect": 3.0, "resize_max_side": None, "reencode": "never"},
        "faces": {"enabled": False},  # img2dataset has no face stage; this measures the download
        "runner": {"kind": runner, "max_workers": 2, "task_retries": 0},
        "output": {"dir": str(out_dir), "contact_sheet": False},
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    config_path = out_dir.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    # A Prefect home of our own: the run does not depend on (or add to) the user's history.
    env = tool_env(PREFECT_HOME=str(WORK / "prefect-home"))
    cmd = [sys.executable, "-m", "facedata.cli", "run", str(config_path), "--output", str(out_dir), "--no-progress"]
    result = RunResult("facedata", rows)
    measure(cmd, env, out_dir.with_suffix(".log"), server, result)
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result.ok = summary["n_ok"]
        result.status_counts = summary["status_counts"]
    shard_stats = [json.loads(p.read_text()) for p in (out_dir / "shards").glob("*.stats.json")]
    if shard_stats:
        window = max(s["finished_at"] for s in shard_stats) - min(s["started_at"] for s in shard_stats)
        result.shard_window_s = round(window, 2)
    return result


def img2dataset_python() -> Path:
    """img2dataset in a venv of its own: its pins (pandas<3, webdataset<0.3) clash with ours."""
    venv = WORK / "venv-img2dataset"
    python = venv / "bin" / "python"
    check = [str(python), "-c", f"import importlib.metadata as m; assert m.version('img2dataset') == '{IMG2DATASET_VERSION}'"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} with img2dataset {IMG2DATASET_VERSION} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "pip", "install", "--quiet", "--python", str(python), f"img2dataset=={IMG2DATASET_VERSION}"],
                   check=True)
    return python


def run_img2dataset(python: Path, url_list: Path, out_dir: Path, rows: int, threads: int, shard_size: int,
                    server: ServerProcess) -> RunResult:
    shutil.rmtree(out_dir, ignore_errors=True)
    options = {
        "url_list": url_list, "input_format": "parquet", "url_col": "url", "caption_col": "caption",
        "output_format": "webdataset", "output_folder": out_dir,
        "processes_count": 2, "thread_count": threads, "number_sample_per_shard": shard_size,
        "distributor": "multiprocessing", "timeout": 10, "retries": 0,
        # No resize, and keep JPEG bytes as downloaded (it still decodes every image to check size).
        "resize_mode": "no", "skip_reencode": True,
        "min_image_size": 200, "max_aspect_ratio": 3,
        # facedata hashes every image and keeps no EXIF column.
        "compute_hash": "sha256", "extract_exif": False,
        "enable_wandb": False,
        # incremental_mode stays at its default: "overwrite" deletes the _tmp folder img2dataset
        # has just made (and out_dir is new anyway).
    }
    cmd = [str(python.parent / "img2dataset")] + [f"--{k}={v}" for k, v in options.items()]
    env = tool_env(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_SILENT="true")
    result = RunResult("img2dataset", rows)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    measure(cmd, env, out_dir.with_suffix(".log"), server, result)
    shard_stats = [json.loads(p.read_text()) for p in out_dir.glob("*_stats.json")]
    if shard_stats:
        result.ok = sum(s["successes"] for s in shard_stats)
        counts: dict[str, int] = {}
        for s in shard_stats:
            for status, n in s["status_dict"].items():
                counts[status] = counts.get(status, 0) + n
        result.status_counts = counts
        window = max(s["end_time"] for s in shard_stats) - min(s["start_time"] for s in shard_stats)
        result.shard_window_s = round(window, 2)
    return result


# ---------------------------------------------------------------- report


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _per_cpu_s(r: RunResult) -> float:
    return r.ok / r.cpu_s if r.cpu_s else 0.0


def _metrics(cores: int) -> list[tuple[str, Callable[[RunResult], str], Callable[[RunResult], float] | None]]:
    """(label, value shown, number compared or None) for each table row. Ratios are facedata /
    img2dataset: above 1 is better for facedata in throughput rows, below 1 in wall, CPU and RSS."""
    return [
        ("images ok", lambda r: f"{r.ok}/{r.rows}", lambda r: r.ok),
        ("wall", lambda r: f"{r.wall_s:.1f} s", lambda r: r.wall_s),
        ("images/s (wall)", lambda r: f"{r.images_per_s:.0f}", lambda r: r.images_per_s),
        (f"images/s per core (/{cores})", lambda r: f"{r.images_per_s / cores:.0f}", lambda r: r.images_per_s),
        ("images/s (shard window)", lambda r: f"{r.window_images_per_s:.0f}", lambda r: r.window_images_per_s),
        ("wall outside shard window", lambda r: f"{r.wall_s - r.shard_window_s:.1f} s",
         lambda r: r.wall_s - r.shard_window_s),
        ("CPU s, tool's tree", lambda r: f"{r.cpu_s:.1f}", lambda r: r.cpu_s),
        ("images per CPU s", lambda r: f"{_per_cpu_s(r):.0f}", _per_cpu_s),
        ("CPU s, loopback server", lambda r: f"{r.server_cpu_s:.1f}", None),
        ("peak RSS, tree sum", lambda r: _mib(r.peak_rss_tree), lambda r: r.peak_rss_tree),
        ("peak RSS, largest process", lambda r: _mib(r.peak_rss_single), lambda r: r.peak_rss_single),
        ("processes (max)", lambda r: str(r.processes), None),
        ("load average at start", lambda r: f"{r.load_before:.1f}", None),
    ]


def best_runs(results: list[RunResult]) -> dict[tuple[str, int], RunResult]:
    """Per (tool, rows), the run with the highest throughput: on a shared machine, the least disturbed."""
    best: dict[tuple[str, int], RunResult] = {}
    for r in results:
        key = (r.tool, r.rows)
        if key not in best or r.images_per_s > best[key].images_per_s:
            best[key] = r
    return best


def format_table(results: list[RunResult], cores: int) -> str:
    best = best_runs(results)
    repeats = max(sum(1 for r in results if (r.tool, r.rows) == key) for key in best)
    lines = [f"best of {repeats} runs per tool and size"] if repeats > 1 else []
    for rows in sorted({r.rows for r in results}):
        fd, i2d = best.get(("facedata", rows)), best.get(("img2dataset", rows))
        lines.append(f"\n{rows:,} rows")
        lines.append(f"  {'':<30}{'facedata':>14}{'img2dataset':>14}{'fd / i2d':>10}")
        for label, show, number in _metrics(cores):
            a = show(fd) if fd else "-"
            b = show(i2d) if i2d else "-"
            c = _ratio(number(fd), number(i2d)) if fd and i2d and number else ""
            lines.append(f"  {label:<30}{a:>14}{b:>14}{c:>10}")
    for tool in ("facedata", "img2dataset"):
        runs = sorted((r for key, r in best.items() if key[0] == tool), key=lambda r: r.rows)
        if len(runs) >= 2:
            small, large = runs[0], runs[-1]
            lines.append(
                f"\n{tool} peak RSS (tree sum) {large.rows:,} vs {small.rows:,} rows: "
                f"{_mib(large.peak_rss_tree)} / {_mib(small.peak_rss_tree)} = "
                f"{_ratio(large.peak_rss_tree, small.peak_rss_tree)}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, action="append", help="URL list size (repeatable; default 20000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 rows, 1,000 per shard")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool and size, in alternating order; the table shows the best (default 1)")
    parser.add_argument("--threads", type=int, default=32, help="download threads per shard, both tools (default 32)")
    parser.add_argument("--runner", choices=("process", "thread"), default="process",
                        help="facedata's runner.kind: shard tasks in 2 worker processes (default) or 2 threads")
    parser.add_argument("--tool", choices=("facedata", "img2dataset"), action="append",
                        help="run only this tool (repeatable; default both)")
    parser.add_argument("--img2dataset-max-rows", type=int, default=None, metavar="ROWS",
                        help="run img2dataset only on lists of at most ROWS rows")
    args = parser.parse_args(argv)
    row_counts = [2000] if args.quick else (args.rows or [20_000])
    shard_size = 1000 if args.quick else 10_000
    tools = args.tool or ["facedata", "img2dataset"]
    cores = os.cpu_count() or 1

    pool = make_pool(WORK / "pool" / "img")
    i2d_python = img2dataset_python() if "img2dataset" in tools else None
    server = ServerProcess(WORK / "pool")
    results: list[RunResult] = []

    def run(tool: str, url_list: Path, rows: int, samples_per_shard: int, name: str) -> RunResult:
        out_dir = WORK / "runs" / name
        if tool == "facedata":
            result = run_facedata(url_list, out_dir, rows, args.threads, samples_per_shard, args.runner, server)
        else:
            result = run_img2dataset(i2d_python, url_list, out_dir, rows, args.threads, samples_per_shard, server)
        # Outputs are not compared; free the disk for the next run. The log stays beside it.
        shutil.rmtree(out_dir, ignore_errors=True)
        return result

    try:
        # Warm the page cache, the bytecode cache, the Prefect database and both tools' imports.
        warm_list = WORK / "urls_warmup.parquet"
        write_url_list(warm_list, server.base_url, 400, pool)
        print("warm-up run ...", flush=True)
        for tool in tools:
            run(tool, warm_list, 400, 200, f"warmup-{tool}")
        for rows in row_counts:
            url_list = WORK / f"urls_{rows}.parquet"
            write_url_list(url_list, server.base_url, rows, pool)
            wanted = [t for t in tools if not (t == "img2dataset" and args.img2dataset_max_rows
                                                and rows > args.img2dataset_max_rows)]
            for repeat in range(args.repeat):
                # Alternate the order so neither tool always runs first (or into the same noise).
                for tool in wanted if repeat % 2 == 0 else wanted[::-1]:
                    print(f"{tool}: {rows:,} rows (run {repeat + 1}/{args.repeat}) ...", flush=True)
                    result = run(tool, url_list, rows, shard_size, f"{tool}-{rows}")
                    results.append(result)
                    print(f"  {result.ok:,} ok in {result.wall_s:.1f} s, {result.images_per_s:.0f} images/s, "
                          f"{_per_cpu_s(result):.0f} per CPU s, peak RSS {_mib(result.peak_rss_tree)}, "
                          f"load {result.load_before:.1f}", flush=True)
    finally:
        server.stop()

    print(format_table(results, cores))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cores": cores,
        "threads_per_shard": args.threads,
        "facedata_runner": args.runner,
        "samples_per_shard": shard_size,
        "pool_images": len(pool),
        "img2dataset_version": IMG2DATASET_VERSION,
        "runs": [{**asdict(r), "images_per_s": round(r.images_per_s, 1),
                  "window_images_per_s": round(r.window_images_per_s, 1),
                  "images_per_cpu_s": round(_per_cpu_s(r), 1)} for r in results],
    }
    out = WORK / "download.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 1 if any(r.returncode for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
