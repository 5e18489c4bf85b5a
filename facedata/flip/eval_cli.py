"""`facedata eval`: the command line's parser and runner (the evaluation itself is in evaluate.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from facedata.errors import UserError
from facedata.flip.evaluate import MIN_EVAL_SAMPLES, evaluate
from facedata.flip.prompts import PROMPTS
from facedata.flip.report import format_eval_table

__all__ = ["add_eval_parser", "run_eval_command"]


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="Evaluate a FLIP checkpoint: retrieval, zero-shot and linear-probe attributes.",
        description="Evaluate a FLIP checkpoint on a published dataset's identity-disjoint held-out split "
                    "(image<->text retrieval R@1/5/10, zero-shot attribute classification from prompts, a "
                    "linear probe on frozen image features), each against the same architecture at its "
                    "random initialisation.")
    p.add_argument("checkpoint", type=Path, help="a checkpoint (checkpoints/step_*.pt) or a training output.dir")
    p.add_argument("--dataset", type=Path, required=True, help="a published dataset folder (DEST of facedata publish)")
    p.add_argument("--split", default="test",
                   help="held-out split, or several joined by + (default: test, pooled with validation when it "
                        "has fewer than --min-samples samples)")
    p.add_argument("--train-split", default="train", help="split the linear probe is trained on (default: train)")
    p.add_argument("--min-samples", type=int, default=MIN_EVAL_SAMPLES,
                   help=f"pool a smaller test split with validation (default: {MIN_EVAL_SAMPLES}; 0: never)")
    p.add_argument("--out", type=Path, help="results JSON (default: eval_SPLIT.json in the checkpoint's run folder)")
    p.add_argument("--attributes", help="comma-separated attributes (default: all with prompts)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="only labels at least this confident (default: every published value)")
    p.add_argument("--max-train-samples", type=int, default=20_000,
                   help="probe training samples at most (a seeded subset; default: 20000)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--no-random", action="store_true", help="skip the random-initialisation comparison")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=2, help="image loading processes (default: 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _default_out(checkpoint: Path, split: str) -> Path:
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"eval_{split.replace('+', '_')}.json"


def run_eval_command(args) -> int:
    from facedata.shards import write_json

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--min-samples", args.min_samples, 0),
                             ("--max-train-samples", args.max_train_samples, 1)):
        if value < low:
            raise UserError(f"facedata eval: {flag}: expected at least {low} (got {value})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"facedata eval: --threads: expected at least 1 (got {args.threads})")
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()] if args.attributes else None
    for a in attributes or ():
        if a not in PROMPTS:
            raise UserError(f"facedata eval: --attributes: unknown attribute {a!r} (known: {', '.join(PROMPTS)})")
    results = evaluate(args.checkpoint, args.dataset, split=args.split, train_split=args.train_split,
                       min_samples=args.min_samples, attributes=attributes, min_confidence=args.min_confidence,
                       probe=not args.no_probe, compare_random=not args.no_random,
                       max_train_samples=args.max_train_samples, batch_size=args.batch_size, device=args.device,
                       workers=args.workers, threads=args.threads, progress=not args.no_progress)
    out = args.out or _default_out(args.checkpoint, "+".join(results["eval_splits"]))
    write_json(out, results)
    print(format_eval_table(results))
    print(f"results: {out}")
    return 0
