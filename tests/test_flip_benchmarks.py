"""Public-benchmark evaluation (facedata eval --benchmark): the readers on fixtures in each
benchmark's exact file layout (real photos, hand labels and captions kept in tests/data/benchmarks),
the multi-caption retrieval metric and the per-attribute probe on hand-made cases, and the command
end to end with a `facedata train` checkpoint and open_clip models built from a config.
Every figure measured on these fixtures is a fixture figure, not a benchmark result."""

from __future__ import annotations

import csv
import json
import pickle
from math import comb

import numpy as np
import pytest

from facedata.core.errors import UserError
from facedata.flip.benchmarks import read_benchmark
from facedata.flip.benchmarks.attributes import CELEBA_ATTRIBUTES
from facedata.flip.metrics import attribute_probe, multi_caption_recall, retrieval_recall
from tests.benchmark_fixtures import (
    build_celeba,
    build_celeba_dialog,
    build_folder,
    build_lfwa,
    build_mm_celeba_hq,
)
from tests.conftest import REPO


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    return {"celeba": build_celeba(root / "celeba"), "lfwa": build_lfwa(root / "lfwa"),
            "mm": build_mm_celeba_hq(root / "mm"), "dialog": build_celeba_dialog(root / "dialog"),
            "folder": build_folder(root / "folder")}


# ------------------------------------------------------------------------------------- readers


def test_celeba_reader_parses_the_published_format(fixtures):
    bench = read_benchmark("celeba-attr", fixtures["celeba"])
    assert bench.attributes == list(CELEBA_ATTRIBUTES)  # the header line, CRLF line ends and all
    assert bench.labels.shape == (40, 40) and set(np.unique(bench.labels)) == {0, 1}
    assert [p.name for p in bench.images[:2]] == ["000001.jpg", "000002.jpg"]
    col = {a: i for i, a in enumerate(bench.attributes)}
    # hand labels: 000017 is P005's studio portrait (a bearded man), 000006 P002's selfie (laughing)
    p005 = bench.labels[16]
    assert p005[col["Male"]] == 1 and p005[col["Mustache"]] == 1 and p005[col["No_Beard"]] == 0
    assert bench.labels[5, col["Smiling"]] == 1 and bench.labels[5, col["Mouth_Slightly_Open"]] == 1
    assert bench.labels[4, col["Smiling"]] == 0  # P002's studio portrait
    assert bench.counts() == {"train": 24, "validation": 8, "test": 8}
    # identity-disjoint, as CelebA's split is: each person's four photos share a split
    assert all(len(set(bench.split[i:i + 4])) == 1 for i in range(0, 40, 4))
    test_males = bench.labels[bench.indices("test"), col["Male"]]
    assert 0 < test_males.sum() < len(test_males)


def test_celeba_missing_and_malformed_files_are_one_line(fixtures, tmp_path):
    import shutil

    bad = tmp_path / "celeba"
    shutil.copytree(fixtures["celeba"], bad)
    (bad / "list_eval_partition.txt").unlink()
    with pytest.raises(UserError, match=r"no list_eval_partition.txt .*expected CelebA's layout: img_align_celeba/"):
        read_benchmark("celeba-attr", bad)
    (bad / "Eval").mkdir()  # the authors' own layout keeps the split file in Eval/: found there too
    shutil.copy(fixtures["celeba"] / "list_eval_partition.txt", bad / "Eval" / "list_eval_partition.txt")
    assert read_benchmark("celeba-attr", bad).counts()["test"] == 8
    lines = (bad / "list_attr_celeba.txt").read_text().splitlines()
    (bad / "list_attr_celeba.txt").write_text("\n".join(["41", *lines[1:]]))
    with pytest.raises(UserError, match="the count line says 41 images but 40 rows follow"):
        read_benchmark("celeba-attr", bad)
    (bad / "list_attr_celeba.txt").write_text("\n".join([*lines[:2], lines[2].replace("-1", "2", 1), *lines[3:]]))
    with pytest.raises(UserError, match=r"list_attr_celeba.txt:3: values must be -1, 0 or 1"):
        read_benchmark("celeba-attr", bad)
    (bad / "list_attr_celeba.txt").write_text("\n".join(lines))
    (bad / "img_align_celeba" / "000040.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of 40 images listed in list_attr_celeba.txt are missing \(first: 000040"):
        read_benchmark("celeba-attr", bad)
    with pytest.raises(UserError, match="no such folder"):
        read_benchmark("celeba-attr", tmp_path / "nowhere")


def test_lfwa_reader_carves_validation_from_train(fixtures):
    bench = read_benchmark("lfwa-attr", fixtures["lfwa"])
    assert bench.images[0].relative_to(fixtures["lfwa"]).as_posix() == "lfw/Person_P001/Person_P001_0001.jpg"
    counts = bench.counts()
    assert counts["test"] == 8 and counts["validation"] == 3 and counts["train"] == 29  # a tenth of 32
    # validation comes only from the published train rows (P001-P007, P010), never from test
    val_people = {p.parent.name for p in np.array(bench.images)[bench.indices("validation")]}
    assert val_people <= {f"Person_P{i:03d}" for i in (1, 2, 3, 4, 5, 6, 7, 10)}
    assert "seed 0" in bench.notes[0]
    celeba = read_benchmark("celeba-attr", fixtures["celeba"])  # the same hand labels, in the same order
    assert np.array_equal(bench.labels, celeba.labels)


def test_caption_sets_and_folders(fixtures, tmp_path):
    mm = read_benchmark("celeba-caption", fixtures["mm"])
    assert [p.name for p in mm.images] == [f"{i}.jpg" for i in range(8)]  # test.txt: images 0-7
    assert len(mm.captions) == 24 and list(mm.captions_per_image()) == [3] * 8
    assert mm.captions[12] == "This man has a full black beard and a mustache."  # 4.txt's first line
    assert mm.caption_image[12] == 4

    dialog = read_benchmark("celeba-caption", fixtures["dialog"])
    assert len(dialog.images) == 6 and len(dialog.captions) == 6  # overall captions only
    assert "She is smiling broadly." not in dialog.captions
    assert "every captioned image" in dialog.notes[0]

    folder = read_benchmark("folder-retrieval", fixtures["folder"])
    assert [p.stem for p in folder.images] == ["P001_amateur_posture", "P002_amateur_posture",
                                               "P003_amateur_posture", "P005_amateur_posture"]
    assert list(folder.captions_per_image()) == [2, 1, 3, 2]
    assert folder.notes == ["1 images without a caption file left out"]

    # the AttnGAN-style split pickle: a plain list is read, anything that names a class is refused
    import shutil

    mm2 = tmp_path / "mm2"
    shutil.copytree(fixtures["mm"], mm2)
    (mm2 / "test.txt").unlink()
    (mm2 / "test").mkdir()
    (mm2 / "test" / "filenames.pickle").write_bytes(pickle.dumps(["1", "3"]))
    assert [p.name for p in read_benchmark("celeba-caption", mm2).images] == ["1.jpg", "3.jpg"]
    (mm2 / "test" / "filenames.pickle").write_bytes(pickle.dumps([np.int64(1)]))
    with pytest.raises(UserError, match="may hold only lists of names"):
        read_benchmark("celeba-caption", mm2)

    with pytest.raises(UserError, match=r"no celeba-caption/ folder of .txt files nor captions_hq.json"):
        (tmp_path / "imgs" / "image").mkdir(parents=True)
        read_benchmark("celeba-caption", tmp_path / "imgs")
    with pytest.raises(UserError, match="no image with a same-stem .txt caption file"):
        read_benchmark("folder-retrieval", tmp_path / "imgs")


# ------------------------------------------------------------------ multi-caption retrieval


def test_multi_caption_recall_perfect_and_shuffled():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 32))
    owner = np.repeat(np.arange(6), [1, 2, 3, 1, 2, 3])
    captions = images[owner] + 0.05 * rng.normal(size=(len(owner), 32))
    res = multi_caption_recall(images, captions, owner, ks=(1, 5, 10))
    assert res["n_images"] == 6 and res["n_captions"] == 12
    assert res["image_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert res["text_to_image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0} and res["mean"] == 1.0
    # captions pointing at the wrong images (a derangement of the images): nothing found at R@1
    wrong = (owner + 1) % 6
    res = multi_caption_recall(images, captions, wrong, ks=(1,))
    assert res["text_to_image"]["R@1"] == 0.0 and res["image_to_text"]["R@1"] == 0.0


def test_multi_caption_recall_hand_made_ranks():
    # 3 images (unit axes), 5 captions; scores = caption . image
    images = np.eye(3)
    captions = np.array([[0.9, 0.1, 0.0],   # of image 0: ranks it 1st
                         [0.2, 0.8, 0.0],   # of image 0: ranks it 2nd
                         [0.1, 0.3, 0.6],   # of image 1: ranks it 2nd
                         [0.0, 0.2, 0.7],   # of image 2: 1st
                         [0.5, 0.0, 0.4]])  # of image 2: 2nd
    owner = np.array([0, 0, 1, 2, 2])
    res = multi_caption_recall(images, captions, owner, ks=(1, 2, 3), normalize=False)
    assert res["text_to_image"] == pytest.approx({"R@1": 2 / 5, "R@2": 1.0, "R@3": 1.0})
    # image 0's captions score .9,.2 (others .1,.0,.5): own caption 1st. Image 1: own .3, others .1,.8,
    # .2,0: 2nd. Image 2: own .7 (.4), others 0,0,.6: 1st.
    assert res["image_to_text"] == pytest.approx({"R@1": 2 / 3, "R@2": 1.0, "R@3": 1.0})
    assert res["mean"] == pytest.approx((2 / 5 + 1 + 1 + 2 / 3 + 1 + 1) / 6)


def test_multi_caption_recall_ties_and_the_single_caption_case():
    # every embedding equal: each image's 2 own captions are tied with the 6 others; the first own
    # caption is within k unless the k first of the random order are all others
    flat = np.ones((4, 3))
    owner = np.repeat(np.arange(4), 2)
    res = multi_caption_recall(flat, np.ones((8, 3)), owner, ks=(1, 2, 5, 7))
    for k in (1, 2, 5, 7):
        assert res["image_to_text"][f"R@{k}"] == pytest.approx(1 - comb(6, k) / comb(8, k))
    assert res["text_to_image"] == pytest.approx({"R@1": 1 / 4, "R@2": 2 / 4, "R@5": 1.0, "R@7": 1.0})
    # one caption per image: the same figures as the paired metric, ties included
    rng = np.random.default_rng(3)
    img = np.round(rng.normal(size=(30, 4)), 1)
    txt = np.round(img + rng.normal(size=(30, 4)), 1)
    txt[5] = txt[6]  # a tie
    single = retrieval_recall(img, txt)
    multi = multi_caption_recall(img, txt, np.arange(30))
    for d in ("image_to_text", "text_to_image"):
        assert multi[d] == pytest.approx(single[d])
    with pytest.raises(ValueError, match="indices"):
        multi_caption_recall(img, txt, np.full(30, 30))


# ---------------------------------------------------------------------------- attribute probe


def test_attribute_probe_on_separable_features_of_the_fixture_labels(fixtures):
    """Per attribute, a feature that is its hand label (+ noise) beside pure-noise features: every
    attribute with both values in train is then predicted perfectly on the identity-disjoint test
    split; constant ones predict their train value; the same features shuffled across images do
    worse. (Features holding all 40 labels at once would not do: with 6 training people, other
    attributes' axes stand in for the asked one and the probe may rightly pick them.)"""
    bench = read_benchmark("celeba-attr", fixtures["celeba"])
    rng = np.random.default_rng(0)
    tr, va, te = (bench.indices(s) for s in ("train", "validation", "test"))
    varying = [i for i in range(40) if 0 < bench.labels[tr, i].mean() < 1]
    assert {"Male", "Smiling", "Black_Hair"} <= {bench.attributes[i] for i in varying}
    assert "Attractive" not in {bench.attributes[i] for i in varying}
    shuffled_acc, separable_acc = [], []
    for i in varying:
        y = bench.labels[:, [i]]
        feats = np.hstack([2.0 * y - 1, np.zeros((40, 6))]) + 0.1 * rng.normal(size=(40, 7))
        res = attribute_probe(feats[tr], y[tr], feats[va], y[va], feats[te], y[te], names=[bench.attributes[i]])
        v = res["attributes"][bench.attributes[i]]
        assert v["accuracy"] == 1.0 and not v["constant"], bench.attributes[i]
        assert res["n_train"] == 24 and res["n_val"] == 8 and res["n_test"] == 8
        separable_acc.append(v["accuracy"])
        mixed = feats[rng.permutation(40)]
        shuffled_acc.append(attribute_probe(mixed[tr], y[tr], mixed[va], y[va], mixed[te], y[te])["mean_accuracy"])
    assert np.mean(shuffled_acc) < np.mean(separable_acc) - 0.2
    # all 40 at once: the constant attributes predict their (single) train value
    feats = rng.normal(size=(40, 8))
    res = attribute_probe(feats[tr], bench.labels[tr], feats[va], bench.labels[va], feats[te], bench.labels[te],
                          names=bench.attributes)
    for i, a in enumerate(bench.attributes):
        v = res["attributes"][a]
        assert v["constant"] == (i not in varying)
        if v["constant"]:
            assert v["accuracy"] == float(np.mean(bench.labels[te, i] == bench.labels[tr[0], i]))
    assert res["mean_accuracy"] == pytest.approx(np.mean([v["accuracy"] for v in res["attributes"].values()]))


def test_attribute_probe_rejects_bad_labels():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match="0 or 1"):
        attribute_probe(x, np.full((4, 2), -1), x, np.zeros((4, 2)), x, np.zeros((4, 2)))


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """configs/flip_tiny.yaml trained by facedata train's code for 4 steps on a small published dataset."""
    from facedata.flip.config import load_train_config
    from facedata.flip.train import train
    from tests.test_flip_train import build_dataset

    data = tmp_path_factory.mktemp("published")
    build_dataset(data)
    out = tmp_path_factory.mktemp("flip_bench") / "run"
    cfg = load_train_config(REPO / "configs" / "flip_tiny.yaml", [
        f"data.dir={data}", f"output.dir={out}", "training.epochs=2", "training.workers=0", "training.threads=1"])
    metrics = train(cfg, progress=False)
    return metrics["checkpoint"]


def _eval(argv):
    import argparse

    from facedata.flip.eval_cli import add_eval_parser, run_eval_command

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return run_eval_command(parser.parse_args(["eval", *argv, "--threads", "1", "--workers", "0", "--no-progress"]))


def test_a_train_checkpoint_and_open_clip_models_share_one_path(fixtures, checkpoint, tmp_path, capsys):
    """The same weights given as a facedata checkpoint and as an open_clip architecture (the
    training YAML's model section) with a weights file give the same row; the checkpoint's random
    initialisation is the architecture's at the training seed."""
    tiny = str(REPO / "configs" / "flip_tiny.yaml")
    out = tmp_path / "celeba_table"
    assert _eval(["--benchmark", "celeba-attr", "--data", str(fixtures["celeba"]), "--checkpoint", str(checkpoint),
                  "--model", f"{tiny}={checkpoint}", "--model", tiny, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    rows = {r["kind"]: [] for r in res["rows"]}
    for r in res["rows"]:
        rows[r["kind"]].append(r)
    assert [r["model"] for r in rows["labels only"]] == ["majority class (train)"]
    (ckpt,), (weights,) = rows["facedata checkpoint"], rows["open_clip weights"]
    random_rows = rows["random init"]
    assert len(random_rows) == 2  # the checkpoint's architecture at seed 0 (once), and the YAML's
    assert ckpt["mean_accuracy"] == pytest.approx(weights["mean_accuracy"], abs=1e-9)
    assert random_rows[0]["mean_accuracy"] == pytest.approx(random_rows[1]["mean_accuracy"], abs=1e-9)
    for r in res["rows"][1:]:
        assert r["n_train"] == 24 and r["n_test"] == 8 and len(r["attributes"]) == 40
        assert 0.0 <= r["mean_accuracy"] <= 1.0
    with open(out / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and {t["benchmark"] for t in table} == {"celeba-attr"}
    assert float(table[1]["mean_accuracy"]) == pytest.approx(ckpt["mean_accuracy"], abs=1e-6)
    with open(out / "per_attribute.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 40
    assert (out / "table.png").stat().st_size > 0
    assert "| majority class (train) | labels only |" in printed and "24 train / 8 validation / 8 test" in printed

    out = tmp_path / "mm_table"
    assert _eval(["--benchmark", "celeba-caption", "--data", str(fixtures["mm"]), "--checkpoint", str(checkpoint),
                  "--model", f"{tiny}={checkpoint}", "--out", str(out), "--no-plot"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_images"] == 8 and res["n_captions"] == 24 and len(res["rows"]) == 3
    by_kind = {r["kind"]: r for r in res["rows"]}
    ckpt, weights, random_init = (by_kind[k] for k in ("facedata checkpoint", "open_clip weights", "random init"))
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "mean"):
        assert ckpt[key] == pytest.approx(weights[key], abs=1e-9)
        assert 0.0 <= random_init[key] <= 1.0
    assert ckpt["t2i_R@10"] == 1.0 and random_init["t2i_R@10"] == 1.0  # 8 images: a caption finds its own within 10
    assert not (out / "table.png").exists()


def test_benchmark_command_errors_before_loading_models(fixtures, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # the benchmark's files are checked first: the checkpoint named here does not even exist
    with pytest.raises(UserError, match=r"no list_attr_celeba.txt .*expected CelebA's layout"):
        _eval(["--benchmark", "celeba-attr", "--data", str(empty), "--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(UserError, match=r"--checkpoint .*none.pt: no such file"):
        _eval(["--benchmark", "celeba-attr", "--data", str(fixtures["celeba"]), "--checkpoint",
               str(tmp_path / "none.pt")])
    with pytest.raises(UserError, match="no such weights file"):
        _eval(["--benchmark", "folder-retrieval", "--data", str(fixtures["folder"]), "--model",
               f"{REPO / 'configs' / 'flip_tiny.yaml'}={tmp_path / 'w.pt'}"])
    with pytest.raises(UserError, match="neither an open_clip architecture name"):
        _eval(["--benchmark", "folder-retrieval", "--data", str(fixtures["folder"]), "--model", "NoSuchNet"])
    with pytest.raises(UserError, match="at least one --checkpoint or --model"):
        _eval(["--benchmark", "folder-retrieval", "--data", str(fixtures["folder"])])
    with pytest.raises(UserError, match="--benchmark and --data go together"):
        _eval(["--data", str(fixtures["folder"]), "--model", "ViT-B-16"])
