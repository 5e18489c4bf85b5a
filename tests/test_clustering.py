"""Identity clustering: metrics on hand-computed cases, the faiss k-NN graph, both clustering
methods on edge cases and synthetic identities, and the default config on real faces
(openpeople's 10 people, embedded once per module with the shipped ArcFace model)."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image, ImageOps
from sklearn.metrics.cluster import pair_confusion_matrix

from facedata.identity.metrics import bcubed_prf, clustering_metrics, n_clusters, pairwise_prf
from facedata.identity.clustering import cluster, cluster_faces, cluster_summary, similarity_graph
from facedata.core.config import FaceConfig, IdentityConfig
from facedata.identity.knn import KnnGraph, build_knn, gpu_available
from facedata.core.packages import package_dir

METHODS = ["components", "chinese_whispers"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def identities(sizes: list[int], dim: int = 128, within: float = 0.65, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Faces of len(sizes) identities with random centres: same identity ~`within` cosine,
    different ~0, in shuffled order. Returns (embeddings float32 [N, dim], labels)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((len(sizes), dim)))
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    noise = unit(rng.standard_normal((len(labels), dim)))
    return unit(np.sqrt(within) * centres[labels] + np.sqrt(1 - within) * noise), labels


def edge_graph(n: int, edges: list[tuple[int, int, float]], k: int = 4) -> KnnGraph:
    """A k-NN graph written by hand: each (i, j, sim) lists j among i's neighbours."""
    indices = np.full((n, k), -1, np.int32)
    sims = np.full((n, k), -np.inf, np.float32)
    filled = [0] * n
    for i, j, sim in edges:
        indices[i, filled[i]], sims[i, filled[i]] = j, sim
        filled[i] += 1
    return KnnGraph(indices, sims)


# ---------------------------------------------------------------- metrics


def test_metrics_hand_computed_example():
    # True pairs: (0,1) (0,2) (1,2) (3,4); predicted: (0,1) (2,3) (2,4) (3,4); shared: (0,1) (3,4).
    truth, pred = [0, 0, 0, 1, 1], [5, 5, 7, 7, 7]
    assert pairwise_prf(truth, pred) == pytest.approx((0.5, 0.5, 0.5))
    # BCubed precision per face: 1, 1, 1/3, 2/3, 2/3; recall: 2/3, 2/3, 1/3, 1, 1 -> both 11/15.
    assert bcubed_prf(truth, pred) == pytest.approx((11 / 15, 11 / 15, 11 / 15))
    assert clustering_metrics(truth, pred)["n_clusters"] == 2


def test_metrics_perfect_up_to_renaming():
    truth = ["ann", "ann", "bob", "cy", "cy", "cy"]
    pred = [9, 9, 4, 1, 1, 1]
    m = clustering_metrics(truth, pred)
    assert m["pairwise_f"] == m["bcubed_f"] == 1.0
    assert m["n_clusters"] == m["n_identities"] == 3


def test_metrics_all_merged_and_all_singletons():
    truth = [0, 0, 1, 1, 2, 2]
    # One cluster: 3 of its 15 pairs are right.
    assert pairwise_prf(truth, [0] * 6) == pytest.approx((0.2, 1.0, 1 / 3))
    assert bcubed_prf(truth, [0] * 6) == pytest.approx((1 / 3, 1.0, 0.5))
    # Every face alone: nothing wrongly joined (precision 1), no true pair found.
    assert pairwise_prf(truth, range(6)) == (1.0, 0.0, 0.0)
    assert bcubed_prf(truth, range(6)) == pytest.approx((1.0, 0.5, 2 / 3))
    assert n_clusters(range(6)) == 6


def test_metrics_empty_and_mismatched():
    assert pairwise_prf([], []) == (1.0, 1.0, 1.0)
    assert clustering_metrics([], [])["n_clusters"] == 0
    with pytest.raises(ValueError, match="equally long"):
        pairwise_prf([0, 1], [0])


def test_pairwise_counts_agree_with_sklearn():
    rng = np.random.default_rng(3)
    truth, pred = rng.integers(0, 40, 3000), rng.integers(0, 25, 3000)
    (tn, fp), (fn, tp) = pair_confusion_matrix(truth, pred)  # ordered pairs, so all doubled
    precision, recall, _ = pairwise_prf(truth, pred)
    assert precision == pytest.approx(tp / (tp + fp))
    assert recall == pytest.approx(tp / (tp + fn))


# ---------------------------------------------------------------- k-NN graph


def test_knn_excludes_self_and_matches_dot_products():
    emb, _ = identities([30, 20, 10])
    graph = build_knn(emb, k=8)
    assert graph.indices.shape == graph.sims.shape == (60, 8)
    assert graph.indices.dtype == np.int32 and graph.sims.dtype == np.float32
    assert not (graph.indices == np.arange(60)[:, None]).any()
    assert (np.diff(graph.sims, axis=1) <= 1e-6).all()
    expected = np.einsum("ij,ikj->ik", emb, emb[graph.indices])
    np.testing.assert_allclose(graph.sims, expected, atol=1e-5)
    # Exact search: the best neighbour is the most similar other face.
    sim = emb @ emb.T
    np.fill_diagonal(sim, -2)
    np.testing.assert_allclose(graph.sims[:, 0], sim.max(axis=1), atol=1e-5)


def test_knn_duplicates_and_fewer_faces_than_k():
    emb = unit(np.random.default_rng(0).standard_normal((3, 16)))
    emb = np.vstack([emb, emb[:1]])  # face 3 is an exact copy of face 0
    graph = build_knn(emb, k=10)
    assert graph.indices.shape == (4, 10)
    assert graph.indices[0, 0] == 3 and graph.indices[3, 0] == 0
    assert graph.sims[0, 0] == pytest.approx(1.0, abs=1e-6)
    # Only 3 other faces exist: the rest is padding.
    assert (graph.indices[:, 3:] == -1).all() and np.isneginf(graph.sims[:, 3:]).all()
    assert not (graph.indices == np.arange(4)[:, None]).any()


def test_knn_empty_and_single_face():
    empty = build_knn(np.empty((0, 512), np.float16), k=5)
    assert empty.indices.shape == (0, 5)
    one = build_knn(np.ones((1, 8), np.float32), k=5)
    assert (one.indices == -1).all()


@pytest.fixture(scope="module")
def many_faces() -> tuple[np.ndarray, KnnGraph]:
    """Just above exact_max, where "auto" switches to IVF: ~21k faces of identities of 2-250 faces,
    and their exact k-NN graph."""
    sizes = np.random.default_rng(1).integers(2, 250, 170).tolist()
    emb, _ = identities(sizes, dim=64, seed=1)
    assert len(emb) > IdentityConfig().exact_max
    return emb, build_knn(emb, k=16, index="flat")


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_edges_exact_search_finds(index, many_faces):
    emb, exact = many_faces
    approx = build_knn(emb, k=16, index=index)
    exact_edges = _edges(exact, 0.4)
    found = len(exact_edges & _edges(approx, 0.4)) / len(exact_edges)
    assert found >= 0.99, f"{index} found {found:.4f} of the exact graph's edges"


def _edges(graph: KnnGraph, threshold: float) -> set[tuple[int, int]]:
    adjacency = similarity_graph(graph, threshold).tocoo()
    return set(zip(adjacency.row.tolist(), adjacency.col.tolist()))


def test_knn_reads_float16_memmap_in_batches(tmp_path):
    emb, _ = identities([50, 40, 30, 20, 10])
    np.save(tmp_path / "emb.npy", emb.astype(np.float16))
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    # k above the largest identity, so no neighbour list is cut where float16 rounding reorders ties.
    from_map = build_knn(mapped, k=64, batch=17)
    from_array = build_knn(emb, k=64)
    assert _edges(from_map, 0.4) == _edges(from_array, 0.4)
    np.testing.assert_allclose(from_map.sims, from_array.sims, atol=2e-3)


@pytest.mark.skipif(gpu_available(), reason="checks the error raised without a GPU")
def test_asking_for_a_gpu_without_one_fails_clearly():
    with pytest.raises(RuntimeError, match="GPU"):
        build_knn(np.eye(4, dtype=np.float32), k=2, use_gpu=True)


@pytest.mark.skipif(not gpu_available(), reason="needs faiss-gpu and a GPU")
def test_gpu_search_matches_cpu():
    emb, _ = identities([100, 50, 25] * 10)
    cpu = build_knn(emb, k=8, index="flat", use_gpu=False)
    gpu = build_knn(emb, k=8, index="flat", use_gpu=True)
    np.testing.assert_allclose(gpu.sims, cpu.sims, atol=1e-4)


# ---------------------------------------------------------------- clustering


@pytest.mark.parametrize("method", METHODS)
def test_threshold_is_inclusive(method):
    half = np.float32(0.5)
    graph = edge_graph(3, [(0, 1, half), (1, 0, half)])
    assert cluster(graph, method, threshold=0.5).tolist() == [0, 0, 1]
    assert cluster(graph, method, threshold=float(np.nextafter(half, np.float32(1)))).tolist() == [0, 1, 2]


def test_one_sided_neighbour_lists_still_join():
    # Face 1 lists face 0, face 0 does not list face 1 (its k slots went to others): an edge.
    graph = edge_graph(2, [(1, 0, 0.9)])
    for method in METHODS:
        assert cluster(graph, method).tolist() == [0, 0]


@pytest.mark.parametrize("method", METHODS)
def test_all_singletons(method):
    emb = np.eye(40, 64, dtype=np.float32)  # 40 orthogonal faces
    labels = cluster(build_knn(emb, k=8), method)
    assert sorted(labels.tolist()) == list(range(40))
    summary = cluster_summary(emb, labels)
    assert (summary.size == 1).all() and (summary.centre_sim == 1).all() and not summary.outlier.any()


@pytest.mark.parametrize("method", METHODS)
def test_one_huge_identity(method):
    emb, _ = identities([3000], within=0.6)
    labels = cluster(build_knn(emb, k=32), method)
    assert (labels == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_fewer_faces_than_k(method):
    emb, truth = identities([3, 2])
    labels = cluster(build_knn(emb, k=32), method)
    assert pairwise_prf(truth, labels)[2] == 1.0


def test_empty_input():
    emb = np.empty((0, 512), np.float16)
    labels, summary = cluster_faces(emb)
    assert labels.shape == (0,) and labels.dtype == np.int64
    assert summary.size.shape == summary.centre_sim.shape == summary.outlier.shape == (0,)
    for method in METHODS:
        assert cluster(build_knn(emb), method).shape == (0,)


def test_bad_arguments():
    graph = edge_graph(2, [(0, 1, 0.9)])
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(graph, "kmeans")
    with pytest.raises(ValueError, match="threshold"):
        cluster(graph, threshold=0)


def test_labels_are_deterministic_and_numbered_by_size():
    emb, truth = identities([5, 80, 20, 40, 3, 1, 1, 60], seed=4)
    first, _ = cluster_faces(emb)
    second, _ = cluster_faces(emb.copy())
    np.testing.assert_array_equal(first, second)
    sizes = np.bincount(first)
    assert (np.diff(sizes) <= 0).all()
    assert sizes[0] == 80 and pairwise_prf(truth, first)[2] == 1.0


def test_chinese_whispers_does_not_follow_a_bridge_that_chains_components():
    """Two people joined by a thin chain of in-between faces (a morph, or a run of bad
    detections): components merges everyone, Chinese Whispers keeps both people apart."""
    rng = np.random.default_rng(7)
    dim = 64
    a, b = np.eye(dim, dtype=np.float32)[:2]
    noise = unit(rng.standard_normal((80, dim)))
    group_a = unit(np.sqrt(0.8) * a + np.sqrt(0.2) * noise[:40])
    group_b = unit(np.sqrt(0.8) * b + np.sqrt(0.2) * noise[40:])
    angles = np.linspace(0.2, np.pi / 2 - 0.2, 12)  # consecutive chain faces ~0.99 alike
    chain = unit(np.cos(angles)[:, None] * a + np.sin(angles)[:, None] * b)
    emb = np.vstack([group_a, group_b, chain])
    graph = build_knn(emb, k=10)
    components = cluster(graph, "components", threshold=0.5)
    assert len(set(components[:80].tolist())) == 1  # the chain joins A and B
    whispers = cluster(graph, "chinese_whispers", threshold=0.5)
    assert len(set(whispers[:40].tolist())) == 1 and len(set(whispers[40:80].tolist())) == 1
    assert whispers[0] != whispers[40]


def test_summary_sizes_centre_similarity_and_outliers():
    dim = 8
    e = np.eye(dim, dtype=np.float32)
    stray = unit((e[0] + 3 * e[2])[None])[0]
    emb = np.vstack([e[0], e[0], e[0], stray, e[1], unit((e[1] + e[3])[None])[0], e[4]])
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    summary = cluster_summary(emb.astype(np.float16), labels, outlier_threshold=0.7, batch=3)
    assert summary.size.tolist() == [4, 4, 4, 4, 2, 2, 1]
    centre = unit((3 * e[0] + stray)[None])[0]
    np.testing.assert_allclose(summary.centre_sim[:4], emb[:4] @ centre, atol=2e-3)
    assert summary.centre_sim[6] == 1.0
    # The stray face sits at 0.56 from its centre, the others at 0.96; pairs are not judged (size < 3).
    assert summary.outlier.tolist() == [False, False, False, True, False, False, False]


# ---------------------------------------------------------------- real faces


def openpeople_faces() -> tuple[np.ndarray, np.ndarray]:
    """Every face the default analyzer embeds in each person's portraits, selfies, posture shots,
    16-face emotions sheet and 6-view character sheet, labelled with the person id."""
    from facedata.faces.models import load_analyzer

    root = package_dir("openpeople")
    analyzer = load_analyzer(FaceConfig())
    embeddings, people = [], []
    for person in sorted((root / "data" / "curated").glob("P*")):
        for path in sorted((person / "assets").glob("*.jpg")):
            with Image.open(path) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            for face in analyzer.analyze([rgb])[0]:
                if face.embedding is not None:
                    embeddings.append(face.embedding)
                    people.append(person.name)
    return np.stack(embeddings), np.array(people)


@pytest.fixture(scope="module")
def real_faces() -> tuple[np.ndarray, np.ndarray]:
    return openpeople_faces()


def test_default_config_clusters_real_people(real_faces):
    emb, people = real_faces
    assert len(emb) > 200 and len(set(people)) == 10
    labels, summary = cluster_faces(emb.astype(np.float16), IdentityConfig())
    metrics = clustering_metrics(people, labels)
    assert metrics["pairwise_f"] >= 0.95, metrics
    mixed = {int(c): sorted(set(people[labels == c])) for c in np.unique(labels) if len(set(people[labels == c])) > 1}
    assert not mixed, f"clusters holding several people: {mixed}"
    # Each person's main cluster is theirs alone and holds most of their faces.
    for person in sorted(set(people)):
        counts = np.bincount(labels[people == person])
        assert counts.max() >= 0.8 * counts.sum()
    assert not summary.outlier.any()
