"""Text-to-face search and "more like this" on the explore page, through a FLIP checkpoint.

The run's kept images (status ok) are embedded once with the checkpoint's image tower, read as its
training read them (the primary face's box grown `crop_scale` times for a checkpoint trained on
crops; facedata.flip.embed.embed_images does both), and kept as a faiss IndexFlatIP (exact
cosine) in the cache folder, per checkpoint hash, rebuilt when the sample table changed. A query
is embedded with the text tower; "more like this" searches with a sample's own image embedding.
The embedding is the expensive part (the whole run's kept images, once); searches are exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np

from facedata.explore.catalog import Catalog
from facedata.explore.images import ShardImages
from facedata.flip.embed import embed_images, embed_texts, load_checkpoint

log = logging.getLogger("facedata.explore")

EMBED_BATCH = 256


class FaceSearch:
    def __init__(self, checkpoint: Path, run_root: Path, catalog: Catalog, images: ShardImages, cache_dir: Path):
        self.ckpt = load_checkpoint(checkpoint)
        self.catalog = catalog
        folder = Path(cache_dir) / "flip" / self.ckpt.short_hash
        meta_file = folder / "meta.json"
        meta = {"checkpoint": self.ckpt.sha256, "table": json.loads((Path(cache_dir) / "samples.meta.json").read_text())}
        try:
            fresh = json.loads(meta_file.read_text()) == meta
        except (FileNotFoundError, ValueError):
            fresh = False
        if fresh:
            self.index = faiss.read_index(str(folder / "index.faiss"))
            self.keys = json.loads((folder / "keys.json").read_text())
            return
        rows = catalog.query("SELECT key, shard FROM samples WHERE status = 'ok' AND ext IS NOT NULL "
                             "ORDER BY shard, row_in_shard")
        boxes = self._primary_boxes(rows) if self.ckpt.use_crops else None
        vectors, keys = [], []
        for start in range(0, len(rows), EMBED_BATCH):
            batch = rows[start:start + EMBED_BATCH]
            found = [(r, images.image(r["shard"], r["key"])) for r in batch]
            found = [(r, data) for r, data in found if data is not None]
            if not found:
                continue
            vectors.append(embed_images(self.ckpt, [data for _, (data, _) in found],
                                        boxes=[boxes.get(r["key"]) for r, _ in found] if boxes is not None else None))
            keys += [r["key"] for r, _ in found]
        dim = vectors[0].shape[1] if vectors else 1
        self.index = faiss.IndexFlatIP(dim)
        if vectors:
            self.index.add(np.concatenate(vectors).astype(np.float32))
        self.keys = keys
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / "index.faiss"))
        (folder / "keys.json").write_text(json.dumps(keys))
        meta_file.write_text(json.dumps(meta))  # last: the folder is complete
        log.info("explore: embedded %d kept images with %s", len(keys), self.ckpt.path)

    def _primary_boxes(self, rows: list[dict]) -> dict[str, list[float]]:
        import pyarrow.parquet as pq

        boxes: dict[str, list[float]] = {}
        for shard in sorted({r["shard"] for r in rows}):
            table = pq.read_table(self.catalog.shards[shard].file, columns=["key", "faces", "primary_face"])
            for record in table.to_pylist():
                if record["faces"] and record["primary_face"] is not None:
                    boxes[record["key"]] = record["faces"][record["primary_face"]]["bbox"]
        return boxes

    def _rows(self, hits: list[tuple[str, float]]) -> list[dict]:
        if not hits:
            return []
        by_key = {r["key"]: r for r in self.catalog.query(
            f"SELECT {Catalog.GRID_COLUMNS} FROM samples WHERE key IN ({', '.join('?' * len(hits))})",
            [k for k, _ in hits])}
        return [{**by_key[k], "similarity": s} for k, s in hits if k in by_key]

    def _search(self, vector: np.ndarray, k: int, skip: str | None = None) -> list[tuple[str, float]]:
        k = max(1, min(k, 200))
        if self.index.ntotal == 0:
            return []
        sims, ids = self.index.search(np.asarray(vector, np.float32).reshape(1, -1), min(k + 1, self.index.ntotal))
        hits = [(self.keys[i], float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0 and self.keys[i] != skip]
        return hits[:k]

    def text_search(self, query: str, k: int) -> list[dict]:
        return self._rows(self._search(embed_texts(self.ckpt, [query])[0], k))

    def similar(self, key: str, k: int) -> list[dict]:
        if key not in self.keys:
            return []
        return self._rows(self._search(self.index.reconstruct(self.keys.index(key)), k, skip=key))
