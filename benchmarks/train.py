"""FLIP training throughput and memory: `facedata.flip.train.train` against open_clip's own training entry
point (`open_clip_train.main`, shipped in the open_clip_torch wheel), same shards, same model, same settings.

    .venv/bin/python benchmarks/train.py                 # tiny config on CPU, 200 steps, ~2.5 min (+~15 s once)
    .venv/bin/python benchmarks/train.py --repeat 2      # two rounds, order alternated; ~4-5 min
    .venv/bin/python benchmarks/train.py --quick         # 40 steps, no warm-up, ~1 min

Data (built once under benchmarks/_work/train/): the 1,000-sample run of benchmarks/publish.py (`facedata demo`
replicated with new keys and identities, benchmarks/_work/publish_run_1000/) published by
`facedata.publish.writer.publish_run` with 100 samples per shard. On CPU with `crops=True`: the webdataset image is the
primary face crop (790 train samples in 8 tars), which both tools read whole (ours: `data.use_crops: false`).
The GPU section uses whole images (`crops=False`, 50 samples per shard, 16 tars).

Contenders, each in a subprocess of its own (`python benchmarks/train.py _worker ...`), with OMP/MKL threads at
1 and `torch.set_num_threads(1)` in the training process (CPU), the same number of loader worker processes, and
an unreported short warm-up of both first (2 steps per loader worker: page cache, imports):
- ours: `facedata.flip.train.train(cfg)` with configs/flip_tiny.yaml, its augmentation set to what open_clip's
  trainer can do (no horizontal flip), `training.steps: N`, one checkpoint at the end;
- open_clip_train: `open_clip_train.main.main(argv)` in-process, after `ensure_torchvision()` and
  `open_clip.add_model_config(DIR)` (the same model config as a JSON; the supported way to register one):
  `--dataset-type webdataset --train-data DIR/webdataset/train-{00000..0000K}.tar --train-num-samples N*B
  --epochs 1` (one epoch of exactly N steps: each loader worker repeats its shards), `--log-every-n-steps 1`.

Same in both: model config and initial weights (both seed torch with 0 right before building the model:
identical state dicts), batch size, AdamW (lr, betas, eps, weight decay off for gains/biases/logit_scale),
linear warmup then cosine to 0 over N steps, fp32 (GPU: bf16 autocast), the augmentation
(RandomResizedCrop scale 0.8-1 bicubic, ColorJitter 0.1/0.1/0.1/0, CLIP normalisation), the tokenizer.
Different: the order of samples (each tool's own shuffling) and so each step's batch.

Measured: at the end of every step the training process notes the clock and the CPU time of itself and its
loader workers, the same way in both (ours: `train(on_step=...)`; open_clip_train: a logging handler on its
per-step "Train Epoch" line). From these: samples/s and samples per CPU-second over steps 2..N, so start-up,
the first batch and the final checkpoint are excluded; samples/s is cross-checked against each tool's own log
(ours: metrics.csv `elapsed_s`; open_clip_train: out.log's per-step samples/s). Also the subprocess's wall and
CPU time (wait4), the wall outside steps 2..N split into up to step 1 / after step N / interpreter, peak RSS of
the training process (ru_maxrss) and of the process tree with the loader workers (/proc sampled every 0.1 s;
shared pages count once per process); on CUDA, torch.cuda.max_memory_allocated. Losses at steps 1, 25%, 50%,
75%, 100% from both logs, raw and as a 10-step mean, with the mean gap between the two 10-step-mean curves and
each tool's own gap between rounds. Results: benchmarks/_work/train.json, curves benchmarks/_work/train_loss.png.

GPU section (only when torch sees CUDA; otherwise "GPU: not available (skipped)"): configs/flip_vitb16.yaml
(open_clip's ViT-B-16 at 224 px, whole images), bf16 autocast on both (open_clip: `--precision amp_bf16`),
batch 128, 8 loader workers, 64 steps.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"
TRAIN_WORK = WORK / "train"
SOURCE_SAMPLES = 1000
# open_clip_torch's `training` extra pins webdataset<=0.2.86: from 0.2.96 on, webdataset's tar_file_expander
# yields an end-of-shard marker ({}) that open_clip_train's group_by_keys_nothrow reads as a file and fails on
# (KeyError: 'fname'; webdataset/webdataset#384, mlfoundations/open_clip#935). facedata's venv has 1.0.x, so
# open_clip_train runs with the version its extra asks for, installed beside the venv, first on its PYTHONPATH.
OC_DEPS = ("webdataset==0.2.86",)
OC_DEPS_DIR = TRAIN_WORK / "open_clip_train_deps"
BENCH_MODEL = "facedata-flip-tiny-bench"  # the tiny config's model, registered with open_clip under this name
SAMPLE_INTERVAL = 0.1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------------------------------- data

def published(crops: bool, samples_per_shard: int) -> Path:
    """The 1,000-sample benchmark run published (cached; publish_run leaves an unchanged DEST alone)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import publish as publish_bench  # benchmarks/publish.py: the replicated demo run

    from facedata.publish.writer import publish_run

    run = publish_bench.prepare_run(SOURCE_SAMPLES)
    dest = TRAIN_WORK / ("data_crops" if crops else "data_full")
    manifest = publish_run(run, dest, overwrite=True, crops=crops, samples_per_shard=samples_per_shard,
                           progress=False)
    if manifest["status"] != "unchanged":
        print(f"published {run.name} to {dest} (crops={crops}, {samples_per_shard} per shard)", flush=True)
    return dest


def train_tars(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "webdataset").glob("train-*.tar"))


def brace_spec(data_dir: Path) -> str:
    """open_clip_train's --train-data: DIR/webdataset/train-{00000..0000K}.tar (braceexpand)."""
    tars = train_tars(data_dir)
    names = [p.name for p in tars]
    if names != [f"train-{i:05d}.tar" for i in range(len(tars))]:
        raise SystemExit(f"{data_dir}: train tars are not numbered 0..{len(tars) - 1}: {names[:3]}...")
    return str(data_dir / "webdataset" / f"train-{{00000..{len(tars) - 1:05d}}}.tar")


# ------------------------------------------------------------------------------------------ the settings

def setup_cpu(args) -> dict:
    """The tiny config on CPU, fp32, one torch thread."""
    import yaml

    data = published(crops=True, samples_per_shard=100)
    cfg = yaml.safe_load((REPO / "configs" / "flip_tiny.yaml").read_text())
    return _setup(args, "tiny-cpu", cfg, data, device="cpu", precision="fp32", steps=args.steps,
                  batch_size=args.batch_size, workers=args.workers, threads=args.threads, warmup=10)


def setup_gpu(args, device: str = "cuda", precision: str = "bf16") -> dict:
    """configs/flip_vitb16.yaml (ViT-B-16, whole images) on CUDA in bf16."""
    import yaml

    data = published(crops=False, samples_per_shard=50)
    cfg = yaml.safe_load((REPO / "configs" / "flip_vitb16.yaml").read_text())
    return _setup(args, f"vitb16-{device}", cfg, data, device=device, precision=precision, steps=args.gpu_steps,
                  batch_size=args.gpu_batch_size, workers=args.gpu_workers, threads=None, warmup=10)


def _setup(args, name: str, cfg: dict, data: Path, *, device: str, precision: str, steps: int,
           batch_size: int, workers: int, threads: int | None, warmup: int) -> dict:
    from facedata.flip.config import train_config_from_dict

    cfg = copy.deepcopy(cfg)
    cfg["data"].update({"dir": str(data), "split": "train", "use_crops": False})
    cfg["model"]["pretrained"] = None
    cfg["model"].setdefault("augment", {})["hflip"] = False  # open_clip's trainer has no flip (non-timm path)
    t = cfg["training"]
    t.pop("epochs", None)
    t.update({"steps": steps, "batch_size": batch_size, "grad_accum": 1, "warmup_steps": warmup,
              "precision": precision, "device": device, "seed": 0, "workers": workers, "threads": threads,
              "grad_clip_norm": None})
    cfg["output"] = {"dir": "", "checkpoint_every": steps, "keep_last": 1, "resume": False}
    tc = train_config_from_dict(cfg, name)  # validates, fills in the defaults both sides must share
    model_cfg = tc.model.resolved()
    aug = tc.model.augment
    tr = tc.training
    j = aug.color_jitter
    n_tars = len(train_tars(data))
    if steps % max(1, workers):
        raise SystemExit(f"{name}: steps ({steps}) must be a multiple of the loader workers ({workers}): "
                         "open_clip_train rounds an epoch up to whole batches per worker")
    if n_tars < workers:
        raise SystemExit(f"{data}: {n_tars} train tars, fewer than {workers} loader workers (open_clip_train "
                         "gives each worker whole shards)")
    size = model_cfg["vision_cfg"].get("image_size", 224)
    oc_precision = {"fp32": "fp32", "bf16": "amp_bf16", "amp": "amp"}[precision]
    # open_clip_train's argv: everything its defaults would choose differently is spelled out.
    oc_argv = [
        "--dataset-type", "webdataset", "--train-data", brace_spec(data),
        "--train-num-samples", str(steps * batch_size), "--epochs", "1",
        "--batch-size", str(batch_size), "--workers", str(workers),
        "--lr", str(tr.lr), "--wd", str(tr.weight_decay), "--beta1", str(tr.beta1), "--beta2", str(tr.beta2),
        "--eps", str(tr.eps), "--warmup", str(warmup), "--lr-scheduler", "cosine",
        "--precision", oc_precision, "--device", device, "--seed", "0",
        "--force-image-size", str(size),
        "--aug-cfg", f"scale={tuple(aug.scale)}", f"color_jitter=({j}, {j}, {j}, 0.0)", "color_jitter_prob=1.0",
        "--log-every-n-steps", "1", "--save-frequency", "1", "--report-to", "",
    ]
    if tc.model.name and not tc.model.config:
        oc_model = tc.model.name  # a built-in architecture (ViT-B-16)
    else:
        oc_model = BENCH_MODEL
    oc_argv += ["--model", oc_model]
    return {"name": name, "device": device, "precision": precision, "steps": steps, "batch_size": batch_size,
            "workers": workers, "threads": threads, "data": str(data), "n_tars": n_tars,
            "ours_config": tc.model_dump(mode="json"), "model_config": model_cfg, "oc_model": oc_model,
            "oc_argv": oc_argv}


# ----------------------------------------------------------------------------------------------- workers

def ensure_oc_deps(target: Path) -> Path:
    """open_clip_train's pinned dependencies (OC_DEPS) in `target`, installed there once with pip --target."""
    stamp = target / ".installed.json"
    if stamp.exists() and json.loads(stamp.read_text()) == list(OC_DEPS):
        return target
    shutil.rmtree(target, ignore_errors=True)
    print(f"installing {', '.join(OC_DEPS)} into {target} for open_clip_train (pip --target, no deps)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    *OC_DEPS], check=True)
    stamp.write_text(json.dumps(list(OC_DEPS)))
    return target


def _env(tool: str, threads: int | None, oc_deps: Path | None) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPYCACHEPREFIX": str(WORK / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # see download.py's tool_env: recompiling on every start
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "OPENBLAS_NUM_THREADS": str(threads)})
    if tool == "open_clip_train" and oc_deps is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(oc_deps), env.get("PYTHONPATH")) if p)
    return env


def _memory_figures() -> dict:
    import torch

    out = {"ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def _tree_cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of it with its live children (the loader workers)."""
    t = os.times()
    own = total = t.user + t.system
    for tid in os.listdir("/proc/self/task"):
        try:
            children = Path(f"/proc/self/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return own, total


class StepProbe:
    """Wall clock and CPU of the training process tree at the end of every step, taken the same way for
    both tools: ours calls it from train(on_step=...), open_clip_train from its per-step log record."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []  # the training process and its loader workers
        self.cpu_main: list[float] = []  # the training process alone

    def __call__(self, *_args) -> None:
        self.wall.append(time.perf_counter())
        own, total = _tree_cpu_seconds()
        self.cpu_main.append(own)
        self.cpu.append(total)


class _StepLogHandler:
    """A logging handler that calls the probe on open_clip_train's per-step line ("Train Epoch: ...")."""

    def __new__(cls, probe: StepProbe):
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if isinstance(record.msg, str) and record.msg.startswith("Train Epoch:"):
                    probe()

        return Handler(level=logging.INFO)


def worker_ours(spec: dict, run_dir: Path) -> dict:
    from facedata.flip.config import train_config_from_dict
    from facedata.flip.train import train

    cfg = copy.deepcopy(spec["ours_config"])
    cfg["output"]["dir"] = str(run_dir)
    probe = StepProbe()
    metrics = train(train_config_from_dict(cfg, spec["name"]), progress=False, on_step=probe)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["elapsed_s"]) for r in rows]
    return {"reported": metrics, "loss": [float(r["loss"]) for r in rows],
            "log_window_s": elapsed[-1] - elapsed[0], "data_s": [float(r["data_s"]) for r in rows],
            "probe_wall": probe.wall, "probe_cpu": probe.cpu, "probe_cpu_main": probe.cpu_main,
            **_memory_figures()}


# open_clip_train's per-step line (train.py), e.g. "Train Epoch: 0 [ 16/3200 (0%)] Data (t): 0.012 Batch (t):
# 0.250, 64.0000/s, 64.0000/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 2.7726 (2.7726) Loss: ..."
_OC_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), "
                      r"([\d.eE+-]+)/s.*?\bLoss: ([\d.eE+-]+|nan|inf) ")


def worker_open_clip(spec: dict, run_dir: Path) -> dict:
    from facedata.core.torchvision_compat import ensure_torchvision

    ensure_torchvision()  # before open_clip imports torchvision
    import open_clip
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["oc_model"] == BENCH_MODEL:
        configs = run_dir / "model_configs"
        configs.mkdir(parents=True, exist_ok=True)
        (configs / f"{BENCH_MODEL}.json").write_text(json.dumps(spec["model_config"], indent=2))
        open_clip.add_model_config(configs)
    from open_clip_train.main import main

    argv = spec["oc_argv"] + ["--logs", str(run_dir), "--name", "run"]
    import logging

    import webdataset

    print(f"webdataset {webdataset.__version__} from {webdataset.__file__}", flush=True)
    probe = StepProbe()
    logging.root.addHandler(_StepLogHandler(probe))
    if main(argv) == -1:
        raise SystemExit("open_clip_train.main returned -1 (an existing experiment folder?)")
    loss, sps, data_t = [], [], []
    for line in (run_dir / "run" / "out.log").read_text().splitlines():
        m = _OC_LINE.search(line)
        if m:
            loss.append(float(m.group(7)))
            sps.append(float(m.group(6)))
            data_t.append(float(m.group(4)))  # the mean over the log window, here one step
    if len(loss) != spec["steps"]:
        raise SystemExit(f"open_clip_train logged {len(loss)} steps, expected {spec['steps']}")
    b = spec["batch_size"]
    return {"loss": loss, "log_window_s": sum(b / v for v in sps[1:]), "data_s": data_t,
            "probe_wall": probe.wall, "probe_cpu": probe.cpu, "probe_cpu_main": probe.cpu_main,
            **_memory_figures()}


def run_worker_main(tool: str, spec_path: str, run_dir: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(run_dir)
    started = time.perf_counter()
    result = (worker_ours if tool == "ours" else worker_open_clip)(spec, run_dir)
    result.update({"worker_start": started, "worker_end": time.perf_counter()})
    Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- measuring

def _read_stat(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), int(fields[21]) * PAGE_SIZE


class TreeSampler(threading.Thread):
    """Peak RSS summed over a process and its descendants (the loader workers), and the most processes."""

    def __init__(self, root_pid: int) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.peak_tree, self.processes = root_pid, 0, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_INTERVAL):
            rss, children = {}, {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    try:
                        ppid, rss[int(entry)] = _read_stat(int(entry))
                    except (OSError, IndexError):
                        continue
                    children.setdefault(ppid, []).append(int(entry))
            members, frontier = [], [self.root_pid]
            while frontier:
                pid = frontier.pop()
                if pid in rss:
                    members.append(rss[pid])
                    frontier.extend(children.get(pid, ()))
            self.peak_tree = max(self.peak_tree, sum(members))
            self.processes = max(self.processes, len(members))

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_tool(tool: str, spec: dict, tag: str, oc_deps: Path | None = None) -> dict:
    run_dir = TRAIN_WORK / "runs" / f"{spec['name']}-{tool}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec_path, out_path, log_path = run_dir / "spec.json", run_dir / "result.json", run_dir / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=2))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", tool, str(spec_path), str(run_dir / "out"),
           str(out_path)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=_env(tool, spec["threads"], oc_deps), cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    sampler.stop()
    code = os.waitstatus_to_exitcode(status)
    if code:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{tool} ({spec['name']}) exited with {code}; {log_path}:\n{tail}")
    res = json.loads(out_path.read_text())
    b, n = spec["batch_size"], spec["steps"]
    if len(res["probe_wall"]) != n:
        raise SystemExit(f"{tool}: {len(res['probe_wall'])} step probes, expected {n}")
    window = res["probe_wall"][-1] - res["probe_wall"][0]  # end of step 1 to end of step N
    window_cpu = res["probe_cpu"][-1] - res["probe_cpu"][0]
    main_cpu = res["probe_cpu_main"][-1] - res["probe_cpu_main"][0]
    return {"tool": tool, "tag": tag, "load_before": round(load, 2), "wall_s": round(wall, 2),
            "window_s": round(window, 2), "samples_per_s": round((n - 1) * b / window, 2),
            "samples_per_cpu_s": round((n - 1) * b / window_cpu, 2), "cores_busy": round(window_cpu / window, 2),
            "log_samples_per_s": round((n - 1) * b / res["log_window_s"], 2),
            "step_ms": round(1000 * window / (n - 1), 1),
            "main_cpu_ms": round(1000 * main_cpu / (n - 1), 1),
            "loader_cpu_ms": round(1000 * (window_cpu - main_cpu) / (n - 1), 1),
            "outside_window_s": round(wall - window, 2),
            # wall outside the window: to the end of step 1 (imports, model, data index, loader start, step 1),
            # after step N (final checkpoint, shutdown), and the interpreter's start and exit around the worker
            "to_step1_s": round(res["probe_wall"][0] - res["worker_start"], 2),
            "after_last_step_s": round(res["worker_end"] - res["probe_wall"][-1], 2),
            "interpreter_s": round(wall - (res["worker_end"] - res["worker_start"]), 2),
            "data_wait_ms": round(1000 * sum(res["data_s"][1:]) / (n - 1), 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_main_mb": res["ru_maxrss_mb"], "peak_rss_tree_mb": round(sampler.peak_tree / 2**20, 1),
            "processes": sampler.processes, "cuda_max_allocated_mb": res.get("cuda_max_allocated_mb"),
            "cuda_max_reserved_mb": res.get("cuda_max_reserved_mb"), "loss": res["loss"]}


# -------------------------------------------------------------------------------------------- reporting

TOOLS = ("ours", "open_clip_train")


def _mean10(loss: list[float], step: int) -> float:
    window = loss[max(0, step - 10):step]
    return sum(window) / len(window)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _curve_gap(a: dict, b: dict) -> float:
    """Mean absolute difference between two runs' 10-step mean loss curves."""
    n = min(len(a["loss"]), len(b["loss"]))
    return _mean([abs(_mean10(a["loss"], s) - _mean10(b["loss"], s)) for s in range(1, n + 1)])


def checkpoints(n: int) -> list[int]:
    return sorted({1, max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n})


def report(spec: dict, runs: list[dict]) -> str:
    best = {t: max((r for r in runs if r["tool"] == t), key=lambda r: r["samples_per_s"]) for t in TOOLS}
    o, c = best["ours"], best["open_clip_train"]
    gpu = spec["device"] == "cuda"
    rows = [("samples/s, steps 2-N", "samples_per_s", "{:,.1f}"),
            ("samples/s, steps 2-N, from the tool's own log", "log_samples_per_s", "{:,.1f}"),
            ("samples per CPU-second, steps 2-N (process tree)", "samples_per_cpu_s", "{:,.1f}"),
            ("cores busy, steps 2-N", "cores_busy", "{:.2f}"),
            ("wall per step, ms", "step_ms", "{:.1f}"),
            ("  CPU per step, training process, ms", "main_cpu_ms", "{:.1f}"),
            ("  CPU per step, loader workers, ms", "loader_cpu_ms", "{:.1f}"),
            ("wall of the subprocess, s", "wall_s", "{:.1f}"),
            ("outside steps 2-N (start-up, step 1, end), s", "outside_window_s", "{:.1f}"),
            ("  of which: imports to end of step 1, s", "to_step1_s", "{:.1f}"),
            ("  of which: after step N (checkpoint, exit of the loop), s", "after_last_step_s", "{:.1f}"),
            ("  of which: interpreter start and exit, s", "interpreter_s", "{:.1f}"),
            ("data wait per step, ms", "data_wait_ms", "{:.1f}"), ("CPU s, process tree", "cpu_s", "{:.1f}"),
            ("peak RSS, training process, MiB", "peak_rss_main_mb", "{:,.0f}"),
            ("peak RSS, tree sum, MiB", "peak_rss_tree_mb", "{:,.0f}"), ("processes", "processes", "{}")]
    if gpu:
        rows += [("CUDA max allocated, MiB", "cuda_max_allocated_mb", "{:,.0f}"),
                 ("CUDA max reserved, MiB", "cuda_max_reserved_mb", "{:,.0f}")]
    n, b = spec["steps"], spec["batch_size"]
    head = (f"{spec['name']}: {n} steps x {b}, {spec['precision']}, {spec['workers']} loader workers, "
            f"threads {spec['threads'] or 'default'}, {spec['n_tars']} train tars; best of "
            f"{len(runs) // 2} by samples/s")
    lines = [head, "", "| | ours | open_clip_train | ours / open_clip_train |", "|---|---:|---:|---:|"]
    for label, key, fmt in rows:
        a, z = o.get(key), c.get(key)
        if a is None or z is None:
            continue
        ratio = f"{a / z:.2f}" if z and key != "processes" else ""
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(z)} | {ratio} |")
    lines += ["", "| step | ours loss | open_clip_train loss | ours, 10-step mean | open_clip_train, 10-step mean |",
              "|---:|---:|---:|---:|---:|"]
    for s in checkpoints(n):
        lines.append(f"| {s} | {o['loss'][s - 1]:.4f} | {c['loss'][s - 1]:.4f} | {_mean10(o['loss'], s):.4f} | "
                     f"{_mean10(c['loss'], s):.4f} |")
    lines += ["", (f"mean loss over steps 1-{n}: ours {_mean(o['loss']):.4f}, open_clip_train "
                   f"{_mean(c['loss']):.4f}; mean |difference| of the 10-step means: ours vs open_clip_train "
                   f"{_curve_gap(o, c):.4f}")]
    for t in TOOLS:  # each tool's own run-to-run spread, the yardstick for the gap above
        mine = [r for r in runs if r["tool"] == t]
        if len(mine) > 1:
            gaps = [_curve_gap(a, z) for i, a in enumerate(mine) for z in mine[i + 1:]]
            lines.append(f"  {t} against itself (rounds): {max(gaps):.4f}")
    if len(runs) > 2:
        lines.append("")
        for r in runs:
            lines.append(f"  round {r['tag']}: {r['tool']:<15} {r['samples_per_s']:8.1f} samples/s, "
                         f"{r['samples_per_cpu_s']:.1f} per CPU-s, "
                         f"wall {r['wall_s']:.1f} s, load before {r['load_before']}, "
                         f"loss at N (10-step mean) {_mean10(r['loss'], n):.4f}")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(results), 4))
    FigureCanvasAgg(fig)
    for i, (name, res) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for r in res["runs"]:
            loss = r["loss"]
            smooth = [_mean10(loss, s) for s in range(1, len(loss) + 1)]
            ax.plot(range(1, len(loss) + 1), smooth, label=f"{r['tool']} ({r['tag']})",
                    color="tab:blue" if r["tool"] == "ours" else "tab:orange", alpha=0.9)
        ax.set_title(f"{name}: contrastive loss, 10-step mean")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def compare(spec: dict, repeat: int, warmup: bool, oc_deps: Path | None, tools: tuple[str, ...] = TOOLS) -> dict:
    if warmup:
        warm = copy.deepcopy(spec)
        n = warm["steps"] = 2 * max(1, spec["workers"])
        warm["oc_argv"][warm["oc_argv"].index("--train-num-samples") + 1] = str(n * spec["batch_size"])
        warm["ours_config"]["training"]["steps"] = n
        warm["ours_config"]["output"]["checkpoint_every"] = n
        for tool in tools:
            print(f"{spec['name']}: warm-up, {tool}", flush=True)
            run_tool(tool, warm, "warmup", oc_deps)
    runs = []
    for r in range(repeat):
        order = tools if r % 2 == 0 else tools[::-1]
        for tool in order:
            print(f"{spec['name']}: round {r + 1}, {tool}, {spec['steps']} steps", flush=True)
            res = run_tool(tool, spec, str(r + 1), oc_deps)
            print(f"  {res['samples_per_s']:.1f} samples/s (steps 2-{spec['steps']}), "
                  f"{res['samples_per_cpu_s']:.1f} per CPU-s, wall {res['wall_s']:.1f} s, "
                  f"peak RSS {res['peak_rss_main_mb']:.0f} MiB (tree {res['peak_rss_tree_mb']:.0f}), "
                  f"final loss {_mean10(res['loss'], spec['steps']):.4f}", flush=True)
            runs.append(res)
    out = {"spec": {k: v for k, v in spec.items() if k != "ours_config"}, "runs": runs}
    if set(tools) == set(TOOLS):
        out["report"] = report(spec, runs)
        print(out["report"], flush=True)
    return out


def versions() -> dict:
    from importlib.metadata import version

    names = ("torch", "torchvision", "open_clip_torch", "webdataset")
    return {n: version(n) for n in names}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        run_worker_main(*argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps on CPU (default 200; a multiple of --workers)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes, both tools (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both tools (default 1)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, order alternated; best reported")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unreported short run of each tool")
    parser.add_argument("--quick", action="store_true", help="40 steps on CPU, 16 on GPU, no warm-up")
    parser.add_argument("--gpu-steps", type=int, default=64, help="a multiple of --gpu-workers")
    parser.add_argument("--gpu-batch-size", type=int, default=128)
    parser.add_argument("--gpu-workers", type=int, default=8)
    parser.add_argument("--no-cpu", action="store_true", help="only the GPU section")
    parser.add_argument("--oc-deps", type=Path, default=OC_DEPS_DIR,
                        help=f"folder for open_clip_train's pinned {', '.join(OC_DEPS)} (installed there with pip "
                             "--target when missing; put first on its PYTHONPATH)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.gpu_steps, args.no_warmup = 40, 16, True
    import torch

    TRAIN_WORK.mkdir(parents=True, exist_ok=True)
    oc_deps = ensure_oc_deps(args.oc_deps.resolve())
    results: dict = {"versions": versions(), "open_clip_train_deps": {"path": str(oc_deps), "pins": list(OC_DEPS)},
                     "cpu_count": os.cpu_count()}
    curves: dict = {}
    if not args.no_cpu:
        spec = setup_cpu(args)
        results["cpu"] = compare(spec, args.repeat, not args.no_warmup, oc_deps)
        curves["tiny, CPU"] = results["cpu"]
    if torch.cuda.is_available():
        spec = setup_gpu(args)
        results["gpu"] = compare(spec, args.repeat, not args.no_warmup, oc_deps)
        results["gpu"]["device_name"] = torch.cuda.get_device_name(0)
        curves["ViT-B-16, GPU"] = results["gpu"]
    else:
        print("GPU: not available (skipped)", flush=True)
        results["gpu"] = "not available (skipped)"
    (WORK / "train.json").write_text(json.dumps(results, indent=1))
    if curves:
        plot(curves, WORK / "train_loss.png")
    print(f"written: {WORK / 'train.json'}, {WORK / 'train_loss.png'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
