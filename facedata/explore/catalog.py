"""The explore page's queries: one flat row per sample in a DuckDB file, queried by columns.

A run's records are nested (faces, per-face attributes) and spread over shards and steps. On first
open the latest finished records file of every shard is flattened, in DuckDB, into one table of
one row per sample: its shard, the stage that dropped it, the value behind that reason, the
primary face's measurements and attributes as plain columns. The table lives in a DuckDB file in
the cache folder and is rebuilt only when a records file changed (size or mtime). Every page then
asks for counts, one page of rows or one sample: DuckDB reads only the columns a query names and
keeps at most `memory_limit` in memory, so the server's memory does not grow with the run.

Nothing here knows a status by name except to say which stage gives it: a reason declared in
facedata.core.schema takes its step from there; any other (a user's step, a future filter) is found in
the `<step>_status` column that holds it. Column names from files are quoted, values are bound as
parameters: no text from a run is ever pasted into SQL.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from facedata.attributes.vocabulary import ATTRIBUTES
from facedata.core.errors import UserError
from facedata.core.run_layout import RunLayout
from facedata.core.schema import Status

# Images with these statuses are never shown on the page (no thumbnail, image or sample view):
# they are counted in the funnel, nothing more. A filter that flags unsafe content names its
# reason with one of these, and the page hides it without code changes.
HIDDEN_STATUSES = frozenset({"unsafe", "nsfw", "csam", "unsafe_content", "punsafe"})

# The stages that come before the pipeline's steps (their reasons are given while downloading).
EARLY_STAGES = ("input", "download", "image")

# The facets: name shown -> the sample table's column (all VARCHAR, null = not stated).
ATTRIBUTE_FACETS = ("age_band", "gender", "expression", "smiling", "mouth_open", "hair_color", "hair_length",
                    "bangs", "eyeglasses", "hat", "earrings", "necklace", "beard", "pose", "sharpness",
                    "lighting", "resolution")
OTHER_FACETS = ("status", "stage", "split", "n_faces")
FACETS = OTHER_FACETS + ATTRIBUTE_FACETS

INDEX_VERSION = 3  # bump when the table's columns change: old cache files are rebuilt


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class ShardRecords:
    shard_id: int
    file: Path


def latest_records(run_root: Path) -> list[ShardRecords]:
    """Each downloaded shard's records from the latest step that finished it (as open_run reads them)."""
    layout = RunLayout(run_root)
    shards = []
    for stats_file in sorted(layout.step_dir("download").glob("*.stats.json")):
        shard_id = json.loads(stats_file.read_text())["shard_id"]
        step = layout.latest_step(shard_id)
        if step is not None:
            shards.append(ShardRecords(shard_id, layout.records_file(step, shard_id)))
    return shards


def _reason_value_expression() -> str:
    """SQL for the measurement behind a drop reason, as text (the record's `error` detail otherwise)."""
    return """CASE
        WHEN status IN ('no_face', 'too_few_faces', 'too_many_faces') THEN n_faces || ' faces'
        WHEN status = 'face_too_small' THEN 'primary face ' || CAST(round(p_side) AS VARCHAR) || ' px'
        WHEN status = 'face_ratio_too_small' THEN 'face area ' || CAST(round(p_area_ratio, 4) AS VARCHAR) || ' of the image'
        WHEN status = 'face_pose' THEN 'yaw ' || CAST(round(p_yaw, 1) AS VARCHAR) || ' degrees'
        WHEN status = 'too_small' THEN 'shorter side ' || CAST(least(x_orig_width, x_orig_height) AS VARCHAR) || ' px'
        WHEN status = 'bad_aspect' THEN 'aspect ' || CAST(round(greatest(x_orig_width, x_orig_height)
                                           / nullif(least(x_orig_width, x_orig_height), 0), 2) AS VARCHAR)
        WHEN status = 'identity_outlier' THEN 'similarity to centre ' || CAST(round(identity_centre_sim, 3) AS VARCHAR)
        WHEN status = 'too_few_attributes' THEN x_n_valid_labels || ' confident labels'
        WHEN status = 'low_relevance' THEN 'clip score ' || CAST(round(clip_score, 3) AS VARCHAR)
        ELSE error END"""


def build_select(files: list[Path], step_order: list[str]) -> str:
    """The SELECT that flattens the shards' records into the sample table (one row per sample)."""
    columns: dict[str, object] = {}
    for file in files:
        for field in pq.read_schema(file):
            columns.setdefault(field.name, field.type)
    has = set(columns)

    def col(name: str, sql_type: str = "VARCHAR") -> str:
        return quote_ident(name) if name in has else f"CAST(NULL AS {sql_type})"

    primary = "faces[primary_face + 1]" if {"faces", "primary_face"} <= has else None
    described = "face_attributes[1]" if "face_attributes" in has else None
    parts = [
        "CAST(regexp_extract(filename, '(\\d+)\\.parquet$', 1) AS INTEGER) AS shard",
        "file_row_number AS row_in_shard",
        "key", f"{col('url')} AS url", f"{col('caption')} AS caption", f"{col('face_caption')} AS face_caption",
        f"{col('license')} AS license", f"{col('path')} AS path", "status", f"{col('error')} AS error",
        f"{col('width', 'BIGINT')} AS width", f"{col('height', 'BIGINT')} AS height",
        f"{col('ext')} AS ext", f"CAST({col('n_faces', 'INTEGER')} AS VARCHAR) AS n_faces",
        f"{col('split')} AS split", f"{col('identity_id', 'BIGINT')} AS identity_id",
        f"{col('identity_outlier', 'BOOLEAN')} AS identity_outlier",
        f"{col('identity_centre_sim', 'FLOAT')} AS identity_centre_sim",
        f"{col('face_identity_ids', 'BIGINT[]')} AS face_identity_ids",
        f"{col('clip_score', 'FLOAT')} AS clip_score", f"{col('primary_face', 'INTEGER')} AS primary_face",
        # Only for the stage and reason columns (dropped from the table).
        f"{col('orig_width', 'BIGINT')} AS x_orig_width", f"{col('orig_height', 'BIGINT')} AS x_orig_height",
        f"{col('n_valid_labels', 'INTEGER')} AS x_n_valid_labels",
    ]
    # A user's step writes <name>_status: the stage of the reasons it gives.
    user_steps = [s for s in step_order if s not in ("download", "faces", "identity", "captions")
                  and f"{s}_status" in has]
    parts += [f"{quote_ident(s + '_status')} AS {quote_ident('x_status_' + s)}" for s in user_steps]
    for name, sql_type in (("score", "FLOAT"), ("side", "FLOAT"), ("area_ratio", "FLOAT"), ("yaw", "FLOAT"),
                           ("sharpness", "FLOAT"), ("embedding_index", "BIGINT")):
        parts.append(f"{primary}.{quote_ident(name)} AS p_{name}" if primary else f"CAST(NULL AS {sql_type}) AS p_{name}")
    for name in ATTRIBUTE_FACETS:
        value = f'{described}."values".{quote_ident(name)}' if described else None
        if value is None:
            parts.append(f"CAST(NULL AS VARCHAR) AS a_{name}")
        elif ATTRIBUTES[name].kind == "bool":
            parts.append(f"CASE WHEN {value} THEN 'yes' WHEN NOT {value} THEN 'no' END AS a_{name}")
        else:
            parts.append(f"CAST({value} AS VARCHAR) AS a_{name}")
    parts.append(f'{described}."values".age AS a_age' if described else "CAST(NULL AS FLOAT) AS a_age")
    file_list = ", ".join(quote_literal(str(f)) for f in files)
    raw = f"read_parquet([{file_list}], union_by_name = true, filename = true, file_row_number = true)"
    known: dict[str, list[str]] = {}
    for status in Status:
        if status is not Status.OK:
            known.setdefault(status.step, []).append(status.value)
    cases = [f"WHEN status IN ({', '.join(quote_literal(v) for v in values)}) THEN {quote_literal(stage)}"
             for stage, values in known.items()]
    cases.append("WHEN starts_with(status, 'http_') THEN 'download'")
    cases += [f"WHEN {quote_ident('x_status_' + s)} = status THEN {quote_literal(s)}" for s in user_steps]
    stage = f"CASE WHEN status = 'ok' THEN NULL {' '.join(cases)} ELSE 'other' END"
    extras = ["x_orig_width", "x_orig_height", "x_n_valid_labels"] + [f"x_status_{s}" for s in user_steps]
    return (f"SELECT * EXCLUDE ({', '.join(quote_ident(c) for c in extras)}), {stage} AS stage, "
            f"{_reason_value_expression()} AS reason_value FROM (SELECT {', '.join(parts)} FROM {raw})")


# ------------------------------------------------------------------------------------------ catalog

PAGE_SIZE_MAX = 200


def _fingerprint(shards: list[ShardRecords]) -> list:
    return [[s.shard_id, str(s.file), s.file.stat().st_size, s.file.stat().st_mtime_ns] for s in shards]


class Catalog:
    """The sample table of one run, and the queries the page asks."""

    def __init__(self, run_root: Path, cache_dir: Path, memory_limit: str = "256MB", threads: int = 2):
        self.root = Path(run_root)
        self.cache_dir = Path(cache_dir)
        self.layout = RunLayout(self.root)
        self.shards = {s.shard_id: s for s in latest_records(self.root)}
        if not self.shards:
            raise UserError(f"{self.root}: no finished shard in this run directory yet")
        self.step_order = self.layout.step_order()
        self.db_file = self.cache_dir / "samples.duckdb"
        self._lock = threading.Lock()
        self._build_if_stale(memory_limit, threads)
        self.db = duckdb.connect(str(self.db_file), read_only=True,
                                 config={"memory_limit": memory_limit, "threads": threads})

    def _build_if_stale(self, memory_limit: str, threads: int) -> None:
        meta_file = self.cache_dir / "samples.meta.json"
        meta = {"version": INDEX_VERSION, "root": str(self.root.resolve()),
                "shards": _fingerprint(sorted(self.shards.values(), key=lambda s: s.shard_id))}
        try:
            if json.loads(meta_file.read_text()) == meta and self.db_file.exists():
                return
        except (FileNotFoundError, ValueError):
            pass
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.db_file.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        files = [s.file for s in sorted(self.shards.values(), key=lambda s: s.shard_id)]
        with duckdb.connect(str(tmp), config={"memory_limit": memory_limit, "threads": threads}) as con:
            con.execute(f"CREATE TABLE samples AS {build_select(files, self.step_order)} ORDER BY shard, row_in_shard")
            con.execute("CREATE TABLE hidden (status VARCHAR)")
            con.executemany("INSERT INTO hidden VALUES (?)", [[s] for s in sorted(HIDDEN_STATUSES)])
        tmp.replace(self.db_file)
        meta_file.write_text(json.dumps(meta))

    def _cursor(self):
        # One DuckDB cursor per query: the server answers requests on several threads.
        return self.db.cursor()

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        cur = self._cursor()
        cur.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # --- the funnel
    def stage_order(self) -> list[str]:
        return list(EARLY_STAGES) + [s for s in self.step_order if s != "download"] + ["other"]

    def funnel(self) -> dict:
        rows = self.query("SELECT stage, status, count(*) AS n FROM samples GROUP BY ALL")
        total = sum(r["n"] for r in rows)
        by_stage: dict[str, list] = {}
        for r in rows:
            if r["stage"] is not None:
                by_stage.setdefault(r["stage"], []).append({"reason": r["status"], "count": r["n"],
                                                            "hidden": r["status"] in HIDDEN_STATUSES})
        stages, kept = [], total
        order = self.stage_order()
        # A stage with drops that the run's recorded step order does not name still shows (before "other").
        order[-1:-1] = sorted(set(by_stage) - set(order))
        for stage in order:
            reasons = sorted(by_stage.get(stage, []), key=lambda r: (-r["count"], r["reason"]))
            if not reasons and stage in ("other", "input", "image"):
                continue
            kept -= sum(r["count"] for r in reasons)
            stages.append({"stage": stage, "reasons": reasons, "kept": kept})
        return {"total": total, "stages": stages, "ok": kept}

    # --- filters, facets, pages
    @staticmethod
    def where(filters: dict[str, list[str]], text: str | None, extra: list[str] = ()) -> tuple[str, list]:
        """A WHERE clause from facet filters (facet -> accepted values; OR within a facet, AND across)
        and search words (each must occur in the web or the face caption)."""
        clauses, params = list(extra), []
        for facet, values in filters.items():
            if facet not in FACETS or not values:
                continue
            column = f"a_{facet}" if facet in ATTRIBUTE_FACETS else facet
            none = "(none)" in values
            values = [v for v in values if v != "(none)"]
            ors = []
            if values:
                ors.append(f"{column} IN ({', '.join('?' * len(values))})")
                params += values
            if none:
                ors.append(f"{column} IS NULL")
            clauses.append("(" + " OR ".join(ors) + ")")
        for word in (text or "").lower().split()[:8]:
            clauses.append("(contains(lower(caption), ?) OR contains(lower(face_caption), ?))")
            params += [word, word]
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def facets(self, filters: dict[str, list[str]], text: str | None) -> dict:
        """Per facet, the count of each value among the samples that pass every other filter.

        Facet filters alone are cheap comparisons, applied inline in each facet's count. A text
        search scans every caption: it is evaluated once, into a materialised set of the matching
        rows that fail at most one facet filter (no other row counts anywhere), which each facet's
        count then reads. (One GROUPING SETS scan measured slower than either.)"""
        active = {f: v for f, v in filters.items() if f in FACETS and v}
        columns = [f"a_{f}" if f in ATTRIBUTE_FACETS else f for f in FACETS]
        selects, params = [], []
        if not (text or "").split():
            for facet, column in zip(FACETS, columns):
                where, p = self.where({f: v for f, v in active.items() if f != facet}, None)
                selects.append(f"SELECT {quote_literal(facet)} AS facet, CAST({column} AS VARCHAR) AS value, "
                               f"count(*) AS n FROM samples{where} GROUP BY 2")
                params += p
            where, p = self.where(active, None)
            selects.append(f"SELECT '' AS facet, NULL AS value, count(*) AS n FROM samples{where}")
            sql = " UNION ALL ".join(selects)
            params += p
        else:
            mask_sql = []
            for facet, values in active.items():
                clause, p = self.where({facet: values}, None)
                mask_sql.append(f"coalesce({clause.removeprefix(' WHERE ')}, false) AS {quote_ident('m_' + facet)}")
                params += p
            text_where, p = self.where({}, text)
            params += p
            failed = " + ".join(f"CAST(NOT {quote_ident('m_' + f)} AS INTEGER)" for f in active) or "0"
            masks = {f: quote_ident("m_" + f) for f in active}
            for facet, column in zip(FACETS, columns):
                others = [m for f, m in masks.items() if f != facet]
                where = f" WHERE {' AND '.join(others)}" if others else ""
                selects.append(f"SELECT {quote_literal(facet)} AS facet, CAST({column} AS VARCHAR) AS value, "
                               f"count(*) AS n FROM base{where} GROUP BY 2")
            total_where = f" WHERE {' AND '.join(masks.values())}" if masks else ""
            selects.append(f"SELECT '' AS facet, NULL AS value, count(*) AS n FROM base{total_where}")
            sql = (f"WITH base AS MATERIALIZED (SELECT * FROM (SELECT {', '.join(columns + mask_sql)} FROM samples"
                   f"{text_where}) WHERE {failed} <= 1) " + " UNION ALL ".join(selects))
        out: dict[str, list] = {facet: [] for facet in FACETS}
        total = 0
        for r in self.query(sql, params):
            if r["facet"] == "":
                total = r["n"]
            else:
                out[r["facet"]].append({"value": r["value"] if r["value"] is not None else "(none)", "count": r["n"]})
        for facet in out:
            out[facet].sort(key=lambda v: (-v["count"], v["value"]))
        return {"total": total, "facets": out}

    GRID_COLUMNS = ("key, shard, url, path, caption, face_caption, status, stage, reason_value, p_score AS score, "
                    "split, identity_id, identity_outlier, n_faces")

    def samples(self, filters: dict[str, list[str]], text: str | None, page: int, page_size: int) -> dict:
        """One page of the samples that pass the filters, in run order. Hidden statuses are counted
        but their rows never leave the database."""
        page_size = max(1, min(page_size, PAGE_SIZE_MAX))
        where, params = self.where(filters, text)
        counts = self.query(f"SELECT count(*) FILTER (WHERE status NOT IN (SELECT status FROM hidden)) AS shown, "
                            f"count(*) FILTER (WHERE status IN (SELECT status FROM hidden)) AS hidden FROM samples{where}",
                            params)[0]
        shown_where, shown_params = self.where(filters, text, ["status NOT IN (SELECT status FROM hidden)"])
        rows = self.query(f"SELECT {self.GRID_COLUMNS} FROM samples{shown_where} ORDER BY shard, row_in_shard "
                          f"LIMIT ? OFFSET ?", shown_params + [page_size, max(page, 0) * page_size])
        return {"total": counts["shown"], "hidden": counts["hidden"], "page": page, "page_size": page_size,
                "rows": rows}

    def sample_row(self, key: str) -> dict | None:
        rows = self.query("SELECT * FROM samples WHERE key = ?", [key])
        return rows[0] if rows else None

    def identities(self, page: int, page_size: int) -> dict:
        page_size = max(1, min(page_size, PAGE_SIZE_MAX))
        rows = self.query(
            "SELECT identity_id, count(*) AS n, count(*) FILTER (WHERE identity_outlier) AS outliers, "
            "any_value(split) FILTER (WHERE split IS NOT NULL) AS split, "
            "arg_max(key, identity_centre_sim) FILTER (WHERE status NOT IN (SELECT status FROM hidden)) AS cover "
            "FROM samples WHERE identity_id IS NOT NULL GROUP BY identity_id ORDER BY n DESC, identity_id "
            "LIMIT ? OFFSET ?", [page_size, max(page, 0) * page_size])
        total = self.query("SELECT count(DISTINCT identity_id) AS n FROM samples")[0]["n"]
        return {"total": total, "page": page, "rows": rows}

    def identity(self, identity_id: int, limit: int = 500) -> dict:
        """An identity's images (primary face in it, or another face of the image), outliers marked,
        and the near-duplicates it absorbed."""
        base = ("SELECT key, shard, caption, face_caption, status, split, identity_id, identity_outlier, "
                "identity_centre_sim, reason_value FROM samples ")
        hidden = "status NOT IN (SELECT status FROM hidden)"
        members = self.query(base + f"WHERE identity_id = ? AND status <> 'near_duplicate' AND {hidden} "
                             "ORDER BY identity_centre_sim DESC NULLS LAST LIMIT ?", [identity_id, limit])
        other_faces = self.query(base + f"WHERE list_contains(face_identity_ids, ?) AND identity_id IS DISTINCT FROM ? "
                                 f"AND {hidden} LIMIT ?", [identity_id, identity_id, limit])
        duplicates = self.query(base + f"WHERE identity_id = ? AND status = 'near_duplicate' AND {hidden} LIMIT ?",
                                [identity_id, limit])
        counts = self.query("SELECT count(*) AS n, count(*) FILTER (WHERE status IN (SELECT status FROM hidden)) AS hidden "
                            "FROM samples WHERE identity_id = ?", [identity_id])[0]
        return {"identity_id": identity_id, "n": counts["n"], "hidden": counts["hidden"], "members": members,
                "other_faces": other_faces, "near_duplicates": duplicates}

    def primary_embeddings_of(self, identity_id: int) -> list[tuple[int, int]]:
        """(shard, embedding row) of every primary face in an identity."""
        rows = self.query("SELECT shard, p_embedding_index AS e FROM samples WHERE identity_id = ? "
                          "AND p_embedding_index IS NOT NULL", [identity_id])
        return [(r["shard"], r["e"]) for r in rows]

    def close(self) -> None:
        self.db.close()
