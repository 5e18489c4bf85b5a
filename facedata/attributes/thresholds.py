"""The confidence each attribute needs before a caption states it: the config's own thresholds, the
ones calibrated on labelled real faces (calibration.json, written by
benchmarks/calibrate_attributes.py; see facedata/attributes/calibration.py), min_confidence. Reads
only the JSON: the caption step, the fingerprints and the dataset card use it without loading models.
"""

from __future__ import annotations

import json
from pathlib import Path

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.config import AttributeConfig

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# A threshold no confidence reaches: that attribute value is never stated.
NEVER = 1.01


def load_calibration(path: Path = CALIBRATION_FILE) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"attributes": {}}


def withheld_values(path: Path = CALIBRATION_FILE) -> dict[str, list[str]]:
    """attribute -> the values of it that are not stated by default (too few labelled faces
    show them to measure them)."""
    return {name: entry["values_left_out"] for name, entry in load_calibration(path).get("attributes", {}).items()
            if entry.get("values_left_out")}  # fmt: skip


def default_thresholds(path: Path = CALIBRATION_FILE) -> dict[str, float | None]:
    """attribute -> its calibrated threshold, or None where no threshold is right often enough
    (left out of captions by default). Attributes not in the file are not calibrated."""
    return {name: entry.get("threshold") for name, entry in load_calibration(path).get("attributes", {}).items()}


def thresholds(cfg: AttributeConfig) -> dict[str, float]:
    """Confidence each kept attribute needs; attributes not asked for are absent. A threshold set
    in the config wins; then, when `calibrated`, the one measured on labelled faces
    (facedata/attributes/calibration.json), where an attribute no threshold made reliable is left
    out unless `include` names it; then min_confidence. A calibrated attribute's values that too
    few labelled faces show (gray, white and red hair) get a key "name=value" with NEVER."""
    calibrated = default_thresholds() if cfg.calibrated else {}
    withheld = withheld_values() if cfg.calibrated else {}
    wanted = cfg.include if cfg.include is not None else list(ATTRIBUTES)
    needed = {}
    for name in wanted:
        if name in cfg.thresholds:
            needed[name] = cfg.thresholds[name]
        elif calibrated.get(name) is not None:
            needed[name] = calibrated[name]
            needed.update({f"{name}={value}": NEVER for value in withheld.get(name, ())})
        elif name not in calibrated or cfg.include is not None:
            needed[name] = cfg.min_confidence
    return needed

