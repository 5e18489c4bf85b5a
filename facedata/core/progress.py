"""Progress bars that only draw on a terminal: in a log file or a CI job they would write escape
codes and carriage returns (the per-shard log lines say the same there)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """tqdm, shown when `progress` is on and stderr is a terminal (tqdm's disable=None)."""
    return tqdm(iterable, disable=None if progress else True, **kwargs)
