"""Batch inference with Ray Data: the teacher's pseudo-labels for an unlabeled pool, and the
final models' predictions (and features) on the test sets.

The pipeline is ``read shards -> select + decode (CPU tasks) -> ModelActor (one per GPU, or CPU
actors)``. Decoding runs in tasks, not in the actor, so a GPU actor only does what needs the GPU;
the actor loads its checkpoints once and predicts every batch it is given. Results stream to the
caller (``iter_batches``): nothing holds the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drray.distributed.datasets import Selection, read_selected, to_model_inputs
from drray.distributed.resources import DATA_TASK_CPUS, check_fits, inference_demand


@dataclass(frozen=True)
class Inference:
    """What runs the models: from a config's InferenceConfig (pseudolabel or evaluate section)."""

    batch_size: int = 128
    concurrency: int = 1
    cpus_per_actor: int = 1
    use_gpu: bool = False
    precision: str = "auto"

    @classmethod
    def of(cls, section) -> Inference:
        return cls(section.batch_size, section.concurrency, section.cpus_per_actor, section.use_gpu,
                   section.precision)


def prob_column(model: str) -> str:
    return f"prob_{model}"


def features_column(model: str) -> str:
    return f"features_{model}"


class ModelActor:
    """Holds models (name -> checkpoint dir) in eval mode; maps a batch of uint8 images to
    ``prob_<name>`` (float32) and, with ``features``, ``features_<name>`` (penultimate layer).
    Other columns (ids, targets, set names) pass through."""

    def __init__(self, models: dict[str, str], inference: Inference, features: bool = False):
        import torch

        from drray.engine.checkpoint import load_model
        from drray.engine.loop import resolve_precision

        torch.set_num_threads(max(1, inference.cpus_per_actor))
        use_cuda = inference.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = resolve_precision(inference.precision, self.device)
        self.models = {name: load_model(path, self.device)[0].eval() for name, path in models.items()}
        self.features = features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from drray.engine.predict import predict_batch

        out = {k: v for k, v in batch.items() if k != "image"}
        for name, model in self.models.items():
            probs, feats = predict_batch(model, batch["image"], device=self.device, dtype=self.dtype,
                                         features=self.features)
            out[prob_column(name)] = probs
            if self.features:
                out[features_column(name)] = feats
        return out


def _inputs(selection: Selection, batch_size: int, tag: str | None):
    """Selected, decoded rows of one prepared set (with a ``test_set`` column when tagged)."""

    def decode(batch, selection=selection, tag=tag):
        out = to_model_inputs(batch, selection)
        if tag is not None:
            out["test_set"] = np.full(len(out["image_id"]), tag, dtype=object)
        return out

    return read_selected(selection).map_batches(decode, batch_size=batch_size, batch_format="pyarrow",
                                                num_cpus=DATA_TASK_CPUS)


def predictions(sets: dict[str | None, Selection], models: dict[str, str], inference: Inference,
                features: bool = False):
    """A Ray Dataset of predictions of every model on every set (tag -> eval-mode Selection),
    in one pipeline: Ray Data's start-up is paid once, each actor loads the models once."""
    import ray

    parts = [_inputs(sel, inference.batch_size, tag) for tag, sel in sets.items()]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    resources = {"num_gpus": 1} if inference.use_gpu else {}
    return ds.map_batches(
        ModelActor, fn_constructor_kwargs={"models": models, "inference": inference, "features": features},
        batch_size=inference.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=inference.concurrency),
        num_cpus=inference.cpus_per_actor, **resources,
    )


def check_resources(inference: Inference, what: str) -> None:
    """Fail early, naming the setting, instead of waiting forever for actors that cannot be
    placed (or for decode tasks starved by actors holding every CPU)."""
    check_fits(inference_demand(inference.concurrency, inference.cpus_per_actor, inference.use_gpu, what),
               f"lower {what}.concurrency or {what}.cpus_per_actor, or set {what}.use_gpu=false")
