"""``drray synth``: write a synthetic fundus data set in the layout of a real one.

The folder must be new, empty, or one ``drray synth`` wrote (its mark lists every file): a rerun
removes the files of the last run first, so no stale image outlives a shorter labels file, and
a folder holding anything else is refused before any work.
"""

from __future__ import annotations

from pathlib import Path

from drray.artifacts import clear_own_files, mark_files
from drray.config import SyntheticConfig
from drray.data.synthetic import synthesize
from drray.progress import Progress


def run(out: str | Path, spec: SyntheticConfig, workers: int | None = None) -> dict:
    clear_own_files(out, what="synthetic-data folder")
    summary = synthesize(out, spec.n, style=spec.style, seed=spec.seed, test_n=spec.test_n,
                         original_size=spec.original_size, frame_scale=spec.frame_scale, workers=workers,
                         progress=Progress(f"synth {spec.style} -> {out}"))
    mark_files(out, what="synthetic-data folder")
    return summary
