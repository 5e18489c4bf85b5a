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

from facedata.core import records
from facedata.core.errors import UserError
from facedata.core.progress import progress_bar
from facedata.core.run_layout import RunLayout, shard_name
from facedata.core.shards import atomic_path, file_sha256, tar_images, write_json

log = logging.getLogger(__name__)


class StepError(UserError):
    """A step named in the config that cannot be loaded or configured, as one line."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepOutput:
    """What a step made of one shard: new columns (one value per record, in record order) and per
    record a drop reason or None (kept, or already dropped before this step). A built-in step may
    also rewrite records' `error` text, add figures of its own to the shard's stats and a tail to
    its log line; a step that makes the records rather than adding to them (download, from the
    input plan) returns them whole as `table`, statuses included."""

    columns: dict[str, list] = field(default_factory=dict)
    reasons: list[str | None] = field(default_factory=list)
    errors: dict[int, str | None] = field(default_factory=dict)  # record index -> its new `error`
    stats: dict = field(default_factory=dict)
    summary: str = ""
    table: pa.Table | None = None


class Shard:
    """What a step sees of one shard: the records the step before it wrote, their images, and the
    shard's files in the step's own folder (for outputs beside the records, written atomically)."""

    def __init__(self, step: str, shard_id: int, layout: RunLayout, source_file: Path, progress: bool,
                 previous: Path | None):
        self.step, self.id, self.name, self.layout = step, shard_id, shard_name(shard_id), layout
        self.table = pq.read_table(source_file)
        self.progress = progress
        # This step's records of the shard from an earlier run under the same settings, when only
        # the records it reads changed since (e.g. identity redone over a grown input): a step may
        # reuse what it computed per image then.
        self.previous = previous
        self._rows: list[dict] | None = None

    @property
    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = self.table.to_pylist()
        return self._rows

    def images(self, wanted: dict[str, str]) -> Iterator[tuple[str, bytes]]:
        """(key, bytes) of the stored image of each key -> ext in `wanted`, in the tar's order."""
        return tar_images(self.layout.images_tar(self.id), wanted)

    def file(self, suffix: str) -> Path:
        """This shard's file `NNNNN.<suffix>` in the step's folder."""
        return self.layout.shard_file(self.step, self.id, suffix)

    def progress_bar(self, total: int, unit: str = "img"):
        return progress_bar(total=total, desc=f"{self.step} {self.name}", unit=unit, progress=self.progress, leave=False)


class Step:
    """What every step declares: `name`, `version`, `reasons` (the statuses it may give), `columns`
    (their Arrow types) and `Options` (a pydantic model of its options, validated at config load)."""

    name: ClassVar[str]
    # Bump when the same inputs and options give other output. (The built-in steps' versions are in
    # fingerprints.STEPS: the flow reads them without importing the steps' models.)
    version: ClassVar[int] = 1
    reasons: ClassVar[dict[str, str]] = {}  # statuses this step may give -> what each means
    columns: ClassVar[dict[str, pa.DataType]] = {}
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: dict | None = None):
        self.options = self.Options.model_validate(options or {})

    @property
    def status_column(self) -> str | None:
        """The column that keeps this step's own verdict per record (None: none is kept)."""
        return f"{self.name}_status"

    def settings(self) -> dict:
        """What the step's fingerprint covers besides its version: its options by default."""
        return self.options.model_dump(mode="json")

    def models(self) -> dict[str, dict]:
        """ModelInfo-style dicts ({name, version, licence, source}) of the models it runs, by role."""
        return {}


class ShardStep(Step):
    """A step over one shard's records: implement `process` (or `run`, which sees the whole `Shard`)."""

    needs_images: ClassVar[bool] = False  # process() gets the kept samples' image bytes

    def process(self, rows: list[dict], images: Callable[[], Iterator[tuple[str, bytes]]] | None) -> StepOutput:
        raise NotImplementedError

    def run(self, shard: Shard) -> StepOutput:
        images = None
        if self.needs_images:
            wanted = {r["key"]: r["ext"] for r in shard.rows if r["status"] == records.OK}
            images = lambda: shard.images(wanted)  # noqa: E731 - read lazily, once
        return self.process(shard.rows, images)


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
def load_step_class(path: str) -> type[Step]:
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
    if not (isinstance(cls, type) and issubclass(cls, Step) and cls not in (ShardStep, GlobalStep)):
        raise StepError(f"step {path!r}: {class_name} is not a facedata.core.step.ShardStep subclass in {module_name}")
    if not getattr(cls, "name", None):
        raise StepError(f"step {path!r}: {class_name} has no `name`")
    return cls


def make_step(path: str, options: dict | None) -> Step:
    cls = load_step_class(path)
    try:
        return cls(options)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise StepError(f"step {cls.name} ({path}): options.{loc}: {e['msg']}") from None


def run_shard_step(step: ShardStep, shard_id: int, run_dir: Path, source: str | Path, fingerprint,
                   progress: bool = False) -> dict:
    """Run `step` on one shard whose records `source` wrote (a step's name, or the records file
    itself for the first step), unless done under `fingerprint` over the same records; returns the
    shard's stats for this step."""
    from facedata.core.fingerprints import reusable

    layout = RunLayout(run_dir)
    name = shard_name(shard_id)
    if isinstance(source, str):
        if not layout.finished(source, shard_id):
            raise RuntimeError(f"{source} shard {name} is not finished; {step.name} cannot run on it")
        source_file = layout.records_file(source, shard_id)
    else:
        source_file = Path(source)
    source_digest = file_sha256(source_file)
    previous = None
    done = reusable(layout.stats_file(step.name, shard_id), fingerprint, f"{step.name} shard {name}")
    if done is not None:
        if done.get("source_digest", source_digest) == source_digest:
            log.info("%s shard %s already done, skipped", step.name, name)
            return done
        # An earlier step was redone over a grown input (identity), so some records it reads changed.
        previous = layout.records_file(step.name, shard_id)
        log.info("%s shard %s: the records it reads changed since it ran; redone", step.name, name)
    out_dir = layout.step_dir(step.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f".{name}.*.tmp"):  # left by an earlier, killed attempt
        stale.unlink(missing_ok=True)

    started = time.time()
    shard = Shard(step.name, shard_id, layout, source_file, progress, previous if previous and previous.exists() else None)
    if not isinstance(source, str):
        # The input plan: a row with no problem found while reading it is still in (ok).
        statuses = shard.table.column("status").to_pylist() if "status" in shard.table.column_names \
            else [None] * shard.table.num_rows
        column = pa.array([s or records.OK for s in statuses], pa.string())
        at = shard.table.schema.get_field_index("status")
        shard.table = shard.table.set_column(at, "status", column) if at >= 0 else shard.table.append_column("status", column)
    before = shard.table.column("status").to_pylist()
    out = step.run(shard)
    if out.table is not None:
        table, statuses = out.table, out.table.column("status").to_pylist()
        step_status = [s if b == records.OK else None for s, b in zip(statuses, before)] \
            if len(before) == len(statuses) else statuses
    else:
        table, statuses, step_status = _apply(step, shard.table, before, out)
    with atomic_path(layout.records_file(step.name, shard_id)) as tmp:
        pq.write_table(table, tmp)
    finished = time.time()
    counts = Counter(s for s in step_status if s)
    n_in = sum(counts.values())
    stats = {
        "shard_id": shard_id,
        "step": step.name,
        "n_samples": len(statuses),
        "n_in": n_in,  # records still kept when the step began (the ones it judged)
        "n_ok": statuses.count(records.OK),
        "status_counts": dict(sorted(Counter(statuses).items())),
        "step_status_counts": dict(sorted(counts.items())),
        "reasons": step.reasons,
        "models": step.models(),
        **out.stats,
        "seconds": round(finished - started, 3),
        "started_at": started,
        "finished_at": finished,
        "source_digest": source_digest,
        "fingerprint": fingerprint.as_dict(),
    }
    write_json(layout.stats_file(step.name, shard_id), stats)
    dropped = ", ".join(f"{k}={v}" for k, v in counts.items() if k != records.OK) or "none dropped"
    log.info("%s shard %s: %d of %d kept (%s) in %.1f s%s", step.name, name, counts.get(records.OK, 0), n_in,
             dropped, finished - started, f"; {out.summary}" if out.summary else "")
    return stats


def _apply(step: ShardStep, table: pa.Table, before: list, out: StepOutput) -> tuple[pa.Table, list, list]:
    """The step's verdicts (only on records still kept: the first reason wins), errors and columns
    added to the records it read."""
    n = table.num_rows
    if len(out.reasons) != n or any(len(v) != n for v in out.columns.values()):
        raise RuntimeError(f"step {step.name}: its output must hold one value per record ({n})")
    unknown = {r for r in out.reasons if r is not None} - set(step.reasons) - {f"{step.name}_dropped"}
    if unknown:
        raise RuntimeError(f"step {step.name}: reasons {sorted(unknown)} are not declared in its `reasons`")
    statuses = list(before)
    step_status: list[str | None] = [None] * n
    for i, reason in enumerate(out.reasons):
        if statuses[i] == records.OK:
            step_status[i] = statuses[i] = reason or records.OK
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))
    if out.errors:
        errors = table.column("error").to_pylist()
        for i, error in out.errors.items():
            errors[i] = error
        table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    added = dict(out.columns)
    if step.status_column:
        added[step.status_column] = step_status
    # Declared columns in their declared order (the status column where declared, else last).
    order = [c for c in step.columns if c in added] + [c for c in added if c not in step.columns]
    for column in order:
        type_ = step.columns.get(column) or (pa.string() if column == step.status_column else None)
        values = added[column]
        if isinstance(values, pa.Array):
            table = table.append_column(column, values if type_ is None else values.cast(type_))
        else:
            table = table.append_column(column, pa.array(values, type_))
    return table, statuses, step_status


class GlobalStep(Step):
    """A step that decides over the whole run at once (identity; run-wide de-duplication): it sees
    every shard's records of the step before (reading only the columns it needs), then gives each
    shard its columns and verdicts as a shard step does. `run_global_step` owns the rest, once:
    skip when done over the same shards, stale cleanup, the per-shard writes, the run-wide report
    written last (`RunLayout.global_report`, which marks it done) and its log line."""

    needs_images: ClassVar[bool] = False  # may read images (from the shard tars): only after download

    def prepare(self, layout: RunLayout, source: str, shard_ids: list[int]) -> None:
        """Read what it needs of every shard and decide."""
        raise NotImplementedError

    def shard_output(self, shard_id: int, table: pa.Table) -> StepOutput:
        """The shard's columns and verdicts (after `prepare`), given its records from the step before."""
        raise NotImplementedError

    def report(self, layout: RunLayout) -> dict:
        """The step's own figures for its run-wide report (after every shard's output)."""
        return {}


def run_global_step(step: GlobalStep, run_dir: Path, shard_ids: list[int], source: str, fingerprint) -> dict:
    """Run `step` over the run's shards (whose records `source` wrote), unless done over the same
    shards under `fingerprint`; returns its run-wide report."""
    from facedata.core.fingerprints import reusable

    layout = RunLayout(run_dir)
    report_file = layout.global_report(step.name)
    done = reusable(report_file, fingerprint, f"{step.name} step")
    if done is not None:
        if done.get("shard_ids") == shard_ids:
            log.info("%s step already done, skipped", step.name)
            return done
        # The input grew by new shards: decided over every shard again (old shards' records may
        # change; the shard steps after it see that their input changed and redo those shards).
        log.info("%s: the run has %d shards, %d when this step ran; redone over all of them", step.name,
                 len(shard_ids), len(done.get("shard_ids", [])))
    for shard_id in shard_ids:
        if not layout.finished(source, shard_id):
            raise RuntimeError(f"{source} shard {shard_name(shard_id)} is not finished; {step.name} cannot run")
    out_dir = layout.step_dir(step.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp"):  # left by an earlier, killed attempt
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    step.prepare(layout, source, shard_ids)
    status_counts: Counter = Counter()
    step_counts: Counter = Counter()
    for shard_id in shard_ids:
        table = pq.read_table(layout.records_file(source, shard_id))
        before = table.column("status").to_pylist()
        table, statuses, step_status = _apply(step, table, before, step.shard_output(shard_id, table))
        with atomic_path(layout.records_file(step.name, shard_id)) as tmp:
            pq.write_table(table, tmp)
        status_counts.update(statuses)
        step_counts.update(s for s in step_status if s)
    report = {
        **step.report(layout),
        "status_counts": dict(status_counts.most_common()),
        "step_status_counts": dict(step_counts.most_common()),
        "reasons": step.reasons,
        "shard_ids": shard_ids,
        "seconds": round(time.perf_counter() - started, 3),
        "fingerprint": fingerprint.as_dict(),
    }
    write_json(report_file, report)
    kept = step_counts.get(records.OK, 0)
    log.info("%s: %d of %d kept (%s)", step.name, kept, sum(step_counts.values()),
             ", ".join(f"{k}={v}" for k, v in step_counts.items() if k != records.OK) or "none dropped")
    return report


BUILTIN_STEPS = ("download", "faces", "identity", "captions")
GLOBAL_STEPS = ("identity",)  # run-wide: the shard steps after one wait for every shard before it
# The built-in steps' classes, imported when they first run.
_BUILTIN_CLASSES = {"download": "facedata.download.step:DownloadStep", "faces": "facedata.faces.step:FaceStep",
                    "identity": "facedata.identity.step:IdentityStep", "captions": "facedata.captions.step:CaptionStep"}


def builtin_step(name: str, cfg) -> ShardStep | GlobalStep:
    """A built-in step configured by the run's config (its own section)."""
    module, _, cls = _BUILTIN_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)
_RESERVED = set(BUILTIN_STEPS) | {"shards", "_plan", "card", "data", "webdataset", "flip"}


def _entry(entry) -> tuple[str, dict]:
    return (entry, {}) if isinstance(entry, str) else (entry.step, entry.options)


def pipeline(cfg) -> list[tuple[str, Step | None]]:
    """The run's steps in order: (name, None) for a built-in step, (name, the step) for a user's.
    Built-in steps switched off in their section (faces.enabled: false, ...) are left out."""
    enabled = {"download": True, "faces": cfg.faces.enabled,
               "identity": cfg.faces.enabled and cfg.identity.enabled,
               "captions": cfg.faces.enabled and cfg.attributes.enabled}
    entries = cfg.steps if cfg.steps is not None else list(BUILTIN_STEPS)
    out: list[tuple[str, Step | None]] = []
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
    """The built-in steps once each, in their order; before download only steps that judge the
    input rows alone (no images: nothing is fetched for a row they drop); user steps loadable,
    with valid options and names of their own. Raises StepError."""
    builtins = [e for e in entries if isinstance(e, str) and e in BUILTIN_STEPS]
    if builtins != list(BUILTIN_STEPS):
        raise StepError(f"steps: expected the built-in steps {', '.join(BUILTIN_STEPS)} once each and in that "
                        "order (switch one off in its own section, e.g. identity.enabled: false), "
                        f"got {', '.join(builtins) or 'none'}")
    names: set[str] = set()
    downloaded = False
    for entry in entries:
        path, options = _entry(entry)
        if path in BUILTIN_STEPS:
            downloaded = downloaded or path == "download"
            continue
        step = make_step(path, options)
        if not downloaded and (step.needs_images or isinstance(step, GlobalStep)):
            what = "it needs images" if step.needs_images else "it is run-wide"
            raise StepError(f"step {path}: {what}, so it must come after download")
        if step.name in _RESERVED or step.name in names or not step.name.isidentifier():
            raise StepError(f"step {path}: name {step.name!r} is taken or not a plain identifier")
        names.add(step.name)


def is_global(cfg, name: str) -> bool:
    """Whether step `name` of the run is run-wide (a barrier: every shard before it finishes first)."""
    return name in GLOBAL_STEPS or isinstance(dict(pipeline(cfg)).get(name), GlobalStep)


def source_of(cfg, name: str) -> str | None:
    """The step whose records `name` reads: the one before it in the run's steps (None for the
    first, which reads the shard's input plan)."""
    names = [n for n, _ in pipeline(cfg)]
    at = names.index(name)
    return names[at - 1] if at else None
