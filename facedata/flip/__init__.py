"""FLIP: face-language image pretraining (CLIP-style contrastive training) on a published facedata
dataset, with open_clip's models and loss.

- `config`: the YAML training config (`TrainConfig`, `load_train_config`).
- `model`: the open_clip model, its tokenizer and image transforms from the config; local
  pretrained checkpoints only (nothing is downloaded).
- `data`: the published webdataset tars of one split as a deterministic, resumable loader.
- `train`: the training loop (`train(cfg)`), checkpoints, metrics and the loss curve.

Import `facedata.flip.train` etc. directly; this package module stays light (no torch import).
"""
