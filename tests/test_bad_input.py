"""Bad inputs, configs and run directories stop `facedata run` and `facedata serve` with one line
(`facedata: error: ...`, exit status 2) before the models load and Prefect starts.

The in-process tests replace what comes after the checks (flows.curate's run_curation, which loads
the models and starts Prefect; serve's server check and deployments) with functions that fail the
test when reached; two subprocess tests run the real command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from facedata.ingest import reader
from facedata.core.config import InputConfig
from facedata.ingest.reader import InputError, check_input, check_run_dir, iter_samples, plan_shards
from tests.conftest import facedata_cmd


def _too_late(*args, **kwargs):
    raise AssertionError("reached the run (models, Prefect) before the bad input was refused")


@pytest.fixture
def no_run(monkeypatch, prefect_settings):
    """flows.curate (run_curation) and serve's next steps replaced by _too_late."""
    import flows.deploy

    curate = types.ModuleType("flows.curate")
    curate.run_curation = _too_late
    monkeypatch.setitem(sys.modules, "flows.curate", curate)
    monkeypatch.setattr(flows.deploy, "check_server", _too_late)
    monkeypatch.setattr(flows.deploy, "build_specs", _too_late)
    # `facedata run` sets its own Ctrl-C handler: keep pytest's.
    sigint = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, sigint)


def cli_error(capsys, *argv: str) -> str:
    """The one stderr line of a `facedata` command that must fail with exit status 2, without its prefix."""
    from facedata.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("facedata: error: "), (rc, out, err)
    return lines[0].removeprefix("facedata: error: ")


def write_config(path: Path, input_section: dict, **sections) -> Path:
    path.write_text(yaml.safe_dump({"input": input_section, "shards": {"samples_per_shard": 4}, **sections}))
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


ROWS = "url,caption\nhttp://e.com/1.jpg,one\n"


def _empty_parquet(d: Path) -> tuple[dict, str]:
    p = write_parquet(d / "in.parquet", {"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())})
    return {"path": str(p)}, f"{p}: no samples found (0 rows)"


def _header_only_csv(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text("url,caption\n")
    return {"path": str(p)}, f"{p}: no samples found (a header line and no rows)"


def _empty_folder(d: Path) -> tuple[dict, str]:
    (p := d / "photos").mkdir()
    (p / "notes.txt").write_text("no images here")
    return {"path": str(p)}, f"{p}: no samples found (no image files: .bmp,"


def _no_url_column(d: Path) -> tuple[dict, str]:
    p = write_parquet(d / "in.parquet", {"link": ["http://e.com/1.jpg"], "caption": ["one"]})
    return {"path": str(p)}, f"{p}: column 'url' not found (columns: link, caption); set input.url_col"


def _caption_named_otherwise(d: Path) -> tuple[dict, str]:
    p = write_parquet(d / "in.parquet", {"url": ["http://e.com/1.jpg"], "alt_text": ["one"]})
    return {"path": str(p)}, (f"{p}: column 'caption' not found (columns: url, alt_text); "
                              "set input.caption_col (null: no captions)")


def _csv_named_parquet(d: Path) -> tuple[dict, str]:
    (p := d / "in.parquet").write_text(ROWS)
    return {"path": str(p)}, f"{p}: read as parquet, but the file holds CSV/TSV text; set input.format: csv"


def _csv_declared_parquet(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text(ROWS)
    return {"path": str(p), "format": "parquet"}, f"{p}: read as parquet, but the file holds CSV/TSV text"


def _parquet_named_csv(d: Path) -> tuple[dict, str]:
    p = write_parquet(d / "in.csv", {"url": ["http://e.com/1.jpg"], "caption": ["one"]})
    return {"path": str(p)}, f"{p}: read as csv, but the file holds Parquet; set input.format: parquet"


def _jsonl_named_csv(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text('{"url": "http://e.com/1.jpg", "caption": "one"}\n')
    return {"path": str(p)}, f"{p}: read as csv, but the file holds JSON lines; set input.format: jsonl"


def _csv_declared_tsv(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text(ROWS)
    return {"path": str(p), "format": "tsv"}, (f"{p}: read as tsv, but its header line is split by ','; "
                                               "set input.format: csv")


def _jsonl_broken_on_line_3(d: Path) -> tuple[dict, str]:
    (p := d / "in.jsonl").write_text('{"url": "http://e.com/1.jpg", "caption": "one"}\n\n'
                                     '{"url": "http://e.com/2.jpg", "caption": "two"\n')
    return {"path": str(p)}, f"{p}: line 3: not valid JSON (Expecting ',' delimiter)"


def _csv_quote_never_closed(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text('url,caption\nhttp://e.com/1.jpg,"one\nhttp://e.com/2.jpg,two\n'
                                   'http://e.com/3.jpg,three\n')
    return {"path": str(p)}, f"{p}: line 2: a quoted value that starts on this line runs on to line 4"


def _csv_quote_closed_by_the_next(d: Path) -> tuple[dict, str]:
    (p := d / "in.csv").write_text('url,caption\nhttp://e.com/1.jpg,one\nhttp://e.com/2.jpg,"two\n'
                                   'http://e.com/3.jpg,"three"\nhttp://e.com/4.jpg,four\n')
    return {"path": str(p)}, f"{p}: line 3: a quoted value that starts on this line runs on to line 4"


BAD_INPUTS = [_empty_parquet, _header_only_csv, _empty_folder, _no_url_column, _caption_named_otherwise,
              _csv_named_parquet, _csv_declared_parquet, _parquet_named_csv, _jsonl_named_csv, _csv_declared_tsv,
              _jsonl_broken_on_line_3,
              _csv_quote_never_closed, _csv_quote_closed_by_the_next]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda make: make.__name__.strip("_"))
def test_bad_input_is_one_line_before_the_run(make, tmp_path, no_run, capsys):
    section, expected = make(tmp_path)
    cfg = write_config(tmp_path / "run.yaml", section)
    message = cli_error(capsys, "run", str(cfg), "--output", str(tmp_path / "out"))
    assert message.startswith(expected)
    # The planning (what a scheduled run and a large input's later rows go through) says the same.
    with pytest.raises(InputError) as err:
        plan_shards(InputConfig(**section), 4, tmp_path / "plan")
    assert str(err.value) == message


def test_unreachable_hub_is_one_line_at_once(tmp_path, no_run, capsys, monkeypatch):
    """A hub dataset name while the Hub does not answer: one line, not half a minute of retries."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    name = "someone/no-such-facedata-test-set"
    cfg = write_config(tmp_path / "run.yaml", {"path": name, "format": "hf"})
    message = cli_error(capsys, "run", str(cfg), "--output", str(tmp_path / "out"))
    assert message.startswith(f"{name}: cannot reach the Hugging Face Hub at http://127.0.0.1:9 (")
    assert message.endswith("set HF_HUB_OFFLINE=1 to read a cached dataset, or give a dataset saved with save_to_disk")
    # Offline mode: no Hub to ask; a dataset not in the local cache is one line too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = cli_error(capsys, "run", str(cfg), "--output", str(tmp_path / "out"))
    assert message.startswith(f"{name}: cannot open Hugging Face dataset, split 'train' (")
    assert message.endswith("HF_HUB_OFFLINE is set: only datasets in the local cache can be opened)")


def test_output_that_is_a_file_or_under_one(tmp_path, no_run, capsys):
    cfg = write_config(tmp_path / "run.yaml", {"path": str(write_parquet(
        tmp_path / "in.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]}))})
    (file := tmp_path / "taken").write_text("x")
    assert cli_error(capsys, "run", str(cfg), "--output", str(file)) == (
        f"{file}: the run directory (--output) is a file; choose a folder")
    assert cli_error(capsys, "run", str(cfg), "--output", str(file / "run")) == (
        f"{file / 'run'}: the run directory (--output) is under {file}, which is a file; choose a folder")
    # output.dir from the config is named as such.
    write_config(cfg, {"path": str(tmp_path / "in.parquet")}, output={"dir": str(file)})
    assert cli_error(capsys, "run", str(cfg)) == f"{file}: the run directory (output.dir) is a file; choose a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path, no_run, capsys):
    cfg = write_config(tmp_path / "run.yaml", {"path": str(write_parquet(
        tmp_path / "in.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]}))})
    (locked := tmp_path / "locked").mkdir()
    locked.chmod(0o555)
    try:
        assert cli_error(capsys, "run", str(cfg), "--output", str(locked / "run")) == (
            f"{locked / 'run'}: cannot write the run directory (--output) (in {locked}, to create it): "
            "Permission denied")
        assert cli_error(capsys, "run", str(cfg), "--output", str(locked)).startswith(
            f"{locked}: cannot write the run directory (--output): Permission denied")
    finally:
        locked.chmod(0o755)


def test_unwritable_output_dir_whatever_the_user(tmp_path, no_run, capsys, monkeypatch):
    """The same check where the folder's mode cannot stop the user (root): writing it fails."""
    cfg = write_config(tmp_path / "run.yaml", {"path": str(write_parquet(
        tmp_path / "in.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]}))})

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", dir)

    monkeypatch.setattr(reader.tempfile, "mkstemp", refused)
    (out := tmp_path / "out").mkdir()
    assert cli_error(capsys, "run", str(cfg), "--output", str(out)) == (
        f"{out}: cannot write the run directory (--output): Permission denied")


def test_output_holding_another_inputs_run(tmp_path, no_run, capsys):
    first = write_parquet(tmp_path / "first.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]})
    second = write_parquet(tmp_path / "second.parquet", {"url": ["http://e.com/2.jpg"], "caption": ["two"]})
    plan_shards(InputConfig(path=str(first)), 4, tmp_path / "run" / "_plan")
    cfg = write_config(tmp_path / "run.yaml", {"path": str(second)})
    assert cli_error(capsys, "run", str(cfg), "--output", str(tmp_path / "run")) == (
        f"{tmp_path / 'run' / '_plan' / 'plan.json'}: this run dir belongs to another input or settings "
        f"(planned from {first}); use another output dir or delete this one")
    # The same input (unchanged, or grown by new files) may come back to its run directory.
    check_run_dir(tmp_path / "run", InputConfig(path=str(first)), 4)
    folder = tmp_path / "daily"
    folder.mkdir()
    write_parquet(folder / "a.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]})
    plan_shards(InputConfig(path=str(folder)), 4, tmp_path / "grown" / "_plan")
    write_parquet(folder / "b.parquet", {"url": ["http://e.com/2.jpg"], "caption": ["two"]})
    check_run_dir(tmp_path / "grown", InputConfig(path=str(folder)), 4)
    with pytest.raises(InputError, match="belongs to another input or settings"):
        check_run_dir(tmp_path / "grown", InputConfig(path=str(folder)), 8)


def test_config_with_a_section_given_twice(tmp_path, no_run, capsys):
    parquet = write_parquet(tmp_path / "in.parquet", {"url": ["http://e.com/1.jpg"], "caption": ["one"]})
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"input:\n  path: {parquet}\nfaces:\n  enabled: false\nshards:\n  samples_per_shard: 4\n"
                   "faces:\n  det_size: 320\n")
    assert cli_error(capsys, "run", str(cfg)) == (
        f"{cfg}: line 7: key 'faces' given twice (first on line 3); only one can apply: merge them")


def test_serve_refuses_what_run_refuses(tmp_path, no_run, capsys):
    """An input that does not exist, or another input's run directory: serve says it now, in the
    words of `facedata run`, instead of at the first scheduled run."""
    cfg = write_config(tmp_path / "run.yaml", {"path": str(tmp_path / "nowhere.parquet")})
    run = cli_error(capsys, "run", str(cfg), "--output", str(tmp_path / "out"))
    assert run.startswith(f"{tmp_path / 'nowhere.parquet'}: not found")
    assert cli_error(capsys, "serve", str(cfg), "--output", str(tmp_path / "out")) == run
    section, expected = _csv_quote_never_closed(tmp_path)
    write_config(cfg, section)
    assert cli_error(capsys, "serve", str(cfg), "--output", str(tmp_path / "out")).startswith(expected)
    write_config(cfg, {"path": str(write_parquet(tmp_path / "in.parquet", {"url": ["http://e.com/1.jpg"],
                                                                      "caption": ["one"]}))})
    (tmp_path / "taken").write_text("x")
    assert cli_error(capsys, "serve", str(cfg), "--output", str(tmp_path / "taken")).endswith(
        "the run directory (--output) is a file; choose a folder")


def test_command_line_prints_one_line_and_exits_2(tmp_path, cli_env):
    """The real command line: no traceback, no model loading, no Prefect (no PREFECT_API_URL is set,
    which serve would otherwise report first)."""
    section, expected = _csv_quote_never_closed(tmp_path)
    cfg = write_config(tmp_path / "run.yaml", section)
    for command in ("run", "serve"):
        proc = subprocess.run(facedata_cmd(command, str(cfg), "--output", str(tmp_path / "out")), env=cli_env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(f"facedata: error: {expected}") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_large_input_has_the_start_of_each_file_checked(tmp_path, monkeypatch):
    """Past CHECK_ALL_BYTES only each file's first batch is read up front: a broken line in it is
    found there; one further in is found by the planning, with the line number."""
    monkeypatch.setattr(reader, "CHECK_ALL_BYTES", 0)
    good = '{"url": "http://e.com/1.jpg", "caption": "one"}\n'
    (early := tmp_path / "early.jsonl").write_text(good * 2 + "{oops\n" + good)
    with pytest.raises(InputError, match=f"^{early}: line 3: not valid JSON"):
        check_input(InputConfig(path=str(early)))
    late_line = reader.BATCH_ROWS + 5
    (late := tmp_path / "late.jsonl").write_text(good * (late_line - 1) + "{oops\n")
    check_input(InputConfig(path=str(late)))
    with pytest.raises(InputError, match=f"^{late}: line {late_line}: not valid JSON"):
        list(iter_samples(InputConfig(path=str(late))))
    monkeypatch.setattr(reader, "CHECK_ALL_BYTES", 1 << 20)
    with pytest.raises(InputError, match=f"^{late}: line {late_line}: not valid JSON"):
        check_input(InputConfig(path=str(late)))


def test_large_input_of_many_files_has_the_first_ones_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CHECK_ALL_BYTES", 0)
    monkeypatch.setattr(reader, "CHECK_FILES", 3)
    folder = tmp_path / "daily"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.jsonl").write_text("\n")  # no records
    with pytest.raises(InputError, match=f"^{folder}: no samples found$"):
        check_input(InputConfig(path=str(folder)))
    monkeypatch.setattr(reader, "CHECK_FILES", 2)
    check_input(InputConfig(path=str(folder)))  # c.jsonl, not read, may have records
    (folder / "c.jsonl").write_text("{oops\n")  # past the checked files: the planning finds it
    check_input(InputConfig(path=str(folder)))
    with pytest.raises(InputError, match=f"^{folder / 'c.jsonl'}: line 1: not valid JSON"):
        list(iter_samples(InputConfig(path=str(folder))))
    (folder / "a.jsonl").write_text("{oops\n")
    with pytest.raises(InputError, match=f"^{folder / 'a.jsonl'}: line 1: not valid JSON"):
        check_input(InputConfig(path=str(folder)))
