"""The YAML config reader (curation and training configs) and --set overrides."""

from __future__ import annotations

import copy

import pytest

from facedata.core.config import ConfigError, config_from_dict, load_config


def test_key_given_twice_is_refused_with_its_lines(tmp_path):
    """Plain YAML keeps the last of two equal keys: the first `faces:` section would vanish."""
    path = tmp_path / "run.yaml"
    path.write_text("input:\n  path: in.parquet\nfaces:\n  enabled: false\nfaces:\n  det_size: 320\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: line 5: key 'faces' given twice (first on line 3); only one can apply: merge them")
    # Inside a section too.
    path.write_text("input:\n  path: in.parquet\n  url_col: link\n  caption_col: text\n  url_col: URL\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line 5: key 'url_col' given twice \(first on line 3\)"):
        load_config(path)
    # Keys brought in by a YAML merge (<<) may still be overridden.
    path.write_text("input: &base\n  path: in.parquet\n  url_col: link\n"
                    "faces: {enabled: false}\n")
    assert load_config(path).input.url_col == "link"
    path.write_text("input:\n  <<: {path: in.parquet, url_col: link}\n  url_col: URL\n")
    assert load_config(path).input.url_col == "URL"


def test_training_config_refuses_a_key_given_twice(tmp_path):
    from facedata.flip.config import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("data:\n  dataset: d\ndata:\n  dataset: e\n")
    with pytest.raises(ConfigError, match=r"train.yaml: line 3: key 'data' given twice \(first on line 1\)"):
        load_train_config(path)


def test_overrides_leave_the_callers_dict_unchanged():
    data = {"input": {"path": "in.parquet"}, "faces": {"filter": {"min_score": 0.5}}}
    before = copy.deepcopy(data)
    cfg = config_from_dict(data, overrides=["input.url_col=link", "faces.filter.min_score=0.9",
                                            "download.timeout=3"])
    assert (cfg.input.url_col, cfg.faces.filter.min_score, cfg.download.timeout) == ("link", 0.9, 3)
    assert data == before
    # The same dict again, without overrides: the defaults, not the last call's overrides.
    assert config_from_dict(data).input.url_col == "url"
