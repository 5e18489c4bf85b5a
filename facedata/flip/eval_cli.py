"""`facedata eval`: the command line's parser and runner.

Two forms: `facedata eval CHECKPOINT --dataset DIR` evaluates on a published facedata dataset
(facedata.flip.evaluate); `facedata eval --benchmark NAME --data DIR --checkpoint ... --model ...`
runs a public benchmark's protocol for several models side by side (facedata.flip.benchmark_eval).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facedata.core.errors import UserError
from facedata.flip.benchmarks import BENCHMARKS
from facedata.flip.evaluate import MIN_EVAL_SAMPLES, evaluate
from facedata.flip.prompts import PROMPTS
from facedata.flip.report import format_eval_table

__all__ = ["add_eval_parser", "run_eval_command"]


def add_eval_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="Evaluate FLIP models: on a published dataset, or on public benchmarks (CelebA, LFWA, captions).",
        description="Evaluate a FLIP checkpoint on a published dataset's identity-disjoint held-out split "
                    "(image<->text retrieval R@1/5/10, zero-shot attribute classification from prompts, a "
                    "linear probe on frozen image features), each against the same architecture at its "
                    "random initialisation. With --benchmark: a public benchmark read from its own file "
                    "layout under --data (celeba-attr, lfwa-attr: a linear probe per attribute, label-wise "
                    "mean accuracy; celeba-caption, folder-retrieval: R@1/5/10 both ways with several captions "
                    "per image), for every --checkpoint and --model side by side, written as CSV, markdown "
                    "and a plot.")
    p.add_argument("checkpoint", type=Path, nargs="?",
                   help="a checkpoint (checkpoints/step_*.pt) or a training output.dir (published-dataset form)")
    p.add_argument("--dataset", type=Path, help="a published dataset folder (DEST of facedata publish)")
    b = p.add_argument_group("public benchmarks")
    b.add_argument("--benchmark", choices=tuple(BENCHMARKS), help="a public benchmark's protocol (needs --data)")
    b.add_argument("--data", type=Path, help="the benchmark's folder, in its published layout (see README)")
    b.add_argument("--checkpoint", dest="checkpoints", type=Path, action="append", default=[],
                   help="a facedata train checkpoint or run folder (repeatable)")
    b.add_argument("--model", dest="models", action="append", default=[],
                   help="ARCH[=WEIGHTS]: an open_clip architecture name, model-config JSON or training YAML, with a "
                        "local weights file (CLIP, FaRL, open_clip); without weights: random init (repeatable)")
    p.add_argument("--split", default="test",
                   help="held-out split, or several joined by + (default: test, pooled with validation when it "
                        "has fewer than --min-samples samples)")
    p.add_argument("--train-split", default="train", help="split the linear probe is trained on (default: train)")
    p.add_argument("--min-samples", type=int, default=MIN_EVAL_SAMPLES,
                   help=f"pool a smaller test split with validation (default: {MIN_EVAL_SAMPLES}; 0: never)")
    p.add_argument("--out", type=Path, help="results JSON (default: eval_SPLIT.json in the checkpoint's run folder); "
                                            "with --benchmark a folder (default: ./eval_BENCHMARK)")
    p.add_argument("--attributes", help="comma-separated attributes (default: all with prompts)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="only labels at least this confident (default: every published value)")
    p.add_argument("--max-train-samples", type=int, default=20_000,
                   help="probe training samples at most (a seeded subset; default: 20000)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--no-random", action="store_true", help="skip the random-initialisation comparison")
    p.add_argument("--no-plot", action="store_true", help="with --benchmark: no table.png")
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
    from facedata.core.shards import write_json

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--min-samples", args.min_samples, 0),
                             ("--max-train-samples", args.max_train_samples, 1)):
        if value < low:
            raise UserError(f"facedata eval: {flag}: expected at least {low} (got {value})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"facedata eval: --threads: expected at least 1 (got {args.threads})")
    if args.benchmark or args.data or args.checkpoints or args.models:
        return run_benchmark_command(args)
    if args.checkpoint is None or args.dataset is None:
        raise UserError("facedata eval: give CHECKPOINT --dataset DIR (a published dataset), or --benchmark NAME "
                        "--data DIR with --checkpoint/--model entries")
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


def run_benchmark_command(args) -> int:
    """Read the benchmark (every file checked before any model loads), load each model, run the
    protocol, write the tables and print the markdown one."""
    from facedata.flip.benchmark_eval import format_markdown, run_benchmark, write_tables
    from facedata.flip.benchmarks import read_benchmark
    from facedata.flip.encoders import ModelSpec, check_spec, load_encoder, parse_model_spec, random_init_of

    if not args.benchmark or not args.data:
        raise UserError("facedata eval: --benchmark and --data go together (and take --checkpoint/--model entries)")
    if args.checkpoint is not None or args.dataset is not None:
        raise UserError("facedata eval: with --benchmark, give models as --checkpoint/--model, not CHECKPOINT --dataset")
    specs = [ModelSpec("checkpoint", str(c)) for c in args.checkpoints] + [parse_model_spec(m) for m in args.models]
    if not specs:
        raise UserError("facedata eval: --benchmark needs at least one --checkpoint or --model")
    bench = read_benchmark(args.benchmark, args.data)
    for spec in specs:
        check_spec(spec)
    encoders, seen_random = [], set()
    for spec in specs:
        enc = load_encoder(spec)
        encoders.append(enc)
        if enc.kind != "random init" and not args.no_random:
            key = (repr(enc.section.resolved()), enc.seed)  # one random-init row per architecture and seed
            if key not in seen_random:
                seen_random.add(key)
                encoders.append(random_init_of(enc))
    results = run_benchmark(bench, encoders, batch_size=args.batch_size, workers=args.workers, device=args.device,
                            threads=args.threads, progress=not args.no_progress)
    out = args.out or Path(f"eval_{args.benchmark}")
    files = write_tables(results, out, plot=not args.no_plot)
    print(format_markdown(results))
    print("written: " + ", ".join(str(p) for p in files.values()))
    return 0
