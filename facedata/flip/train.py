"""The FLIP training loop: open_clip's CLIP and ClipLoss on a published facedata split.

`train(cfg)` runs to the configured length and returns its metrics. In `output.dir` it writes:

- `checkpoints/step_NNNNNNNN.pt`, every `checkpoint_every` steps and at the end, atomically
  (temp file, then rename); the newest `keep_last` are kept. Each holds the model (`state_dict`,
  so open_clip and `model.pretrained` load it), optimiser, LR scheduler, gradient scaler, RNG
  states and the data position, so rerunning a killed run continues exactly where the last
  checkpoint left it: same parameters, same losses, as if it had never stopped;
- `metrics.csv`: one row per optimiser step (step, epoch, loss, lr, samples/s, ...); on resume the
  rows after the checkpoint are dropped, then rewritten by the resumed steps;
- `loss.png`: the loss curve (and LR), redrawn at each checkpoint and at the end;
- `config.yaml`: the config of the run; `index/`: the cached tar index of the split;
- TensorBoard scalars under `tensorboard/` when the tensorboard package is installed.

Optimisation follows open_clip's trainer: AdamW without weight decay on gains, biases and
logit_scale; linear warmup then cosine decay to 0; logit_scale clamped to ln(100). Gradient
accumulation uses open_clip's feature caching, so the contrastive loss of a step compares all
batch_size * grad_accum samples; here the forward pass that takes gradients replays the RNG state
of the pass that cached the features, so random masking (vision_cfg.patch_dropout) agrees
between them, and logit_scale's gradient, which every replayed pass contributes in full, is
divided by grad_accum.

Mixed precision (bf16 or amp, i.e. float16 with gradient scaling) is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import re
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from facedata.core.errors import UserError
from facedata.flip.config import TrainConfig
from facedata.flip.data import FaceTextDataset, StepBatches, index_split, split_tars, step_loader
from facedata.core.shards import atomic_path, atomic_write_bytes

log = logging.getLogger("facedata.flip")

CHECKPOINT_FORMAT = "facedata-flip-checkpoint-v1"
METRIC_COLUMNS = ("step", "epoch", "loss", "lr", "samples_per_s", "logit_scale", "data_s", "elapsed_s")
_CHECKPOINT = re.compile(r"^step_(\d{8})\.pt$")


# ---------------------------------------------------------------------------------------------
# Pieces


def check_inputs(cfg: TrainConfig) -> None:
    """Cheap checks before anything heavy starts (and before a Prefect flow does): the split's
    tars exist and a configured pretrained checkpoint is a file. One-line UserErrors."""
    split_tars(cfg.data.dir, cfg.data.split)
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise UserError(f"model.pretrained: {cfg.model.pretrained}: no such file "
                        "(a local CLIP checkpoint; nothing is downloaded)")
    if cfg.training.device == "cuda" and not torch.cuda.is_available():
        raise UserError("training.device: cuda was asked for but torch sees no CUDA device")


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW in two groups, as open_clip: gains, biases and logit_scale (and any other parameter
    under 2 dims) without weight decay, the rest with it."""
    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": cfg.weight_decay}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
    )


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LR multiplier of optimiser step `step` (0-based): linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _all_rng_states() -> dict:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As plain values, so the checkpoint loads with torch.load(weights_only=True).
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_all_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _CHECKPOINT.match(p.name)), key=lambda p: p.name)


def _save_checkpoint(path: Path, state: dict, keep_last: int) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(path.parent.parent)[:-keep_last]:
        old.unlink(missing_ok=True)


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path}: cannot read checkpoint ({' '.join(str(err).split())[:200]}); "
                        "delete it to resume from the one before") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a facedata FLIP checkpoint")
    return state


class MetricsLog:
    """metrics.csv, one row per step; on resume it keeps the rows up to the resumed step."""

    def __init__(self, path: Path, keep_upto: int):
        self.path = path
        self.rows: list[dict] = []
        if keep_upto > 0 and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f)
                             if r.get("step", "").isdigit() and int(r["step"]) <= keep_upto]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        self._file = open(path, "a", newline="")
        self._writer = csv.DictWriter(self._file, METRIC_COLUMNS)

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def plot(self, path: Path) -> None:
        """The loss curve (and the LR on a second axis) as a PNG, without touching pyplot's state."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.rows:
            return
        steps = [int(r["step"]) for r in self.rows]
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        loss = np.array([float(r["loss"]) for r in self.rows])
        ax.plot(steps, loss, color="tab:blue", alpha=0.35 if len(loss) > 20 else 1.0, label="loss")
        if len(loss) > 20:
            k = max(5, len(loss) // 50)
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"loss ({k}-step mean)")
        ax.set_xlabel("step")
        ax.set_ylabel("contrastive loss")
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(steps, [float(r["lr"]) for r in self.rows], color="tab:orange", lw=1, label="lr")
        ax2.set_ylabel("learning rate")
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")


def _tensorboard(output_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(output_dir / "tensorboard"))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"


# ---------------------------------------------------------------------------------------------
# One optimiser step


class _Stepper:
    def __init__(self, model, loss_fn, optimizer, scheduler, scaler, device, precision, cfg):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.scheduler, self.scaler = scheduler, scaler
        self.device = device
        self.grad_clip = cfg.grad_clip_norm
        if device.type == "cuda" and precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self.autocast = lambda: torch.autocast("cuda", dtype=dtype)
        else:
            self.autocast = contextlib.nullcontext

    def _loss(self, image_features, text_features, logit_scale):
        return self.loss_fn(image_features, text_features, logit_scale)

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        if len(micro) == 1:
            images, texts = micro[0]
            with self.autocast():
                out = model(images, texts)
                loss = self._loss(out["image_features"], out["text_features"], out["logit_scale"])
            self._backward(loss)
        else:
            # open_clip's accumulation: cache every micro-batch's features without gradients, then
            # redo each with gradients, the others' cached features serving as negatives.
            cached_img, cached_txt, states = [], [], []
            with torch.no_grad(), self.autocast():
                for images, texts in micro:
                    states.append(_rng_state(self.device))
                    out = model(images, texts)
                    cached_img.append(out["image_features"])
                    cached_txt.append(out["text_features"])
            after = _rng_state(self.device)
            for j, (images, texts) in enumerate(micro):
                _set_rng_state(states[j], self.device)  # same random masks as the cached pass
                with self.autocast():
                    out = model(images, texts)
                    img = torch.cat(cached_img[:j] + [out["image_features"]] + cached_img[j + 1:])
                    txt = torch.cat(cached_txt[:j] + [out["text_features"]] + cached_txt[j + 1:])
                    loss = self._loss(img, txt, out["logit_scale"])
                self._backward(loss)
            _set_rng_state(after, self.device)
            scale = getattr(model, "logit_scale", None)
            if scale is not None and scale.grad is not None:
                scale.grad.div_(len(micro))  # each replayed pass gave logit_scale its full gradient
        if self.scaler is not None:
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train (or resume training) to the configured length; returns the run's metrics:
    steps, start_step, steps_run, epochs, final_loss, samples_per_s (this run, first step
    excluded), peak_memory_mb (+ peak_memory_kind), device, precision, checkpoint, output_dir,
    n_samples, wall_s.

    `on_step(step, row)` is called after each step's metrics row is written and before that
    step's checkpoint (an exception there stops the run like a kill would)."""
    from facedata.core.progress import progress_bar

    from facedata.flip.model import build_flip_model  # first: it makes torchvision importable
    from open_clip import ClipLoss

    check_inputs(cfg)
    t_start = time.perf_counter()
    tc = cfg.training
    out_dir = Path(cfg.output.dir)
    from facedata.flip.embed import resolve_device

    device = resolve_device(tc.device, "training.device")
    precision = tc.precision if device.type == "cuda" else "fp32"
    if tc.precision != precision:
        log.info("training.precision %s is for CUDA; training on %s in fp32", tc.precision, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    checkpoints = list_checkpoints(out_dir)
    if checkpoints and not cfg.output.resume:
        raise UserError(f"output.dir: {out_dir} already holds checkpoints; set output.resume: true to "
                        "continue that run, or choose another output.dir")

    # The initial weights come from the seeded global RNG.
    random.seed(tc.seed)
    np.random.seed(tc.seed % 2**32)
    torch.manual_seed(tc.seed)
    flip = build_flip_model(cfg.model)
    model = flip.model.to(device)

    index = index_split(cfg.data.dir, cfg.data.split, cache_dir=out_dir / "index")
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = len(index) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"data.split: {cfg.data.split} has {len(index)} samples, fewer than one step's "
                        f"batch_size x grad_accum = {per_step}")
    total_steps = tc.steps if tc.steps is not None else tc.epochs * steps_per_epoch

    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
    stepper = _Stepper(model, ClipLoss(), optimizer, scheduler, scaler, device, precision, tc)

    start_step = 0
    model_config = flip.model_config
    if checkpoints:
        state = _load_checkpoint(checkpoints[-1])
        if state["model_config"] != model_config:
            raise UserError(f"output.dir: {out_dir} holds a run of a different model "
                            f"({checkpoints[-1].name}); choose another output.dir")
        if state["n_samples"] != len(index) or state["per_step"] != per_step:
            raise UserError(
                f"output.dir: {out_dir}: its checkpoint was trained on {state['n_samples']} samples in steps of "
                f"{state['per_step']}, now {len(index)} in steps of {per_step}; choose another output.dir")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _restore_all_rng_states(state["rng"])
        start_step = state["step"]
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):  # training.steps may have changed
            group["lr"] = base * lr_factor(start_step, tc.warmup_steps, total_steps)
        log.info("resuming %s from step %d (%s)", out_dir, start_step, checkpoints[-1].name)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_dir / "config.yaml",
                           yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    for stale in (out_dir / "checkpoints").glob(".*.tmp") if (out_dir / "checkpoints").is_dir() else ():
        stale.unlink(missing_ok=True)  # left by a run killed while saving

    size = flip.image_size if isinstance(flip.image_size, int) else max(flip.image_size)
    min_scale = cfg.model.augment.scale[0] if cfg.model.augment.enabled else 1.0
    dataset = FaceTextDataset(index, flip.tokenizer, flip.train_transform, cfg.data.use_crops,
                              cfg.data.crop_scale, cfg.data.max_pixels,
                              decode_side=math.ceil(size / math.sqrt(min_scale)))
    metrics = MetricsLog(out_dir / "metrics.csv", keep_upto=start_step)
    tb = _tensorboard(out_dir)

    def checkpoint(step: int) -> Path:
        epoch, batch = divmod(step, steps_per_epoch)
        path = out_dir / "checkpoints" / f"step_{step:08d}.pt"
        _save_checkpoint(path, {
            "format": CHECKPOINT_FORMAT, "step": step, "total_steps": total_steps,
            "data_position": {"epoch": epoch, "micro_batch": batch * tc.grad_accum},
            "n_samples": len(index), "per_step": per_step, "steps_per_epoch": steps_per_epoch,
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "rng": _all_rng_states(), "model_config": model_config, "config": cfg.model_dump(mode="json"),
        }, cfg.output.keep_last)
        metrics.plot(out_dir / "loss.png")
        return path

    model.train()
    bar = progress_bar(total=total_steps, initial=start_step, desc="train", unit="step", progress=progress,
               dynamic_ncols=True)
    step = start_step
    timed_samples, timed_s = 0, 0.0
    last_checkpoint = checkpoints[-1] if checkpoints else None
    batches = step_loader(
        dataset, StepBatches(index, tc.batch_size, tc.grad_accum, steps_per_epoch, start_step, total_steps,
                             tc.seed, cfg.data.shuffle_window),
        workers=tc.workers, pin_memory=device.type == "cuda")
    try:
        t0 = time.perf_counter()
        while step < total_steps:
            epoch = step // steps_per_epoch
            micro = []
            for _ in range(tc.grad_accum):
                images, texts = next(batches)
                micro.append((images.to(device, non_blocking=True), texts.to(device, non_blocking=True)))
            t_data = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss = stepper.step(micro)
            if not math.isfinite(loss):
                raise UserError(f"training diverged at step {step + 1} (loss {loss}); lower training.lr "
                                "or use precision bf16/fp32")
            t1 = time.perf_counter()
            step += 1
            if step > start_step + 1:  # the first step pays for start-up and worker launch
                timed_samples += per_step
                timed_s += t1 - t0
            row = {"step": step, "epoch": epoch, "loss": f"{loss:.6f}", "lr": f"{lr:.6e}",
                   "samples_per_s": f"{per_step / (t1 - t0):.2f}",
                   "logit_scale": f"{float(model.logit_scale.detach().exp()):.4f}",
                   "data_s": f"{t_data - t0:.4f}", "elapsed_s": f"{time.perf_counter() - t_start:.2f}"}
            metrics.append(row)
            if tb is not None:
                tb.add_scalar("train/loss", loss, step)
                tb.add_scalar("train/lr", lr, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if on_step is not None:
                on_step(step, row)
            if step % cfg.output.checkpoint_every == 0 or step == total_steps:
                last_checkpoint = checkpoint(step)
            t0 = time.perf_counter()
    finally:
        batches.close()  # stops the loader's workers
        bar.close()
        metrics.close()
        if tb is not None:
            tb.close()
    if step == start_step and metrics.rows:
        metrics.plot(out_dir / "loss.png")  # nothing left to train: still leave the plot
    peak, peak_kind = _peak_memory_mb(device)
    last_losses = [float(r["loss"]) for r in metrics.rows[-10:]]
    return {
        "steps": total_steps, "start_step": start_step, "steps_run": step - start_step,
        "epochs": total_steps / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "final_loss": last_losses[-1] if last_losses else None,
        "mean_loss_last_10": float(np.mean(last_losses)) if last_losses else None,
        "samples_per_s": timed_samples / timed_s if timed_s else None,
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind,
        "device": str(device), "precision": precision, "n_samples": len(index),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None, "output_dir": str(out_dir),
        "metrics_csv": str(out_dir / "metrics.csv"), "loss_png": str(out_dir / "loss.png"),
        "wall_s": round(time.perf_counter() - t_start, 2),
    }


def write_report(metrics: dict[str, Any], output_dir: str | Path) -> Path:
    """The run's metrics as `train_report.json` in its output folder."""
    from facedata.core.shards import write_json

    path = Path(output_dir) / "train_report.json"
    write_json(path, metrics)
    return path


def train_and_report(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """`train`, then `write_report`: the run without Prefect (`facedata train --no-prefect`)."""
    metrics = train(cfg, progress=progress)
    write_report(metrics, cfg.output.dir)
    return metrics


def format_report(metrics: dict[str, Any]) -> str:
    """The metrics as `key: value` lines, for the terminal."""
    return "\n".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in metrics.items())
