"""Every path of a run directory, named once.

A run directory holds the shard plan, one folder per pipeline step with that step's per-shard
files (`NNNNN.parquet`, `NNNNN.stats.json`, and whatever else the step writes), the config the
run was made under with each step's fingerprint, and the run's reports. Modules ask a
`RunLayout` for a path instead of spelling folder names, so the layout can change in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The folder of each step's shard outputs. The download step's folder keeps its historical name.
STEP_DIRS = {"download": "shards", "faces": "faces", "identity": "identity", "captions": "captions"}


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    # The run as a whole.
    @property
    def plan_dir(self) -> Path:
        return self.root / "_plan"

    def plan_file(self, shard_id: int) -> Path:
        """The input rows planned for one shard (what the download step reads)."""
        return self.plan_dir / f"{shard_name(shard_id)}.parquet"

    @property
    def config_file(self) -> Path:
        """The config the run was last started with (what the dataset card states)."""
        return self.root / "config.yaml"

    @property
    def fingerprints_file(self) -> Path:
        """Each step's fingerprint under config_file: a step output with another is stale."""
        return self.root / "fingerprints.json"

    @property
    def summary_file(self) -> Path:
        return self.root / "summary.json"

    # Steps and their shards.
    def step_dir(self, step: str) -> Path:
        return self.root / STEP_DIRS.get(step, step)

    def shard_file(self, step: str, shard_id: int, suffix: str) -> Path:
        """e.g. shard_file("faces", 3, "embeddings.npy") -> RUN/faces/00003.embeddings.npy"""
        return self.step_dir(step) / f"{shard_name(shard_id)}.{suffix}"

    def records_file(self, step: str, shard_id: int) -> Path:
        return self.shard_file(step, shard_id, "parquet")

    def stats_file(self, step: str, shard_id: int) -> Path:
        """Written last by a shard step: its presence marks the shard done."""
        return self.shard_file(step, shard_id, "stats.json")

    def images_tar(self, shard_id: int) -> Path:
        """The kept images of a shard (written by the download step, read by the later ones)."""
        return self.shard_file("download", shard_id, "tar")

    def global_report(self, step: str) -> Path:
        """Written last by a run-wide step (identity): marks it done for every shard."""
        return self.step_dir(step) / f"{step}.json"

    @property
    def identity_report(self) -> Path:
        return self.global_report("identity")

    def step_order(self) -> list[str]:
        """The run's steps in order, as its last start recorded them (the built-in ones before
        steps were recorded)."""
        try:
            return list(json.loads(self.fingerprints_file.read_text())["order"])
        except FileNotFoundError:
            return [step for step in STEP_DIRS if self.step_dir(step).is_dir()]

    def finished(self, step: str, shard_id: int) -> bool:
        """Whether `step` finished this shard: its completion record exists (a run-wide step such
        as identity writes one for the whole run, last)."""
        done = self.global_report(step).exists() or self.stats_file(step, shard_id).exists()
        return done and self.records_file(step, shard_id).exists()

    def latest_step(self, shard_id: int) -> str | None:
        """The last step in the run's order that has finished this shard (None: not even downloaded)."""
        return next((step for step in reversed(self.step_order()) if self.finished(step, shard_id)), None)
