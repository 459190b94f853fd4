"""Checkpoint directories: weights anyone can load safely, plus the state to resume training.

    model.pt   the model's state dict: ``torch.load(path, weights_only=True)``
    state.pt   optimizer, scheduler, scaler, RNG states and the epoch (also weights_only-safe)
    meta.json  what the model is (its ModelSpec), its preprocessing, epoch and metrics
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from drray.artifacts import Legacy
from drray.engine.model import ModelSpec, unwrap

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "state.pt", "meta.json"
# A model folder written before drray marked its output folders (see drray.artifacts).
MODEL_LEGACY = Legacy(MODEL_FILE, frozenset({MODEL_FILE, STATE_FILE, META_FILE, "ema.pt"}))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # this device's generator only: another allocation may have fewer GPUs per node
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    *internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: str | Path, *, model, spec: ModelSpec, epoch: int, metrics: dict,
                    optimizer=None, scheduler=None, scaler=None, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), directory / MODEL_FILE)
    if optimizer is not None:
        torch.save({
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": epoch,
            "rng": rng_state(),
        }, directory / STATE_FILE)
    meta = {"spec": spec.to_dict(), "epoch": epoch, "metrics": metrics, **(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_training_state(directory: str | Path, *, model, optimizer, scheduler, scaler,
                        restore_rng: bool = True) -> tuple[int, dict]:
    """Restore everything a resumed run needs; return the completed epoch and its metrics.

    ``restore_rng=False`` for multi-process runs: the saved state is rank 0's, and every rank
    must keep drawing its own random numbers (the caller reseeds them)."""
    directory = Path(directory)
    from drray.models.checkpoints import load_strict

    load_strict(unwrap(model), torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True),
                str(directory / MODEL_FILE))
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:  # e.g. one parameter group before 2026-12-01, two now
        raise ValueError(f"{directory}: this checkpoint's optimizer state was written by an earlier drray "
                         f"({exc}); it cannot be resumed: remove {directory.parent} (drray's own training "
                         f"checkpoints) and the stage trains from its start") from exc
    if state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return int(state["epoch"]), read_meta(directory).get("metrics", {})


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a drray checkpoint ({META_FILE} missing)")
    return json.loads(path.read_text())


def classifier_meta(directory: str | Path) -> dict:
    """The meta of a classifier checkpoint, or an error that names what to pass instead: users
    point commands at stage directories, run directories and SimCLR encoders, not only models."""
    directory = Path(directory)
    if not (directory / META_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a drray model folder ({META_FILE} missing){_instead(directory)}")
    meta = read_meta(directory)
    if meta["spec"]["kind"] != "classifier":
        raise ValueError(f"{directory} is a {meta['spec']['kind']} model (SimCLR pretraining: an encoder without a "
                         f"referable-DR head), not a classifier: pass a fine-tuned model such as RUN/models/student, "
                         f"RUN/models/teacher or RUN/models/supervised")
    return meta


def _instead(directory: Path) -> str:
    """What the user probably meant, from what the folder holds."""
    inside = [name for name in ("best", "model") if (directory / name / META_FILE).is_file()]
    if inside:
        options = " or ".join(f"{directory / name}" for name in inside)
        return (f"; it looks like a stage directory: pass {options} (best: the epoch chosen on validation; "
                f"model: the last epoch)")
    published = sorted(p.parent.name for p in directory.glob(f"models/*/{META_FILE}"))
    if published:
        return "; it looks like a run directory: pass one of its models: " + ", ".join(
            str(directory / "models" / name) for name in published)
    return ": pass a folder holding model.pt and meta.json, e.g. RUN/models/student"


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a checkpoint directory (its spec) and load its weights strictly."""
    from drray.models.checkpoints import load_strict

    meta = read_meta(directory)
    model = ModelSpec.from_dict(meta["spec"]).build(pretrained=False)
    state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    load_strict(model, state, str(Path(directory) / MODEL_FILE))
    return model.to(device), meta
