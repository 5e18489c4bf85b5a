"""The step contract for steps over one shard's records, in the spirit of datatrove's PipelineStep.

A step implements only its work: `process(rows, images)` gets the shard's records (every sample,
kept or not) and returns the columns it adds and, per sample, a drop reason or None. A filter is
smaller still: `keep(sample)` returns True, or the reason it drops the sample. `run_shard_step`
owns everything else, once: skipping a shard already done under the same fingerprint, clearing an
earlier attempt's temp files, reading the previous step's records, appending typed columns,
applying statuses (only to samples still kept: the first reason wins), the atomic writes with the
completion record last, the stats and the log line.

A user's own step is named in the config's `steps` list by its import path, `package.module:Class`
or `path/to/file.py:Class`, with its options; it runs in the flow and in `--no-prefect` runs like a
built-in step, and shows in the funnel, the dataset card and the Prefect artifacts:

    steps:
      - download
      - faces
      - {step: my_filters.py:SharpEnough, options: {min_sharpness: 80}}
      - identity
      - captions

    class SharpEnough(Filter):
        name = "sharp_enough"
        reasons = {"blurry": "primary face sharpness under min_sharpness"}

        class Options(BaseModel):
            min_sharpness: float = 50.0

        def keep(self, sample):
            face = sample["faces"][sample["primary_face"]]
            return face["sharpness"] >= self.options.min_sharpness or "blurry"
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from facedata import records
from facedata.errors import UserError
from facedata.run_layout import RunLayout, shard_name

log = logging.getLogger(__name__)


class StepError(UserError):
    """A step named in the config that cannot be loaded or configured, as one line."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepOutput:
    """What a step made of one shard: new columns (one value per record, in record order) and per
    record a drop reason or None (kept, or already dropped before this step)."""

    columns: dict[str, list] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)


class ShardStep:
    """A step over one shard's records. Subclasses set `name`, `reasons`, `columns` (their Arrow
    types) and `Options` (a pydantic model of their options), and implement `process`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1  # bump when the same inputs and options give other output
    reasons: ClassVar[dict[str, str]] = {}  # statuses this step may give -> what each means
    columns: ClassVar[dict[str, pa.DataType]] = {}
    needs_images: ClassVar[bool] = False  # process() gets the kept samples' image bytes
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict | None = None):
        self.options = self.Options.model_validate(options or {})

    def settings(self) -> dict:
        """What the step's fingerprint covers besides its version: its options by default."""
        return self.options.model_dump(mode="json")

    def models(self) -> dict[str, dict]:
        """ModelInfo-style dicts ({name, version, licence, source}) of the models it runs, by role."""
        return {}

    def process(self, rows: list[dict], images: Callable[[], Iterator[tuple[str, bytes]]] | None) -> StepOutput:
        raise NotImplementedError


class Filter(ShardStep):
    """A step that only keeps or drops: implement `keep(sample) -> True | reason`."""

    def keep(self, sample: dict) -> bool | str:
        raise NotImplementedError

    def process(self, rows, images=None) -> StepOutput:
        out = StepOutput(reasons=[None] * len(rows))
        for i, row in enumerate(rows):
            if row["status"] != records.OK:
                continue
            verdict = self.keep(row)
            if verdict is not True:
                out.reasons[i] = verdict if isinstance(verdict, str) and verdict else f"{self.name}_dropped"
        return out


@functools.lru_cache(maxsize=64)
def load_step_class(path: str) -> type[ShardStep]:
    """`package.module:Class` or `path/to/file.py:Class` -> the class, or a one-line StepError."""
    module_name, _, class_name = path.rpartition(":")
    if not module_name or not class_name:
        raise StepError(f"step {path!r}: expected module:Class or path/to/file.py:Class")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_file():
                raise StepError(f"step {path!r}: {file}: no such file")
            spec = importlib.util.spec_from_file_location(f"facedata_user_step_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except StepError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's module: any import error is theirs to fix
        raise StepError(f"step {path!r}: cannot import {module_name} ({type(err).__name__}: {err})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ShardStep)):
        raise StepError(f"step {path!r}: {class_name} is not a facedata.step.ShardStep subclass in {module_name}")
    if not getattr(cls, "name", None):
        raise StepError(f"step {path!r}: {class_name} has no `name`")
    return cls


def make_step(path: str, options: dict | None) -> ShardStep:
    cls = load_step_class(path)
    try:
        return cls(options)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise StepError(f"step {cls.name} ({path}): options.{loc}: {e['msg']}") from None


def run_shard_step(step: ShardStep, shard_id: int, run_dir: Path, source: str, fingerprint) -> dict:
    """Run `step` on one shard whose records `source` (the previous step) wrote, unless done under
    `fingerprint`; returns the shard's stats for this step."""
    from facedata.fingerprints import reusable
    from facedata.shards import atomic_path, tar_images, write_json

    layout = RunLayout(run_dir)
    name = shard_name(shard_id)
    done = reusable(layout.stats_file(step.name, shard_id), fingerprint, f"{step.name} shard {name}")
    if done is not None:
        log.info("%s shard %s already done, skipped", step.name, name)
        return done
    if not layout.finished(source, shard_id):
        raise RuntimeError(f"{source} shard {name} is not finished; {step.name} cannot run on it")
    out_dir = layout.step_dir(step.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{name}.*.tmp"):  # left by an earlier, killed attempt
        stale.unlink(missing_ok=True)

    started = time.time()
    table = pq.read_table(layout.records_file(source, shard_id))
    rows = table.to_pylist()
    images = None
    if step.needs_images:
        wanted = {r["key"]: r["ext"] for r in rows if r["status"] == records.OK}
        images = lambda: tar_images(layout.images_tar(shard_id), wanted)  # noqa: E731 - read lazily, once
    out = step.process(rows, images)
    if len(out.reasons) != len(rows) or any(len(v) != len(rows) for v in out.columns.values()):
        raise RuntimeError(f"step {step.name}: process() must return one value per record ({len(rows)})")
    unknown = {r for r in out.reasons if r is not None} - set(step.reasons) - {f"{step.name}_dropped"}
    if unknown:
        raise RuntimeError(f"step {step.name}: reasons {sorted(unknown)} are not declared in its `reasons`")

    statuses = table.column("status").to_pylist()
    step_status: list[str | None] = [None] * len(rows)
    for i, reason in enumerate(out.reasons):
        if statuses[i] == records.OK:
            step_status[i] = statuses[i] = reason or records.OK
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
    table = table.append_column(f"{step.name}_status", pa.array(step_status, pa.string()))
    for column, values in out.columns.items():
        table = table.append_column(column, pa.array(values, step.columns.get(column)))
    with atomic_path(layout.records_file(step.name, shard_id)) as tmp:
        pq.write_table(table, tmp)
    finished = time.time()
    counts = Counter(s for s in step_status if s)
    stats = {
        "shard_id": shard_id,
        "step": step.name,
        "n_samples": len(rows),
        "n_ok": statuses.count(records.OK),
        "status_counts": dict(sorted(Counter(statuses).items())),
        "step_status_counts": dict(sorted(counts.items())),
        "reasons": step.reasons,
        "models": step.models(),
        "seconds": round(finished - started, 3),
        "started_at": started,
        "finished_at": finished,
        "fingerprint": fingerprint.as_dict(),
    }
    write_json(layout.stats_file(step.name, shard_id), stats)
    log.info("%s shard %s: %d of %d kept (%s)", step.name, name, counts.get(records.OK, 0), sum(counts.values()),
             ", ".join(f"{k}={v}" for k, v in counts.items() if k != records.OK) or "none dropped")
    return stats


BUILTIN_STEPS = ("download", "faces", "identity", "captions")
_RESERVED = set(BUILTIN_STEPS) | {"shards", "_plan", "card", "data", "webdataset", "flip"}


def _entry(entry) -> tuple[str, dict]:
    return (entry, {}) if isinstance(entry, str) else (entry.step, entry.options)


def pipeline(cfg) -> list[tuple[str, ShardStep | None]]:
    """The run's steps in order: (name, None) for a built-in step, (name, the step) for a user's.
    Built-in steps switched off in their section (faces.enabled: false, ...) are left out."""
    enabled = {"download": True, "faces": cfg.faces.enabled,
               "identity": cfg.faces.enabled and cfg.identity.enabled,
               "captions": cfg.faces.enabled and cfg.attributes.enabled}
    entries = cfg.steps if cfg.steps is not None else list(BUILTIN_STEPS)
    out: list[tuple[str, ShardStep | None]] = []
    for entry in entries:
        path, options = _entry(entry)
        if path in BUILTIN_STEPS:
            if enabled[path]:
                out.append((path, None))
        else:
            step = make_step(path, options)
            out.append((step.name, step))
    return out


def check_steps(entries: list) -> None:
    """The built-in steps once each, in their order, download first; user steps loadable, with
    valid options and names of their own. Raises StepError."""
    builtins = [e for e in entries if isinstance(e, str) and e in BUILTIN_STEPS]
    if builtins != list(BUILTIN_STEPS):
        raise StepError(f"steps: expected the built-in steps {', '.join(BUILTIN_STEPS)} once each and in that "
                        "order (switch one off in its own section, e.g. identity.enabled: false), "
                        f"got {', '.join(builtins) or 'none'}")
    if _entry(entries[0])[0] != "download":
        raise StepError("steps: download must come first (every other step reads what it stored)")
    names: set[str] = set()
    for entry in entries:
        path, options = _entry(entry)
        if path in BUILTIN_STEPS:
            continue
        step = make_step(path, options)
        if step.name in _RESERVED or step.name in names or not step.name.isidentifier():
            raise StepError(f"step {path}: name {step.name!r} is taken or not a plain identifier")
        names.add(step.name)


def source_of(cfg, name: str) -> str:
    """The step whose records `name` reads: the one before it in the run's steps."""
    names = [n for n, _ in pipeline(cfg)]
    return names[names.index(name) - 1]
