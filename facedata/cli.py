"""The `facedata` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from facedata.core.config import ConfigError, FaceConfig, FaceFilterConfig, ImageConfig, load_config
from facedata.core.errors import UserError
from facedata.explore.command import add_explore_parser, run_explore_command
from facedata.flip.eval_cli import add_eval_parser, run_eval_command
from facedata.flip.search import add_search_parser, run_search_command
from facedata.core.prefect_env import configure_prefect
from flows.deploy import add_serve_parser, run_serve_command


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="Run the curation flow on a config.", description="Run the curation flow on CONFIG.")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--output", type=Path, help="run directory (default: the config's output.dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set download.timeout=5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="print per step what a run would reuse and redo (settings, models, input), run nothing")
    p.add_argument("--no-prefect", action="store_true",
                   help="run the steps in this process, one shard after another, without Prefect")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="Run the embedded demo end to end, offline.",
        description="Serve a small real photo corpus on 127.0.0.1 (with broken entries), curate and publish it, "
                    "then train and evaluate a tiny FLIP model on it.",
    )
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--no-train", action="store_true", help="stop after publishing; skip the FLIP model")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_detect(sub) -> None:
    defaults = FaceConfig()
    p = sub.add_parser(
        "detect", help="Print the faces found in image files as JSON.",
        description="Detect faces in each image file and print one JSON object per image: path, width, "
        "height and faces (bbox x1 y1 x2 y2 and 5 keypoints in the image's pixels after EXIF orientation, "
        "score, pose in degrees). A file that cannot be read gets {path, error} and the rest go on; "
        "the exit status is 1 when no file could be read.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files")
    p.add_argument("--format", choices=("jsonl", "json"), default="jsonl",
                   help="jsonl: one object per line as each image is done (default); json: one array")
    p.add_argument("--backend", choices=get_args(FaceConfig.model_fields["backend"].annotation),
                   default=defaults.backend, help=f"face models (default: {defaults.backend})")
    p.add_argument("--model-dir", help="your own insightface model folder (default: the packaged models)")
    p.add_argument("--det-size", type=int, default=defaults.det_size,
                   help=f"detector input side in pixels (default: {defaults.det_size})")
    p.add_argument("--min-score", type=float, default=defaults.filter.min_score,
                   help=f"smallest detector score reported (default: {defaults.filter.min_score})")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="Train a FLIP (CLIP-style) model on a published dataset.",
                       description="Train FLIP as CONFIG says; rerun a stopped run to resume it.")
    p.add_argument("config", type=Path, help="training YAML (see configs/flip_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set training.steps=100 (repeatable)")
    p.add_argument("--no-prefect", action="store_true", help="train in this process without a Prefect flow")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_publish(sub) -> None:
    p = sub.add_parser(
        "publish", help="Publish a finished run as a dataset (folder or Hugging Face Hub).",
        description="Publish RUN_DIR's kept samples as parquet shards (load_dataset), webdataset tars and a "
                    "dataset card, to a folder or a Hub dataset repo (private by default; token from HF_TOKEN "
                    "or `hf auth login`, never printed). Republishing the same run is a no-op.",
    )
    p.add_argument("run_dir", type=Path, help="a finished run directory (the one holding summary.json)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="DEST", help="a folder, or hf://datasets/OWNER/NAME[@revision]")
    where.add_argument("--repo", metavar="OWNER/NAME", help="a Hub dataset repo (same as --to hf://datasets/...)")
    p.add_argument("--dry-run", action="store_true",
                   help="write nothing: build in a temporary folder, then remove it (Hub: print the upload plan)")
    p.add_argument("--public", action="store_true", help="Hub: create the repo public (default: private)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier publish of other content at the destination (anything else is refused)")
    p.add_argument("--skip-partial", action="store_true", help="skip unfinished shards with a warning")
    p.add_argument("--crops", action="store_true", help="face crops instead of whole images in the tars")
    p.add_argument("--embeddings", action="store_true", help="also publish the primary faces' embeddings")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedata", description="Build face-centric image-text datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_demo(sub)
    _add_detect(sub)
    _add_train(sub)
    _add_publish(sub)
    add_eval_parser(sub)
    add_search_parser(sub)
    add_serve_parser(sub)
    add_explore_parser(sub)
    return parser


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = args.output or Path(cfg.output.dir)
    from facedata.report.summary import format_summary

    if args.dry_run:
        from facedata.pipeline import dry_run

        print("\n".join(dry_run(cfg, run_dir)))
        return 0
    from facedata.ingest.reader import check_run

    # A bad input or run directory is one line now, before the models load and Prefect starts.
    check_run(cfg, run_dir, "--output" if args.output else "output.dir")
    if args.no_prefect:
        from facedata.pipeline import curate

        summary = curate(cfg, run_dir, progress=not args.no_progress)
    else:
        from flows.curate import run_curation

        summary = run_curation(cfg, run_dir, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0


def cmd_demo(args) -> int:
    from facedata.demo.run import run_demo

    run_demo(args.output, progress=not args.no_progress, train=not args.no_train)
    return 0


def cmd_detect(args) -> int:
    from facedata.faces.step import detect_files

    try:
        cfg = FaceConfig(backend=args.backend, model_dir=args.model_dir, det_size=args.det_size,
                         filter=FaceFilterConfig(min_score=args.min_score))
    except ValidationError as err:
        e = err.errors()[0]
        raise ConfigError(f"facedata detect: --{str(e['loc'][-1]).replace('_', '-')}: {e['msg']}") from None
    results = []
    n_read = 0
    for result in detect_files(args.paths, cfg, ImageConfig().max_pixels):
        n_read += "error" not in result
        if args.format == "jsonl":
            print(json.dumps(result), flush=True)
        else:
            results.append(result)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    return 0 if n_read else 1


def cmd_train(args) -> int:
    from facedata.flip.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    if args.no_prefect:
        from facedata.flip.train import train_and_report as run_training
    else:
        from flows.train_flip import run_training
    from facedata.flip.train import format_report

    print(format_report(run_training(cfg, progress=not args.no_progress)))
    return 0


def cmd_publish(args) -> int:
    from facedata.publish.writer import publish

    result = publish(args.run_dir, args.to, repo=args.repo, private=not args.public, dry_run=args.dry_run,
                     overwrite=args.overwrite, skip_partial=args.skip_partial, crops=args.crops,
                     embeddings=args.embeddings, samples_per_shard=args.samples_per_shard,
                     progress=not args.no_progress)
    manifest = result["manifest"]
    splits = ", ".join(f"{name} {s['num_examples']}" for name, s in manifest["splits"].items())
    state = {"unchanged": "unchanged (already published)",
             "dry run": "not written (dry run), would go to"}.get(manifest["status"], "written")
    where = result.get("staging", result["destination"])
    print(f"{manifest['n_samples']} samples ({splits}) {state}: {where}")
    upload = result.get("upload")
    if upload and not args.dry_run:
        print(f"uploaded to {upload.get('url') or result['destination']}")
    return 0


def _stop_at_once(signum, frame) -> None:
    """Ctrl-C during a run: stop now, with one line. Every finished shard is on disk already (its
    completion record is written last); the temp files of the writes in progress are removed, so
    nothing partial is left; the rerun redoes the unfinished shards. Unwinding instead would wait
    for every running task and for Prefect to report the cancellation, over a minute of tracebacks."""
    from facedata.core.shards import discard_in_flight

    discard_in_flight()
    print("facedata: interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
    os._exit(130)  # the temporary Prefect server's watchdog stops it when this process is gone


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("facedata").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    configure_prefect()
    if args.command in ("run", "demo", "train"):
        signal.signal(signal.SIGINT, _stop_at_once)
    try:
        return {"run": cmd_run, "demo": cmd_demo, "detect": cmd_detect, "train": cmd_train,
                "publish": cmd_publish, "search": run_search_command,
                "eval": run_eval_command, "serve": run_serve_command,
                "explore": run_explore_command}[args.command](args)
    except UserError as err:
        print(f"facedata: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facedata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
