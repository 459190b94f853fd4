"""Prediction with a one-logit classifier: probabilities (and penultimate features, for the
rows that ask) of uint8 image batches, the same way in training validation, batch inference and
drray predict."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from drray.engine.loop import autocast, to_device


@torch.no_grad()
def predict_batch(model: torch.nn.Module, images, *, device: torch.device, dtype: torch.dtype | None,
                  channels_last: bool = False,
                  features: bool | np.ndarray = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Sigmoid probabilities (B,) of a one-logit classifier for a batch of uint8 NCHW images (a
    numpy array or tensor, moved to ``device``; or a tensor already on a GPU, e.g. decoded there
    by nvJPEG), and its penultimate features: with ``features`` True every row's (B, D), with a
    boolean mask of the rows only theirs (a t-SNE's sample), else None; nothing more leaves the
    device. The model must be in eval mode."""
    x = to_device({"image": images}, device, channels_last)["image"]  # a GPU tensor stays where it is
    with autocast(device, dtype):
        penultimate = model.features(x)
        logits = model.head(penultimate)
    probs = torch.sigmoid(logits.float()).cpu().numpy()
    if features is False:
        return probs, None
    if features is not True:
        penultimate = penultimate[torch.as_tensor(np.asarray(features, bool), device=penultimate.device)]
    return probs, penultimate.float().cpu().numpy()


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
