"""The `facedata explore` subcommand's arguments (the server is imported only when it runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_explore_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explore", help="Browse a run in a local web page: funnel, reasons, facets, samples, identities.",
        description="Serve a web page over the run directory PATH on 127.0.0.1 and print its URL: the funnel "
                    "(click a reason to see its samples), facets and caption search, each sample with its faces "
                    "and attributes, identities; with --checkpoint, text-to-face search. The one write action is "
                    "opting a face or identity out (added to the run's opt-out gallery).",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="a run directory (e.g. runs/demo/run)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1; anything else exposes the run's data to the network)")
    p.add_argument("--checkpoint", type=Path, help="a FLIP checkpoint: text-to-face search and 'more like this'")
    p.add_argument("--cache-dir", type=Path, help="where the sample table and thumbnails go (default: PATH/.explore)")
    p.add_argument("--optout-gallery", type=Path,
                   help="opt-out gallery folder (default: identity.optout_gallery of the run's config)")
    return p


def run_explore_command(args) -> int:
    from facedata.explore.server import serve

    serve(args.path, host=args.host, port=args.port, checkpoint=args.checkpoint, cache_dir=args.cache_dir,
          optout_gallery=args.optout_gallery, ready=lambda line: print(line, flush=True))
    return 0
