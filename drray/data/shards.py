"""The prepared-image contract: ``OUT/shards/*.parquet``, ``OUT/rejects.parquet``, ``OUT/manifest.json``.

One row per prepared image in the shards (schema :data:`SHARD_SCHEMA`); one row per input that
was not prepared in the rejects; counts, parameters and content hashes in the manifest.
prepared + rejected = inputs, always. Every image names its patient (``patient_id``, never
null: an image without patient information is its own patient), so that splits, label subsets
and evaluation can keep a patient's two eyes together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from drray.artifacts import Legacy, sha256_file

SHARD_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("image", pa.binary()),  # encoded RGB (JPEG or PNG), size x size
    ("grade", pa.int8()),  # 0-4, null when unlabeled
    ("dme", pa.int8()),  # risk of macular oedema 0-2 (IDRiD; Messidor-2 0-1), null when not graded
    # the patient (drray.data.sources: a patients file, a CSV column, EyePACS 10_left -> 10, or
    # the image itself); not null: writing a row without one fails
    pa.field("patient_id", pa.string(), nullable=False),
    ("source", pa.string()),
    ("split", pa.string()),
    ("path", pa.string()),  # the original file
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("fundus_cx", pa.float32()),  # fundus circle in original pixels
    ("fundus_cy", pa.float32()),
    ("fundus_r", pa.float32()),
])
REJECT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("kind", pa.string()),
    ("reason", pa.string()),
])
INDEX_COLUMNS = ["image_id", "grade", "dme", "patient_id", "source", "split"]  # what sampling and evaluation read
MANIFEST = "manifest.json"
# A prepared set written before drray marked its output folders: what it may hold.
PREPARED_LEGACY = Legacy(MANIFEST, frozenset({MANIFEST, "rejects.parquet", "shards"}))


class PreparedDataError(ValueError):
    """A prepared-data directory is missing or incomplete."""


class ShardWriter:
    """Writes rows into numbered Parquet shards of at most ``rows_per_shard`` rows, in row
    groups of ``rows_per_group`` (small groups would make readers pay per-group overhead;
    groups are also the unit a reader can shuffle and split). Every group but the last holds
    exactly ``rows_per_group`` rows, however the rows arrive: the same rows in the same order
    give the same files, so a data set prepared again has the same content hash (and the stages
    that read it keep their keys), whatever sizes of batches the pipeline happened to deliver."""

    def __init__(self, directory: Path, rows_per_shard: int = 500, rows_per_group: int = 250):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard, self.rows_per_group = rows_per_shard, rows_per_group
        self.shards: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_current = 0
        self._pending: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self._pending.append(table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA))
        if sum(t.num_rows for t in self._pending) >= self.rows_per_group:
            self._flush(whole_groups_only=True)

    def close(self) -> list[dict]:
        self._flush(whole_groups_only=False)
        self._close_current()
        return self.shards

    def _flush(self, whole_groups_only: bool) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        end = table.num_rows - table.num_rows % self.rows_per_group if whole_groups_only else table.num_rows
        self._pending = [table.slice(end)] if end < table.num_rows else []
        start = 0
        while start < end:
            if self._writer is None:
                self._open()
            # one group at a time, never across a shard's end
            take = min(self.rows_per_group, self.rows_per_shard - self._rows_in_current, end - start)
            self._writer.write_table(table.slice(start, take), row_group_size=self.rows_per_group)
            self._rows_in_current += take
            start += take
            if self._rows_in_current >= self.rows_per_shard:
                self._close_current()

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}.parquet"
        self._writer = pq.ParquetWriter(self.directory / name, SHARD_SCHEMA)
        self.shards.append({"file": name, "rows": 0})
        self._rows_in_current = 0

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            path = self.directory / self.shards[-1]["file"]
            self.shards[-1].update(rows=self._rows_in_current, sha256=sha256_file(path))


def write_rejects(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=REJECT_SCHEMA) if rows else REJECT_SCHEMA.empty_table()
    pq.write_table(table, path)


def read_manifest(prepared: str | Path) -> dict:
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise PreparedDataError(
            f"{prepared} holds no prepared data ({MANIFEST} missing): run `drray prepare` into it first"
        )
    return json.loads(path.read_text())


def shard_paths(prepared: str | Path) -> list[Path]:
    """The shard files of a complete prepared directory, as its manifest lists them."""
    manifest = read_manifest(prepared)
    root = Path(prepared) / "shards"
    paths = []
    for shard in manifest["shards"]:
        path = (root / shard["file"]).resolve()
        if root.resolve() not in path.parents:  # manifests never point outside their root
            raise PreparedDataError(f"{prepared}/{MANIFEST}: shard path {shard['file']!r} escapes {root}")
        paths.append(path)
    return paths


def read_index(prepared: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The prepared images' ids, grades, DME, patients, sources and splits, without the pixels."""
    paths = shard_paths(prepared)
    columns = columns or INDEX_COLUMNS
    if not paths:
        return SHARD_SCHEMA.empty_table().select(columns)
    missing = [c for c in columns if c not in pq.read_schema(paths[0]).names]
    if missing:  # a set an older drray prepared
        raise PreparedDataError(f"{prepared}: its shards have no {', '.join(missing)} column (prepared by an "
                                f"older drray): prepare it again (drray prepare, or drray run prepare)")
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)
