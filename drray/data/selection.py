"""Which rows of a prepared set a stream reads, and the reading of them: plain Arrow, no torch.

The functions here run in Ray Data's read tasks. Ray imports a task's function's module in each
worker, so they live apart from the training streams' decoding (drray.distributed.datasets,
which imports torch: ~350 MB a worker); a shard read needs none of that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_COLUMNS_READ = ["image_id", "image", "split"]
WANTS_FEATURES = "wants_features"  # a column: the rows whose penultimate features inference is asked for


@dataclass(frozen=True)
class Rows:
    """Rows of a prepared set: its ``split`` (None: all), those with a ``targets`` entry (None:
    all), carrying their target and, with ``patients``, their patient_id."""

    prepared: str
    split: str | None = "train"
    targets: dict[str, float] | None = None  # image_id -> target; rows without one are left out
    # image_id -> patient_id, carried as a patient_id column (evaluation: per-patient metrics)
    patients: dict[str, str] | None = None

    def __post_init__(self):
        # absolute: the rows are read wherever the stream is built (a Ray worker has its own cwd)
        object.__setattr__(self, "prepared", str(Path(self.prepared).resolve()))


def select_rows(batch: pa.Table, rows: Rows) -> pa.Table:
    """``rows``' part of a shard batch (split and target filter): ids and encoded images, with
    their targets (and patients, when ``rows`` has them)."""
    ids = batch.column("image_id").to_pylist()
    splits = batch.column("split").to_pylist()
    keep = [i for i, (image_id, split) in enumerate(zip(ids, splits, strict=True))
            if (rows.split is None or split == rows.split)
            and (rows.targets is None or image_id in rows.targets)]
    out = batch.select(["image_id", "image"]).take(pa.array(keep, pa.int64()))
    if rows.targets is not None:
        out = out.append_column("target", pa.array([rows.targets[ids[i]] for i in keep], pa.float32()))
    if rows.patients is not None:
        out = out.append_column("patient_id", pa.array([rows.patients[ids[i]] for i in keep], pa.string()))
    return out


def read_shards(paths: pa.Table, rows: Rows) -> pa.Table:
    """``rows``' part of the shards in ``paths`` (a ``path`` column), read one after another."""
    return pa.concat_tables([select_rows(pq.read_table(path, columns=SHARD_COLUMNS_READ), rows)
                             for path in paths.column("path").to_pylist()])


def label_rows(batch: pa.Table, tag: str | None, feature_ids: frozenset[str] | None) -> pa.Table:
    """A set's selected rows with its ``test_set`` tag (when it has one) and, when features are
    asked for in the pipeline, ``wants_features``: true for the rows in ``feature_ids``. Every
    set gets that column then, an empty ``feature_ids`` for a set none of whose rows want them,
    so that all blocks share a schema."""
    if tag is not None:
        batch = batch.append_column("test_set", pa.array([tag] * batch.num_rows, pa.string()))
    if feature_ids is not None:
        wanted = [image_id in feature_ids for image_id in batch.column("image_id").to_pylist()]
        batch = batch.append_column(WANTS_FEATURES, pa.array(wanted, pa.bool_()))
    return batch
