"""The identity stage: every shard's faces in, the same records with identity columns out.

Unlike the shard stages this one needs the whole run at once, but only the embeddings: they are
copied shard by shard into one memory-mapped float16 file (`RUN/identity/embeddings.npy`), and
per-face bookkeeping is a handful of numpy arrays, never Python objects per face. Then:

1. opt-out: an image with any embedded face at least `optout_threshold` similar to a face of the
   opt-out gallery is dropped (`optout_match`); only the count is reported, never who or which;
2. identities: a faiss k-NN graph over the remaining faces, clustered (facedata.identity.clustering);
3. cleaning, per image by its primary face, each switchable: near-duplicates of one shot keep the
   best image by resolution, then sharpness, then detector score (`near_duplicate`); outliers of
   their identity (`identity_outlier`); singleton identities (`singleton_identity`); a cap of
   images per identity keeping the best (`identity_cap`);
4. an identity-disjoint train/validation/test split of the kept images.

Written, each atomically: `RUN/identity/NNNNN.parquet` per shard (the face stage's records plus
identity_id, identity_size, identity_centre_sim, identity_outlier, face_identity_ids, split and
identity_status), `gallery.png` (face crops: a row per largest identity, then the flagged
outliers) and `identity.json` last, which marks the stage done for its list of shards (a run whose
input grew by new shards does it again over all of them). Same input and config give the same output.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from facedata.core import records
from facedata.identity.metrics import clustering_metrics
from facedata.identity.clustering import cluster, cluster_summary
from facedata.core.config import Config, FaceConfig, IdentityConfig
from facedata.report.contact_sheet import make_contact_sheet
from facedata.core.errors import UserError
from facedata.identity.knn import build_knn
from facedata.core.run_layout import RunLayout
from facedata.core.schema import reasons as schema_reasons
from facedata.core.schema import step_columns
from facedata.core.step import GlobalStep, StepOutput
from facedata.core.shards import atomic_path

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IDENTITY_COLUMNS = step_columns("identity")
_GALLERY_PER_ROW = 8
_GALLERY_OUTLIER_ROWS = 2


@dataclass
class FaceIndex:
    """One entry per embedded face of the run, in embedding-file order."""

    shard: np.ndarray  # int32: shard id
    row: np.ndarray  # int32: the record's row in its shard's parquet
    face: np.ndarray  # int32: the face's position in the record's `faces` list
    primary: np.ndarray  # bool
    pixels: np.ndarray  # int64: the image's width * height
    sharpness: np.ndarray  # float32
    score: np.ndarray  # float32
    bbox: np.ndarray  # float32 [N, 4]


def _shard_faces(table: pa.Table) -> dict[str, np.ndarray]:
    """Flatten a shard's `faces` column to per-face arrays, keeping only embedded faces."""
    faces = table.column("faces").combine_chunks()
    parents = pc.list_parent_indices(faces).to_numpy()
    flat = pc.list_flatten(faces)
    starts = faces.offsets.to_numpy()
    position = np.arange(len(parents)) + starts[0] - starts[parents]
    emb_index = flat.field("embedding_index")
    embedded = pc.is_valid(emb_index).to_numpy(zero_copy_only=False)
    # Cast first: in a shard where no image decoded these columns are all null, of type null.
    width = pc.fill_null(table.column("width").cast(pa.int64()), 0).to_numpy()
    height = pc.fill_null(table.column("height").cast(pa.int64()), 0).to_numpy()
    rows = parents[embedded]
    return {
        "embedding_index": emb_index.to_numpy(zero_copy_only=False)[embedded].astype(np.int64),
        "row": rows.astype(np.int32),
        "face": position[embedded].astype(np.int32),
        "primary": flat.field("primary").to_numpy(zero_copy_only=False)[embedded].astype(bool),
        "pixels": (width * height)[rows],
        "sharpness": flat.field("sharpness").to_numpy(zero_copy_only=False)[embedded].astype(np.float32),
        "score": flat.field("score").to_numpy(zero_copy_only=False)[embedded].astype(np.float32),
        "bbox": pc.list_flatten(flat.field("bbox")).to_numpy(zero_copy_only=False)
        .astype(np.float32).reshape(-1, 4)[embedded],
    }


def gather_faces(run_dir: Path, shard_ids: list[int], out_path: Path) -> tuple[np.ndarray, FaceIndex]:
    """Copy every shard's embeddings into one memory-mapped file and index their faces."""
    layout = RunLayout(run_dir)
    arrays = [np.load(layout.shard_file("faces", i, "embeddings.npy"), mmap_mode="r") for i in shard_ids]
    dims = {a.shape[1] for a in arrays}
    if len(dims) > 1:
        expected = arrays[0].shape[1]
        bad = next(i for i, a in zip(shard_ids, arrays) if a.shape[1] != expected)
        raise UserError(
            f"{layout.shard_file('faces', bad, 'embeddings.npy')}: embeddings have dimension "
            f"{arrays[shard_ids.index(bad)].shape[1]}, other shards have {expected}; rerun its face stage"
        )
    dim = dims.pop() if dims else 0
    total = sum(len(a) for a in arrays)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        emb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))
        # Take the file's disk space now, while running out of it is an OSError: a store to a mapped
        # page the disk has no room for kills the whole process (SIGBUS), without a word.
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        parts: dict[str, list[np.ndarray]] = {}
        offset = 0
        for shard_id, array in zip(shard_ids, arrays):
            emb[offset : offset + len(array)] = array
            table = pq.read_table(layout.records_file("faces", shard_id), columns=["faces", "width", "height"])
            faces = _shard_faces(table)
            order = np.argsort(faces.pop("embedding_index"), kind="stable")
            if len(order) != len(array):
                raise UserError(
                    f"{layout.records_file('faces', shard_id)}: {len(order)} embedded faces but "
                    f"{len(array)} embedding rows; rerun its face stage"
                )
            parts.setdefault("shard", []).append(np.full(len(array), shard_id, np.int32))
            for name, values in faces.items():
                parts.setdefault(name, []).append(values[order])
            offset += len(array)
        emb.flush()
        del emb
    emb = np.load(out_path, mmap_mode="r")
    joined = {name: np.concatenate(values) for name, values in parts.items()} if parts else {}
    if not joined:
        empty = np.zeros(0)
        joined = dict(shard=empty.astype(np.int32), row=empty.astype(np.int32), face=empty.astype(np.int32),
                      primary=empty.astype(bool), pixels=empty.astype(np.int64),
                      sharpness=empty.astype(np.float32), score=empty.astype(np.float32),
                      bbox=np.zeros((0, 4), np.float32))
    return emb, FaceIndex(**joined)


def load_optout_gallery(path: Path, face_cfg: FaceConfig, dim: int) -> np.ndarray:
    """Unit-norm embeddings of the opted-out faces: from .npy files, and from photos (one face each,
    the largest if several), embedded with the run's own face models."""
    from facedata.faces.step import analyze_encoded, stage_analyzer

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: identity.optout_gallery must be a folder of photos or .npy files")
    vectors: list[np.ndarray] = []
    photos = []
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if file.suffix.lower() == ".npy":
            array = np.atleast_2d(np.load(file)).astype(np.float32)
            if array.shape[1] != dim:
                raise UserError(f"{file}: opt-out embeddings have dimension {array.shape[1]}, the run's have {dim}")
            vectors.append(array)
        else:
            photos.append(file)
    if photos:
        analyzer = stage_analyzer(face_cfg)
        results = analyze_encoded(analyzer, [(p.read_bytes(), None) for p in photos], face_cfg, 178_956_970)
        for photo, result in zip(photos, results):
            if isinstance(result, Exception):
                raise UserError(f"{photo}: opt-out photo cannot be read ({result})")
            embedded = [f.embedding for f in result.faces if f.embedding is not None]
            if not embedded:
                raise UserError(f"{photo}: no usable face found in this opt-out photo")
            vectors.append(np.asarray(embedded[:1], np.float32))
    if not vectors:
        raise UserError(f"{path}: the opt-out gallery holds no photos or .npy files")
    gallery = np.concatenate(vectors).astype(np.float32)
    gallery /= np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    return gallery


def match_optout(emb: np.ndarray, gallery: np.ndarray, threshold: float, batch: int = 65_536) -> np.ndarray:
    """bool [N]: faces at least `threshold` similar to some gallery face."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    hits = np.zeros(len(emb), bool)
    for start in range(0, len(emb), batch):
        x = np.asarray(emb[start : start + batch], np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sims, _ = index.search(x, 1)
        hits[start : start + len(x)] = sims[:, 0] >= threshold
    return hits


def _quality_rank(idx: FaceIndex) -> np.ndarray:
    """Higher is better: resolution, then sharpness, then detector score."""
    order = np.lexsort((idx.score, idx.sharpness, idx.pixels))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _near_duplicates(graph, labels, is_primary, rank, threshold) -> np.ndarray:
    """bool [N]: primary faces that are a near-duplicate of a better primary face of their identity."""
    n, k = graph.indices.shape
    rows = np.repeat(np.arange(n), k)
    cols = graph.indices.ravel().astype(np.int64)
    ok = (cols >= 0) & (graph.sims.ravel() >= threshold)
    rows, cols = rows[ok], cols[ok]
    ok = is_primary[rows] & is_primary[cols] & (labels[rows] == labels[cols])
    rows, cols = rows[ok], cols[ok]
    adjacency = sparse.coo_matrix((np.ones(len(rows), np.int8), (rows, cols)), shape=(n, n))
    _, group = connected_components(adjacency, directed=False)
    best = np.full(group.max() + 1 if n else 0, -1, np.int64)
    np.maximum.at(best, group, np.where(is_primary, rank, -1))
    return is_primary & (rank != best[group])


def _assign_splits(image_label: np.ndarray, cfg: IdentityConfig) -> np.ndarray:
    """Split index (0 train, 1 validation, 2 test) per image, by identity: whole identities are
    dealt in a seeded order to test, then validation, until each holds its share of the images."""
    split = np.zeros(len(image_label), np.int8)
    if not len(image_label):
        return split
    ids, counts = np.unique(image_label, return_counts=True)
    order = np.random.default_rng(cfg.seed).permutation(len(ids))
    targets = [(2, cfg.test_fraction * len(image_label)), (1, cfg.validation_fraction * len(image_label))]
    assigned = np.zeros(len(ids), np.int8)
    filled = {2: 0, 1: 0}
    pos = 0
    for split_id, target in targets:
        while pos < len(order) and filled[split_id] < target and len(ids) - pos > 1:
            assigned[order[pos]] = split_id
            filled[split_id] += counts[order[pos]]
            pos += 1
    split[:] = assigned[np.searchsorted(ids, image_label)]
    return split


def _face_crops(run_dir: Path, idx: FaceIndex, faces: np.ndarray) -> dict[int, bytes]:
    """JPEG crops (a margin around the box) of the given faces, read from the shard tars."""
    crops: dict[int, bytes] = {}
    for shard_id in np.unique(idx.shard[faces]):
        mine = faces[idx.shard[faces] == shard_id]
        table = pq.read_table(RunLayout(run_dir).records_file("faces", int(shard_id)), columns=["key", "ext"])
        keys = table.column("key").to_pylist()
        exts = table.column("ext").to_pylist()
        wanted = {f"{keys[idx.row[f]]}.{exts[idx.row[f]]}": [] for f in mine}
        for f in mine:
            wanted[f"{keys[idx.row[f]]}.{exts[idx.row[f]]}"].append(int(f))
        with tarfile.open(RunLayout(run_dir).images_tar(int(shard_id))) as tar:
            for member in tar:
                if member.name not in wanted:
                    continue
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                    im = im.convert("RGB")
                    for f in wanted[member.name]:
                        x1, y1, x2, y2 = idx.bbox[f]
                        m = 0.25 * max(x2 - x1, y2 - y1)
                        crop = im.crop((int(x1 - m), int(y1 - m), int(x2 + m), int(y2 + m))).resize((160, 160))
                        buf = io.BytesIO()
                        crop.save(buf, format="JPEG", quality=88)
                        crops[f] = buf.getvalue()
    return crops


@dataclass(frozen=True)
class GalleryTile:
    """One face drawn in gallery.png."""

    shard: int
    row: int  # the record's row in its shard
    face: int  # the face's position in the record's `faces`
    identity: int
    outlier: bool  # drawn in the outliers' rows: the record's identity_outlier is true


@dataclass
class Gallery:
    path: Path
    title: str
    columns: int
    rows: list[list[GalleryTile]]  # as drawn: one row per identity, then the outliers' rows
    n_outliers: int  # images flagged identity_outlier in all; up to _GALLERY_OUTLIER_ROWS rows are shown


def write_gallery(run_dir: Path, idx: FaceIndex, labels: np.ndarray, centre_sim: np.ndarray,
                  outlier: np.ndarray, n_clusters: int, out_path: Path) -> Gallery | None:
    """A grid: one row of faces for each of the largest identities, most central first, then the
    flagged outliers (the images whose identity_outlier is true: their primary face, least central
    first, captioned "OUTLIER of identity N"), so a person can check the clustering at a
    glance. A row that ends early ends in plain background. None when there is nothing to show."""
    sizes = np.bincount(labels[labels >= 0]) if len(labels) else np.zeros(0, np.int64)
    flagged = np.flatnonzero(outlier & idx.primary & (labels >= 0))
    flagged = flagged[np.argsort(centre_sim[flagged], kind="stable")]
    columns = int(min(_GALLERY_PER_ROW, max(sizes.max(initial=0), len(flagged), 1)))
    rows: list[list[tuple[int, str]]] = []
    for label in range(min(n_clusters, len(sizes))):
        if sizes[label] < 2:
            break
        members = np.flatnonzero(labels == label)
        members = members[np.argsort(-centre_sim[members], kind="stable")][:columns]
        rows.append([(int(f), f"identity {label} ({sizes[label]} faces) sim {centre_sim[f]:.2f}") for f in members])
    n_identity_rows = len(rows)
    shown = flagged[: _GALLERY_OUTLIER_ROWS * columns]
    for start in range(0, len(shown), columns):
        rows.append([(int(f), f"OUTLIER of identity {labels[f]} ({sizes[labels[f]]} faces) sim {centre_sim[f]:.2f}")
                     for f in shown[start : start + columns]])
    if not rows:
        return None
    name = Path(run_dir).name
    title = f"{name}: {n_identity_rows} largest identities, a row each; " + (
        "no outliers flagged" if not len(flagged) else
        f"{len(flagged)} outliers, last row{'s' if len(rows) - n_identity_rows > 1 else ''}"
        + (f" ({len(shown)} shown)" if len(shown) < len(flagged) else ""))
    crops = _face_crops(run_dir, idx, np.array([f for row in rows for f, _ in row], np.int64))
    items: list[tuple[bytes | None, str]] = []
    for row in rows:
        items += [(crops[f], caption) for f, caption in row]
        items += [(None, "")] * (columns - len(row))  # the next row starts a row of its own
    path = make_contact_sheet(items, out_path, title=title, thumb=128, columns=columns, max_items=len(items))
    if path is None:
        return None
    tiles = [[GalleryTile(int(idx.shard[f]), int(idx.row[f]), int(idx.face[f]), int(labels[f]),
                          outlier=i >= n_identity_rows) for f, _ in row] for i, row in enumerate(rows)]
    return Gallery(path, title, columns, tiles, int(len(flagged)))


class IdentityStep(GlobalStep):
    """Cluster, clean and split the run's faces (see the module's docstring)."""

    name = "identity"
    reasons = schema_reasons("identity")
    columns = IDENTITY_COLUMNS
    status_column = "identity_status"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare(self, layout: RunLayout, source: str, shard_ids: list[int]) -> None:
        cfg, icfg = self.cfg, self.cfg.identity
        emb, idx = gather_faces(layout.root, shard_ids, layout.step_dir(self.name) / "embeddings.npy")
        n = len(idx.shard)
        log.info("identity: %d embedded faces from %d shards", n, len(shard_ids))

        # Images are addressed by (shard, row); a face's image number is its position in `images`.
        image_keys = idx.shard.astype(np.int64) << 32 | idx.row.astype(np.int64)
        images, face_image = np.unique(image_keys, return_inverse=True)
        image_drop = np.full(len(images), "", dtype=object)

        optout_faces = 0
        if icfg.optout_gallery:
            gallery = load_optout_gallery(Path(icfg.optout_gallery), cfg.faces, emb.shape[1])
            hits = match_optout(emb, gallery, icfg.optout_threshold)
            optout_faces = int(hits.sum())
            image_drop[np.unique(face_image[hits])] = records.OPTOUT_MATCH
            log.info("identity: %d faces matched the opt-out gallery; their images are removed", optout_faces)

        # Cluster the faces of images that are still in.
        live = np.flatnonzero(image_drop[face_image] == "")
        live_emb = np.asarray(emb[live]) if len(live) < n else emb
        t0 = time.perf_counter()
        graph = build_knn(live_emb, k=icfg.k, index=icfg.index, exact_max=icfg.exact_max, nprobe=icfg.nprobe,
                          seed=icfg.seed)
        t_knn = time.perf_counter() - t0
        live_labels = cluster(graph, icfg.method, icfg.threshold, seed=icfg.seed)
        t_cluster = time.perf_counter() - t0 - t_knn
        summary = cluster_summary(live_emb, live_labels, icfg.outlier_threshold)

        labels = np.full(n, -1, np.int64)
        size = np.zeros(n, np.int64)
        centre_sim = np.full(n, np.nan, np.float32)
        outlier = np.zeros(n, bool)
        labels[live], size[live], centre_sim[live], outlier[live] = (live_labels, summary.size, summary.centre_sim,
                                                                     summary.outlier)

        # Cleaning, by each image's primary face; the first reason wins.
        primary = idx.primary & (labels >= 0)
        if icfg.drop_near_duplicates and len(live):
            dup = _near_duplicates(graph, live_labels, idx.primary[live], _quality_rank(idx)[live],
                                   icfg.near_duplicate_threshold)
            _drop(image_drop, face_image[live[dup]], records.NEAR_DUPLICATE)
        if icfg.drop_outliers:
            _drop(image_drop, face_image[primary & outlier], records.IDENTITY_OUTLIER)
        if icfg.drop_singletons:
            _drop(image_drop, face_image[primary & (size == 1)], records.SINGLETON_IDENTITY)
        if icfg.max_images_per_identity:
            alive = np.flatnonzero(primary & (image_drop[face_image] == ""))
            rank = _quality_rank(idx)[alive]
            order = alive[np.lexsort((-rank, labels[alive]))]
            seen_before = np.arange(len(order)) - np.searchsorted(labels[order], labels[order])
            _drop(image_drop, face_image[order[seen_before >= icfg.max_images_per_identity]], records.IDENTITY_CAP)

        kept_primary = np.flatnonzero(primary & (image_drop[face_image] == ""))
        split_of_face = np.full(n, -1, np.int8)
        split_of_face[kept_primary] = _assign_splits(labels[kept_primary], icfg)

        self._decided = _Decided(idx, face_image, image_drop, labels, size, centre_sim, outlier, split_of_face)
        self._split_counts = {name: {"images": 0, "identities": 0} for name in SPLITS}
        self._split_ids: dict[str, set] = {name: set() for name in SPLITS}
        self._truth: tuple[list, list] = ([], [])
        self._report = {
            "n_faces": n,
            "n_images": int(len(images)),
            "n_identities": int(live_labels.max() + 1) if len(live) else 0,
            "n_singletons": int(np.count_nonzero(np.bincount(live_labels) == 1)) if len(live) else 0,
            "largest_identity": int(summary.size.max()) if len(live) else 0,
            "n_outlier_faces": int(outlier.sum()),
            "n_optout_faces": optout_faces,
            "knn_seconds": round(t_knn, 3),
            "cluster_seconds": round(t_cluster, 3),
            "config": icfg.model_dump(mode="json"),
        }

    def shard_output(self, shard_id: int, table: pa.Table) -> StepOutput:
        """The identity columns of one shard's face records (its primary faces'), and the drop
        reasons of its images."""
        d = self._decided
        n_rows = table.num_rows
        mine = np.flatnonzero(d.idx.shard == shard_id)
        rows, faces = d.idx.row[mine], d.idx.face[mine]
        prim = mine[d.idx.primary[mine]]
        at = d.idx.row[prim]
        identity_id = np.full(n_rows, -1, np.int64)
        identity_id[at] = d.labels[prim]
        id_size = np.zeros(n_rows, np.int64)
        id_size[at] = d.size[prim]
        id_sim = np.full(n_rows, np.nan, np.float32)
        id_sim[at] = d.centre_sim[prim]
        id_outlier = np.zeros(n_rows, bool)
        id_outlier[at] = d.outlier[prim]
        split = np.full(n_rows, -1, np.int8)
        split[at] = d.split_of_face[prim]
        drop = np.full(n_rows, "", dtype=object)
        drop[rows] = d.image_drop[d.face_image[mine]]

        statuses = table.column("status").to_pylist()
        n_faces = [len(f or ()) for f in table.column("faces").to_pylist()]
        face_ids = [[-1] * k for k in n_faces]
        for r, f, label in zip(rows, faces, d.labels[mine]):
            face_ids[r][f] = int(label)
        reasons: list[str | None] = [None] * n_rows
        split_names: list[str | None] = [None] * n_rows
        for r in range(n_rows):
            if statuses[r] != records.OK:
                continue
            reasons[r] = drop[r] or None
            if not drop[r] and split[r] >= 0:
                split_names[r] = name = SPLITS[split[r]]
                self._split_counts[name]["images"] += 1
                self._split_ids[name].add(int(identity_id[r]))
        label_col = self.cfg.identity.label_col
        if label_col and label_col in table.column_names and len(prim):
            truth = table.column(label_col).to_pylist()
            self._truth[0].extend(truth[r] for r in at)
            self._truth[1].extend(d.labels[prim].tolist())
        valid = identity_id >= 0
        return StepOutput(reasons=reasons, columns={
            "identity_id": pa.array(identity_id, mask=~valid),
            "identity_size": pa.array(id_size, mask=~valid),
            "identity_centre_sim": pa.array(id_sim, mask=~valid),
            "identity_outlier": pa.array(id_outlier, mask=~valid),
            "face_identity_ids": face_ids,
            "split": split_names,
        })

    def report(self, layout: RunLayout) -> dict:
        d = self._decided
        report = dict(self._report)
        for name in SPLITS:
            self._split_counts[name]["identities"] = len(self._split_ids[name])
        report["splits"] = self._split_counts
        if self._truth[0]:
            report["metrics"] = clustering_metrics(np.asarray(self._truth[0], dtype=object).astype(str),
                                                   np.asarray(self._truth[1]))
        gallery = write_gallery(layout.root, d.idx, d.labels, d.centre_sim, d.outlier, self.cfg.identity.gallery_clusters,
                                layout.step_dir(self.name) / "gallery.png")
        report["gallery"] = str(gallery.path) if gallery else None
        return report


@dataclass
class _Decided:
    """What the identity step decided over the run's faces (one entry per embedded face)."""

    idx: FaceIndex
    face_image: np.ndarray  # face -> its image's number
    image_drop: np.ndarray  # image number -> drop reason, "" when kept
    labels: np.ndarray
    size: np.ndarray
    centre_sim: np.ndarray
    outlier: np.ndarray
    split_of_face: np.ndarray


def _drop(image_drop: np.ndarray, image_numbers: np.ndarray, status: str) -> None:
    fresh = image_numbers[image_drop[image_numbers] == ""]
    image_drop[fresh] = status
