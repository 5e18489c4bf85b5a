"""FLIP training on a small real dataset in the published layout (openpeople photos, captions from
each person's metadata, primary face boxes from the face detector)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from facedata.core.config import ConfigError, FaceConfig
from facedata.core.errors import UserError
from facedata.flip.config import load_train_config, train_config_from_dict
from facedata.core.packages import package_dir
from tests.conftest import REPO, facedata_cmd

SHOTS = {"studio_portrait": "a studio portrait", "amateur_selfie": "an amateur selfie",
         "amateur_posture": "a full-length snapshot", "studio_posture": "a full-length studio photo"}
VALIDATION = ("P009", "P010")
TINY_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 128, "head_width": 64, "layers": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _caption(meta: dict, shot: str) -> str:
    details = meta["character_details"]
    demo = details["demographics"]
    person = {"female": "woman", "male": "man"}.get(demo["sex"], "person")
    hair = details["visible_traits"]["hair"]["description"].rstrip(".").lower()
    return f"{SHOTS[shot]} of a {person} aged {demo['age_range']} with {hair}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_dataset(dest: Path) -> dict:
    """DEST/webdataset/{train-00000,train-00001,validation-00000}.tar: 32 + 8 samples."""
    from facedata.faces.models import load_analyzer

    analyzer = load_analyzer(FaceConfig(), threads=1)
    samples: dict[str, list] = {"train": [], "validation": []}
    for person in sorted((package_dir("openpeople") / "data" / "curated").glob("P*")):
        meta = json.loads((person / "metadata.json").read_text())
        split = "validation" if person.name in VALIDATION else "train"
        for shot in SHOTS:
            with Image.open(person / "assets" / f"{shot}.jpg") as im:
                im.draft("RGB", (576, 576))
                im = im.convert("RGB")
                im.thumbnail((288, 288))
            faces = analyzer.analyze([np.asarray(im)])[0]
            w, h = im.size
            box = [float(v) for v in faces[0].bbox] if faces else [w * 0.3, h * 0.1, w * 0.7, h * 0.5]
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            key = f"{person.name}_{shot}"
            caption = _caption(meta, shot)
            record = {
                "key": key, "face_caption": caption, "caption": None, "url": f"http://example.invalid/{key}.jpg",
                "width": w, "height": h, "n_faces": max(1, len(faces)), "identity_id": person.name, "split": split,
                "faces": [{"bbox": box, "landmarks": None, "score": 0.9, "identity_id": person.name,
                           "primary": True, "attributes": {}, "confidences": {}}],
            }
            samples[split].append((key, buf.getvalue(), caption, record))
    wds = dest / "webdataset"
    wds.mkdir(parents=True)
    shards = {"train-00000.tar": samples["train"][:16], "train-00001.tar": samples["train"][16:],
              "validation-00000.tar": samples["validation"]}
    for name, rows in shards.items():
        with tarfile.open(wds / name, "w") as tar:
            for key, jpg, caption, record in rows:
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps(record).encode())
    return samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("published")
    build_dataset(dest)
    return dest


def tiny_config(data_dir: Path, out: Path, checkpoint_every: int = 3, **training) -> dict:
    return {
        "data": {"dir": str(data_dir), "split": "train", "use_crops": True},
        "model": {"config": TINY_MODEL},
        "training": {"steps": 8, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 2,
                     "precision": "fp32", "seed": 0, "workers": 0, "threads": 1, **training},
        "output": {"dir": str(out), "checkpoint_every": checkpoint_every, "keep_last": 2},
    }


def run(cfg: dict, **kwargs) -> dict:
    from facedata.flip.train import train

    return train(train_config_from_dict(cfg), progress=False, **kwargs)


def losses(out: Path) -> list[str]:
    with open(out / "metrics.csv", newline="") as f:
        return [(r["step"], r["epoch"], r["loss"], r["lr"]) for r in csv.DictReader(f)]


def checkpoint_state(out: Path) -> dict:
    from facedata.flip.train import list_checkpoints

    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# Config


def test_config_errors_are_one_line(tmp_path):
    good = tiny_config(tmp_path, tmp_path / "out")
    path = tmp_path / "flip.yaml"
    path.write_text(yaml.safe_dump(good))
    cfg = load_train_config(path, ["training.lr=0.01", "model.config.vision_cfg.layers=1"])
    assert cfg.training.lr == 0.01 and cfg.model.resolved()["vision_cfg"]["layers"] == 1
    cases = {
        "training.lr=-1": "training.lr: expected greater than 0 (got -1)",
        "training.epochs=2": "training: set exactly one of epochs and steps",
        "training.precision=fp16": "training.precision: expected 'fp32', 'bf16' or 'amp'",
        "model.name=ViT-Nope": "model.name: unknown open_clip architecture 'ViT-Nope'",
        "model.config.text_cfg.hf_model_name=bert-base-uncased": "config.text_cfg.hf_model_name",
        "training.batch_sise=3": "training.batch_sise: unknown key",
    }
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            load_train_config(path, [override])
        assert str(err.value).startswith(f"{path}: ") and expected in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    named = train_config_from_dict({"data": {"dir": "x"}, "model": {"name": "ViT-B-16", "image_size": 64,
                                                                   "config": {"vision_cfg": {"patch_dropout": 0.5}}}})
    resolved = named.model.resolved()
    assert resolved["vision_cfg"] == {"image_size": 64, "layers": 12, "width": 768, "patch_size": 16,
                                      "patch_dropout": 0.5}
    for shipped in ("flip_tiny.yaml", "flip_vitb16.yaml"):
        load_train_config(REPO / "configs" / shipped)


# ---------------------------------------------------------------------------------------------
# Data


def test_split_index_and_errors(dataset, tmp_path):
    from facedata.flip.data import epoch_order, index_split

    train_index = index_split(dataset, "train", cache_dir=tmp_path / "index")
    assert len(train_index) == 32 and len(train_index.tars) == 2
    assert (tmp_path / "index" / "train.npz").exists()
    assert list(index_split(dataset, "train", cache_dir=tmp_path / "index").keys) == list(train_index.keys)
    assert len(index_split(dataset, "validation")) == 8
    a, b = epoch_order(train_index, 0, 0), epoch_order(train_index, 0, 1)
    assert sorted(a) == list(range(32)) and list(a) != list(b)
    assert list(a) == list(epoch_order(train_index, 0, 0))
    windowed = epoch_order(train_index, 0, 0, shuffle_window=1)
    assert len({int(train_index.tar_id[i]) for i in windowed[:16]}) == 1  # one tar at a time

    with pytest.raises(UserError, match=r"data.split: .*webdataset: no test-\*.tar shards \(splits there: train, "
                                        r"validation\)"):
        index_split(dataset, "test")
    with pytest.raises(UserError, match="no such folder"):
        index_split(tmp_path / "nowhere", "train")
    broken = tmp_path / "broken"
    (broken / "webdataset").mkdir(parents=True)
    (broken / "webdataset" / "train-00000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(UserError, match=r"train-00000.tar: not a readable tar") as err:
        index_split(broken, "train")
    assert "\n" not in str(err.value)


def test_corrupt_image_member_is_one_line_error(dataset, tmp_path):
    """A damaged image inside a tar stops training with one line naming the tar and the member,
    also when it is found inside a loader worker."""
    from facedata.flip.data import FaceTextDataset, StepBatches, index_split, step_loader

    bad = tmp_path / "bad"
    (bad / "webdataset").mkdir(parents=True)
    with tarfile.open(dataset / "webdataset" / "validation-00000.tar") as src, \
            tarfile.open(bad / "webdataset" / "train-00000.tar", "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".jpg") and member.name.startswith("P010_studio_portrait"):
                data = data[:200]  # truncated JPEG
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    index = index_split(bad, "train")
    ds = FaceTextDataset(index, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long), lambda im: torch.zeros(1))
    for workers in (0, 1):
        with pytest.raises(UserError) as err:
            list(step_loader(ds, StepBatches(index, 4, 1, 2, 0, 2, seed=0), workers=workers))
        assert str(err.value).startswith(f"{bad / 'webdataset' / 'train-00000.tar'}:P010_studio_portrait.jpg: ")
        assert "\n" not in str(err.value)


def test_crops_mode_yields_face_crops(dataset):
    """use_crops cuts the primary face's box grown 1.5x (square) out of the image, also from a
    reduced-scale JPEG decode, and the face detector finds that face filling the crop's middle."""
    from facedata.faces.models import load_analyzer
    from facedata.flip.data import FaceTextDataset, index_split

    index = index_split(dataset, "train")
    whole = FaceTextDataset(index, None, None)
    crops = FaceTextDataset(index, None, None, use_crops=True, crop_scale=1.5)
    drafted = FaceTextDataset(index, None, None, use_crops=True, crop_scale=1.5, decode_side=20)
    analyzer = load_analyzer(FaceConfig(), threads=1)
    for i in range(0, len(index), 3):
        image = whole.load_image(i)
        box = whole.face_box(i)
        region = crops.crop_region(box, image.width, image.height)
        crop = crops.load_image(i)
        expected = image.crop(tuple(round(v) for v in region))
        assert crop.size == expected.size and np.array_equal(np.asarray(crop), np.asarray(expected))
        side = 1.5 * max(box[2] - box[0], box[3] - box[1])
        assert crop.width <= round(side) + 1 and crop.height <= round(side) + 1
        small = drafted.load_image(i)
        assert 19 <= min(small.size) and small.width < crop.width  # same region, fewer pixels
        diff = np.abs(np.asarray(crop.resize(small.size, Image.BOX), dtype=float) - np.asarray(small, dtype=float))
        assert diff.mean() < 20, (index.keys[i], diff.mean())  # DCT-scaled vs box-filtered, ~1 px apart
        faces = analyzer.analyze([np.asarray(crop.resize((crop.width * 2, crop.height * 2)))])[0]
        assert faces, f"no face in the crop of {index.keys[i]}"
        fx1, fy1, fx2, fy2 = faces[0].bbox / 2
        assert (fx2 - fx1) * (fy2 - fy1) > 0.2 * crop.width * crop.height
        assert abs((fx1 + fx2) / 2 - crop.width / 2) < 0.2 * crop.width


def test_crops_of_a_dataset_published_with_crops(dataset, tmp_path):
    """A dataset published with crops stores the face crop (and its crop_box in KEY.json): crops
    mode cuts the same face region from it as from the whole image."""
    from facedata.flip.data import FaceTextDataset, index_split

    index = index_split(dataset, "validation")
    whole, whole_crops = FaceTextDataset(index, None, None), FaceTextDataset(index, None, None, use_crops=True)
    cropped_dir = tmp_path / "published_crops"
    (cropped_dir / "webdataset").mkdir(parents=True)
    with tarfile.open(cropped_dir / "webdataset" / "validation-00000.tar", "w") as tar:
        for i, key in enumerate(whole.index.keys):
            image, meta = whole.load_image(i), whole.metadata(i)
            x1, y1, x2, y2 = meta["faces"][0]["bbox"]
            side, cx, cy = 1.5 * max(x2 - x1, y2 - y1), (x1 + x2) / 2, (y1 + y2) / 2
            box = [max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
                   min(image.width, round(cx + side / 2)), min(image.height, round(cy + side / 2))]
            buf = io.BytesIO()
            image.crop(box).save(buf, "JPEG", quality=95)
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", whole.caption(i).encode())
            _add(tar, f"{key}.json", json.dumps({**meta, "crop_box": box, "crop_face": 0}).encode())
    published = FaceTextDataset(index_split(cropped_dir, "validation"), None, None, use_crops=True)
    for i in range(len(published)):
        a, b = whole_crops.load_image(i), published.load_image(i)
        assert abs(a.width - b.width) <= 2 and abs(a.height - b.height) <= 2
        diff = np.abs(np.asarray(b.resize(a.size), dtype=float) - np.asarray(a, dtype=float))
        assert diff.mean() < 12, (published.index.keys[i], diff.mean())


# ---------------------------------------------------------------------------------------------
# Training


def test_training_lowers_the_loss(dataset, tmp_path):
    out = tmp_path / "run"
    metrics = run(tiny_config(dataset, out, steps=36, lr=1e-3, warmup_steps=4, checkpoint_every=12))
    rows = losses(out)
    assert [int(r[0]) for r in rows] == list(range(1, 37))
    first = np.mean([float(r[2]) for r in rows[:6]])
    last = np.mean([float(r[2]) for r in rows[-6:]])
    assert first > 1.9  # ~ln(8) for an untrained model on 8 pairs
    assert last < first - 0.5, (first, last)
    assert metrics["steps_run"] == 36 and metrics["samples_per_s"] > 0 and metrics["peak_memory_mb"] > 0
    assert metrics["epochs"] == 9 and metrics["steps_per_epoch"] == 4
    assert (out / "loss.png").stat().st_size > 5000 and (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000024.pt", "step_00000036.pt"]
    # The lr follows warmup then cosine decay towards 0.
    lrs = [float(r[3]) for r in rows]
    assert lrs[0] == pytest.approx(1e-3 / 4) and lrs[3] == pytest.approx(1e-3) and lrs[-1] < 1e-5


def test_grad_accumulation_matches_one_big_batch():
    """Two accumulated micro-batches of 4 give the loss and gradients of one batch of 8
    (logit_scale's included), as the contrastive loss compares all 8 pairs either way."""
    from facedata.flip.model import create_model  # first: it makes torchvision importable
    from facedata.flip.train import _Stepper
    from open_clip import ClipLoss  # noqa: I001

    cfg = train_config_from_dict({"data": {"dir": "x"}, "model": {"config": TINY_MODEL}, "training": {"steps": 1}})
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 48, 48, generator=gen)
    texts = torch.randint(1, 49000, (8, 32), generator=gen)
    results = []
    for micro in ([(images, texts)], [(images[:4], texts[:4]), (images[4:], texts[4:])]):
        torch.manual_seed(0)
        model = create_model(cfg.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        loss = _Stepper(model, ClipLoss(), optimizer, scheduler, None, torch.device("cpu"), "fp32",
                        cfg.training).step(micro)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_one, grads_one), (loss_acc, grads_acc) = results
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    assert grads_one.keys() == grads_acc.keys() and "logit_scale" in grads_one
    for name, grad in grads_one.items():
        assert torch.allclose(grad, grads_acc[name], rtol=1e-4, atol=1e-7), name


def test_killed_run_resumes_to_the_same_state(dataset, tmp_path):
    """8 steps straight (2 loader workers) vs 4 steps, a crash before step 4's checkpoint, then a
    resume from step 3 (no workers) to 8: identical parameters, optimiser state and loss log.
    Random patch masking and gradient accumulation are on, so RNG states must be restored and
    the accumulation's replayed passes must see the cached passes' masks."""
    model = {"config": {**TINY_MODEL, "vision_cfg": {**TINY_MODEL["vision_cfg"], "patch_dropout": 0.5}}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = tiny_config(dataset, straight, batch_size=4, grad_accum=2, workers=2)
    cfg["model"] = model
    run(cfg)

    class Killed(Exception):
        pass

    def kill_at_4(step: int, row: dict) -> None:
        if step == 4:
            raise Killed

    cfg = tiny_config(dataset, resumed, batch_size=4, grad_accum=2, workers=0)
    cfg["model"] = model
    with pytest.raises(Killed):
        run(cfg, on_step=kill_at_4)
    assert checkpoint_state(resumed)["step"] == 3 and len(losses(resumed)) == 4
    metrics = run(cfg)
    assert metrics["start_step"] == 3 and metrics["steps_run"] == 5

    a, b = checkpoint_state(straight), checkpoint_state(resumed)
    assert a["step"] == b["step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert losses(straight) == losses(resumed)
    assert len({r[2] for r in losses(straight)}) == 8

    # A finished run rerun does nothing and says so.
    again = run(cfg)
    assert again["steps_run"] == 0 and again["start_step"] == 8


def test_pretrained_checkpoint(dataset, tmp_path):
    """A local checkpoint (facedata's own, or a bare state dict) loads as model.pretrained; a
    missing or mismatched one is a one-line error."""
    from facedata.flip.model import build_flip_model

    first = tmp_path / "first"
    run(tiny_config(dataset, first, steps=2, checkpoint_every=2))
    ckpt = checkpoint_state(first)
    ckpt_path = first / "checkpoints" / "step_00000002.pt"

    cfg = train_config_from_dict({**tiny_config(dataset, tmp_path / "second", steps=1),
                                  "model": {"config": TINY_MODEL, "pretrained": str(ckpt_path)}})
    loaded = build_flip_model(cfg.model).model.state_dict()
    for name, tensor in ckpt["state_dict"].items():
        assert torch.equal(loaded[name], tensor), name
    bare = tmp_path / "bare.pt"
    torch.save(ckpt["state_dict"], bare)
    cfg.model.pretrained = str(bare)
    assert torch.equal(build_flip_model(cfg.model).model.state_dict()["text_projection"],
                       ckpt["state_dict"]["text_projection"])
    metrics = run({**tiny_config(dataset, tmp_path / "second", steps=1),
                   "model": {"config": TINY_MODEL, "pretrained": str(ckpt_path)}})
    assert metrics["steps_run"] == 1

    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(UserError) as err:
        run({**tiny_config(dataset, tmp_path / "third"), "model": {"config": TINY_MODEL, "pretrained": str(missing)}})
    assert str(err.value).startswith(f"model.pretrained: {missing}: no such file") and "\n" not in str(err.value)
    other = {**TINY_MODEL, "embed_dim": 32}
    with pytest.raises(UserError) as err:
        build_flip_model(train_config_from_dict({"data": {"dir": "x"},
                                                 "model": {"config": other, "pretrained": str(ckpt_path)}}).model)
    assert "weights do not fit the model" in str(err.value) and "\n" not in str(err.value)


def test_cli_train_errors_are_one_line(dataset, tmp_path, cli_env):
    path = tmp_path / "flip.yaml"
    path.write_text(yaml.safe_dump(tiny_config(dataset, tmp_path / "out")))
    proc = subprocess.run(facedata_cmd("train", str(path), "--no-prefect", "--set", "model.pretrained=/no/clip.pt"),
                          capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("facedata: error: model.pretrained: /no/clip.pt: no such file "
                                   "(a local CLIP checkpoint; nothing is downloaded)")
    proc = subprocess.run(facedata_cmd("train", str(path), "--set", "data.split=test"),
                          capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no test-*.tar shards" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "amp"])
def test_gpu_training(dataset, tmp_path, precision):
    out = tmp_path / precision
    metrics = run(tiny_config(dataset, out, steps=6, grad_accum=2, batch_size=4, device="cuda",
                              precision=precision, workers=2))
    assert metrics["device"].startswith("cuda") and metrics["precision"] == precision
    assert metrics["peak_memory_kind"] == "cuda_max_allocated" and metrics["peak_memory_mb"] > 0
    assert all(np.isfinite(float(r[2])) for r in losses(out))
    assert os.path.getsize(out / "checkpoints" / "step_00000006.pt") > 0


@pytest.mark.slow
def test_cli_train_runs_the_prefect_flow(dataset, tmp_path, cli_env):
    """`facedata train` through the Prefect flow, with loader workers: a report, the run's files,
    and a clean stderr (workers forked after Prefect started used to exit with status 1)."""
    path = tmp_path / "flip.yaml"
    out = tmp_path / "out"
    path.write_text(yaml.safe_dump(tiny_config(dataset, out, steps=3, workers=1)))
    proc = subprocess.run(facedata_cmd("train", str(path), "--no-progress"), capture_output=True, text=True,
                          env=cli_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps_run: 3" in proc.stdout and "device: cpu" in proc.stdout
    assert "Traceback" not in proc.stderr and "exited unexpectedly" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "train_report.json").read_text())
    assert report["steps"] == 3 and report["checkpoint"].endswith("step_00000003.pt")
    assert len(losses(out)) == 3 and (out / "loss.png").exists()
