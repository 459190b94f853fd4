"""Training methods as objects: each owns the views its data streams are made of, the step that
turns a batch into a loss, and the batch keys the two share, and is built from its config
section (``from_config``). Nothing is dispatched on a method's name.

    simclr     SimCLR (stage 1): two views per image, NT-Xent
    classify   supervised fine-tuning (teacher, student, supervised baseline) and distillation
               (the student on pseudo-labels: the same step, its own input noise)
    fixmatch   the FixMatch baseline: labeled weak views + unlabeled weak/strong pairs
    mixmatch   the MixMatch baseline: labeled weak views + K weak views per unlabeled image

A method's views are made in the training loop, on the worker's device, from the decoded images
its streams ship (drray.methods.base.Views, drray.data.augment). A method's objects are frozen
dataclasses: Ray pickles them into its workers.
"""

from drray.methods.base import CleanImage, Method, NoisyImage, Step, Views, WeakImage, augment_batch
from drray.methods.classify import Classify
from drray.methods.fixmatch import FixMatch
from drray.methods.mixmatch import MixMatch
from drray.methods.simclr import SimCLR

__all__ = ["Classify", "CleanImage", "FixMatch", "Method", "MixMatch", "NoisyImage", "SimCLR", "Step", "Views",
           "WeakImage", "augment_batch"]
