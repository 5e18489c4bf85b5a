"""The fixed cost of a small run: time to the first output line, to the first finished shard, and
in total, for `facedata run` on 10 real photos (a folder input, so no network), side by side with a
baseline commit of this repository in the same session.

    .venv/bin/python benchmarks/startup.py [--baseline REF] [--repeats 3]

Variants: the baseline's `facedata run` (Prefect), this tree's `facedata run` (Prefect) and this
tree's `facedata run --no-prefect`. Each run gets a fresh run directory; the Prefect home is shared
and warmed first, as on a user's machine after the first run. Runs alternate between variants so
that load from other processes spreads over all of them; medians are reported, with ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "startup"
sys.path.insert(0, str(REPO / "tests"))


def make_corpus(n: int = 10) -> Path:
    from conftest import openpeople_photos

    folder = WORK / "photos"
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i, path in enumerate(openpeople_photos()[:n]):
        shutil.copy(path, folder / f"{i:03d}.jpg")
        (folder / f"{i:03d}.txt").write_text(f"a photo of a person, {path.stem.replace('_', ' ')}")
    return folder


def baseline_tree(ref: str) -> Path:
    tree = WORK / f"baseline-{ref}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), ref], check=True,
                       capture_output=True)
    return tree


def timed_run(tree: Path, config: Path, output: Path, extra: list[str], env: dict) -> dict:
    """Seconds from start to the first line, to the first finished download shard, and to exit."""
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "facedata.cli", "run", str(config), "--output", str(output),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PYTHONPATH": str(tree)}, cwd=tree)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(line)
            marks.setdefault("first_line", now)
            if "shard 00000:" in line and " ok in " in line:
                marks.setdefault("first_shard", now)

    reader = threading.Thread(target=read)
    reader.start()
    proc.wait()
    reader.join()
    marks["total"] = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: run failed:\n{''.join(lines[-20:])}")
    return marks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="b6b25fd", help="git ref to compare with (default: b6b25fd)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    WORK.mkdir(parents=True, exist_ok=True)
    photos = make_corpus()
    config = WORK / "run.yaml"
    config.write_text(yaml.safe_dump({"input": {"path": str(photos), "format": "folder"},
                                      "output": {"contact_sheet": False}}))
    env = {**os.environ, "PREFECT_HOME": str(WORK / "prefect-home")}
    variants = {
        f"baseline {args.baseline}, Prefect": (baseline_tree(args.baseline), []),
        "this tree, Prefect": (REPO, []),
        "this tree, --no-prefect": (REPO, ["--no-prefect"]),
    }
    timed_run(REPO, config, WORK / "warm", [], env)  # the Prefect home's one-time migration
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (tree, extra) in variants.items():
            results[name].append(timed_run(tree, config, WORK / "out", extra, env))

    base = f"baseline {args.baseline}, Prefect"
    med = {name: {k: statistics.median(r[k] for r in runs) for k in ("first_line", "first_shard", "total")}
           for name, runs in results.items()}
    print(f"10-image folder run, median of {args.repeats}; seconds (ratio to the baseline)")
    print(f"{'variant':<34}{'first line':>18}{'first shard':>18}{'total':>18}")
    for name, m in med.items():
        cells = [f"{m[k]:.1f} ({m[k] / med[base][k]:.2f}x)" for k in ("first_line", "first_shard", "total")]
        print(f"{name:<34}" + "".join(f"{c:>18}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
