"""How much of the synthetic label is visible in global colour statistics alone?

    python bench/synth_colour.py [--n 1000]

For each style, synthesises n images at demo settings, prepares them at 64 px (in process) and
fits a logistic regression on per-channel colour histograms (5-fold, out of fold). An AUC near
0.5 means colour alone says nothing about referable DR; the lesions must be seen. Bar: < 0.7.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_section  # noqa: E402
from drray.data.fundus import decode_image  # noqa: E402
from drray.data.prepare import PrepareParams, prepare_rows  # noqa: E402
from drray.data.sources import collect_inputs  # noqa: E402
from drray.data.synthetic import synthesize  # noqa: E402
from drray.metrics import colour_histograms, cross_validated_auc  # noqa: E402

LABELS = {"eyepacs": "trainLabels.csv", "messidor2": "messidor_data.csv"}


def measure(style: str, n: int, seed: int) -> tuple[float, int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, n, style=style, seed=seed, frame_scale=0.6)
        items = [i for i in collect_inputs(style, tmp, [LABELS[style]]).items if not i.reject]
        rows = [r for r in prepare_rows([vars(i) for i in items], PrepareParams(size=64)).to_pylist() if r["image"]]
    images = [np.asarray(decode_image(r["image"])) for r in rows]
    targets = np.array([int(r["grade"] >= 2) for r in rows])
    return cross_validated_auc(colour_histograms(images), targets), len(rows), int(targets.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    lines = []
    for style, seed in (("eyepacs", 0), ("messidor2", 1)):
        auc, n, pos = measure(style, args.n, seed)
        print(f"{style}: colour-histogram AUC {auc:.3f} on {n} images ({pos} referable)")
        lines.append(f"| {style} | {n} | {pos} | {auc:.3f} |")
    write_section("synthetic data: colour alone", f"""
`python bench/synth_colour.py --n {args.n}` on {machine()}, {time.strftime('%Y-%m-%d')}.
Logistic regression on per-channel 32-bin colour histograms of prepared 64 px images, 5-fold
out-of-fold ROC AUC for referable DR (bar: < 0.7; 0.5 = no information).

| style | images | referable | colour-histogram AUC |
|---|---|---|---|
{chr(10).join(lines)}
""")


if __name__ == "__main__":
    main()
