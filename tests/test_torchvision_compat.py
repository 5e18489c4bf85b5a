"""torchvision (a CUDA build beside CPU torch) and open_clip import and work after
`ensure_torchvision`; the compiled ops that cannot load fail with a clear RuntimeError."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from facedata.core.torchvision_compat import _compiled_ops_load, ensure_torchvision

    assert "torchvision" not in sys.modules
    print("compiled ops load:", _compiled_ops_load())
    ensure_torchvision()
    ensure_torchvision()  # idempotent
    import open_clip
    import torchvision
    from torchvision import transforms

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 1},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    model.output_dict = True
    model.eval()
    tokens = open_clip.get_tokenizer("ViT-B-16", context_length=16)(["a smiling woman", "a man with a beard"])
    from PIL import Image
    image = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])(
        Image.new("RGB", (50, 40), (200, 120, 90)))
    with torch.no_grad():
        out = model(torch.stack([image, image]), tokens)
    assert out["image_features"].shape == (2, 32) and out["text_features"].shape == (2, 32)
    assert torch.isfinite(out["image_features"]).all()
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)

    try:
        torchvision.ops.nms(torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11]]), torch.tensor([0.9, 0.8]), 0.5)
    except RuntimeError as err:
        print("nms:", " ".join(str(err).split())[:200])
    else:
        print("nms: ran")
""")


def test_open_clip_works_after_ensure_torchvision(cli_env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=cli_env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, *_, last = proc.stdout.strip().splitlines()
    if first == "compiled ops load: True":  # a torchvision built for this torch: nms simply runs
        assert last == "nms: ran"
    else:  # the CPU-torch + CUDA-torchvision install: a RuntimeError that says why, no crash
        assert first == "compiled ops load: False"
        assert last.startswith("nms: Couldn't load custom C++ ops"), last
