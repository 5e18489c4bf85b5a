"""Shared by the image filters: decoding bytes to a bounded size, one-thread ONNX Runtime sessions."""

from __future__ import annotations

import io

from PIL import Image


def decode_rgb(data: bytes, max_side: int | None = None) -> Image.Image:
    """The image as RGB; with max_side, shrunk so its longer side is at most max_side. JPEG's draft
    mode decodes at 1/2, 1/4 or 1/8 scale directly, which is most of the cost saved on large photos;
    draft never goes below the requested size, so the final thumbnail does the exact fit."""
    im = Image.open(io.BytesIO(data))
    if max_side:
        im.draft("RGB", (max_side, max_side))
    im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.BILINEAR)
    return im


def onnx_session(path: str):
    """An ONNX Runtime CPU session using one thread per call: the pipeline runs one shard per core, so
    a model that spread over every core would only contend with the other shards' workers."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def package_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
