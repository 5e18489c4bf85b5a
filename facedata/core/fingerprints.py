"""Step fingerprints: what made each output, so a rerun redoes exactly what changed.

A step's fingerprint is a digest of the options that shape its output (dotted config keys), the
models it runs (name and version), its code version, and the fingerprint of the step before it.
Every step output records the fingerprint it was made under (in its stats file); an output whose
recorded fingerprint differs from the one the current config gives is stale and is redone, and so
is every step after it, because their fingerprints chain. Options that change only speed
(concurrency, batch sizes, threads, runners) are left out: changing them redoes nothing.

Models are identified by what their loaders report (`ModelInfo`: name, package version or file
digest), so a new model package version redoes the steps that run it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from facedata.core.config import Config
from facedata.core.errors import UserError
from facedata.core.run_layout import RunLayout

log = logging.getLogger(__name__)


class StaleRunError(UserError):
    """A run directory holds outputs made under other settings than the ones it records."""

# Options of each step that change only how fast it runs, not what it writes.
_SPEED_ONLY = {
    "download.concurrency",
    "faces.batch_size",
    "attributes.batch_size",
    "attributes.threads",
}


def _flat(prefix: str, value) -> dict:
    """{"a": {"b": 1, "c": {}}} -> {"a.b": 1}: dotted keys, as the config is written."""
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}", item))
        return out
    return {prefix: value}


def _derived(key: str) -> bool:
    """A setting the run derives (thresholds from the calibration, models, file states) rather than
    one the user wrote: named after the user's own when both changed."""
    return ".applied_" in key or key.endswith(".files") or key.startswith("models.")


def _options(cfg: Config, *sections: str) -> dict:
    out: dict = {}
    for section in sections:
        out.update(_flat(section, getattr(cfg, section).model_dump(mode="json")))
    return {k: v for k, v in out.items() if k not in _SPEED_ONLY}


def _files_state(path: str | None) -> str | None:
    """Names, sizes and modification times of the files at `path` (a file or a folder): changes
    when the files do, without reading them."""
    if not path:
        return None
    root = Path(path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class StepSpec:
    """What a pipeline step's fingerprint covers."""

    name: str
    # Bump when the step's code writes different output for the same inputs and options.
    version: int
    settings: Callable[[Config], dict]
    # The ModelInfo roles (see model_infos) whose models the step runs.
    model_roles: tuple[str, ...] = ()


def _download_settings(cfg: Config) -> dict:
    return _options(cfg, "input", "shards", "download", "image")


def _identity_settings(cfg: Config) -> dict:
    settings = _options(cfg, "identity")
    settings["identity.optout_gallery.files"] = _files_state(cfg.identity.optout_gallery)
    return settings


def _caption_settings(cfg: Config) -> dict:
    from facedata.attributes.thresholds import thresholds

    settings = _options(cfg, "attributes", "captions", "relevance")
    # The thresholds applied also depend on the calibration shipped with the code.
    settings.update(_flat("attributes.applied_thresholds", thresholds(cfg.attributes)))
    settings["relevance.checkpoint.files"] = _files_state(cfg.relevance.checkpoint)
    return settings


STEPS: dict[str, StepSpec] = {
    spec.name: spec
    for spec in (
        StepSpec("download", 1, _download_settings),
        StepSpec("faces", 1, lambda cfg: _options(cfg, "faces"), ("detector", "embedder")),
        StepSpec("identity", 1, _identity_settings),
        StepSpec("captions", 2, _caption_settings, ("attributes",)),  # 2: group captions describe every described face
    )
}


def enabled_steps(cfg: Config) -> list[str]:
    """The names of the steps the config runs, in order (a user's steps among them)."""
    from facedata.core.step import pipeline

    return [name for name, _ in pipeline(cfg)]


@dataclass(frozen=True)
class Fingerprint:
    step: str
    digest: str
    version: int
    settings: dict
    upstream: str | None = None  # the digest of the step before
    upstream_step: str | None = None

    def as_dict(self) -> dict:
        return {"step": self.step, "digest": self.digest, "version": self.version, "settings": self.settings,
                "upstream": self.upstream, "upstream_step": self.upstream_step}

    def why_stale(self, recorded: dict | None) -> str | None:
        """None when `recorded` (an output's fingerprint) is this one; else why it is not, in words."""
        if not recorded:
            return "made before fingerprints were recorded"
        if recorded.get("digest") == self.digest:
            return None
        old = recorded.get("settings") or {}
        changed = sorted((k for k in set(old) | set(self.settings) if old.get(k, "unset") != self.settings.get(k, "unset")),
                         key=lambda k: (_derived(k), k))
        if changed:
            shown = ", ".join(f"{k} {_show(old.get(k, 'unset'))} -> {_show(self.settings.get(k, 'unset'))}"
                              for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            return f"settings changed ({shown}{more})"
        if recorded.get("version") != self.version:
            return f"its code changed (version {recorded.get('version')} -> {self.version})"
        return f"{self.upstream_step} changed"


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def step_fingerprints(cfg: Config, models: dict[str, dict] | None = None) -> dict[str, Fingerprint]:
    """The fingerprint of every enabled step under `cfg`, chained in pipeline order. `models` maps a
    model role to its ModelInfo dict (model_infos(cfg)); None loads the models to ask them."""
    if models is None:
        models = model_infos(cfg)
    from facedata.core.step import pipeline

    out: dict[str, Fingerprint] = {}
    upstream: Fingerprint | None = None
    for name, user_step in pipeline(cfg):
        if user_step is None:
            spec = STEPS[name]
            version, settings = spec.version, dict(spec.settings(cfg))
            step_models = {key: info for role in spec.model_roles for key, info in _role_models(models, role).items()}
        else:
            version = user_step.version
            settings = _flat(name, user_step.settings()) if user_step.settings() else {}
            step_models = user_step.models()
        for key, info in step_models.items():
            settings[f"models.{key}"] = f"{info['name']} {info['version']}"
        body = {"step": name, "version": version, "settings": settings,
                "upstream": upstream.digest if upstream else None}
        fp = Fingerprint(name, _digest(body), version, settings,
                         upstream.digest if upstream else None, upstream.step if upstream else None)
        out[name] = upstream = fp
    return out


def _role_models(models: dict, role: str) -> dict[str, dict]:
    value = models.get(role)
    if value is None:
        return {}
    return {role: value} if "name" in value else {f"{role}.{k}": v for k, v in value.items()}


def model_infos(cfg: Config) -> dict:
    """Load (once per process) every model the config runs and return their ModelInfo dicts by
    role: a missing or unreadable file is a one-line error here, before any work starts."""
    infos: dict = {}
    if not cfg.faces.enabled:
        return infos
    from facedata.faces.models import load_analyzer

    analyzer = load_analyzer(cfg.faces)
    infos["detector"] = analyzer.detector_info.as_dict()
    infos["embedder"] = analyzer.embedder_info.as_dict()
    if cfg.attributes.enabled:
        from facedata.attributes import load_predictors

        infos["attributes"] = {type(p).__name__: p.info.as_dict() for p in load_predictors(cfg.attributes, cfg.faces)}
        if cfg.relevance.checkpoint:
            from facedata.flip.embed import load_checkpoint

            load_checkpoint(cfg.relevance.checkpoint)
    return infos


def recorded_fingerprint(stats: dict) -> dict | None:
    return stats.get("fingerprint")


@dataclass
class StepPlan:
    """What a run will do for one step: reuse its current outputs, redo stale ones, do missing ones."""

    step: str
    reused: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why stale -> shards
    whole_run: bool = False  # a global step: one output for the whole run

    def line(self) -> str:
        if self.whole_run:
            why = next(iter(self.reasons), None)
            state = f"{why}, redoing" if why else "to do" if self.missing else "reused"
            return f"{self.step}: {state}"
        unit = "shards"
        parts = []
        for reason, n in sorted(self.reasons.items(), key=lambda item: -item[1]):
            parts.append(f"{reason}, redoing {n} {unit if n != 1 else unit.rstrip('s')}")
        if self.missing:
            parts.append(f"{len(self.missing)} {unit if len(self.missing) != 1 else unit.rstrip('s')} to do")
        if self.reused:
            parts.append(f"{len(self.reused)} reused")
        return f"{self.step}: " + ("; ".join(parts) or "nothing to do")


def plan_step(fingerprint: Fingerprint, stats_of: Callable[[int], dict | None], shard_ids: Iterable[int]) -> StepPlan:
    """Sort a step's shards into reused, stale and missing, by their stats (None: not done)."""
    plan = StepPlan(fingerprint.step)
    for shard_id in shard_ids:
        stats = stats_of(shard_id)
        if stats is None:
            plan.missing.append(shard_id)
            continue
        why = fingerprint.why_stale(recorded_fingerprint(stats))
        if why is None:
            plan.reused.append(shard_id)
        else:
            plan.stale.append(shard_id)
            plan.reasons[why] = plan.reasons.get(why, 0) + 1
    return plan


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def reusable(stats_file: Path, fingerprint: Fingerprint, what: str) -> dict | None:
    """The stats of a finished output made under `fingerprint`; None when there is none. A stale
    output's completion record is removed first, so that until it is redone it reads as unfinished
    (to a rerun, a publish or a report) rather than as made under the current settings."""
    stats = _read_json(stats_file)
    if stats is None:
        return None
    why = fingerprint.why_stale(recorded_fingerprint(stats))
    if why is None:
        return stats
    log.info("%s: %s; redone", what, why)
    stats_file.unlink(missing_ok=True)
    return None


def identity_stats(layout: RunLayout, shard_ids: list[int]) -> dict | None:
    """The identity step's report when it covers exactly these shards (a grown input redoes it)."""
    report = _read_json(layout.identity_report)
    return report if report is not None and report.get("shard_ids") == shard_ids else None


def plan_run(layout: RunLayout, fingerprints: dict[str, Fingerprint], shard_ids: list[int]) -> list[StepPlan]:
    """Per step, which outputs a run under `fingerprints` reuses and which it redoes. A step after a
    redone one is redone too (fingerprints chain), except where only a shard's content can tell:
    a caption shard is also redone when the identity step changes its records."""
    plans = []
    for step, fp in fingerprints.items():
        if step == "identity":
            plan = plan_step(fp, lambda _: identity_stats(layout, shard_ids), [0])
            plan.whole_run = True
        else:
            plan = plan_step(fp, lambda i, step=step: _read_json(layout.stats_file(step, i)), shard_ids)
        plans.append(plan)
    return plans


def check_current(layout: RunLayout, allow_missing: bool = False) -> None:
    """Refuse a run directory whose outputs were not all made under the settings it records (a
    rerun with new settings that was stopped before it finished): its card would state settings
    that did not make its data. `allow_missing`: unfinished outputs are the caller's concern."""
    recorded = _read_json(layout.fingerprints_file)
    if recorded is None:
        return  # a run made before fingerprints were recorded: nothing to compare with
    fingerprints = {step: Fingerprint(**recorded["steps"][step]) for step in layout.step_order()}
    shard_ids = recorded.get("shard_ids") or []
    for plan in plan_run(layout, fingerprints, shard_ids):
        if plan.stale or (plan.missing and not allow_missing):
            raise StaleRunError(
                f"{layout.root}: not finished under its current settings ({plan.line()}); "
                "rerun `facedata run` with the same config to finish it")


def write_fingerprints(layout: RunLayout, fingerprints: dict[str, Fingerprint], shard_ids: list[int]) -> None:
    from facedata.core.shards import write_json

    # `order`: the steps in run order (write_json sorts the keys of `steps`).
    write_json(layout.fingerprints_file, {"steps": {s: fp.as_dict() for s, fp in fingerprints.items()},
                                          "order": list(fingerprints), "shard_ids": shard_ids})
