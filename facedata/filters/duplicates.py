"""Run-wide exact and near duplicates, as plain functions over arrays: the run-wide step gathers
every shard's (key, sha256, phash, phash_crops, size) and drops what `find_duplicates` returns.

Exact duplicates share the sha256 of their bytes. Near duplicates are within `radius` bits of each
other's 64-bit pHash, where one image's whole-image hash is compared with the other's whole and crop
hashes (facedata.filters.perceptual_hash), found with a faiss binary index. pHash compares layouts,
so photos from one studio setup (same backdrop, pose and framing, different people) can be that
close too: `verify` (e.g. `verify_pair` on the two images, local features under one similarity
transform) confirms each candidate pair before a sample is dropped.

Which copy is kept: the larger image (width x height), then the first key in sorted order, so the
result does not depend on the order shards finished in. Dropping is greedy in that order: a sample
kept drops its near duplicates, a dropped sample drops nothing, so chains A~B~C with A and C far
apart do not merge A and C through B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from facedata.core import records
from facedata.core.run_layout import RunLayout
from facedata.core.shards import tar_images
from facedata.core.step import GlobalStep, StepError, StepOutput
from facedata.filters.perceptual_hash import HASH_BITS, hex_to_bytes

REASONS = {
    "duplicate_exact": "same bytes (sha256) as a larger or earlier-keyed image of the run",
    "duplicate_near": "perceptual hash within the radius of a larger or earlier-keyed image of the run",
}
# Above this many hashes a multi-hash index answers the range search faster than a flat scan;
# below it building the hash tables costs more than it saves.
MULTIHASH_FROM = 200_000


def binary_index(codes: np.ndarray, radius: int, kind: str = "auto"):
    """A faiss binary index over (n, 8) uint8 codes that finds every code within `radius` bits.
    The multi-hash index splits the 64 bits into radius+1 chunks: two codes within the radius agree
    exactly on at least one chunk (pigeonhole), so its range search misses nothing."""
    import faiss

    n = len(codes)
    if kind == "auto":
        kind = "multihash" if n >= MULTIHASH_FROM and radius + 1 <= HASH_BITS // 4 else "flat"
    if kind == "flat":
        index = faiss.IndexBinaryFlat(HASH_BITS)
    elif kind == "multihash":
        nhash = radius + 1
        bits = HASH_BITS // nhash
        if bits < 1:
            raise ValueError(f"radius {radius} too large for a multi-hash index over {HASH_BITS} bits")
        index = faiss.IndexBinaryMultiHash(HASH_BITS, nhash, bits)
        index.nflip = 0
    else:
        raise ValueError(f"index kind {kind!r}: expected flat, multihash or auto")
    index.add(codes)
    return index


def near_pairs(hashes: Sequence[str], crop_hashes: Sequence[Sequence[str] | None] | None, radius: int,
               index_kind: str = "auto") -> set[tuple[int, int]]:
    """Index pairs (i, j), i < j, whose hashes are within `radius` bits: i's whole-image hash against
    j's whole-image hash, or either one's crop hashes against the other's whole-image hash."""
    codes = hex_to_bytes(list(hashes))
    if not len(codes):
        return set()
    index = binary_index(codes, radius, index_kind)
    query_rows, owners = [codes], [np.arange(len(codes))]
    for i, extra in enumerate(crop_hashes or []):
        if extra:
            query_rows.append(hex_to_bytes(list(extra)))
            owners.append(np.full(len(extra), i))
    queries, owner = np.concatenate(query_rows), np.concatenate(owners)
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(queries), 65_536):  # bounded result buffers on large runs
        lims, _, found = index.range_search(queries[start:start + 65_536], radius + 1)  # faiss: distance < r
        for q in range(len(lims) - 1):
            i = int(owner[start + q])
            for j in found[lims[q]:lims[q + 1]]:
                j = int(j)
                if i != j:
                    pairs.add((min(i, j), max(i, j)))
    return pairs


def find_duplicates(keys: Sequence[str], sha256: Sequence[str | None], phash: Sequence[str | None],
                    phash_crops: Sequence[Sequence[str] | None] | None = None,
                    sizes: Sequence[int | None] | None = None, radius: int = 8,
                    verify: Callable[[str, str], bool] | None = None,
                    index_kind: str = "auto") -> dict[str, tuple[str, str]]:
    """key -> (reason, the key kept in its place) for every sample to drop as a duplicate.

    keys, sha256, phash, phash_crops and sizes are parallel (one entry per sample still kept);
    sizes are pixel counts (width x height), larger kept first. `verify(kept_key, other_key)`, when
    given, must confirm each near pair; exact pairs need no confirmation."""
    n = len(keys)
    if not (len(sha256) == len(phash) == n and (sizes is None or len(sizes) == n)
            and (phash_crops is None or len(phash_crops) == n)):
        raise ValueError("find_duplicates: keys, sha256, phash, phash_crops and sizes must have one entry per sample")
    if len(set(keys)) != n:
        raise ValueError("find_duplicates: keys must be unique")
    size = [(s or 0) for s in sizes] if sizes is not None else [0] * n
    order = sorted(range(n), key=lambda i: (-size[i], keys[i]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)

    drop: dict[str, tuple[str, str]] = {}
    best_of_sha: dict[str, int] = {}
    for i in order:
        digest = sha256[i]
        if digest is None:
            continue
        if digest in best_of_sha:
            drop[keys[i]] = ("duplicate_exact", keys[best_of_sha[digest]])
        else:
            best_of_sha[digest] = i

    # Near duplicates among what exact matching kept and that has a hash.
    alive = [i for i in order if keys[i] not in drop and phash[i]]
    pairs = near_pairs([phash[i] for i in alive],
                       [phash_crops[i] for i in alive] if phash_crops is not None else None, radius, index_kind)
    neighbours: dict[int, list[int]] = {}
    for a, b in pairs:  # positions in `alive`, which is in keep order: a < b means a is kept first
        neighbours.setdefault(a, []).append(b)
    dropped = set()
    for a in range(len(alive)):
        if a in dropped:
            continue
        for b in sorted(neighbours.get(a, ())):
            if b in dropped:
                continue
            kept_key, other_key = keys[alive[a]], keys[alive[b]]
            if verify is None or verify(kept_key, other_key):
                dropped.add(b)
                drop[other_key] = ("duplicate_near", kept_key)
    return drop


# --- confirming a candidate pair from the images themselves

VERIFY_SIDE = 128  # compared as 128 x 128 grey images
VERIFY_BLOCKS = 8  # in an 8 x 8 grid of blocks, each must match
# Largest mean absolute grey difference (of 255) in any block for two images to count as copies.
# On openpeople and the other packaged photos with their copies (re-encoded at quality 30, halved,
# cropped by up to 10%), true pairs reached 6.7 and distinct photos that share a studio setup or a
# template (different people, same backdrop, pose and clothes) 17.6 at the least.
MAX_BLOCK_DIFFERENCE = 10.0


def _grey(image: Image.Image) -> np.ndarray:
    from PIL import ImageFilter

    small = image.convert("L").resize((VERIFY_SIDE, VERIFY_SIDE), Image.BILINEAR)
    return np.asarray(small.filter(ImageFilter.BoxBlur(1)), dtype=np.float32)  # blur: JPEG noise


def _views(data: bytes) -> list[np.ndarray]:
    from facedata.filters._images import decode_rgb
    from facedata.filters.perceptual_hash import HASH_INPUT_SIDE, crops

    image = decode_rgb(data, HASH_INPUT_SIDE)
    return [_grey(image)] + [_grey(c) for c in crops(image)]


def block_difference(a: bytes, b: bytes) -> float:
    """The largest block-mean absolute grey difference between two images once aligned: first the
    best of the alignments the hashes consider (each whole image against the other's whole image or
    one of its crops), then refined by an affine ECC fit, which takes up a crop that fell between
    grid positions. A copy re-encoded, resized or cropped differs little in every block; two photos
    that share a backdrop or template differ a lot where the people differ, however small that is."""
    import cv2

    views_a, views_b = _views(a), _views(b)
    best = None
    for views, other in ((views_a, views_b[0]), (views_b, views_a[0])):
        for view in views:
            mean = float(np.abs(view - other).mean())
            if best is None or mean < best[0]:
                best = (mean, view, other)
    _, view, other = best
    try:
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
        _, warp = cv2.findTransformECC(other, view, np.eye(2, 3, dtype=np.float32), cv2.MOTION_AFFINE, criteria, None, 1)
        view = cv2.warpAffine(view, warp, (VERIFY_SIDE, VERIFY_SIDE), flags=cv2.INTER_LINEAR + cv2.WARP_INVERSE_MAP)
    except cv2.error:
        pass  # no convergence (e.g. a flat image): compare as coarsely aligned
    margin = 4  # pixels the warp may have pulled in from outside the image
    diff = np.abs(view - other)[margin:-margin, margin:-margin]
    k = diff.shape[0] // VERIFY_BLOCKS
    blocks = diff[:k * VERIFY_BLOCKS, :k * VERIFY_BLOCKS].reshape(VERIFY_BLOCKS, k, VERIFY_BLOCKS, k).mean(axis=(1, 3))
    return float(blocks.max())


def verify_pair(a: bytes, b: bytes, max_block_difference: float = MAX_BLOCK_DIFFERENCE) -> bool:
    """Whether two images (encoded bytes) are copies of one picture (see block_difference). A copy
    with a banner or logo pasted over part of it differs a lot in those blocks and is not confirmed."""
    return block_difference(a, b) <= max_block_difference


class Duplicates(GlobalStep):
    """The run-wide duplicate step: every kept image's sha256 and pHash (the `phash` step must come
    before it) go through `find_duplicates`; each dropped image names the one kept in its place
    (`duplicate_of`). A near pair is confirmed on the two images' pixels (`verify_pair`) unless
    `verify` is off."""

    name = "duplicates"
    reasons = REASONS
    columns = {"duplicate_of": pa.string()}
    needs_images = True

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        radius: int = Field(8, ge=0, le=HASH_BITS // 2)  # bits of 64; 8 measured in benchmarks/README.md
        verify: bool = True

    def prepare(self, layout: RunLayout, source: str, shard_ids: list[int]) -> None:
        wanted = ["key", "status", "ext", "sha256", "phash", "phash_crops", "width", "height"]
        rows: list[dict] = []
        shard_of: dict[str, tuple[int, str]] = {}
        for shard_id in shard_ids:
            path = layout.records_file(source, shard_id)
            missing = set(wanted) - set(pq.read_schema(path).names)
            if missing:
                raise StepError(f"step duplicates: {path} has no {', '.join(sorted(missing))} column: "
                                "put the phash step (facedata.filters.perceptual_hash:PerceptualHash) before it")
            for row in pq.read_table(path, columns=wanted).to_pylist():
                if row["status"] == records.OK:
                    rows.append(row)
                    shard_of[row["key"]] = (shard_id, row["ext"])

        def image(key: str) -> bytes:
            shard_id, ext = shard_of[key]
            return next(data for _, data in tar_images(layout.images_tar(shard_id), {key: ext}))

        verify = (lambda kept, other: verify_pair(image(kept), image(other))) if self.options.verify else None
        self._drop = find_duplicates([r["key"] for r in rows], [r["sha256"] for r in rows], [r["phash"] for r in rows],
                                     [r["phash_crops"] for r in rows], [(r["width"] or 0) * (r["height"] or 0) for r in rows],
                                     radius=self.options.radius, verify=verify)

    def shard_output(self, shard_id: int, table: pa.Table) -> StepOutput:
        found = [self._drop.get(key) for key in table.column("key").to_pylist()]
        return StepOutput(reasons=[f[0] if f else None for f in found],
                          columns={"duplicate_of": [f[1] if f else None for f in found]})

    def report(self, layout: RunLayout) -> dict:
        return {"n_duplicates": len(self._drop), "radius": self.options.radius, "verified": self.options.verify}
