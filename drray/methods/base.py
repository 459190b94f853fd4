"""What every method shares: the Views its training loop makes of a batch's decoded images (on
the training device, drray.data.augment), and the Method interface the fit loop drives."""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from drray.data.augment import NoiseAugment, WeakAugment, as_unit
from drray.data.transforms import normalise

IMAGE, TARGET = "image", "target"  # the keys of a labeled (or evaluation) batch
U_IMAGE = "u_image"  # the unlabeled stream's decoded images (FixMatch, MixMatch), before their views

# step(model, batch) -> (loss, images): what distinguishes one method's training from another's
# (loss, n images) or (loss, n images, {statistic: detached scalar}): see drray.engine.loop
Step = Callable[[torch.nn.Module, dict], tuple]


class Views(abc.ABC):
    """What the training loop makes of a stream's images: the stream ships each decoded image
    once, as uint8 NCHW under ``source``; on the training device, after the batch has moved
    there, :meth:`augment` replaces them with the method's named views, standardised for the
    model. Every image (and every view of it) draws its own random parameters."""

    source: ClassVar[str] = IMAGE

    @abc.abstractmethod
    def views(self, images: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """The named views of ``images`` (uint8 NCHW), float32 in [0, 1] on their device."""

    def augment(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        """``batch`` with its ``source`` images replaced by these views (standardised)."""
        if self.source not in batch:
            raise KeyError(f"{type(self).__name__} makes its views of the batch's {self.source!r} images, but the "
                           f"batch has only {sorted(batch)}: is the stream built from this method's views?")
        out = {key: value for key, value in batch.items() if key != self.source}
        out.update({key: normalise(view) for key, view in self.views(batch[self.source], generator).items()})
        return out


@dataclass(frozen=True)
class CleanImage(Views):
    """The image as prepared: validation, evaluation, inference."""

    def views(self, images, generator):
        return {IMAGE: as_unit(images)}


@dataclass(frozen=True)
class NoisyImage(Views):
    """Supervised and student training: flips and colour jitter of strength ``jitter``."""

    jitter: float = 0.4

    def views(self, images, generator):
        return {IMAGE: NoiseAugment(self.jitter)(images, generator)}


@dataclass(frozen=True)
class WeakImage(Views):
    """FixMatch's and MixMatch's weak augmentation of the labeled images (flip + translate 12.5%)."""

    def views(self, images, generator):
        return {IMAGE: WeakAugment()(images, generator)}


ALIGNMENT_MOMENTUM = 0.99  # ReMixMatch averages the last 128 batches; an EMA at 0.99 weighs ~the last 100


def distribution_aligner(prior: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """FixMatch's and MixMatch's guess correction: with a ``prior`` (the labeled training images'
    positive share, labels the budget already spent), each batch's unlabeled probabilities
    aligned to it by the model's running mean prediction (``drray.losses.align_distribution``);
    None: the guesses as the published method makes them. The running mean is the step
    function's own (per worker, from the first batch on; a resumed run starts it again, and it
    settles within ~100 steps)."""
    if prior is None:
        return lambda p: p
    from drray.losses import align_distribution

    state: dict[str, torch.Tensor] = {}

    def align(p: torch.Tensor) -> torch.Tensor:
        batch_mean = p.detach().float().mean()
        previous = state.get("mean")
        state["mean"] = batch_mean if previous is None else \
            ALIGNMENT_MOMENTUM * previous + (1 - ALIGNMENT_MOMENTUM) * batch_mean
        return align_distribution(p, prior, state["mean"])

    return align


def unlabeled_weight(lambda_u: float, rampup_steps: int, steps_done: int = 0) -> Callable[[], float]:
    """FixMatch's and MixMatch's weight of the unlabeled loss, one call per step: ``lambda_u``
    times the linear ramp over ``rampup_steps`` (:func:`drray.losses.linear_rampup`), counted
    from ``steps_done`` so that a resumed run continues its ramp."""
    from drray.losses import linear_rampup

    steps = itertools.count(steps_done)
    return lambda: lambda_u * linear_rampup(next(steps), rampup_steps)


class Method(Protocol):
    """A training method as the fit loop and the data pipelines see it."""

    train_views: Views  # the "train" stream: the pool (SimCLR), the labeled subset, pseudo-labels
    unlabeled_views: Views | None  # the "unlabeled" stream of FixMatch / MixMatch, else None

    def step(self, steps_done: int = 0) -> Step:
        """The step function, continuing after ``steps_done`` steps (a resumed run)."""
        ...


def augment_batch(method: Method, batch: dict, generator: torch.Generator | None = None) -> dict:
    """A training batch (on the device) with the method's views made of its streams' images:
    the "train" stream's, and the "unlabeled" stream's where the method has one."""
    batch = method.train_views.augment(batch, generator)
    if method.unlabeled_views is not None:
        batch = method.unlabeled_views.augment(batch, generator)
    return batch
