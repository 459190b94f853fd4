"""Binary classification on ``target``: supervised fine-tuning (teacher, student, supervised
baseline; hard 0/1 labels) and distillation (the student on the teacher's pseudo-labels, hard
or soft, with the paper's input noise)."""

from __future__ import annotations

from dataclasses import dataclass

from drray.config import DistillConfig, FinetuneConfig
from drray.losses import binary_cross_entropy
from drray.methods.base import IMAGE, TARGET, NoisyImage, Step

FINETUNE_JITTER = 0.4  # colour-jitter strength of fine-tuning's training noise


@dataclass(frozen=True)
class Classify:
    jitter: float = FINETUNE_JITTER
    unlabeled_views = None

    @classmethod
    def from_config(cls, section: FinetuneConfig | DistillConfig) -> Classify:
        return cls(section.jitter if isinstance(section, DistillConfig) else FINETUNE_JITTER)

    @property
    def train_views(self) -> NoisyImage:
        return NoisyImage(self.jitter)

    def step(self, steps_done: int = 0) -> Step:
        return classify_step


def classify_step(model, batch):
    logits = model(batch[IMAGE])
    return binary_cross_entropy(logits, batch[TARGET]), logits.shape[0]
