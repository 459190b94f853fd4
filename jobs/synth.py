"""``drray synth``: write a synthetic fundus data set in the layout of a real one."""

from __future__ import annotations

from pathlib import Path

from drray.config import SyntheticConfig
from drray.data.synthetic import synthesize
from drray.progress import Progress


def run(out: str | Path, spec: SyntheticConfig, workers: int | None = None) -> dict:
    return synthesize(out, spec.n, style=spec.style, seed=spec.seed, test_n=spec.test_n,
                      original_size=spec.original_size, frame_scale=spec.frame_scale, workers=workers,
                      progress=Progress(f"synth {spec.style} -> {out}"))
