"""Batch inference with Ray Data: the teacher's pseudo-labels for an unlabeled pool, and the
final models' predictions (and features) on the test sets.

The pipeline is ``read shards and select rows (CPU tasks, a shard each) -> ModelActor (one
per GPU, or CPU actors)``. The selected rows reach the actor with their images still encoded (a
prepared JPEG is several times smaller than its pixels in Ray's object store: 2.7x at 32 px,
~14x at 299 px), and the actor decodes them: on a GPU in one batched nvJPEG call, elsewhere (or
for PNG, or when nvJPEG refuses an image) with the training streams' CPU decode. The actor
loads its checkpoints once and predicts every batch it is given, one output row per input row:
an image that cannot be decoded gets its reason (``decode_error``) and no probability, and the
job goes on. Penultimate features leave the device only for the rows that ask for them
(``wants_features``: evaluation's t-SNE sample). Results stream to the caller
(``iter_batches``) under a bounded object-store budget (:func:`object_store_budget`), and
nothing holds the whole pool: memory stays flat as the pool grows (bench/inference_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drray.config import ClusterShare
from drray.data.selection import WANTS_FEATURES, label_rows
from drray.data.shards import shard_paths
from drray.data.transforms import decode_images
from drray.distributed.datasets import Selection, read_rows
from drray.distributed.resources import DATA_TASK_CPUS, check_fits, inference_demand

DECODE_ERROR = "decode_error"  # output column: why a row's image could not be decoded ("" when it was)


@dataclass(frozen=True)
class Inference:
    """What runs the models: from a config's InferenceConfig (pseudolabel or evaluate section)."""

    batch_size: int = 128
    concurrency: int = 1
    cpus_per_actor: int = 1
    use_gpu: bool = False
    precision: str = "auto"

    @classmethod
    def of(cls, section, what: str, share: ClusterShare | None = None) -> Inference:
        """From a config section (``what``: its name, for errors); ``concurrency: auto`` becomes
        one actor per GPU of this job's ``share`` of the Ray cluster (drray.distributed.scaling)."""
        from drray.distributed.scaling import AUTO, cluster_shape, inference_actors

        actors = section.concurrency
        if actors == AUTO:
            actors = inference_actors(AUTO, section.cpus_per_actor, section.use_gpu, what, cluster_shape(share))
        return cls(section.batch_size, actors, section.cpus_per_actor, section.use_gpu, section.precision)


def prob_column(model: str) -> str:
    return f"prob_{model}"


def features_column(model: str) -> str:
    return f"features_{model}"


def features_of(cell: bytes) -> np.ndarray:
    """One row's ``features_<model>`` cell as a float32 vector (empty: none were asked for)."""
    return np.frombuffer(cell, np.float32)


class ModelActor:
    """Holds models (name -> checkpoint dir) in eval mode; maps a batch of selected rows, images
    encoded (``image`` bytes), to ``prob_<name>`` (float32, NaN where the image could not be
    decoded) and ``decode_error``, and where the batch has a ``wants_features`` column to
    ``features_<name>``: the penultimate features as float32 bytes for the rows that want them
    (:func:`features_of`), empty bytes for the others (one column type for every batch,
    whichever rows it holds). Other columns (ids, targets, set names) pass through."""

    def __init__(self, models: dict[str, str], inference: Inference, size: int):
        import torch

        from drray.engine.checkpoint import load_model
        from drray.engine.loop import resolve_precision

        torch.set_num_threads(max(1, inference.cpus_per_actor))
        use_cuda = inference.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = resolve_precision(inference.precision, self.device)
        # channels_last on GPUs (tensor cores' layout); on CPUs it measured slower here (bench/gpu.py)
        self.channels_last = use_cuda
        layout = torch.channels_last if use_cuda else torch.contiguous_format
        self.models = {name: load_model(path, self.device)[0].eval().to(memory_format=layout)
                       for name, path in models.items()}
        self.size = size

    def decode(self, encoded: np.ndarray) -> tuple[object, list[str]]:
        """The batch's decodable images and per row why not (see :func:`decode_images`)."""
        return decode_images(list(encoded), self.size, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from drray.engine.predict import predict_batch

        images, errors = self.decode(batch["image"])
        decoded = np.array([not e for e in errors], dtype=bool)
        wants = batch.get(WANTS_FEATURES)
        out = {k: v for k, v in batch.items() if k not in ("image", WANTS_FEATURES)}
        out[DECODE_ERROR] = np.asarray(errors, dtype=object)
        for name, model in self.models.items():
            probs = np.full(len(errors), np.nan, np.float32)
            feats = None
            if decoded.any():
                probs[decoded], feats = predict_batch(
                    model, images, device=self.device, dtype=self.dtype, channels_last=self.channels_last,
                    features=False if wants is None else np.asarray(wants, bool)[decoded])
            out[prob_column(name)] = probs
            if wants is not None:
                out[features_column(name)] = _feature_cells(feats, decoded, wants)
        return out


def _feature_cells(feats: np.ndarray | None, decoded: np.ndarray, wants) -> np.ndarray:
    """Per row, its features' float32 bytes where it wants them and was decoded, else b""."""
    cells = np.full(len(decoded), b"", dtype=object)
    rows = np.flatnonzero(decoded & np.asarray(wants, bool))
    for row, vector in zip(rows, feats if feats is not None else [], strict=True):
        cells[row] = np.ascontiguousarray(vector, np.float32).tobytes()
    return cells


# Shards read at once per model actor: a shard (a few hundred rows) reads in tens of ms, far
# faster than an actor predicts it; more reads at once would only hold more rows in memory.
READ_TASKS_PER_ACTOR = 2


def _inputs(selection: Selection, tag: str | None, feature_ids: frozenset[str] | None, tasks: int):
    """Selected rows of one prepared set, images still encoded, labelled (:func:`label_rows`) in
    the same tasks that read them (Ray Data fuses the two maps)."""
    import ray

    tasks = max(1, min(tasks, len(shard_paths(selection.prepared))))  # as read_rows: no more than shards
    rows = read_rows(selection.rows, tasks)
    if tag is None and feature_ids is None:
        return rows
    return rows.map_batches(label_rows, fn_kwargs={"tag": tag, "feature_ids": feature_ids}, batch_format="pyarrow",
                            compute=ray.data.TaskPoolStrategy(size=tasks), num_cpus=DATA_TASK_CPUS)


def predictions(sets: dict[str | None, Selection], models: dict[str, str], inference: Inference,
                features: dict[str | None, frozenset[str]] | None = None):
    """A Ray Dataset of predictions of every model on every set (tag -> eval-mode Selection),
    in one pipeline: Ray Data's start-up is paid once, each actor loads the models once.
    ``features``: per set tag, the image ids whose penultimate features are wanted (the rows of
    other sets, and the others of that set, get none)."""
    import ray

    sizes = {sel.size for sel in sets.values()}
    if len(sizes) != 1:
        raise ValueError(f"inference: the sets are prepared at different sizes ({sorted(sizes)}); one model "
                         f"input size is needed")
    tasks = READ_TASKS_PER_ACTOR * inference.concurrency
    parts = [_inputs(sel, tag, None if features is None else features.get(tag, frozenset()), tasks)
             for tag, sel in sets.items()]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    resources = {"num_gpus": 1} if inference.use_gpu else {}
    ds = ds.map_batches(
        ModelActor, fn_constructor_kwargs={"models": models, "inference": inference, "size": sizes.pop()},
        batch_size=inference.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=inference.concurrency),
        num_cpus=inference.cpus_per_actor, **resources,
    )
    return limit_object_store(ds, object_store_budget(sets.values(), inference))


# Ray Data lets a pipeline's blocks fill half of Ray's object store (GBs): the reads, far faster
# than the models, ran ahead of them until the pool's rows sat in memory, so memory grew with the
# pool. The budget is rows enough to keep every actor fed (a few of its batches queued, the next
# shards read), whatever the pool's size.
ROWS_IN_FLIGHT_PER_ACTOR = 4096
MIN_OBJECT_STORE_BUDGET = 64 * 2**20  # bytes: a few shards' blocks, however small the images


def object_store_budget(sets, inference: Inference) -> int:
    """Bytes of Ray's object store a prediction pipeline may hold: ROWS_IN_FLIGHT_PER_ACTOR rows
    per actor at the largest bytes per row of ``sets`` (Selections), at least the minimum."""
    per_row = max(bytes_per_row(selection.prepared) for selection in sets)
    return int(max(MIN_OBJECT_STORE_BUDGET, ROWS_IN_FLIGHT_PER_ACTOR * inference.concurrency * per_row))


def bytes_per_row(prepared: str) -> float:
    """A prepared set's shard bytes per image: about what a row takes in the object store, its
    image encoded (the other columns are a few bytes)."""
    from drray.data.shards import read_manifest

    rows = sum(shard["rows"] for shard in read_manifest(prepared)["shards"])
    return sum(path.stat().st_size for path in shard_paths(prepared)) / max(rows, 1)


def limit_object_store(ds, budget: int):
    """``ds`` with its execution limited to ``budget`` bytes of the object store (its own
    context: other pipelines of the process keep Ray Data's defaults)."""
    options = ds.context.execution_options
    options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
    return ds


def check_resources(inference: Inference, what: str) -> None:
    """Fail early, naming the setting, instead of waiting forever for actors that cannot be
    placed (or for read tasks starved by actors holding every CPU)."""
    check_fits(inference_demand(inference.concurrency, inference.cpus_per_actor, inference.use_gpu, what),
               f"lower {what}.concurrency or {what}.cpus_per_actor, or set {what}.use_gpu=false")
