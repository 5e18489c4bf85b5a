"""Shard files on disk: the unit of work, resume and parallelism.

A finished shard NNNNN in `<run>/shards/` is three files, each written atomically (temp file, then
rename) in this order:

- `NNNNN.tar`: a webdataset tar of the kept samples (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`);
- `NNNNN.parquet`: every sample of the shard, kept or not, with its status and measurements;
- `NNNNN.stats.json`: counts per status, bytes and seconds. Written last, so it marks the shard done.

A shard without its stats file is unfinished; a rerun redoes it from its plan and overwrites the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


from facedata.core import records
from facedata.core.run_layout import shard_name  # noqa: F401 - the one spelling of a shard's name, re-exported


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


# Temp files being written now, so that an interrupted process can remove them before it exits.
_IN_FLIGHT: set[Path] = set()
_IN_FLIGHT_LOCK = threading.Lock()


def discard_in_flight() -> int:
    """Remove every temp file an atomic write has open (for a process about to exit at once, e.g.
    on Ctrl-C); returns how many. The outputs they would have become stay as they were."""
    with _IN_FLIGHT_LOCK:
        paths = list(_IN_FLIGHT)
        _IN_FLIGHT.clear()
    for path in paths:
        path.unlink(missing_ok=True)
    return len(paths)


class atomic_path:
    """Context manager giving a temp path beside `path`; renamed onto `path` only on success.

    The result gets the permissions a plain open() would have given it: mkstemp creates its
    file readable by the owner only, which would leave every output private to whoever ran.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(name)
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.add(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(self.tmp)
        if exc_type is None:
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
            raise_naming(exc, self.path)


def raise_naming(err: BaseException | None, path: Path) -> None:
    """Raise `err` as an OSError naming `path`, the output being written, when it is one that names no
    file: a failed write or close (a full disk, a file size limit) gives only its errno, which leaves
    the user to guess which output, and so which disk, it was. Otherwise return."""
    if isinstance(err, OSError) and err.errno and err.filename is None:
        raise OSError(err.errno, err.strerror, str(path)) from err


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


class ImageTar:
    """Streams a shard's kept samples into its tar (`KEY.EXT`, `KEY.txt`, `KEY.json`, as webdataset
    reads them) as they arrive, so memory stays flat in the shard size; atomic: the tar appears
    under its name only when closed."""

    def __init__(self, path: Path):
        self._target = atomic_path(path)
        self._tmp = self._target.__enter__()
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
        self._mtime = int(time.time())

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = self._mtime
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write to the tar drops it at once, so that on a full disk the partial file does
        not go on holding the space, and names it."""
        try:
            yield
        except BaseException as err:
            self.abort()
            raise_naming(err, self._target.path)
            raise

    def add(self, record: dict, image: bytes | None = None, ext: str | None = None) -> None:
        """Store a kept sample (status ok); others have nothing to store."""
        if record["status"] != records.OK:
            return
        key = record["key"]
        meta = {k: v for k, v in record.items() if k not in ("image",)}
        with self._writing():
            self._add_member(f"{key}.{ext}", image)
            self._add_member(f"{key}.txt", (record.get("caption") or "").encode("utf-8"))
            self._add_member(f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode())

    def abort(self) -> None:
        """Remove the unfinished tar (again is a no-op). Closing it writes its end, which fails as
        the writes did on a full disk: the file goes all the same."""
        with suppress(OSError):
            self._tar.close()
        self._target.__exit__(RuntimeError, None, None)

    def close(self) -> None:
        with self._writing():
            self._tar.close()
        self._target.__exit__(None, None, None)


def tar_images(tar_path: Path, wanted: dict[str, str]) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of the images named `KEY.EXT` for each key -> ext in `wanted`, in tar order."""
    with tarfile.open(tar_path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if wanted.get(key) == ext:
                yield key, tar.extractfile(member).read()


# path -> sha256 while its size and modification time stay the same (checkpoints are hashed by
# every command that loads them; they can be hundreds of MB).
_SHA256_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), remembered in this process while its size and mtime stay the same."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]
