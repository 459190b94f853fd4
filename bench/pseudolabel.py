"""Pseudo-labeling throughput and memory: the Ray Data job (read tasks + model actors that
decode, streamed into Parquet) against a bare single-process PyTorch DataLoader loop over the
same shards with the same model, same run; and the job's peak memory at two pool sizes (at pool
scale, with the whole job: bench/inference_memory.py).

    python bench/pseudolabel.py [--config configs/demo.yaml] [--sizes 2000 20000] [--set k=v ...]

The pools are the config's prepared train split, repeated under new ids up to each size (the
cost per image does not depend on which image it is). The teacher is a randomly initialised
classifier of the pretraining backbone at the prepared size: inference costs the same.
Rates are images/s of the inference itself (after Ray and the model are up); memory is the
peak proportional set size of the whole process tree, Ray's processes included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, run_measured, write_section  # noqa: E402

OUT = Path(__file__).with_name("out") / "pseudolabel"

COMMON = r"""
import json, sys, time, dataclasses
from drray.config import load_config
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
pool_dir, teacher = sys.argv[3], sys.argv[4]
cfg = dataclasses.replace(cfg, data=dataclasses.replace(
    cfg.data, eyepacs=dataclasses.replace(cfg.data.eyepacs, prepared=pool_dir)))
"""

RAY_JOB = COMMON + r"""
from pathlib import Path
from drray.distributed.inference import Inference, check_resources
from drray.distributed.runtime import ensure_ray
from jobs import pseudolabel
ensure_ray(cfg.run.num_cpus)
inference = Inference.of(cfg.pseudolabel, "pseudolabel")
check_resources(inference, "pseudolabel")
out = Path(sys.argv[5])
start = time.perf_counter()
n = pseudolabel._write(out, cfg, {"teacher": teacher}, inference)["images"]
print(json.dumps({"images": n, "seconds": time.perf_counter() - start}))
"""

BASELINE = COMMON + r"""
import numpy as np, pyarrow.parquet as pq, torch
from drray.data.shards import shard_paths
from drray.data.transforms import decode_to_tensor
from drray.engine.checkpoint import load_model
from drray.engine.loop import resolve_precision
from drray.engine.predict import predict_batch
torch.set_num_threads(int(sys.argv[5]))

class Pool(torch.utils.data.IterableDataset):
    def __iter__(self):
        for path in shard_paths(pool_dir):
            for r in pq.read_table(path, columns=["image_id", "image", "split"]).to_pylist():
                if r["split"] == "train":
                    yield r["image_id"], decode_to_tensor(r["image"])

model, _ = load_model(teacher)
model.eval()
device = torch.device("cpu")
dtype = resolve_precision(cfg.pseudolabel.precision, device)
loader = torch.utils.data.DataLoader(Pool(), batch_size=cfg.pseudolabel.batch_size, num_workers=0)
start, n = time.perf_counter(), 0
for ids, images in loader:
    probs, _ = predict_batch(model, images.numpy(), device=device, dtype=dtype)
    n += len(ids)
print(json.dumps({"images": n, "seconds": time.perf_counter() - start}))
"""


def make_pool(source: str, n: int, out: Path) -> Path:
    """A prepared set of ``n`` train rows: the source's train rows repeated under new ids, the
    first copy with its grades (the labeled subset), the others unlabeled, as a pool is. Its
    manifest keeps the source's inputs fingerprint and parameters, so that a job given it as
    ``data.eyepacs.prepared`` takes it as prepared and current."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from drray.artifacts import OUTPUT_MARK
    from drray.data.shards import read_manifest, shard_paths

    if (out / "manifest.json").is_file():
        return out
    rows = pa.concat_tables(pq.read_table(p) for p in shard_paths(source))
    rows = rows.filter(pa.compute.equal(rows.column("split"), "train"))
    (out / "shards").mkdir(parents=True, exist_ok=True)
    shards, done, copy = [], 0, 0
    while done < n:
        take = rows.slice(0, min(len(rows), n - done))
        ids = pa.array([f"{i}_r{copy}" for i in take.column("image_id").to_pylist()])
        take = take.set_column(take.schema.get_field_index("image_id"), "image_id", ids)
        if copy:
            grade = take.schema.get_field_index("grade")
            take = take.set_column(grade, take.schema.field(grade), pa.nulls(len(take), pa.int8()))
        for start in range(0, len(take), 500):
            name = f"shard-{len(shards):05d}.parquet"
            pq.write_table(take.slice(start, 500), out / "shards" / name, row_group_size=250)
            shards.append({"file": name, "rows": min(500, len(take) - start)})
        done, copy = done + len(take), copy + 1
    for name in (OUTPUT_MARK, "rejects.parquet"):  # drray's mark: a job may replace the folder
        shutil.copyfile(Path(source) / name, out / name)
    manifest = read_manifest(source)
    manifest.update(shards=shards, content_hash=f"bench-{n}")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def make_teacher(cfg, out: Path) -> Path:
    import torch

    from drray.engine.checkpoint import save_checkpoint
    from drray.engine.model import ModelSpec

    spec = ModelSpec("classifier", cfg.pretrain.backbone, cfg.data.size)
    torch.manual_seed(0)
    save_checkpoint(out, model=spec.build(), spec=spec, epoch=0, metrics={})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from drray.config import load_config
    from drray.distributed.prepare import ensure_prepared

    cfg = load_config(args.config, args.overrides)
    ensure_prepared("eyepacs", cfg.data.eyepacs, cfg)
    shutil.rmtree(OUT / "tables", ignore_errors=True)
    teacher = make_teacher(cfg, OUT / "teacher")
    overrides = json.dumps(args.overrides)
    py = sys.executable
    results = {}
    for n in args.sizes:
        pool = make_pool(cfg.data.eyepacs.prepared, n, OUT / f"pool-{n}")
        common = [args.config, overrides, str(pool), str(teacher)]
        seconds, peak, out = run_measured([py, "-c", RAY_JOB, *common, str(OUT / "tables" / f"{n}.parquet")])
        ray_run = json.loads(out.strip().splitlines()[-1])
        results[n] = {"ray": ray_run, "ray_peak": peak, "ray_wall": seconds}
        print(f"pool {n}: Ray Data job {ray_run['images'] / ray_run['seconds']:.1f} img/s, "
              f"peak {peak / 2**20:.0f} MiB", flush=True)
    small = args.sizes[0]
    threads = cfg.pseudolabel.concurrency * cfg.pseudolabel.cpus_per_actor + 1  # what the job's CPUs do
    import os

    threads = min(threads, os.cpu_count() or 1)
    seconds, peak, out = run_measured([py, "-c", BASELINE, args.config, overrides,
                                       str(OUT / f"pool-{small}"), str(teacher), str(threads)])
    base = json.loads(out.strip().splitlines()[-1])
    base_rate = base["images"] / base["seconds"]
    print(f"pool {small}: bare DataLoader loop ({threads} threads) {base_rate:.1f} img/s, peak {peak / 2**20:.0f} MiB")
    write_section("Pseudo-labeling (bench/pseudolabel.py)", _table(cfg, args, results, base_rate, peak, threads))


def _table(cfg, args, results, base_rate, base_peak, threads) -> str:
    small, large = args.sizes
    p = cfg.pseudolabel
    lines = [
        f"Machine: {machine()}. Config `{args.config}` {' '.join(args.overrides)}: {cfg.pretrain.backbone} "
        f"classifier at {cfg.data.size} px, batch {p.batch_size}, {p.concurrency} actor(s) x {p.cpus_per_actor} CPU, "
        f"precision {p.precision}. Command: `python bench/pseudolabel.py --config {args.config}`.",
        "",
        "| run | pool images | img/s | ratio to loop | peak memory (MiB, process tree PSS) |",
        "|---|---|---|---|---|",
        f"| bare DataLoader loop, 1 process, {threads} torch threads | {small} | {base_rate:.1f} | 1.00 | "
        f"{base_peak / 2**20:.0f} |",
    ]
    for n in (small, large):
        r = results[n]
        rate = r["ray"]["images"] / r["ray"]["seconds"]
        lines.append(f"| Ray Data job (read tasks + model actor that decodes, streamed to Parquet) | {n} | {rate:.1f} | "
                     f"{rate / base_rate:.2f} | {r['ray_peak'] / 2**20:.0f} |")
    growth = results[large]["ray_peak"] / results[small]["ray_peak"]
    lines += ["", f"Peak memory growth from {small} to {large} pool images: **{growth:.2f}x** (target <= 1.2x). "
                  f"Rates exclude Ray's start (whole job wall time: "
                  + ", ".join(f"{n}: {results[n]['ray_wall']:.0f} s" for n in (small, large)) + ")."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
