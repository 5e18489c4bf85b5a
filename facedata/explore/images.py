"""Images for the explore page, read from the run's shard tars, and thumbnails cached on disk.

A shard tar holds `KEY.jpg|png|webp` per kept image. Where each member's bytes sit in the tar is
read once per shard (headers only) and remembered for a few shards; an image is then one seek
and one read. Thumbnails are made on first request and kept as JPEG files in the cache folder, so
a page of a million-row run costs the thumbnails it shows, nothing more.
"""

from __future__ import annotations

import io
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from facedata.core.run_layout import RunLayout, shard_name

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
THUMB_SIDE = 256


class ShardImages:
    """Image bytes by (shard, key), from RUN/shards/NNNNN.tar, with thumbnails under cache_dir/thumbs."""

    def __init__(self, run_root: Path, cache_dir: Path, shards_remembered: int = 16):
        self.layout = RunLayout(run_root)
        self.thumb_dir = Path(cache_dir) / "thumbs"
        self._members: OrderedDict[int, dict[str, tuple[int, int, str]]] = OrderedDict()
        self._remembered = shards_remembered
        self._lock = threading.Lock()

    def _member_map(self, shard_id: int) -> dict[str, tuple[int, int, str]]:
        with self._lock:
            if shard_id in self._members:
                self._members.move_to_end(shard_id)
                return self._members[shard_id]
        members: dict[str, tuple[int, int, str]] = {}
        tar_path = self.layout.images_tar(shard_id)
        if tar_path.exists():
            with tarfile.open(tar_path) as tar:
                for info in tar:
                    stem, _, ext = info.name.rpartition(".")
                    if info.isfile() and ext.lower() in IMAGE_TYPES:
                        members[stem] = (info.offset_data, info.size, ext.lower())
        with self._lock:
            self._members[shard_id] = members
            while len(self._members) > self._remembered:
                self._members.popitem(last=False)
        return members

    def image(self, shard_id: int, key: str) -> tuple[bytes, str] | None:
        """(bytes, content type) of a kept image, or None where the tar has no image for the key."""
        member = self._member_map(shard_id).get(key)
        if member is None:
            return None
        offset, size, ext = member
        with open(self.layout.images_tar(shard_id), "rb") as f:
            f.seek(offset)
            return f.read(size), IMAGE_TYPES[ext]

    def thumbnail(self, shard_id: int, key: str) -> bytes | None:
        """A JPEG at most THUMB_SIDE px on its longer side, made once and then read from the cache."""
        # The key comes from the sample table (checked to exist there), and is used only as a file
        # name inside the cache folder; keys are made by the planner from digits.
        path = self.thumb_dir / shard_name(shard_id) / f"{key}.jpg"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        found = self.image(shard_id, key)
        if found is None:
            return None
        with Image.open(io.BytesIO(found[0])) as im:
            im.draft("RGB", (THUMB_SIDE, THUMB_SIDE))  # JPEG: decode at a reduced scale
            im = im.convert("RGB")
            im.thumbnail((THUMB_SIDE, THUMB_SIDE))
            out = io.BytesIO()
            im.save(out, "JPEG", quality=82)
        data = out.getvalue()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data
