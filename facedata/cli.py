"""The `facedata` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from facedata.config import ConfigError, load_config
from facedata.prefect_env import configure_prefect
from facedata.reader import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="Run the curation flow on a config.", description="Run the curation flow on CONFIG.")
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--output", type=Path, help="run directory (default: the config's output.dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set download.timeout=5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="Run the embedded demo end to end, offline.",
        description="Serve a small real photo corpus on 127.0.0.1 (with broken entries) and curate it.",
    )
    p.add_argument("--output", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedata", description="Build face-centric image-text datasets.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_demo(sub)
    return parser


def cmd_run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = args.output or Path(cfg.output.dir)
    from facedata.summary import format_summary
    from flows.curate import run_curation

    summary = run_curation(cfg, run_dir, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    return 0


def cmd_demo(args) -> int:
    from facedata.demo import run_demo

    run_demo(args.output, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("facedata").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    configure_prefect()
    try:
        return {"run": cmd_run, "demo": cmd_demo}[args.command](args)
    except (ConfigError, InputError) as err:
        print(f"facedata: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facedata: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
