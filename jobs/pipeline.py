"""``drray run pipeline``: the paper's method end to end, plus the supervised baseline (and the
baselines ``pipeline.baselines`` names), then the evaluation and the report.

    prepare -> pretrain -> teacher -> supervised -> baselines -> pseudolabel -> distill
            -> student -> oof -> models -> evaluate -> report

Each stage's output is keyed by its config and inputs (``jobs.stages``), and a finished stage is
skipped: a rerun after a crash redoes only what is missing, a changed downstream setting reuses
the upstream stages. ``RUN/pipeline.json`` records every invocation: which stages ran, which were
skipped, and how long each took.
"""

from __future__ import annotations

from collections.abc import Callable

from drray.config import Config
from jobs.runner import pipeline_steps, run_steps


def run(cfg: Config, on_stage: Callable[[str, str], None] | None = None) -> dict:
    return run_steps(cfg, pipeline_steps(), on_stage)
