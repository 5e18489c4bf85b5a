"""The curation flow through the real CLI: a real Prefect run, a real loopback server, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from facedata.core import records
from tests.conftest import REPO, facedata_cmd, read_records

pytestmark = pytest.mark.slow


def write_corpus(path: Path, rows: list[tuple[str, str]]) -> Path:
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), path)
    return path


def write_config(path: Path, corpus: Path, **sections) -> Path:
    cfg = {
        "input": {"path": str(corpus), "format": "parquet"},
        "shards": {"samples_per_shard": 4},
        "download": {"concurrency": 4, "timeout": 2.0, "retries": 1, "backoff": 0.05},
        "image": {"min_side": 64},
        "runner": {"max_workers": 2},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_run_consistent(run_dir: Path, n_expected: int) -> pa.Table:
    """Every planned sample appears exactly once, in the download and the final records; tars hold
    exactly the samples the download kept; later stages keep a subset; stats add up. Returns the
    final records (the caption stage's when it ran, else the identity stage's, else the face stage's)."""
    downloaded = read_records(run_dir / "shards")
    keys = downloaded.column("key").to_pylist()
    assert len(keys) == n_expected == len(set(keys))
    ok_keys = {k for k, s in zip(keys, downloaded.column("status").to_pylist()) if s == records.OK}
    tar_keys: list[str] = []
    for tar_path in sorted((run_dir / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            tar_keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".json")]
    assert sorted(tar_keys) == sorted(ok_keys)
    identity = run_dir / "identity"
    captions = sorted((run_dir / "captions").glob("0*.parquet"))
    if captions and len(captions) == len(list((run_dir / "shards").glob("*.tar"))):
        final = pa.concat_tables([pq.read_table(p) for p in captions], promote_options="permissive")
    elif (identity / "identity.json").exists():
        final = pa.concat_tables([pq.read_table(p) for p in sorted(identity.glob("0*.parquet"))],
                                 promote_options="permissive")
    else:
        final = read_records(run_dir / "faces")
    assert sorted(final.column("key").to_pylist()) == sorted(keys)
    kept = {k for k, s in zip(final.column("key").to_pylist(), final.column("status").to_pylist()) if s == records.OK}
    assert kept <= ok_keys
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["n_samples"] == n_expected and summary["n_ok"] == len(kept)
    download_step = next(step for step in summary["funnel"] if step["stage"] == "download")
    assert download_step["kept"] == len(ok_keys)
    return final


def test_cli_run_records_every_sample(tmp_path, web, web_root, cli_env):
    photos = sorted(p.name for p in web_root.glob("*.jpg"))[:6]
    rows = [(web.url(name), f"photo {i}") for i, name in enumerate(photos)]
    rows += [
        (web.url("status/404"), "gone"),
        (web.url("as/image/jpeg/page.html"), "a web page"),
        (web.url("coffee.png"), "coffee"),
        (rows[0][0], "repeat"),
    ]
    corpus = write_corpus(tmp_path / "corpus.parquet", rows)
    cfg = write_config(tmp_path / "run.yaml", corpus)
    run_dir = tmp_path / "run"
    proc = subprocess.run(facedata_cmd("run", str(cfg), "--output", str(run_dir), "--no-progress"),
                          env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = check_run_consistent(run_dir, len(rows))
    status = dict(zip(table.column("caption").to_pylist(), table.column("status").to_pylist()))
    assert status["gone"] == "http_404"
    assert status["a web page"] == records.NOT_IMAGE
    assert status["repeat"] == records.DUPLICATE_URL
    assert status["coffee"] == records.NO_FACE
    # At 320 px, selfies and portraits show 59-134 px faces; full-length shots 21-28 px.
    for i, name in enumerate(photos):
        assert status[f"photo {i}"] == (records.FACE_TOO_SMALL if "posture" in name else records.OK), name
    assert "http_404" in proc.stdout and "no_face" in proc.stdout and "SCRFD" in proc.stdout
    assert (run_dir / "contact_sheet.png").stat().st_size > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["input"]["path"] == str(corpus)


def test_kill_mid_run_then_resume(tmp_path, web, web_root, cli_env):
    """SIGKILL the flow mid-shard; the rerun keeps finished shards and ends with every sample once."""
    photos = sorted(p.name for p in web_root.glob("*.jpg"))
    # Each request takes 0.3 s, so the run lasts long enough to be killed half-way.
    rows = [(web.url(f"slow/0.3/{name}"), f"photo {i}") for i, name in enumerate(photos)]
    rows.append((web.url("status/500"), "always broken"))
    corpus = write_corpus(tmp_path / "corpus.parquet", rows)
    cfg = write_config(tmp_path / "run.yaml", corpus, download={"concurrency": 2, "retries": 0},
                       runner={"max_workers": 1})
    run_dir = tmp_path / "run"
    shard_dir = run_dir / "shards"
    n_shards = -(-len(rows) // 4)
    cmd = facedata_cmd("run", str(cfg), "--output", str(run_dir), "--no-progress")
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while len(list(shard_dir.glob("*.stats.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.stats.json")}
    assert 2 <= len(done_before) < n_shards, "the kill should land mid-run"
    faces_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "faces").glob("*.stats.json")}
    assert not (run_dir / "summary.json").exists()

    rerun = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, mtime in done_before.items():  # finished shards were skipped, not redone
        assert (shard_dir / name).stat().st_mtime_ns == mtime
    for name, mtime in faces_before.items():
        assert (run_dir / "faces" / name).stat().st_mtime_ns == mtime
    check_run_consistent(run_dir, len(rows))
    downloaded = read_records(shard_dir).column("status").to_pylist()
    assert downloaded.count(records.OK) == len(photos)
    assert len(list((run_dir / "faces").glob("*.stats.json"))) == n_shards
    assert not list(shard_dir.glob(".*.tmp")) and not list((run_dir / "faces").glob(".*.tmp")), "temp files left"


def file_mtimes(run_dir: Path, *patterns: str) -> dict[str, int]:
    """Modification times of the run's files matching the glob patterns, by path in the run."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for pattern in patterns for p in run_dir.glob(pattern)}


@pytest.mark.timeout(600)  # three whole runs
def test_grown_input_runs_only_its_new_shards_and_matches_a_fresh_run(tmp_path, web_root, cli_env):
    """A nightly job adds a file to the input folder. The next run downloads and detects only the
    new shard, redoes the identity stage over all faces, captions again only the old shards whose
    records that changed (without describing their images again), publishes the new version over
    its own earlier one, and ends where one run over the whole input ends."""
    from PIL import Image

    from facedata.demo.server import LoopbackServer

    site = tmp_path / "site"
    site.mkdir()
    portraits = sorted(web_root.glob("*_studio_portrait.jpg"))[:5]
    for photo in portraits:
        (site / photo.name).write_bytes(photo.read_bytes())
    with Image.open(portraits[0]) as im:  # the same shot, larger: it wins the near-duplicate pair
        im.resize((im.width * 3 // 2, im.height * 3 // 2), Image.BICUBIC).save(site / "larger_copy.jpg", quality=90)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with LoopbackServer(site) as web:
        first = [(web.url(p.name), f"photo {i}") for i, p in enumerate(portraits[:4])] + [(web.url("status/404"), "gone")]
        later = [(web.url(portraits[4].name), "photo 4"), (web.url("larger_copy.jpg"), "photo 0 again"),
                 (first[1][0], "photo 1 repeated")]
        write_corpus(corpus / "2026-11-24.parquet", first)
        cfg = write_config(tmp_path / "run.yaml", corpus, shards={"samples_per_shard": 3},
                           attributes={"predictors": ["age_gender", "expression", "geometry"]},
                           output={"contact_sheet": False})

        def run(out: Path, *options: str) -> None:
            proc = subprocess.run(facedata_cmd("run", str(cfg), "--output", str(out), "--no-progress", *options),
                                  env=cli_env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]

        grown, dataset = tmp_path / "grown", tmp_path / "dataset"
        run(grown, "--set", f"publish.to={dataset}")
        first_publish = json.loads((dataset / "manifest.json").read_text())
        before = file_mtimes(grown, "shards/*", "faces/*")
        write_corpus(corpus / "2026-11-25.parquet", later)
        run(grown, "--set", f"publish.to={dataset}")
        run(tmp_path / "fresh")

    # The old shards' download and faces were not redone; the new shard (00002) was.
    after = file_mtimes(grown, "shards/*", "faces/*")
    assert {k: after[k] for k in before} == before
    for stage in ("shards", "faces"):
        assert f"{stage}/00002.stats.json" in after and not any(k.startswith(f"{stage}/00002.") for k in before)
    assert json.loads((grown / "identity" / "identity.json").read_text())["shard_ids"] == [0, 1, 2]
    # Shard 00000 holds photo 0, now the near-duplicate of its larger copy: captioned again with its
    # other images' descriptions reused; the new shard's images were all described now.
    stats = {i: json.loads((grown / "captions" / f"0000{i}.stats.json").read_text()) for i in range(3)}
    assert stats[0]["n_reused"] == stats[0]["n_in"] == 2
    assert stats[2]["n_reused"] == 0 and stats[2]["n_in"] == 2

    final = check_run_consistent(grown, len(first) + len(later))
    fresh = check_run_consistent(tmp_path / "fresh", len(first) + len(later))
    columns = ["key", "status", "face_caption", "identity_id", "split"]
    assert sorted(final.select(columns).to_pylist(), key=lambda r: r["key"]) == \
        sorted(fresh.select(columns).to_pylist(), key=lambda r: r["key"])
    status = dict(zip(final.column("caption").to_pylist(), final.column("status").to_pylist()))
    assert status["photo 0"] == records.NEAR_DUPLICATE and status["photo 0 again"] == records.OK
    assert status["photo 1 repeated"] == records.DUPLICATE_URL
    # The run's dataset folder was replaced by the new version (no --overwrite needed for its own).
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["source_shards"] == ["00000", "00001", "00002"] and first_publish["source_shards"] == ["00000", "00001"]
    assert manifest["n_samples"] == list(status.values()).count(records.OK) == 5


def test_bad_config_gives_one_line_error(tmp_path, cli_env):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("input:\n  path: x.parquet\ndownload:\n  timeout: soon\n")
    proc = subprocess.run(facedata_cmd("run", str(cfg)), env=cli_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(cfg) in lines[0] and "download.timeout" in lines[0] and "number" in lines[0]


def test_missing_input_gives_one_line_error(tmp_path, cli_env):
    cfg = write_config(tmp_path / "run.yaml", tmp_path / "nowhere.parquet")
    proc = subprocess.run(facedata_cmd("run", str(cfg), "--output", str(tmp_path / "run")), env=cli_env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert "nowhere.parquet" in proc.stderr.strip().splitlines()[-1]


def test_missing_input_is_found_before_models_load_or_prefect_starts(tmp_path, monkeypatch):
    from facedata.core.config import config_from_dict
    from facedata.ingest.reader import InputError
    from flows import curate

    def too_late(*args):
        raise AssertionError("the input should be checked first")

    monkeypatch.setattr(curate, "checked_model_infos", too_late)
    monkeypatch.setattr(curate, "start_api_server", too_late)
    (tmp_path / "empty.csv").write_text("")
    for name, error in (("nowhere.parquet", "nowhere.parquet: not found"), ("empty.csv", "empty.csv: file is empty")):
        cfg = config_from_dict({"input": {"path": str(tmp_path / name)}})
        with pytest.raises(InputError, match=error):
            curate.run_curation(cfg, tmp_path / "run")


@pytest.mark.parametrize("kind", ["process", "dask"])
def test_models_checked_in_a_short_lived_process(tmp_path, monkeypatch, kind):
    """Where the tasks run in worker processes, the models are checked in a child process, so the
    flow process does not hold them for the whole run; a bad model is still one line up front."""
    from facedata.faces import models as face_models
    from facedata.core.config import RunnerConfig, config_from_dict
    from flows.curate import run_curation

    def load_here(*args):
        raise AssertionError("models loaded in the flow process")

    monkeypatch.setattr(face_models, "load_models", load_here)  # not in the spawned child
    absent = tmp_path / "absent"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "urls.parquet")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "urls.parquet")}, "runner": {"kind": kind},
                            "faces": {"model_dir": str(absent)}})
    with pytest.raises(ValueError, match="no such folder") as err:
        run_curation(cfg, tmp_path / "run")
    assert str(absent) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()
    # The thread runner's tasks run in this process and reuse its models: they load here.
    with pytest.raises(AssertionError, match="flow process"):
        run_curation(cfg.model_copy(update={"runner": RunnerConfig(kind="thread")}), tmp_path / "run")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["demo", "--help"], ["detect", "--help"]])
def test_help(args):
    proc = subprocess.run(facedata_cmd(*args), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and "usage: facedata" in proc.stdout


GOLDEN = REPO / "tests" / "data" / "demo_golden.json"


def demo_outcome(run_dir: Path) -> dict[str, list]:
    """key -> [status, n_faces, primary face box (whole pixels), identity id, split, face caption] of
    every demo record: what a restructuring of the code must leave unchanged."""
    table = pq.read_table(sorted(run_dir.glob("captions/0*.parquet")))
    out = {}
    for r in table.to_pylist():
        box = [round(v) for v in r["faces"][r["primary_face"]]["bbox"]] if r["primary_face"] is not None else None
        out[r["key"]] = [r["status"], r["n_faces"], box, r.get("identity_id"), r.get("split"), r.get("face_caption")]
    return dict(sorted(out.items()))


def test_demo_records_match_the_golden_copy(demo_run):
    """The demo's records (statuses, boxes, identities, splits, captions) as the last deliberate change
    left them. A change meant to alter them rewrites the copy: FACEDATA_WRITE_GOLDEN=1 pytest -k golden."""
    got = demo_outcome(demo_run)
    if os.environ.get("FACEDATA_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())

    def same(a: list | None, b: list | None) -> bool:  # boxes within 2 px: other CPUs round otherwise
        if a is None or b is None or (a[2] is None) != (b[2] is None):
            return a == b
        boxes_close = a[2] is None or all(abs(x - y) <= 2 for x, y in zip(a[2], b[2]))
        return boxes_close and a[:2] + a[3:] == b[:2] + b[3:]

    changed = {k: (expected.get(k), got.get(k)) for k in sorted(set(expected) | set(got))
               if not same(expected.get(k), got.get(k))}
    assert not changed, f"{len(changed)} demo records differ from {GOLDEN.name}: {list(changed.items())[:3]}"


def test_demo_end_to_end(demo_run):
    """The embedded demo: every corpus entry ends with the status the demo expects for it, and the
    flow published the run."""
    out = demo_run.parent
    stdout = (out / "stdout.txt").read_text()
    corpus = pq.read_table(out / "corpus.parquet").to_pylist()
    table = check_run_consistent(demo_run, len(corpus)).sort_by("key")
    # Keys are the corpus row numbers, so record i is corpus row i.
    assert table.column("key").to_pylist() == [f"{i:09d}" for i in range(len(corpus))]
    for row, status in zip(corpus, table.column("status").to_pylist()):
        assert status == row["expected_status"], row
    kept = [c for c, s in zip(table.column("face_caption").to_pylist(), table.column("status").to_pylist())
            if s == records.OK]
    assert kept and all(kept)
    assert (demo_run / "contact_sheet.png").exists() and (demo_run / "captions_sheet.png").exists()
    assert "timeout" in stdout and "opted_out" in stdout and "captions" in stdout
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert manifest["n_samples"] == len(kept) and (out / "dataset" / "README.md").exists()
    # It ends by training the tiny FLIP model, which fits its training captions where the same
    # architecture at random initialisation does not (eight held-out faces are too few to judge).
    fit = json.loads((out / "flip" / "eval.json").read_text())["train_retrieval"]
    assert fit["text_to_image"]["R@5"]["trained"] > fit["text_to_image"]["R@5"]["random_init"] + 0.2
    assert "train fit" in stdout and (out / "flip" / "loss.png").exists()
