"""Batch inference at pool scale: the pseudolabel job's peak memory at two pool sizes (target:
<= 1.2x from 20,000 to 200,000 images), and the rate of decoding in the model actor (drray's
pipeline) against decoding in Ray Data tasks (the pipeline before issue 14), alternated in one
Ray session.

    python bench/inference_memory.py [--config configs/ci.yaml] [--sizes 20000 200000]
        [--rounds 2] [--rate-pool 20000] [--set k=v ...]

The pools are the config's prepared train split repeated under new ids (bench/pseudolabel.py's
make_pool: encoded images of the prepared size, the copies unlabeled). The teacher is a randomly
initialised classifier of the pretraining backbone at the prepared size (ci: resnet18 at 32 px):
inference costs the same with trained weights.

Memory: the whole job, ``drray run pseudolabel`` in a fresh process that starts its own Ray, is
sampled every 0.1 s as the proportional set size (PSS) summed over its process tree: the driver,
Ray's GCS and raylet (which holds the object store: shared memory counted once, however many
processes map it) and every worker and actor. That is what the job takes from the machine; RSS
summed over processes would count the object store once per process that maps it. The driver's
own peak RSS is reported beside it.

Rates: one pass over the rate pool per pipeline and round, ``iter_batches`` to the driver (no
table written), the pipelines alternated so that the machine's noise falls on all alike: the
pipeline before issue 14 (ray.data.read_parquet, decoded images shipped from Ray Data tasks),
the same decode tasks fed by drray's shard reads under its object-store budget, and drray's
pipeline, which ships the encoded images and decodes in the actor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, run_measured, write_section  # noqa: E402
from bench.pseudolabel import make_pool, make_teacher  # noqa: E402

OUT = Path(__file__).with_name("out") / "inference_memory"
SECTION = "Batch inference at pool scale (bench/inference_memory.py)"

# The job as a user runs it (after a finished teacher stage is put where the job looks for it:
# resolved by the checkout that runs, whose stage keys may differ from this one's), and the
# driver's own peak RSS once it is done.
JOB = r"""
import json, resource, shutil, sys
from drray.artifacts import atomic_write_json
from drray.config import load_config
from drray.data.shards import read_manifest
from jobs import stages
from jobs.cli import main

config, settings, teacher = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
cfg = load_config(config, settings)
stage = stages.resolve(cfg, read_manifest(cfg.data.eyepacs.prepared))["teacher"].dir.path
shutil.copytree(teacher, stage / "model", dirs_exist_ok=True)
atomic_write_json(stage / "done.json", {"stage": "teacher", "metrics": {}})
args = ["run", "pseudolabel", "--config", config]
for item in settings:
    args += ["--set", item]
try:
    main(args, standalone_mode=False)
finally:
    print("DRIVER_MAX_RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

# The pipelines over one pool, alternated: before issue 14 (ray.data.read_parquet, images decoded
# in Ray Data tasks and shipped decoded to an actor that predicts them as they come), the same
# decode tasks after drray's shard reads and object-store budget, and drray's pipeline (the
# actor decodes).
RATES = r"""
import json, sys, time
import numpy as np, ray, torch
from drray.config import load_config
from drray.data.selection import select_rows
from drray.distributed.datasets import Selection, read_rows, to_model_inputs
from drray.data.shards import shard_paths
from drray.distributed import inference as inf
from drray.distributed.resources import DATA_TASK_CPUS
from drray.distributed.runtime import ensure_ray

cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
pool, teacher, rounds = sys.argv[3], sys.argv[4], int(sys.argv[5])
ensure_ray(cfg.run.num_cpus)
inference = inf.Inference.of(cfg.pseudolabel, "pseudolabel")
selection = Selection.clean(pool, cfg.data.size, split="train")
models = {"teacher": teacher}


class DecodedImagesActor(inf.ModelActor):
    def decode(self, encoded):
        return torch.from_numpy(np.asarray(encoded)), [""] * len(encoded)


def decoded_to_actor(rows):
    decoded = rows.map_batches(to_model_inputs, fn_kwargs={"selection": selection}, batch_size=inference.batch_size,
                               batch_format="pyarrow", num_cpus=DATA_TASK_CPUS)
    return decoded.map_batches(
        DecodedImagesActor, fn_constructor_kwargs={"models": models, "inference": inference, "size": cfg.data.size},
        batch_size=inference.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=inference.concurrency), num_cpus=inference.cpus_per_actor)


def shard_reads_decode_in_tasks():
    rows = read_rows(selection.rows, inf.READ_TASKS_PER_ACTOR * inference.concurrency)
    return inf.limit_object_store(decoded_to_actor(rows), inf.object_store_budget([selection], inference))


def read_parquet_rows():  # drray's reads before issue 14's inference work
    paths = [str(p) for p in shard_paths(selection.prepared)]
    ds = ray.data.read_parquet(paths).select_columns(["image_id", "image", "split"])
    return ds.map_batches(select_rows, fn_kwargs={"rows": selection.rows}, batch_size=256, batch_format="pyarrow",
                          num_cpus=DATA_TASK_CPUS)


PIPELINES = {
    "before: read_parquet, decode in tasks": lambda: decoded_to_actor(read_parquet_rows()),
    "shard reads + budget, decode in tasks": shard_reads_decode_in_tasks,
    "drray: shard reads + budget, decode in the actor": lambda: inf.predictions({None: selection}, models, inference),
}
rates = {name: [] for name in PIPELINES}
for _ in range(rounds):
    for name, build in PIPELINES.items():
        start, n = time.perf_counter(), 0
        for batch in build().iter_batches(batch_size=None, batch_format="numpy"):
            n += len(batch["image_id"])
        rates[name].append(n / (time.perf_counter() - start))
print("RATES", json.dumps(rates))
"""


def run_sampled(cmd: list[str], cwd: Path | None = None, interval: float = 0.1) -> tuple[float, dict, str]:
    """Run a command (from checkout ``cwd``: its drray is imported, Ray's workers' included);
    return its seconds, the peak PSS of its process tree (with the driver's share at that
    moment) and its stdout."""
    env = {"PYTHONPATH": str(cwd)} if cwd else None
    return run_measured(cmd, env=env, interval=interval, cwd=cwd, at_peak=_pss)


def _pss(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss:"))


def measure_job(args, source: str, n: int, teacher: Path) -> dict:
    pool = make_pool(source, n, OUT / f"pool-{n}")
    run = OUT / f"run-{n}"
    shutil.rmtree(run, ignore_errors=True)
    settings = [*args.overrides, f"data.eyepacs.prepared={pool}", f"run.dir={run}"]
    config = str(Path(args.config).resolve())
    seconds, peak, out = run_sampled([sys.executable, "-c", JOB, config, json.dumps(settings), str(teacher)],
                                     cwd=args.repo)
    # the job's summary as `drray run` prints it, among Ray's notices on the same stdout
    result, _ = json.JSONDecoder().raw_decode(out[out.index('{\n  "stage"'):])
    driver = int(out.rpartition("DRIVER_MAX_RSS")[2].split()[0])
    shutil.rmtree(run, ignore_errors=True)
    return {"images": result["images"], "images_per_s": result["images_per_s"], "wall": seconds,
            "peak": peak["tree"], "driver_at_peak": peak["driver"], "driver_max_rss": driver}


def measure_rates(args, source: str, teacher: Path) -> dict[str, list[float]]:
    pool = make_pool(source, args.rate_pool, OUT / f"pool-{args.rate_pool}")
    out = subprocess.run([sys.executable, "-c", RATES, args.config, json.dumps(args.overrides), str(pool),
                          str(teacher), str(args.rounds)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"rates failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.rpartition("RATES")[2].splitlines()[0])  # Ray's notices share stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ci.yaml")
    parser.add_argument("--sizes", type=int, nargs=2, default=[20000, 200000])
    parser.add_argument("--rounds", type=int, default=2, help="passes of each pipeline, alternated")
    parser.add_argument("--rate-pool", type=int, default=20000)
    parser.add_argument("--parts", nargs="+", choices=["memory", "rates"], default=["memory", "rates"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repo", type=Path, default=None,
                        help="run the memory part's jobs from another checkout (e.g. a `git archive` of an earlier "
                             "commit, its data/ linked to this one's): a before/after; RESULTS.md is left alone")
    args = parser.parse_args()

    from drray.config import load_config
    from drray.distributed.prepare import ensure_prepared

    cfg = load_config(args.config, args.overrides)
    ensure_prepared("eyepacs", cfg.data.eyepacs, cfg)
    teacher = make_teacher(cfg, OUT / "teacher")
    jobs, rates = {}, {}
    if "memory" in args.parts:
        for n in args.sizes:
            jobs[n] = measure_job(args, cfg.data.eyepacs.prepared, n, teacher)
            print(f"pool {n}: {jobs[n]}", flush=True)
    if "rates" in args.parts:
        rates = measure_rates(args, cfg.data.eyepacs.prepared, teacher)
        print(f"rates on {args.rate_pool} images: {rates}", flush=True)
    if args.repo is None:
        write_section(SECTION, _table(cfg, args, jobs, rates))


def _table(cfg, args, jobs: dict, rates: dict) -> str:
    p = cfg.pseudolabel
    mib = 2 ** 20
    lines = [
        f"Machine: {machine()}, {time.strftime('%Y-%m-%d')}. Config `{args.config}` {' '.join(args.overrides)}: "
        f"{cfg.pretrain.backbone} classifier at {cfg.data.size} px, batch {p.batch_size}, {p.concurrency} actor(s) "
        f"x {p.cpus_per_actor} CPU, precision {p.precision}, run.num_cpus {cfg.run.num_cpus}. Command: "
        f"`python bench/inference_memory.py --config {args.config}"
        + "".join(f" --set {o}" for o in args.overrides) + "`.",
    ]
    if jobs:
        small, large = args.sizes
        lines += ["", "| pool images | job img/s | job wall time | peak memory, process tree PSS (MiB) | "
                      "driver's share at the peak (MiB) | driver's peak RSS (MiB) |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['images_per_s']:.0f} | {r['wall']:.0f} s | {r['peak'] / mib:.0f} | "
                  f"{r['driver_at_peak'] / mib:.0f} | {r['driver_max_rss'] / mib:.0f} |" for n, r in jobs.items()]
        growth = jobs[large]["peak"] / jobs[small]["peak"]
        lines += ["", f"Peak memory growth from {small} to {large} pool images: **{growth:.2f}x** (target <= 1.2x)."]
    if rates:
        lines += ["", f"Rates on {args.rate_pool} pool images, each pass a new pipeline (its start included), "
                      f"{args.rounds} rounds alternated, the results iterated in the driver (no table):", "",
                  "| pipeline | img/s per round | mean | ratio |", "|---|---|---|---|"]
        means = {name: sum(values) / len(values) for name, values in rates.items()}
        base = next(iter(means.values()))
        for name, values in rates.items():
            lines.append(f"| {name} | {' / '.join(f'{v:.0f}' for v in values)} | {means[name]:.0f} | "
                         f"{means[name] / base:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
