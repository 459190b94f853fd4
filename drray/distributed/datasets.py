"""Ray Data pipelines that feed the training stages: read shards, select rows, decode, emit numpy
batches of uint8 images. Each image crosses the object store once, decoded: its method's views
are made from it in the training loop, on the worker's device (drray.methods.base.Views)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from drray.data.selection import Rows, read_shards
from drray.data.shards import shard_paths
from drray.data.transforms import decode_batch
from drray.distributed.resources import DATA_TASK_CPUS
from drray.methods import CleanImage, Views


@dataclass(frozen=True)
class Selection:
    """Which rows of a prepared set (:class:`drray.data.selection.Rows`: ``prepared``, ``split``,
    ``targets``, ``patients``), and the views the training loop makes of them (the stream ships
    the decoded images under ``views.source``)."""

    prepared: str
    views: Views
    size: int  # the prepared image side (the shape of an empty batch)
    split: str | None = "train"
    targets: dict[str, float] | None = None
    patients: dict[str, str] | None = None

    @property
    def rows(self) -> Rows:
        """The rows alone, which is what a read task gets (without the views: no torch there)."""
        return Rows(self.prepared, self.split, self.targets, self.patients)

    def __post_init__(self):
        object.__setattr__(self, "prepared", self.rows.prepared)  # absolute, as Rows makes it

    @classmethod
    def clean(cls, prepared: str, size: int, **rows) -> Selection:
        """The images as prepared: validation, evaluation, inference."""
        return cls(prepared, CleanImage(), size, **rows)


def to_model_inputs(batch: pa.Table, selection: Selection) -> dict[str, np.ndarray]:
    """Decode the images once, uint8 NCHW under the views' ``source`` key; the views are made
    on the training device."""
    out: dict[str, np.ndarray] = {"image_id": np.asarray(batch.column("image_id").to_pylist(), dtype=object)}
    out[selection.views.source] = decode_batch(batch.column("image").to_pylist(), selection.size)
    if "target" in batch.column_names:
        out["target"] = batch.column("target").to_numpy().astype(np.float32)
    if "patient_id" in batch.column_names:
        out["patient_id"] = np.asarray(batch.column("patient_id").to_pylist(), dtype=object)
    return out


EPOCHS_PER_PASS = 10  # epochs streamed by one execution of a stage's pipeline (see repeat)
MIN_ROWS_PER_PASS = 2000  # ... or more epochs, for a small selection (a labeled subset)
# ... and at most this many rows: Ray Data shuffles every epoch of a pass as soon as the pass
# starts (its inputs are ready) and keeps the shuffled copies in the object store until they are
# read; ten epochs of the paper's 57k EyePACS JPEGs (~30 KB) would be ~17 GB, spilled to disk.
MAX_ROWS_PER_PASS = 50_000


def repeat(ds, times: int):
    """``times`` epochs of ``ds`` as one stream. Ray Data starts a pipeline anew for every
    iteration (listing files, reading, scheduling: 7 s here before the first batch of each
    epoch, a quarter of a demo epoch); one execution for several epochs pays that once, and
    every copy still draws its own order (the augmentations are drawn by the training loop)."""
    return ds.union(*[ds] * (times - 1)) if times > 1 else ds


def read_rows(rows: Rows, tasks: int):
    """``rows`` of their prepared set (ids, encoded images, targets: select_rows), one task and
    one block per shard of the manifest's list, at most ``tasks`` at once (and no more than there
    are shards). Not ray.data.read_parquet: its Parquet reader (Ray 2.60) starts 32
    footer-reading actors for a few hundred files (~100 MB each here) and packs up to 128 MiB of
    rows into one read task (100,000 rows of a 32 px pool), which made memory grow with the pool."""
    import ray

    paths = [str(p) for p in shard_paths(rows.prepared)]
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(len(paths), 1)).map_batches(
        read_shards, fn_kwargs={"rows": rows}, batch_size=1, batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=max(1, min(tasks, len(paths)))), num_cpus=DATA_TASK_CPUS)


# A selection of at most this many rows (a labeled subset, a validation set) is read by the
# driver: a Ray Data read costs ~3.5 s of pipeline start-up here, more than reading the shards.
DRIVER_READ_MAX_ROWS = 5000
# Shards a training stream reads at once (once per stage: the rows stay in the object store).
TRAINING_READ_TASKS = 4


def _epochs(selection: Selection, epochs: int, shuffle: bool):
    """``epochs`` epochs of the selection's encoded rows, each in its own random order
    (``shuffle``), as one Ray Dataset: read once and kept in Ray's object store (spilled to disk
    when larger than it), since reading again every epoch costs more than it saves."""
    import ray

    if selection.targets is None or len(selection.targets) > DRIVER_READ_MAX_ROWS:
        ds = read_rows(selection.rows, TRAINING_READ_TASKS).materialize()
        return repeat(ds.random_shuffle() if shuffle else ds, epochs)
    paths = pa.table({"path": [str(p) for p in shard_paths(selection.prepared)]})
    stored = ray.put(read_shards(paths, selection.rows))
    # One block per epoch, each made by a task from the one stored table, in an order drawn when
    # the pass runs (every pass its own). Not a union of shuffled copies: FixMatch's labeled
    # stream repeats a small budget hundreds of times a pass, and Ray could not pickle so deep a
    # plan (a traceback on the console every few seconds).
    return ray.data.range(epochs, override_num_blocks=epochs).map_batches(
        _epoch_of, fn_kwargs={"stored": stored, "shuffle": shuffle}, batch_size=1, batch_format="pyarrow",
        num_cpus=DATA_TASK_CPUS)


def _epoch_of(_: pa.Table, stored, shuffle: bool) -> pa.Table:
    import ray

    table = ray.get(stored)
    return table.take(np.random.default_rng().permutation(table.num_rows)) if shuffle else table


@dataclass(frozen=True)
class Stream:
    """A stage's data stream as data: its rows and views, and how one pass is made. It becomes
    a Ray Dataset (:meth:`build`) where it is iterated: the driver, or a Ray Train worker (a
    plain object is cheap to ship; a Dataset is not: see drray.distributed.train)."""

    selection: Selection
    batch_size: int
    epochs_per_pass: int = 1
    shuffle: bool = True  # rows in a new order every epoch (training); False: as stored (validation)

    def build(self):
        return stage_dataset(self.selection, self.batch_size, self.epochs_per_pass, self.shuffle)


def stage_dataset(selection: Selection, batch_size: int, epochs_per_pass: int = 1, shuffle: bool = True):
    """A Ray Dataset of decoded images for ``selection``: ``epochs_per_pass`` epochs of it, each
    with its rows in a new random order (``shuffle``). Blocks of the worker's ``batch_size`` let
    the worker take batches as they come instead of re-assembling them from smaller blocks.
    """
    # Every epoch shuffles the encoded rows (not decoded tensors) across the whole selection:
    # rows are stored in file order, where a patient's two eyes are neighbours, so shuffling only
    # the order of blocks (as drray did before) kept them in one batch, each other's SimCLR negatives.
    ds = _epochs(selection, epochs_per_pass, shuffle)
    return ds.map_batches(to_model_inputs, fn_kwargs={"selection": selection}, batch_size=batch_size,
                          batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
