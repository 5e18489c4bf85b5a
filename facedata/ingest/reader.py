"""Ingest: read any supported input, streaming, as normalised sample batches; split them into shards.

Every batch has the same columns, in this order::

    key      string   global row index, zero-padded to 9 digits ("000000042"): stable across reruns
    url      string   stripped; None when the sample has none
    caption  string   stripped; None when missing or empty
    path     string   local file to read instead of downloading (folder input, HF images on disk)
    image    large_binary  embedded image bytes (HF Image columns, WebDataset tars)
    status   string   None: to be fetched or read; otherwise an input problem (records.MISSING_URL,
                      INVALID_URL, DUPLICATE_URL). Rows with a problem are kept, never dropped.
    ...      string   extra columns carried through (InputConfig.extra_cols)

Extra columns are always stored as strings (numbers and booleans in their JSON spelling, nested
values as JSON, bytes decoded as UTF-8 with bad bytes replaced), so every batch and every shard of a
run has one schema whatever the source types are, and files with drifting types cannot break a run.
Extras named like a sample column get the prefix `source_` (a source `status` becomes `source_status`).
With extra_cols None the extras are the columns of the first batch read; a column that first shows up
later (JSONL records, WebDataset json, a second file) is skipped with a warning: list it in
input.extra_cols to keep it.

Memory stays flat in the input size: files are read in batches, and only the URL dedupe set (one
64-bit hash per distinct URL) grows.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from facedata.core import records
from facedata.core.config import InputConfig
from facedata.core.errors import UserError
from facedata.core.run_layout import RunLayout
from facedata.core.shards import write_json

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("key", "url", "caption", "path", "image", "status")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PLAN_FILE = "plan.json"
BATCH_ROWS = 8192

_FILE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".tar": "webdataset"}
_FORMAT_SUFFIX = {fmt: suffix for suffix, fmt in _FILE_FORMATS.items()}
# Files save_to_disk writes at the top of a Dataset / DatasetDict folder.
_HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
_WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Sources that embed image bytes read fewer rows per batch, so a batch stays within a few hundred MB.
_IMAGE_BATCH_ROWS = 256
_SHARD_FILE = re.compile(r"^\d{5,}\.parquet(\.tmp)?$")
# Formats whose input can grow by new files after a run was planned (see plan_shards).
_APPENDABLE = frozenset({"parquet", "csv", "tsv", "jsonl", "webdataset"})


class InputError(UserError):
    """An input problem, phrased as one line that names the file and the column or field."""


@dataclass
class ShardPlan:
    shard_id: int
    path: str  # the shard's input parquet (absolute when plan_dir was)
    n_samples: int


@dataclass(frozen=True)
class _Source:
    format: str
    # Data files in read order; the folder itself for folder and saved HF input; empty for a hub name.
    files: list[Path]


@dataclass
class _Batch:
    """Rows as one reader found them, before keys, cleaning and statuses."""

    source: str  # file (or dataset) the rows came from, for messages
    url: pa.Array | list
    caption: pa.Array | list
    fields: dict[str, pa.Array | list]  # every source column or field, by source name
    path: pa.Array | list | None = None
    image: pa.Array | None = None  # large_binary


# ---------------------------------------------------------------------------------------------
# Finding the input


def _file_format(path: Path) -> str | None:
    return _FILE_FORMATS.get(path.suffix.lower())


# What a file's first bytes say it is, for a format mismatch message.
_KIND_NAMES = {"parquet": "Parquet", "tar": "a tar archive", "gzip": "gzip-compressed data", "zip": "a zip archive",
               "binary": "binary data", "json": "JSON lines", "text": "CSV/TSV text"}
# The kinds each format's files may be (CSV, TSV and tars may be compressed: pyarrow and tarfile
# decompress them).
_FITS = {"parquet": {"parquet"}, "csv": {"text", "gzip"}, "tsv": {"text", "gzip"},
         "jsonl": {"json", "text"}, "webdataset": {"tar", "gzip"}}
_KIND_FORMAT = {"parquet": "parquet", "tar": "webdataset", "json": "jsonl", "text": "csv (or tsv)"}


def _sniff(path: Path) -> str | None:
    """parquet, tar, gzip, zip, binary, json or text from the file's first bytes; None if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if b"\x00" in head:
        return "binary"
    return "json" if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{") else "text"


def _check_format(path: Path, fmt: str) -> None:
    if mismatch := _format_mismatch(path, fmt):
        raise InputError(mismatch)


def _format_mismatch(path: Path, fmt: str) -> str | None:
    """A one-line message when the file's content is not what input.format (or its suffix) says."""
    kind = _sniff(path)
    if kind is None or kind in _FITS.get(fmt, {kind}):
        return None
    fix = f"set input.format: {_KIND_FORMAT[kind]}" if kind in _KIND_FORMAT else "check input.path"
    return f"{path}: read as {fmt}, but the file holds {_KIND_NAMES[kind]}; {fix}"


def _detect_dir_format(root: Path) -> str:
    names = os.listdir(root)
    if any(marker in names for marker in _HF_MARKERS):
        return "hf"
    found = {fmt for name in names if (fmt := _file_format(Path(name))) and (root / name).is_file()}
    if len(found) > 1:
        raise InputError(f"{root}: holds several input formats ({', '.join(sorted(found))}); set input.format")
    return found.pop() if found else "folder"


def _resolve(cfg: InputConfig) -> _Source:
    """The input's format and files, checked to exist and be non-empty."""
    raw = cfg.path
    path = Path(raw).expanduser()
    fmt = cfg.format
    if fmt == "hf":
        return _Source("hf", [path] if path.exists() else [])
    if path.is_dir():
        if fmt == "auto":
            fmt = _detect_dir_format(path)
        if fmt in ("hf", "folder"):
            return _Source(fmt, [path])
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == _FORMAT_SUFFIX[fmt])
        if not files:
            raise InputError(f"{path}: no *{_FORMAT_SUFFIX[fmt]} files in this folder")
    elif path.is_file():
        if fmt == "folder":
            raise InputError(f"{path}: input.format folder needs a folder, this is a file")
        fmt = fmt if fmt != "auto" else _file_format(path) or ""
        if not fmt:
            raise InputError(f"{path}: cannot tell the format from the file name; set input.format")
        files = [path]
    elif any(ch in raw for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(f"{raw}: no files match this pattern")
        if fmt == "folder":
            raise InputError(f"{raw}: input.format folder needs a folder, not a pattern")
        if fmt == "auto":
            found = {_file_format(f) for f in files}
            if len(found) != 1 or None in found:
                kinds = ", ".join(sorted({f.suffix or f.name for f in files}))
                raise InputError(f"{raw}: matches files of several or unknown formats ({kinds}); set input.format")
            fmt = found.pop()
    else:
        raise InputError(f"{raw}: not found (for a Hugging Face hub dataset set input.format: hf)")
    for f in files:
        if f.stat().st_size == 0:
            raise InputError(f"{f}: file is empty")
    return _Source(fmt, files)


def _all_files(source: _Source) -> Iterator[Path]:
    for f in source.files:
        if f.is_dir():
            for dirpath, dirnames, filenames in os.walk(f):
                dirnames.sort()
                for name in sorted(filenames):
                    yield Path(dirpath, name)
        else:
            yield f


def _settings(cfg: InputConfig, source: _Source, samples_per_shard: int) -> str:
    """Every setting that shapes the shards, as JSON."""
    settings = {
        "format": source.format,
        "hub": cfg.path if not source.files else None,
        "url_col": cfg.url_col,
        "caption_col": cfg.caption_col,
        "extra_cols": cfg.extra_cols,
        "hf_split": cfg.hf_split,
        "dedupe_urls": cfg.dedupe_urls,
        "samples_per_shard": samples_per_shard,
    }
    return json.dumps(settings, sort_keys=True)


def _digest(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode())
    return digest.hexdigest()


def _file_entries(source: _Source) -> list[list]:
    """[resolved path, size, mtime_ns] of every input file, in read order."""
    entries = []
    for f in _all_files(source):
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return entries


def _fingerprint(settings: str, files: list[list]) -> str:
    """Identity of a planning: the settings and the input files (path, size, mtime)."""
    return _digest(settings, *(f"{path}\0{size}\0{mtime}\n" for path, size, mtime in files))


# ---------------------------------------------------------------------------------------------
# Value conversion


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (bool, int, float, list, dict)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _text_array(values: list) -> pa.Array:
    texts = [_text(v) for v in values]
    try:
        return pa.array(texts, pa.string())
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\ud800" escape
        return pa.array([t if t is None else t.encode("utf-8", "replace").decode() for t in texts], pa.string())


def _strings(values: pa.Array | pa.ChunkedArray | list) -> pa.Array:
    """Any column as a string array: text kept, bytes decoded (bad UTF-8 replaced), scalars cast, nested as JSON."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, list):
        return _text_array(values)
    kind = values.type
    if pa.types.is_dictionary(kind):
        return _strings(values.dictionary_decode())
    if pa.types.is_string(kind):
        return values
    if pa.types.is_null(kind):
        return pa.nulls(len(values), pa.string())
    if pa.types.is_nested(kind):
        return _text_array(values.to_pylist())
    try:  # text, binary holding valid UTF-8, numbers, booleans, dates
        return values.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _text_array(values.to_pylist())


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname)


def _check_columns(source: str, names: list[str], cfg: InputConfig, kind: str = "column",
                   need_url: bool = True) -> None:
    """InputError unless the configured columns exist; JSON records may lack extras (they are sparse)."""
    wanted = [("url_col", cfg.url_col)] if need_url else []
    if cfg.caption_col is not None:
        wanted.append(("caption_col", cfg.caption_col))
    if kind == "column":
        wanted += [("extra_cols", name) for name in cfg.extra_cols or []]
    for setting, name in wanted:
        if name not in names:
            shown = ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")
            where = "" if kind == "column" else " in the first records"
            fix = f"set input.{setting}" + (" (null: no captions)" if setting == "caption_col" else "")
            raise InputError(f"{source}: {kind} {name!r} not found{where} ({kind}s: {shown}); {fix}")


# ---------------------------------------------------------------------------------------------
# Readers: one per format, each yields _Batch of at most batch_rows rows


def _table_batch(source: str, batch: pa.RecordBatch | pa.Table, cfg: InputConfig) -> _Batch:
    fields = dict(zip(batch.schema.names, batch.columns))
    n = batch.num_rows
    caption = fields[cfg.caption_col] if cfg.caption_col is not None else [None] * n
    return _Batch(source, url=fields[cfg.url_col], caption=caption, fields=fields)


def _read_parquet(cfg: InputConfig, files: list[Path], batch_rows: int) -> Iterator[_Batch]:
    for f in files:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputError(_format_mismatch(f, "parquet")
                             or f"{f}: not a readable Parquet file ({_one_line(err)})") from None
        names = parquet.schema_arrow.names
        _check_columns(str(f), names, cfg)
        columns = None
        if cfg.extra_cols is not None:  # read only what is carried
            caption = [cfg.caption_col] if cfg.caption_col is not None else []
            columns = list(dict.fromkeys([cfg.url_col, *caption, *cfg.extra_cols]))
        with parquet:
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                yield _table_batch(str(f), batch, cfg)


def _read_csv(cfg: InputConfig, files: list[Path], batch_rows: int, delimiter: str) -> Iterator[_Batch]:
    parse = pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    label = "TSV" if delimiter == "\t" else "CSV"
    for f in files:
        _check_format(f, "tsv" if delimiter == "\t" else "csv")
        try:
            names = pacsv.open_csv(f, parse_options=parse).schema.names
            other = "," if delimiter == "\t" else "\t"
            if len(names) == 1 and other in names[0] and len(names[0].split(other)) > 1:
                fmt, wanted = ("tsv", "csv") if delimiter == "\t" else ("csv", "tsv")
                raise InputError(f"{f}: read as {fmt}, but its header line is split by {other!r}; "
                                 f"set input.format: {wanted}")
            _check_columns(str(f), names, cfg)
            # Binary columns: every cell is kept as written and decoded later with bad UTF-8 replaced,
            # so neither type inference nor a stray byte can fail the read.
            convert = pacsv.ConvertOptions(column_types={name: pa.binary() for name in names})
            reader = pacsv.open_csv(f, parse_options=parse, convert_options=convert)
            checked = False
            for batch in reader:
                if not checked and _has_line_break(batch):
                    _check_csv_quotes(f, delimiter)
                    checked = True
                for offset in range(0, batch.num_rows, batch_rows):
                    yield _table_batch(str(f), batch.slice(offset, batch_rows), cfg)
        except pa.ArrowInvalid as err:
            fmt = "tsv" if delimiter == "\t" else "csv"
            raise InputError(_format_mismatch(f, fmt) or f"{f}: not valid {label} ({_one_line(err)})") from None


def _has_line_break(batch: pa.RecordBatch) -> bool:
    """Whether any value holds a line break: a quoted multi-line value, or an unclosed quote that
    swallowed the following rows."""
    return any(pc.any(pc.match_substring_regex(column, "[\r\n]")).as_py() for column in batch.columns)


def _check_csv_quotes(path: Path, delimiter: str) -> None:
    """Read the file strictly (Python's csv, strict=True): an InputError naming the line where a
    quoted value opens that does not close properly. pyarrow reads such a value on to the next
    quote, or to the end of the file, silently turning the rows in between into one caption."""
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            rows = csv.reader(f, delimiter=delimiter, strict=True)
            start = 1
            try:
                for _ in rows:
                    start = rows.line_num + 1
            except csv.Error as err:
                end = rows.line_num
                runs = f" runs on to line {end} and" if end > start else ""
                raise InputError(
                    f"{path}: line {start}: a quoted value that starts on this line{runs} does not close "
                    f"properly ({err}); the rows after it would merge into one value: close the quote, "
                    f'or write a quote inside a value as ""') from None
    finally:
        csv.field_size_limit(limit)


def _record_fields(rows: list[dict]) -> dict[str, list]:
    """Columns of JSON records: the union of their keys, None where a record lacks one."""
    names = dict.fromkeys(name for row in rows for name in row)
    return {name: [row.get(name) for row in rows] for name in names}


def _records_batch(source: str, rows: list[dict], cfg: InputConfig, check: bool) -> _Batch:
    fields = _record_fields(rows)
    if check:
        _check_columns(source, list(fields), cfg, kind="field")
    empty = [None] * len(rows)
    caption = fields.get(cfg.caption_col, empty) if cfg.caption_col is not None else empty
    return _Batch(source, url=fields.get(cfg.url_col, empty), caption=caption, fields=fields)


def _read_jsonl(cfg: InputConfig, files: list[Path], batch_rows: int) -> Iterator[_Batch]:
    for f in files:
        _check_format(f, "jsonl")
        rows: list[dict] = []
        first = True
        with open(f, "rb") as lines:
            for line_no, raw in enumerate(lines, 1):
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{f}: line {line_no}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{f}: line {line_no}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                if len(rows) == batch_rows:
                    yield _records_batch(str(f), rows, cfg, check=first)
                    rows, first = [], False
        if rows:
            yield _records_batch(str(f), rows, cfg, check=first)


def _open_hf(cfg: InputConfig, files: list[Path]):
    import datasets  # heavy import, only for this format

    if files:
        try:
            ds = datasets.load_from_disk(str(files[0]))
        except FileNotFoundError as err:
            raise InputError(f"{files[0]}: not a dataset saved with save_to_disk ({_one_line(err)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                splits = ", ".join(ds)
                raise InputError(f"{files[0]}: split {cfg.hf_split!r} not found (splits: {splits}); set input.hf_split")
            ds = ds[cfg.hf_split]
        return ds
    _check_hub_reachable(cfg)
    try:
        return datasets.load_dataset(cfg.path, split=cfg.hf_split, streaming=True)
    except Exception as err:  # the hub client raises many types (network, auth, unknown split or name)
        reason = _one_line(err)
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            reason += "; HF_HUB_OFFLINE is set: only datasets in the local cache can be opened"
        raise InputError(f"{cfg.path}: cannot open Hugging Face dataset, split {cfg.hf_split!r} ({reason})") from None


def _check_hub_reachable(cfg: InputConfig) -> None:
    """InputError at once when the Hub does not answer: the hub client would retry for about half a
    minute, printing a warning per try, before failing. Off in offline mode (HF_HUB_OFFLINE=1),
    where datasets reads its local cache."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    try:
        httpx.head(constants.ENDPOINT, timeout=5)
    except httpx.HTTPError as err:
        raise InputError(
            f"{cfg.path}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({_one_line(err)}); "
            "set HF_HUB_OFFLINE=1 to read a cached dataset, or give a dataset saved with save_to_disk") from None


def _read_hf(cfg: InputConfig, files: list[Path], batch_rows: int) -> Iterator[_Batch]:
    """Rows of an HF dataset. The first Image column becomes `image` bytes (or `path` when an entry has
    no bytes); further Image columns are not carried."""
    import datasets

    ds = _open_hf(cfg, files)
    source = str(files[0]) if files else f"{cfg.path} (split {cfg.hf_split})"
    image_cols = [name for name, feature in (ds.features or {}).items() if isinstance(feature, datasets.Image)]
    if image_cols:
        batch_rows = min(batch_rows, _IMAGE_BATCH_ROWS)
    first = True
    # Arrow format hands out slices of the stored table: no Python rows, and images stay undecoded
    # {bytes, path} structs.
    for table in ds.with_format("arrow").iter(batch_size=batch_rows):
        text_names = [name for name in table.column_names if name not in image_cols]
        if first:
            _check_columns(source, text_names, cfg, need_url=not image_cols)
            first = False
        fields = {name: table.column(name) for name in text_names}
        empty = [None] * table.num_rows
        image = path = None
        if image_cols:
            struct = table.column(image_cols[0]).combine_chunks()
            image = pc.struct_field(struct, "bytes").cast(pa.large_binary())
            path = pc.if_else(pc.is_valid(image), pa.scalar(None, pa.string()), pc.struct_field(struct, "path"))
        yield _Batch(
            source,
            url=fields.get(cfg.url_col, empty),
            caption=fields[cfg.caption_col] if cfg.caption_col is not None else empty,
            fields=fields,
            path=path,
            image=image,
        )


def _read_folder(root: Path, batch_rows: int) -> Iterator[_Batch]:
    """Image files under root (sorted, hidden files skipped), captioned by a same-stem .txt beside them."""
    paths: list[str] = []
    captions: list[str | None] = []
    for dirpath, dirnames, filenames in os.walk(root.resolve()):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        present = set(filenames)
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES:
                continue
            paths.append(os.path.join(dirpath, name))
            sidecar = os.path.join(dirpath, stem + ".txt")
            captions.append(Path(sidecar).read_bytes().decode("utf-8", "replace") if stem + ".txt" in present else None)
            if len(paths) == batch_rows:
                yield _Batch(str(root), url=[None] * len(paths), caption=captions, fields={}, path=paths)
                paths, captions = [], []
    if paths:
        yield _Batch(str(root), url=[None] * len(paths), caption=captions, fields={}, path=paths)


def _tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Members grouped by WebDataset key (the path up to the first dot of the basename): (key, {ext: data})."""
    key, members = "", {}
    for member in tar:
        if not member.isfile():
            continue
        folder, _, base = member.name.rpartition("/")
        if base.startswith(".") or "." not in base:
            continue
        stem, ext = base.split(".", 1)
        if f"{folder}/{stem}" != key:
            if members:
                yield key, members
            key, members = f"{folder}/{stem}", {}
        members[ext.lower()] = tar.extractfile(member).read()
    if members:
        yield key, members


def _wds_batch(source: str, metas: list[dict], images: list[bytes | None], captions: list[str | None],
               cfg: InputConfig) -> _Batch:
    fields = _record_fields(metas)
    return _Batch(source, url=fields.get(cfg.url_col, [None] * len(metas)), caption=captions, fields=fields,
                  image=pa.array(images, pa.large_binary()))


def _read_webdataset(cfg: InputConfig, files: list[Path], batch_rows: int) -> Iterator[_Batch]:
    """Samples of WebDataset tars: image from jpg/jpeg/png/webp, caption from txt, extras (and the URL
    under input.url_col) from json; a json field named like input.caption_col is not carried (txt is
    the caption). Other members are ignored. Tars are read as streams, one member at a time."""
    batch_rows = min(batch_rows, _IMAGE_BATCH_ROWS)
    for f in files:
        metas: list[dict] = []
        images: list[bytes | None] = []
        captions: list[str | None] = []
        try:
            with tarfile.open(f, mode="r|*") as tar:
                for key, members in _tar_samples(tar):
                    if not {"txt", "json", *_WDS_IMAGE_EXTS} & members.keys():
                        continue  # not a sample (e.g. an index member)
                    meta = {}
                    if "json" in members:
                        try:
                            meta = json.loads(members["json"].decode("utf-8", "replace"))
                        except json.JSONDecodeError as err:
                            raise InputError(f"{f}: {key}.json: not valid JSON ({err.msg})") from None
                        if not isinstance(meta, dict):
                            raise InputError(f"{f}: {key}.json: expected a JSON object, got {type(meta).__name__}")
                    metas.append(meta)
                    images.append(next((members[ext] for ext in _WDS_IMAGE_EXTS if ext in members), None))
                    captions.append(members["txt"].decode("utf-8", "replace") if "txt" in members else None)
                    if len(metas) == batch_rows:
                        yield _wds_batch(str(f), metas, images, captions, cfg)
                        metas, images, captions = [], [], []
        except tarfile.TarError as err:
            raise InputError(_format_mismatch(f, "webdataset")
                             or f"{f}: not a readable tar file ({_one_line(err)})") from None
        if metas:
            yield _wds_batch(str(f), metas, images, captions, cfg)


# ---------------------------------------------------------------------------------------------
# Normalising: keys, cleaned text, statuses, a fixed schema


def _clean(values: pa.Array | list) -> list[str | None]:
    """Stripped strings; empty ones become None."""
    return [(v.strip() or None) if v is not None else None for v in _strings(values).to_pylist()]


def _url_hash(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest(), "little")


class _Normaliser:
    """Turns reader batches into sample tables; holds the state that spans batches."""

    def __init__(self, cfg: InputConfig, first_row: int = 0, extras: list[str] | None = None,
                 seen_urls: set[int] | None = None):
        """An appended planning continues an earlier one: its keys from first_row, the extra
        columns it chose, the URLs it saw (for the dedupe)."""
        self.cfg = cfg
        self.first_row = self.n_rows = first_row
        self.seen_urls: set[int] = seen_urls if seen_urls is not None else set()
        if extras is None and cfg.extra_cols is not None:
            extras = list(cfg.extra_cols)
        self.extras: list[str] | None = extras
        self.skipped: set[str] = set()

    def _url_status(self, url: str | None) -> str | None:
        if url is None:
            return records.MISSING_URL
        if not _is_http_url(url):
            return records.INVALID_URL
        if self.cfg.dedupe_urls:
            url_hash = _url_hash(url)
            if url_hash in self.seen_urls:
                return records.DUPLICATE_URL
            self.seen_urls.add(url_hash)
        return None

    def _extra_names(self, batch: _Batch) -> list[str]:
        own = {self.cfg.url_col, self.cfg.caption_col}
        if self.extras is None:
            self.extras = [name for name in batch.fields if name not in own]
        elif self.cfg.extra_cols is None:
            late = [name for name in batch.fields if name not in own and name not in self.extras
                    and name not in self.skipped]
            if late:
                log.warning("%s: column(s) %s not in the first batch read; not carried (list them in "
                            "input.extra_cols to keep them)", batch.source, ", ".join(late))
                self.skipped.update(late)
        return self.extras

    def __call__(self, batch: _Batch) -> pa.Table:
        urls = _clean(batch.url)
        n = len(urls)
        captions = _clean(batch.caption)
        paths = _strings(batch.path) if batch.path is not None else pa.nulls(n, pa.string())
        image = batch.image if batch.image is not None else pa.nulls(n, pa.large_binary())
        has_local = pc.or_(pc.is_valid(image), pc.is_valid(paths)).to_pylist()
        columns = {
            "key": pa.array([f"{i:09d}" for i in range(self.n_rows, self.n_rows + n)], pa.string()),
            "url": pa.array(urls, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "path": paths,
            "image": image,
            # URL problems only matter for samples that are fetched by URL.
            "status": pa.array([None if local else self._url_status(url) for url, local in zip(urls, has_local)],
                               pa.string()),
        }
        for name in self._extra_names(batch):
            values = batch.fields.get(name)
            out = f"source_{name}" if name in SAMPLE_COLUMNS else name
            columns[out] = _strings(values) if values is not None else pa.nulls(n, pa.string())
        self.n_rows += n
        return pa.table(columns)


def iter_samples(cfg: InputConfig, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Normalised sample batches (at most batch_rows rows each, one schema) with keys and input statuses."""
    return _iter_source(cfg, _resolve(cfg), batch_rows)


def _batches(cfg: InputConfig, source: _Source, batch_rows: int) -> Iterator[_Batch]:
    if source.format == "folder":
        return _read_folder(source.files[0], batch_rows)
    if source.format in ("csv", "tsv"):
        return _read_csv(cfg, source.files, batch_rows, "\t" if source.format == "tsv" else ",")
    reader = {"parquet": _read_parquet, "jsonl": _read_jsonl, "hf": _read_hf, "webdataset": _read_webdataset}
    return reader[source.format](cfg, source.files, batch_rows)


def _iter_source(cfg: InputConfig, source: _Source, batch_rows: int,
                 normalise: _Normaliser | None = None) -> Iterator[pa.Table]:
    batches = _batches(cfg, source, batch_rows)
    normalise = normalise or _Normaliser(cfg)
    for batch in batches:
        if len(batch.url):
            yield normalise(batch)
    if normalise.n_rows == normalise.first_row:
        where = cfg.path if normalise.first_row == 0 else ", ".join(str(f) for f in source.files)
        raise InputError(f"{where}: no samples found{_why_empty(source)}")


def _why_empty(source: _Source) -> str:
    if source.format == "folder":
        return f" (no image files: {', '.join(sorted(IMAGE_SUFFIXES))})"
    if source.format in ("csv", "tsv") and len(source.files) == 1:
        return " (a header line and no rows)"
    if source.format == "parquet" and len(source.files) == 1:
        return " (0 rows)"
    return ""


# ---------------------------------------------------------------------------------------------
# Shard planning


def _write_shards(tables: Iterator[pa.Table], samples_per_shard: int, plan_dir: Path,
                  first_shard: int = 0) -> list[ShardPlan]:
    shards: list[ShardPlan] = []
    writer: pq.ParquetWriter | None = None
    tmp = final = None
    count = 0

    def close() -> None:
        nonlocal writer
        writer.close()
        writer = None
        os.replace(tmp, final)
        shards.append(ShardPlan(first_shard + len(shards), str(final), count))

    try:
        for table in tables:
            offset = 0
            while offset < table.num_rows:
                if writer is None:
                    final = plan_dir / f"{first_shard + len(shards):05d}.parquet"
                    tmp = final.with_name(final.name + ".tmp")
                    writer = pq.ParquetWriter(tmp, table.schema)
                    count = 0
                take = min(samples_per_shard - count, table.num_rows - offset)
                writer.write_table(table.slice(offset, take))
                count += take
                offset += take
                if count == samples_per_shard:
                    close()
        if writer is not None:
            close()
    finally:
        if writer is not None:  # failed mid-shard: release the file; the next run replans
            writer.close()
    return shards


# Inputs up to this size are read whole by check_input; larger ones have the start of each file read.
CHECK_ALL_BYTES = 32 << 20
_checked_inputs: set[str] = set()


def check_input(cfg: InputConfig) -> None:
    """The InputError planning would raise, now: a run checks this before it loads its models and
    starts Prefect (tens of seconds on a cold start), and `facedata serve` before it serves.

    A missing or empty input, a file whose content is not its format, missing columns, rows that
    do not parse (a JSONL line, an unclosed CSV quote): an input of at most CHECK_ALL_BYTES is read
    whole, a larger one up to the first batch of each of its first CHECK_FILES files (a problem
    further in is reported by the planning, with the same message); a Hugging Face dataset has its
    first rows read. An input
    already checked unchanged (same files, sizes, mtimes and settings) is not read again."""
    source = _resolve(cfg)
    key = None
    if source.files:
        entries = _file_entries(source)
        whole = sum(size for _, size, _ in entries) <= CHECK_ALL_BYTES
        key = _fingerprint(_settings(cfg, source, 0), entries) + ("whole" if whole else "start")
        if key in _checked_inputs:
            return
    else:  # a hub dataset: its first rows
        whole = False
    for f in source.files:
        if f.is_file():
            _check_format(f, source.format)
    if whole or source.format in ("folder", "hf"):
        rows = _iter_source(cfg, source, BATCH_ROWS if whole else 64)
        try:
            for _ in rows:
                if not whole:
                    break
        finally:
            rows.close()
    else:
        _peek_files(cfg, source)
    if key is not None:
        _checked_inputs.add(key)


# A large input has at most this many of its files' starts read up front (the planning reads them all).
CHECK_FILES = 64


def _peek_files(cfg: InputConfig, source: _Source) -> None:
    """Read the first CHECK_FILES files up to their first rows; InputError when none has any and
    there are no more files."""
    found = len(source.files) > CHECK_FILES
    for f in source.files[:CHECK_FILES]:
        batches = _batches(cfg, _Source(source.format, [f]), BATCH_ROWS)
        try:
            for batch in batches:
                if len(batch.url):
                    found = True
                    break
        finally:
            batches.close()
    if not found:
        raise InputError(f"{cfg.path}: no samples found{_why_empty(source)}")


def check_run(cfg, run_dir: Path, setting: str = "output.dir") -> None:
    """check_input and check_run_dir for a run of cfg (a Config) in run_dir: what `facedata run`
    and `facedata serve` check before models load and Prefect starts."""
    check_input(cfg.input)
    check_run_dir(run_dir, cfg.input, cfg.shards.samples_per_shard, setting)


def check_run_dir(run_dir: Path, cfg: InputConfig, samples_per_shard: int, setting: str = "output.dir") -> None:
    """An InputError, now, when a run could not work in run_dir: it is a file (or under one), it
    cannot be written, or it holds the run of another input or settings (its plan, _plan/plan.json,
    does not match; an input that only grew by new files is fine). setting names where the path
    came from (--output or output.dir) for the message."""
    run_dir = Path(run_dir)
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == run_dir else f"is under {existing}, which is a file"
        raise InputError(f"{run_dir}: the run directory ({setting}) {what}; choose a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".facedata-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == run_dir else f" (in {existing}, to create it)"
        raise InputError(f"{run_dir}: cannot write the run directory ({setting}){where}: {err.strerror}") from None
    plan_file = RunLayout(run_dir).plan_dir / PLAN_FILE
    if not plan_file.is_file():
        return
    plan = _read_plan(plan_file)
    source = _resolve(cfg)
    settings = _settings(cfg, source, samples_per_shard)
    files = _file_entries(source)
    if plan.get("fingerprint") != _fingerprint(settings, files):
        _appended_files(plan_file, plan, cfg, source, _digest(settings), files)


def plan_shards(cfg: InputConfig, samples_per_shard: int, plan_dir: Path) -> list[ShardPlan]:
    """Split the input into plan_dir/00000.parquet, 00001.parquet, ... of samples_per_shard rows each.

    plan.json is written last: when it exists and matches the input (files, sizes, mtimes, settings),
    the plan is reused without reading the input; when it is missing the planning is redone. An
    input that grew by new files since (a folder or pattern of parquet, CSV, JSONL or tar files that
    a nightly job adds to) gets new shards for the new files only, after the planned ones: the keys
    go on from the last planned one and the URL dedupe remembers the planned URLs. Any other change
    (settings, a planned file changed or removed) is an error: the run dir belongs to that input.
    """
    plan_dir = Path(plan_dir)
    source = _resolve(cfg)
    settings = _settings(cfg, source, samples_per_shard)
    files = _file_entries(source)
    fingerprint = _fingerprint(settings, files)
    settings = _digest(settings)
    plan_file = plan_dir / PLAN_FILE
    if plan_file.exists():
        plan = _read_plan(plan_file)
        if plan.get("fingerprint") == fingerprint:
            return load_plan(plan_dir)
        new_files = _appended_files(plan_file, plan, cfg, source, settings, files)
        planned = load_plan(plan_dir)
        _remove_unplanned(plan_dir, {Path(s.path).name for s in planned})
        normalise = _Normaliser(cfg, first_row=plan["n_samples"], extras=plan["extra_cols"],
                                seen_urls=_planned_urls(planned) if cfg.dedupe_urls else None)
        appended = _write_shards(_iter_source(cfg, _Source(source.format, new_files), BATCH_ROWS, normalise),
                                 samples_per_shard, plan_dir, first_shard=len(planned))
        shards = planned + appended
        log.info("planned %d more samples in %d new shards from %d new files of %s", normalise.n_rows - normalise.first_row,
                 len(appended), len(new_files), cfg.path)
    else:
        plan_dir.mkdir(parents=True, exist_ok=True)
        _remove_unplanned(plan_dir, set())
        normalise = _Normaliser(cfg)
        shards = _write_shards(_iter_source(cfg, source, BATCH_ROWS, normalise), samples_per_shard, plan_dir)
        log.info("planned %d samples in %d shards from %s (%s)", normalise.n_rows, len(shards), cfg.path,
                 source.format)
    plan = {
        "input": cfg.path,
        "format": source.format,
        "fingerprint": fingerprint,
        "settings": settings,
        "files": files,
        "extra_cols": normalise.extras,
        "n_samples": sum(s.n_samples for s in shards),
        "n_shards": len(shards),
        "shards": [{"shard_id": s.shard_id, "file": Path(s.path).name, "n_samples": s.n_samples} for s in shards],
    }
    # Temporary file and rename (shards too): a killed run never leaves a half-written file behind.
    write_json(plan_file, plan)
    return shards


def _appended_files(plan_file: Path, plan: dict, cfg: InputConfig, source: _Source, settings: str,
                    files: list[list]) -> list[Path]:
    """The input files added since the plan was made, in read order, when the input only grew by
    new files; otherwise an InputError saying what changed."""
    another = f"{plan_file}: this run dir belongs to another input or settings (planned from {plan.get('input')})"
    if plan.get("settings") != settings or "files" not in plan or _other_path(plan.get("input"), cfg.path):
        raise InputError(f"{another}; use another output dir or delete this one")
    now = {path: [size, mtime] for path, size, mtime in files}
    for path, size, mtime in plan["files"]:
        if path not in now:
            raise InputError(f"{plan_file}: planned input file {path} was removed; a run's input may only "
                             "grow by new files (use another output dir or delete this one)")
        if now[path] != [size, mtime]:
            raise InputError(f"{plan_file}: planned input file {path} changed (size or mtime); a run's input "
                             "may only grow by new files (use another output dir or delete this one)")
    if source.format not in _APPENDABLE:
        raise InputError(f"{another}: {cfg.path} has new files, and input.format {source.format} cannot add "
                         "them to planned shards; use another output dir or delete this one")
    planned = {path for path, *_ in plan["files"]}
    return [f for f in source.files if str(f.resolve()) not in planned]


def _other_path(planned: str | None, path: str) -> bool:
    """Whether the plan was made from another input path (not the same one spelled otherwise)."""
    return planned is not None and Path(planned).expanduser().resolve() != Path(path).expanduser().resolve()


def _planned_urls(planned: list[ShardPlan]) -> set[int]:
    """Hashes of the planned shards' URLs, so an appended planning drops their repeats."""
    seen: set[int] = set()
    for shard in planned:
        seen.update(_url_hash(url) for url in pq.read_table(shard.path, columns=["url"]).column("url").to_pylist()
                    if url is not None)
    return seen


def _remove_unplanned(plan_dir: Path, keep: set[str]) -> None:
    """Shard files a killed planning left (none of the planned ones) and plan.json temporaries."""
    for stale in plan_dir.iterdir():
        if ((_SHARD_FILE.match(stale.name) and stale.name not in keep)
                or (stale.name.startswith(f".{PLAN_FILE}.") and stale.suffix == ".tmp")):
            stale.unlink()


def _read_plan(plan_file: Path) -> dict:
    try:
        plan = json.loads(plan_file.read_text())
        if not isinstance(plan, dict) or not isinstance(plan.get("shards"), list):
            raise ValueError("no shard list")
    except FileNotFoundError:
        raise InputError(f"{plan_file}: not found; plan the shards first") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{plan_file}: unreadable plan ({_one_line(err)}); delete it to replan") from None
    return plan


def load_plan(plan_dir: Path) -> list[ShardPlan]:
    """The shards of a finished planning, from plan_dir/plan.json."""
    plan_dir = Path(plan_dir)
    plan = _read_plan(plan_dir / PLAN_FILE)
    return [ShardPlan(s["shard_id"], str(plan_dir / s["file"]), s["n_samples"]) for s in plan["shards"]]
