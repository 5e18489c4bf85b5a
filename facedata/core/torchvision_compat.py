"""Make torchvision importable beside the CPU build of torch.

Every registry torchvision wheel for Linux x86 is a CUDA build: its compiled ops (`_C.so`) need
libtorch_cuda, fail to load beside CPU torch, and `import torchvision` then dies registering fake
kernels for `torchvision::nms`, an operator that never got defined. open_clip and timm import
torchvision, so training would not start. When (and only when) the compiled ops do not load, the
two operator schemas torchvision's registrations expect are declared here, without kernels. What
open_clip uses (models, transforms) then works; torchvision's compiled ops (nms, roi_align,
`torchvision.io` decoding) stay unavailable and say so when called (facedata decodes images with
Pillow). With a torchvision that matches its torch, this does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_LIBRARY: torch.library.Library | None = None  # kept alive: the definitions live as long as it does


def _compiled_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    library = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError:
        return False
    return True


def ensure_torchvision() -> None:
    """Call before torchvision (or open_clip) is first imported."""
    global _LIBRARY
    if "torchvision" in sys.modules or _LIBRARY is not None or _compiled_ops_load():
        return
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
