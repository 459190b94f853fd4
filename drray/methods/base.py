"""What every method shares: the Views a data stream makes of decoded images, and the Method
interface the fit loop drives."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from drray.data.transforms import apply_each, evaluation, train_noise, weak_view

IMAGE, TARGET = "image", "target"  # the keys of a labeled (or evaluation) batch

# step(model, batch) -> (loss, images): what distinguishes one method's training from another's
# (loss, n images) or (loss, n images, {statistic: detached scalar}): see drray.engine.loop
Step = Callable[[torch.nn.Module, dict], tuple]


class Views(abc.ABC):
    """What a data stream makes of each decoded image (uint8 CHW tensors): named uint8 NCHW
    arrays. Every image (and every view of it) draws its own random parameters."""

    @abc.abstractmethod
    def make(self, images: list[torch.Tensor], size: int) -> dict[str, np.ndarray]:
        """The stream's arrays for ``images``, each (len(images), 3, size, size) uint8."""


@dataclass(frozen=True)
class CleanImage(Views):
    """The image as prepared: validation, evaluation, inference."""

    def make(self, images, size):
        return {IMAGE: apply_each(evaluation(), images, size)}


@dataclass(frozen=True)
class NoisyImage(Views):
    """Supervised and student training: flips and colour jitter of strength ``jitter``."""

    jitter: float = 0.4

    def make(self, images, size):
        return {IMAGE: apply_each(train_noise(self.jitter), images, size)}


@dataclass(frozen=True)
class WeakImage(Views):
    """FixMatch's and MixMatch's weak augmentation (flip + translate 12.5%)."""

    def make(self, images, size):
        return {IMAGE: apply_each(weak_view(), images, size)}


class Method(Protocol):
    """A training method as the fit loop and the data pipelines see it."""

    train_views: Views  # the "train" stream: the pool (SimCLR), the labeled subset, pseudo-labels
    unlabeled_views: Views | None  # the "unlabeled" stream of FixMatch / MixMatch, else None

    def step(self, steps_done: int = 0) -> Step:
        """The step function, continuing after ``steps_done`` steps (a resumed run)."""
        ...
