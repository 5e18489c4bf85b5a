"""The process task runner: the whole flow through the real CLI with shard tasks in worker processes."""

from __future__ import annotations

import subprocess

import pytest

from facedata.core import records
from tests.conftest import facedata_cmd
from tests.test_flow import check_run_consistent, write_config, write_corpus

pytestmark = pytest.mark.slow


def test_process_runner_records_every_sample(tmp_path, web, web_root, cli_env):
    photos = sorted(p.name for p in web_root.glob("*_studio_portrait.jpg"))[:5]
    rows = [(web.url(name), f"photo {i}") for i, name in enumerate(photos)]
    rows += [(web.url("status/404"), "gone"), (web.url("chelsea.png"), "cat")]
    corpus = write_corpus(tmp_path / "corpus.parquet", rows)
    # Three shards on two workers: a worker takes a second shard, and face tasks run there too.
    cfg = write_config(tmp_path / "run.yaml", corpus, shards={"samples_per_shard": 3},
                       identity={"enabled": False}, output={"contact_sheet": False})
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        facedata_cmd("run", str(cfg), "--output", str(run_dir), "--no-progress", "--set", "runner.kind=process"),
        env=cli_env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = check_run_consistent(run_dir, len(rows))
    status = dict(zip(table.column("caption").to_pylist(), table.column("status").to_pylist()))
    assert status == {**{f"photo {i}": records.OK for i in range(len(photos))},
                      "gone": "http_404", "cat": records.NO_FACE}
    assert len(list((run_dir / "shards").glob("*.tar"))) == 3
