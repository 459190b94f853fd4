"""Prediction with a one-logit classifier: probabilities (and penultimate features, when asked)
of uint8 image batches, the same way in training validation, batch inference and drray predict."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from drray.engine.loop import autocast, to_device


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images, *, device: torch.device, dtype: torch.dtype | None,
                  channels_last: bool = False, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Sigmoid probabilities (B,) of a one-logit classifier for a batch of uint8 NCHW images, and
    with ``features`` its penultimate features (B, D) (else None: nothing more leaves the device);
    the model must be in eval mode."""
    x = to_device({"image": images}, device, channels_last)["image"]
    with autocast(device, dtype):
        penultimate = model.features(x)
        logits = model.head(penultimate)
    probs = torch.sigmoid(logits.float()).cpu().numpy()
    return probs, (penultimate.float().cpu().numpy() if features else None)


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[dict], *, device: torch.device,
            dtype: torch.dtype | None, channels_last: bool = False) -> tuple[list[str], np.ndarray]:
    """Sigmoid probabilities of a one-logit classifier, with the batches' image ids."""
    model.eval()
    ids, probs = [], []
    for batch in batches:
        batch_probs, _ = predict_batch(model, batch["image"], device=device, dtype=dtype,
                                       channels_last=channels_last)
        probs.append(batch_probs)
        ids.extend(str(i) for i in batch["image_id"])
    return ids, (np.concatenate(probs) if probs else np.zeros(0, np.float32))
