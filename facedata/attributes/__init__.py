"""Attribute models, each behind the `AttributePredictor` interface of `facedata.attributes.base`,
chosen by `attributes.predictors` in the config."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from facedata.core.config import AttributeConfig, FaceConfig

if TYPE_CHECKING:  # the models' runtimes load with the predictors, not with the vocabulary
    from facedata.attributes.base import AttributePredictor


@functools.lru_cache(maxsize=4)
def _load(names: tuple[str, ...], model_dir: str | None, threads: int) -> tuple[AttributePredictor, ...]:
    loaded: list[AttributePredictor] = []
    for name in names:
        # Imported here: a run that does not ask for a model does not pay for its runtime (torch,
        # LiteRT) or its files.
        if name == "age_gender":
            from facedata.attributes.age_gender import load_age_gender

            loaded.append(load_age_gender(model_dir, threads))
        elif name == "expression":
            from facedata.attributes.expression import FerExpression

            loaded.append(FerExpression(num_threads=threads))
        elif name == "parsing":
            from facedata.attributes.parsing import BiSeNetParsing

            loaded.append(BiSeNetParsing(threads=threads))
        elif name == "geometry":
            from facedata.attributes.geometry import FaceGeometry

            loaded.append(FaceGeometry())
        else:
            raise ValueError(f"unknown attribute predictor {name!r}")
    return tuple(loaded)


def load_predictors(cfg: AttributeConfig, face_cfg: FaceConfig) -> list[AttributePredictor]:
    """The configured predictors, loaded once per process. A user's genderage.onnx is looked for
    in attributes.model_dir, else in faces.model_dir."""
    model_dir = cfg.model_dir or face_cfg.model_dir
    return list(_load(tuple(cfg.predictors), model_dir, cfg.threads))
