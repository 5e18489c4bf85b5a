"""FLIP evaluation: the metric functions on hand-made embeddings, the prompts and labels, and an end
to end run (tiny model trained briefly on the demo dataset, against its random initialisation)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError
from facedata.flip.evaluate import (
    PROMPTS,
    attribute_labels,
    class_names,
    linear_probe,
    prompts_for,
    retrieval_recall,
    zero_shot_accuracy,
)
from tests.conftest import REPO

# ------------------------------------------------------------------------------------- retrieval


def test_perfect_embeddings_recall_everything():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(50, 16))
    res = retrieval_recall(img, img + 0.01 * rng.normal(size=img.shape))
    assert res["n"] == 50
    for direction in ("image_to_text", "text_to_image"):
        assert res[direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
        assert res["mean_rank"][direction] == 1.0


def test_unrelated_pairings_recall_at_chance():
    rng = np.random.default_rng(1)
    n = 400
    img, txt = rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    res = retrieval_recall(img, txt, ks=(1, 10, 100))
    for direction in ("image_to_text", "text_to_image"):
        assert res[direction]["R@1"] <= 5 / n  # ~1/N: a handful of lucky hits at most
        assert abs(res[direction]["R@10"] - 10 / n) < 0.02
        assert abs(res[direction]["R@100"] - 100 / n) < 0.08
        assert abs(res["mean_rank"][direction] - (n + 1) / 2) < 0.1 * n
    # the same embeddings with the pairing shuffled: still chance, while the true pairing is perfect
    perm = rng.permutation(n)
    assert retrieval_recall(img, img[perm])["image_to_text"]["R@1"] == pytest.approx(np.mean(perm == np.arange(n)))


def test_hand_made_ranks():
    # scores S[i, j] = image i . text j (no normalisation): image i's match is text i.
    s = np.array([[0.9, 0.5, 0.45],  # match 1st
                  [0.8, 0.3, 0.6],  # match 3rd
                  [0.2, 0.7, 0.4]])  # match 2nd
    res = retrieval_recall(np.eye(3), s.T, ks=(1, 2, 3), normalize=False)
    assert res["image_to_text"] == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0})
    assert res["mean_rank"]["image_to_text"] == pytest.approx(2.0)
    # text j's match is image j: column 0 ranks it 1st, column 1 3rd, column 2 (.45, .6, .4) 3rd
    assert res["text_to_image"] == pytest.approx({"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 1.0})
    assert res["mean_rank"]["text_to_image"] == pytest.approx(7 / 3)


def test_ties_count_as_random_order():
    # image 0's match ties with both other texts: its rank is 1, 2 or 3 with equal chance
    s = np.array([[0.5, 0.5, 0.5],
                  [0.1, 0.9, 0.2],
                  [0.1, 0.2, 0.9]])
    res = retrieval_recall(np.eye(3), s.T, ks=(1, 2, 3), normalize=False)
    assert res["image_to_text"] == pytest.approx({"R@1": (1 / 3 + 1 + 1) / 3, "R@2": (2 / 3 + 1 + 1) / 3, "R@3": 1.0})
    # a collapsed model (every embedding equal) is at chance exactly, not at 1.0 or 0.0
    flat = np.ones((8, 4))
    res = retrieval_recall(flat, flat, ks=(1, 5, 10))
    assert res["image_to_text"] == pytest.approx({"R@1": 1 / 8, "R@5": 5 / 8, "R@10": 1.0})
    assert res["mean_rank"]["text_to_image"] == pytest.approx(4.5)


def test_retrieval_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="paired"):
        retrieval_recall(np.zeros((3, 4)), np.zeros((4, 4)))
    assert retrieval_recall(torch.eye(2), torch.eye(2))["image_to_text"]["R@1"] == 1.0  # tensors work too


# ------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_accuracy_and_balanced_accuracy():
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    images = np.array([[1.0, 0.1], [0.9, 0.0], [1.0, -0.2], [0.8, 0.3], [0.0, 1.0]])
    res = zero_shot_accuracy(images, classes, [0, 0, 0, 1, 1])
    assert res["n"] == 5
    assert res["accuracy"] == pytest.approx(4 / 5)  # image 3 (class 1) looks like class 0
    assert res["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert res["per_class_recall"] == {0: 1.0, 1: 0.5}
    assert res["predictions"] == [0, 0, 0, 0, 1]
    # unknown labels (-1) are left out; everything wrong is 0
    res = zero_shot_accuracy(images, classes, [1, 1, -1, -1, 0])
    assert res["n"] == 3 and res["accuracy"] == 0.0 and res["predictions"][2] == -1


def test_zero_shot_prompt_ensembles_and_ties():
    # [C, P, D]: each class's prompts are normalised and averaged: class 0 -> (1, 0), class 1 -> (0, 1)
    prompts = np.array([[[1.0, 0.5], [1.0, -0.5]], [[0.5, 1.0], [-0.5, 1.0]]])
    res = zero_shot_accuracy(np.array([[1.0, 0.05], [0.05, 1.0]]), prompts, [0, 1])
    assert res["accuracy"] == 1.0
    # an image equally close to both classes gets half the credit
    res = zero_shot_accuracy(np.array([[1.0, 1.0]]), np.eye(2), [1])
    assert res["accuracy"] == pytest.approx(0.5)


def test_prompts_cover_the_vocabulary():
    described = {a for a, spec in ATTRIBUTES.items() if spec.kind in ("category", "bool")}
    assert set(PROMPTS) == described
    for attribute in PROMPTS:
        prompts = prompts_for(attribute)
        assert list(prompts) == class_names(attribute)
        for texts in prompts.values():
            assert len(texts) >= 4  # several templates x phrasings, averaged
            for text in texts:
                assert "{" not in text and " a a" not in text and " a e" not in text and " a o" not in text
    assert "a face of a person who looks happy." in prompts_for("expression")["happy"]
    assert "a photo of a female face." in prompts_for("gender")["female"]
    assert any("glasses" in t for t in prompts_for("eyeglasses")["true"])


def test_attribute_labels_use_the_primary_faces_confident_values():
    meta = {"faces": [
        {"primary": False, "attributes": {"gender": "male"}, "confidences": {"gender": 0.99}},
        {"primary": True, "attributes": {"gender": "female", "smiling": False, "eyeglasses": True, "hair_color": None,
                                         "age": 31.5, "age_band": "adult"},
         "confidences": {"gender": 0.99, "smiling": 0.7, "eyeglasses": 0.95, "hair_color": None, "age_band": 0.9}},
    ]}
    names = ["gender", "smiling", "eyeglasses", "hair_color", "age_band"]
    assert attribute_labels(meta, names) == {"gender": "female", "smiling": "false", "eyeglasses": "true",
                                             "age_band": "adult"}
    assert attribute_labels(meta, names, min_confidence=0.9) == {"gender": "female", "eyeglasses": "true",
                                                                 "age_band": "adult"}
    assert attribute_labels({"faces": []}, names) == {}
    assert attribute_labels({}, names) == {}


# ---------------------------------------------------------------------------------- linear probe


def test_linear_probe_separates_a_separable_set():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 4
    y_train = np.repeat(["a", "b", "c"], 20)
    y_test = np.repeat(["a", "b", "c"], [10, 3, 5])
    x_train = centres[np.searchsorted(["a", "b", "c"], y_train)] + rng.normal(size=(60, 8))
    x_test = centres[np.searchsorted(["a", "b", "c"], y_test)] + rng.normal(size=(18, 8))
    res = linear_probe(x_train, y_train, x_test, y_test)
    assert res["accuracy"] == 1.0 and res["balanced_accuracy"] == 1.0
    assert res["classes"] == ["a", "b", "c"] and res["n_train"] == 60 and res["n"] == 18
    assert res["l2_selection"] == "cv" and set(res["cv_balanced_accuracy"]) == {"0.0001", "0.001", "0.01", "0.1", "1"}
    # a fixed penalty; a test class never seen in training counts as wrong
    res = linear_probe(x_train, y_train, np.vstack([x_test, x_test[:2]]), np.concatenate([y_test, ["z", "z"]]),
                       l2=0.01)
    assert res["l2_selection"] == "fixed" and res["accuracy"] == pytest.approx(18 / 20)
    assert res["balanced_accuracy"] == pytest.approx(3 / 4)


def test_linear_probe_on_noise_is_near_chance_and_needs_two_classes():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(200, 16)), rng.integers(0, 2, 200)
    res = linear_probe(x[:100], y[:100], x[100:], y[100:])
    assert abs(res["balanced_accuracy"] - 0.5) < 0.15
    with pytest.raises(ValueError, match="2 classes"):
        linear_probe(x[:10], np.zeros(10), x[10:20], np.zeros(10))
    # a class with a single training sample: no cross-validation, the middle penalty
    y1 = np.array([0] * 9 + [1])
    assert linear_probe(x[:10], y1, x[10:12], [0, 1])["l2_selection"] == "middle"


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(demo_run, tmp_path_factory):
    """The tiny FLIP config trained for 40 steps (1 step an epoch) on the demo dataset's 30 train samples."""
    from facedata.flip.config import load_train_config
    from facedata.flip.train import train

    dataset = demo_run.parent / "dataset"
    out = tmp_path_factory.mktemp("flip_eval") / "run"
    cfg = load_train_config(REPO / "configs" / "flip_tiny.yaml", [
        f"data.dir={dataset}", f"output.dir={out}", "training.epochs=40", "training.workers=0",
        "training.threads=1", "output.checkpoint_every=1000"])
    metrics = train(cfg, progress=False)
    return dataset, out, metrics


def _parse(argv):
    from facedata.flip.eval_cli import add_eval_parser

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def test_eval_command_trained_vs_random_init(trained, tmp_path, capsys):
    from facedata.flip.eval_cli import run_eval_command

    dataset, run_dir, metrics = trained
    out = tmp_path / "eval.json"
    assert run_eval_command(_parse([str(run_dir), "--dataset", str(dataset), "--out", str(out), "--threads", "1",
                                    "--workers", "0", "--no-progress"])) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    print(printed)  # the table, for -s runs

    # the held-out split: the demo's 4 test samples pooled with its 4 validation samples
    assert res["eval_splits"] == ["validation", "test"] and res["n_eval"] == 8 and "pooled" in res["split_note"]
    assert res["identities"]["shared"] == 0 and res["n_train"] == 30
    assert res["checkpoint"] == metrics["checkpoint"] and res["step"] == metrics["steps"]
    assert res["random_init_seed"] == 0 and res["use_crops"] is True

    # training fitted the train captions: far better retrieval there than the random initialisation
    fit = res["train_retrieval"]
    assert fit["n"] == 30
    for direction in ("image_to_text", "text_to_image"):
        r5 = fit[direction]["R@5"]
        assert r5["trained"] > r5["random_init"] + 0.2, fit
        assert r5["difference"] == pytest.approx(r5["trained"] - r5["random_init"])
    # held-out figures are reported (8 samples: too noisy to assert on), with both models
    for direction in ("image_to_text", "text_to_image"):
        for k in ("R@1", "R@5", "R@10"):
            v = res["retrieval"][direction][k]
            assert 0.0 <= v["trained"] <= 1.0 and 0.0 <= v["random_init"] <= 1.0
        assert res["retrieval"][direction]["R@10"]["trained"] == 1.0  # 8 candidates
    assert res["retrieval"]["chance"]["R@1"] == pytest.approx(1 / 8)

    # zero-shot and probe: attributes with 2+ classes among the labels, the rest skipped with a reason
    assert res["zero_shot"] and res["linear_probe"]
    for block in ("zero_shot", "linear_probe"):
        for attribute, v in res[block].items():
            assert len(v["present"]) >= 2 and attribute not in res["skipped"][block]
            for metric in ("accuracy", "balanced_accuracy"):
                assert 0.0 <= v[metric]["trained"] <= 1.0 and 0.0 <= v[metric]["random_init"] <= 1.0
        for why in res["skipped"][block].values():
            assert "1 " in why or "0 " in why
    assert "gender" in res["zero_shot"] and res["zero_shot"]["gender"]["classes"] == ["female", "male"]
    # nobody wears glasses in the demo (and captions leave glasses out by default: 0 labelled)
    assert res["skipped"]["zero_shot"]["eyeglasses"].startswith(("0 class", "1 class"))
    assert math.isfinite(res["zero_shot_mean"]["balanced_accuracy"]["difference"])

    # the printed table
    assert "held-out: validation+test, 8 samples" in printed
    for row in ("retrieval i->t R@1", "train fit t->i R@5", "zero-shot gender bal-acc", "probe mean bal-acc"):
        assert row in printed
    assert f"results: {out}" in printed


def test_random_baseline_is_the_start_of_training(trained, tmp_path):
    """The comparison model is the very initialisation train() starts from: a one-step run with a
    negligible learning rate ends where the baseline is."""
    from facedata.flip.config import load_train_config
    from facedata.flip.evaluate import _load, _seeded
    from facedata.flip.train import train

    dataset, _, _ = trained
    cfg = load_train_config(REPO / "configs" / "flip_tiny.yaml", [
        f"data.dir={dataset}", f"output.dir={tmp_path / 'one'}", "training.epochs=1", "training.lr=1e-12",
        "training.warmup_steps=0", "training.workers=0", "training.threads=1", "training.seed=7"])
    metrics = train(cfg, progress=False)
    loaded = _load(metrics["checkpoint"], None, None, None)
    assert loaded.seed == 7
    baseline = _seeded(loaded.seed, loaded.baseline).state_dict()
    after_one_step = loaded.model.state_dict()
    assert baseline.keys() == after_one_step.keys()
    for name, value in baseline.items():
        assert torch.allclose(value, after_one_step[name], atol=1e-6), name
    # and a different seed gives different weights
    other = _seeded(8, loaded.baseline).state_dict()
    assert not torch.allclose(other["visual.conv1.weight"], baseline["visual.conv1.weight"])


def test_evaluate_a_model_object_and_explicit_splits(trained):
    from facedata.flip.config import load_train_config
    from facedata.flip.evaluate import evaluate, format_eval_table
    from facedata.flip.model import build_flip_model

    dataset, _, _ = trained
    cfg = load_train_config(REPO / "configs" / "flip_tiny.yaml", [f"data.dir={dataset}"])
    torch.manual_seed(3)
    flip = build_flip_model(cfg.model)
    flip.model.train()
    # an untrained model against the random initialisation of the seed it was built with: no difference
    res = evaluate(flip, dataset, split="test", min_samples=0, attributes=["gender", "smiling"], seed=3, threads=1)
    assert res["eval_splits"] == ["test"] and res["n_eval"] == 4 and res["split_note"] is None
    assert res["checkpoint"] is None and res["use_crops"] is False and res["random_init_seed"] == 3
    for block in (res["retrieval"], res["train_retrieval"]):
        for direction in ("image_to_text", "text_to_image"):
            assert all(v["difference"] == 0.0 for v in block[direction].values())
    for v in [*res["zero_shot"].values(), *res["linear_probe"].values()]:
        assert v["balanced_accuracy"]["difference"] == 0.0
    assert flip.model.training  # handed back in the mode it came in
    # without the comparison
    res = evaluate(flip, dataset, split="validation", attributes=["gender"], probe=False, compare_random=False,
                   threads=1)
    assert res["eval_splits"] == ["validation"] and res["linear_probe"] == {}
    assert res["retrieval"]["image_to_text"]["R@1"]["random_init"] is None
    assert res["retrieval"]["image_to_text"]["R@1"]["difference"] is None
    assert "validation, 4 samples" in format_eval_table(res)


def test_eval_errors_are_one_line(trained, tmp_path):
    from facedata.flip.eval_cli import run_eval_command
    from facedata.flip.evaluate import evaluate

    dataset, run_dir, _ = trained
    with pytest.raises(UserError, match="missing.pt: no such file or folder"):
        evaluate(tmp_path / "missing.pt", dataset)
    with pytest.raises(UserError, match="without checkpoints"):
        evaluate(tmp_path, dataset)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(UserError, match="not a facedata FLIP checkpoint"):
        evaluate(bad, dataset)
    with pytest.raises(UserError, match=r"--split: .*: no nope-\*\.tar shards \(splits there: test, train, valid"):
        evaluate(run_dir, dataset, split="validation+nope")
    with pytest.raises(UserError, match=r"--dataset: .*: no such folder"):
        evaluate(run_dir, tmp_path / "nowhere")
    with pytest.raises(UserError, match="probe's training split"):
        evaluate(run_dir, dataset, split="train")
    with pytest.raises(UserError, match="--attributes: unknown attribute 'age'"):
        run_eval_command(_parse([str(run_dir), "--dataset", str(dataset), "--attributes", "gender,age"]))
    with pytest.raises(UserError, match="--batch-size"):
        run_eval_command(_parse([str(run_dir), "--dataset", str(dataset), "--batch-size", "0"]))
