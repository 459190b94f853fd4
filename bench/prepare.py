"""Preparation throughput: `drray prepare` (Ray Data, reduced-size JPEG decoding) against the
plain loop of the Voets et al. replication (full decode, crop, resize), same images, same run.

    python bench/prepare.py [--n 200] [--cpus 2]

EyePACS-sized synthetic originals (3888x2592 JPEGs) are generated once into bench/out/.
Reports images/s, images/s per core, the ratio per core, and peak memory of each process tree.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, run_measured, write_section  # noqa: E402

OUT = Path(__file__).with_name("out") / "prepare"

# The baseline: the plain loop of the Voets et al. replication, in numpy instead of OpenCV. It
# decodes every JPEG at full size and finds the fundus on the full-size image (threshold, then the
# extent of the bright pixels, as their contour + enclosing circle does). It imports nothing of
# drray's, so a change to drray's own code cannot move the baseline it is measured against.
BASELINE = r"""
import io, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
paths = sorted(Path(sys.argv[1]).glob("*.jpeg"))
start = time.perf_counter()
for p in paths:
    with Image.open(p) as img:
        img = img.convert("RGB")                       # full-size decode (no draft)
    bright = np.asarray(img.convert("L")) > 20         # the fundus, on the full-size image
    ys, xs = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
    cx, cy = (xs[0] + xs[-1]) / 2, (ys[0] + ys[-1]) / 2
    r = max(xs[-1] - xs[0], ys[-1] - ys[0]) / 2
    square = img.crop((int(cx - r), int(cy - r), int(cx + r), int(cy + r)))
    out = square.resize((299, 299), Image.BICUBIC)
    buf = io.BytesIO(); out.save(buf, format="JPEG", quality=95)
print(len(paths) / (time.perf_counter() - start))
"""

# The same loop with drray's circle finder (which shrinks the frame before it looks): the
# baseline this benchmark used until 2026-12-01, kept as a row so older figures stay comparable.
BASELINE_DRRAY_FINDER = r"""
import io, sys, time
from pathlib import Path
from PIL import Image
from drray.data.fundus import find_fundus, crop_to_circle
paths = sorted(Path(sys.argv[1]).glob("*.jpeg"))
start = time.perf_counter()
for p in paths:
    with Image.open(p) as img:
        img = img.convert("RGB")              # full-size decode (no draft)
    circle = find_fundus(img)                  # drray's circle finder (it downsamples internally)
    out = crop_to_circle(img, circle, 299)     # crop the full-size image, resize to 299
    buf = io.BytesIO(); out.save(buf, format="JPEG", quality=95)
print(len(paths) / (time.perf_counter() - start))
"""


DRRAY_LOOP = r"""
import sys, time
from pathlib import Path
from drray.data.prepare import PrepareParams, prepare_rows
paths = sorted(Path(sys.argv[1]).glob("*.jpeg"))
rows = [{"image_id": p.stem, "path": str(p), "grade": None, "source": "eyepacs", "split": "train"} for p in paths]
start = time.perf_counter()
prepare_rows(rows, PrepareParams(size=299))
print(len(paths) / (time.perf_counter() - start))
"""


def ensure_originals(n: int) -> Path:
    raw = OUT / f"orig-{n}"
    if (raw / "trainLabels.csv").is_file():
        return raw
    shutil.rmtree(raw, ignore_errors=True)
    from drray.data.synthetic import synthesize

    print(f"generating {n} EyePACS-sized JPEGs into {raw} ...", flush=True)
    synthesize(raw, n, style="eyepacs", seed=0, original_size=True)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    raw = ensure_originals(args.n)

    base_s, base_rss, base_out = run_measured([sys.executable, "-c", BASELINE, str(raw / "train")],
                                              env={"OMP_NUM_THREADS": "1"})
    base_rate = float(base_out.strip())
    _, finder_rss, finder_out = run_measured([sys.executable, "-c", BASELINE_DRRAY_FINDER, str(raw / "train")],
                                             env={"OMP_NUM_THREADS": "1"})
    finder_rate = float(finder_out.strip())
    _, loop_rss, loop_out = run_measured([sys.executable, "-c", DRRAY_LOOP, str(raw / "train")],
                                         env={"OMP_NUM_THREADS": "1"})
    loop_rate = float(loop_out.strip())

    prepared = OUT / "prepared"
    t0 = time.time()
    drray_s, drray_rss, _ = run_measured([
        sys.executable, "-m", "jobs.cli", "prepare", "--source", "eyepacs", "--images", str(raw),
        "--labels", "trainLabels.csv", "--out", str(prepared), "--size", "299", "--num-cpus", str(args.cpus)])
    manifest = json.loads((prepared / "manifest.json").read_text())
    timing = manifest["timing"]  # ray_start_s, pipeline_s (decode -> shards), total_s (whole job)
    assert manifest["counts"]["prepared"] == args.n, manifest["counts"]
    rate_pipeline = args.n / timing["pipeline_s"]
    # steady state: after the first batch, whose latency includes starting the worker processes
    rate_steady = (args.n - timing["first_batch_rows"]) / (timing["pipeline_s"] - timing["first_batch_s"])
    per_core_steady = (rate_steady / args.cpus) / base_rate
    rate_job = args.n / timing["total_s"]
    rate_cmd = args.n / drray_s
    per_core = (rate_pipeline / args.cpus) / base_rate
    per_core_job = (rate_job / args.cpus) / base_rate
    mean_mb = sum(p.stat().st_size for p in (raw / "train").glob("*.jpeg")) / args.n / 1e6
    print(f"baseline {base_rate:.1f} img/s; drray pipeline {rate_pipeline:.1f} img/s, whole job {rate_job:.1f}, "
          f"whole command {rate_cmd:.1f} ({time.time() - t0:.0f} s); per-core ratio {per_core:.1f}x "
          f"({per_core_job:.1f}x with Ray start-up, {per_core_steady:.1f}x steady state)")
    mib = 1024 * 1024
    write_section("prepare", f"""
`python bench/prepare.py --n {args.n} --cpus {args.cpus}` on {machine()}, {time.strftime('%Y-%m-%d')}.
{args.n} synthetic EyePACS-sized JPEGs (3888x2592, {mean_mb:.2f} MB on average) -> 299 px, JPEG q95 output.

| | images/s | images/s per core | per-core ratio | peak memory (process tree, PSS) |
|---|---|---|---|---|
| plain loop (Voets et al.): full decode, circle on the full-size image, crop, resize (1 process) | {base_rate:.1f} | {base_rate:.1f} | 1.0x | {base_rss / mib:.0f} MiB |
| the same loop with drray's circle finder (the baseline until 2026-12-01) | {finder_rate:.1f} | {finder_rate:.1f} | {finder_rate / base_rate:.2f}x | {finder_rss / mib:.0f} MiB |
| drray's preprocessing (reduced-size decode), same loop, 1 process, no Ray | {loop_rate:.1f} | {loop_rate:.1f} | {loop_rate / base_rate:.1f}x | {loop_rss / mib:.0f} MiB |
| `drray prepare`, Ray Data pipeline, after the first batch (an upper bound: output is kept in input order, so later batches can finish before the first arrives) | {rate_steady:.1f} | {rate_steady / args.cpus:.1f} | **{per_core_steady:.1f}x** | |
| `drray prepare`, Ray Data pipeline ({args.cpus} CPUs, decode -> shards) | {rate_pipeline:.1f} | {rate_pipeline / args.cpus:.1f} | {per_core:.1f}x | {drray_rss / mib:.0f} MiB |
| `drray prepare`, whole job (+ listing, Ray start {timing['ray_start_s']:.1f} s) | {rate_job:.1f} | {rate_job / args.cpus:.1f} | {per_core_job:.1f}x | |
| `drray prepare`, whole command (+ Python and library imports) | {rate_cmd:.1f} | {rate_cmd / args.cpus:.1f} | | |

Target: >= 7x per core against the plain loop. Measured: {loop_rate / base_rate:.1f}x for the preprocessing alone on one core (the
reliable figure; {loop_rate / finder_rate:.1f}x against the loop with drray's finder), {per_core_steady:.1f}x for the Ray pipeline after its first batch (an upper bound), {per_core:.1f}x for
the whole pipeline on {args.n} images, where starting Ray's worker processes weighs heavily. The plain loop decodes every JPEG at full size (~10 MP) before cropping; drray
decodes at 1/8 scale with PIL's `draft` (libjpeg's DCT scaling), which is where almost all of the gain
comes from. What remains is mostly libjpeg's entropy (Huffman) decoding, which DCT scaling cannot skip and
which grows with file size: it bounds the ratio at (baseline time) / (entropy decode time), about 10x here.
The baseline imports nothing of drray's: until 2026-12-01 it used drray's own circle finder, so making
that finder faster (`Image.reduce` instead of a box resize) made the baseline faster and the ratio
smaller without drray getting slower; the second row keeps that loop for comparison. drray's memory includes
Ray's own processes (GCS, raylet, workers): a fixed cost, not one per image. Ray's start-up (~3-5 s)
is amortised over real data sets (tens of thousands of images) but weighs on a few hundred.
""")


if __name__ == "__main__":
    main()
