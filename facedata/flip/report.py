"""The printed table of a published-dataset evaluation (`facedata.flip.evaluate.evaluate`'s result)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_eval_table"]


def _f(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def format_eval_table(results: dict[str, Any]) -> str:
    """A short table: every figure for the trained and the random-init model and their difference."""
    lines = []
    where = results.get("checkpoint") or "model"
    step = f" (step {results['step']})" if results.get("step") is not None else ""
    lines.append(f"FLIP eval of {where}{step}")
    lines.append(f"held-out: {'+'.join(results['eval_splits'])}, {results['n_eval']} samples; probe trained on "
                 f"{results['train_split']} ({results['n_train']}); identities shared: "
                 f"{results['identities']['shared']}")
    if results.get("split_note"):
        lines.append(f"note: {results['split_note']}")
    rows: list[tuple[str, str, dict]] = []
    for block, label in (("retrieval", "retrieval"), ("train_retrieval", "train fit")):
        b = results.get(block)
        if not b:
            continue
        for direction, short in (("image_to_text", "i->t"), ("text_to_image", "t->i")):
            for key, v in b[direction].items():
                rows.append((f"{label} {short} {key}", str(b["n"]), v))
    for block, label in (("zero_shot", "zero-shot"), ("linear_probe", "probe")):
        for a, b in results.get(block, {}).items():
            rows.append((f"{label} {a} acc", str(b["n"]), b["accuracy"]))
            rows.append((f"{label} {a} bal-acc", str(b["n"]), b["balanced_accuracy"]))
        mean = results.get(f"{block}_mean", {})
        if results.get(block):
            rows.append((f"{label} mean bal-acc", f"{len(results[block])} attr", mean["balanced_accuracy"]))
    width = max([len(r[0]) for r in rows] + [6])
    lines.append(f"{'metric':<{width}}  {'n':>7}  {'trained':>7}  {'random':>7}  {'diff':>7}")
    for name, n, v in rows:
        lines.append(f"{name:<{width}}  {n:>7}  {_f(v['trained']):>7}  {_f(v['random_init']):>7}  "
                     f"{_f(v['difference'], True):>7}")
    for block, why in results.get("skipped", {}).items():
        if why:
            lines.append(f"skipped ({block}): " + "; ".join(f"{a}: {w}" for a, w in why.items()))
    return "\n".join(lines)
