"""Every throughput figure of drray's training path from one GPU slot: a prepared script that a
GPU node runs in under 8 minutes, printing its figures and writing them (with the card's name)
into its own section of bench/RESULTS.md.

    python bench/gpu.py      # on the GPU node, the defaults below
    python bench/gpu.py --device cpu --size 32 --batch 8 --steps 2 --warmup 1 --backbone resnet18 --results x.md

The second is a smoke test on any CPU (1-3 min on 2 cores; --results elsewhere, or it adds a
"CPU only" section to bench/RESULTS.md).

Options, with their GPU defaults (--device cpu: warm-up, precision, batches of the distillation
and inference, the data set and the workers get smaller ones, see --help): --results PATH
(bench/RESULTS.md; only this script's section is replaced), --size 299 (px), --batch 128 (SimCLR
pairs per step), --steps 50 (timed), --warmup 10, --backbone resnet50 (SimCLR and the teacher),
--student densenet161, --distill-batch 64, --predict-batch 256, --images 4096 (rows of the
prepared set), --loader-workers min(8, CPUs - 2), --worker-cpus 2, --precision bf16, --budget 440
(s, all sections), --cap-scale 1 (x each section's time cap), --only SECTION,... (a rerun of
some sections; written as a section of its own), --work DIR (kept; else a temporary folder).

What one run measures, on synthetic fundus photographs prepared at --size px (JPEG in drray's
shard format, drray.data.shards), bf16 autocast and channels_last throughout:
 1. augmentation alone: views/s of drray.data.augment.SimCLRAugment on a uint8 batch already on
    the device (parameters drawn on the CPU generator the fit loop uses, rendered on the device).
 2. SimCLR pairs/s: (a) on Ray Train: drray.distributed.train.fit_stage, a TorchTrainer with one
    worker (use_gpu on CUDA) fed by drray's Ray Data stream (Stream, Selection) of decoded uint8
    images, the views made on the device by drray's fit loop, and its data-wait share of step
    time; (b) a bare PyTorch loop, same model, augmentation, loss and optimiser, fed by a
    DataLoader (decoding in worker processes, pinned uint8 batches copied to the device);
    (c) the ceiling: (b) on one uint8 batch already on the device; (d) the model alone: (c) with
    its views made once; (e) drray's fit loop without Ray (LocalRuntime) over (b)'s DataLoader,
    which splits (a)/(b) into the loop's share and Ray's. Ratios (a)/(b), (b)/(c), (e)/(b).
 3. distillation: the student's train step (forward + backward) on the device through drray's
    train_epoch with the Classify method's noise views and soft targets, one pinned host uint8
    batch moved to the device every step as a stream's would be.
 4. pseudo-labels: the teacher classifier in eval mode through drray.engine.predict.predict_batch
    from host uint8 batches, the model NCHW (as drray.engine.checkpoint.load_model gives it to
    the inference actors) and channels_last; and the whole Ray Data pipeline
    (drray.distributed.inference.predictions, one model actor), its start-up included.

Runs fed by a data pipeline, (a), (b) and (e), warm up for one epoch of --steps steps and time
the next (drray's fit loop times whole epochs; a shorter warm-up would time a loader's backlog);
the others warm up for --warmup steps. Every section has a time cap: its step loops stop timing
there and report the steps they timed (one at least), and a hard limit 20 s later (SIGALRM; Ray's
waits see it) ends one that hangs, Ray Train's fit included; the run's budget skips what would
start too late. A failed or skipped section prints why, the next one runs, and the exit status
is 1 when any figure is missing.

Time at the defaults on one H100/H200, estimated from public figures (ResNet-50 trains at
~2,600 img/s at 224 px, so ~1,400 img/s or ~700 pairs/s at 299 px; DenseNet161 ~3x its cost
per image): ~3 minutes, Ray Train's start-up (~15 s) and the synthetic data (~3 s) included.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import RESULTS, machine, write_section  # noqa: E402

TEMPERATURE = 0.5  # SimCLR's (drray.methods.SimCLR's default)
DISTINCT_IMAGES = 16  # rendered fundus images; the set repeats them under new ids (decoding costs the same)
LOADER_TIMEOUT_S = 120  # a DataLoader worker that delivers nothing for this long fails the section
HARD_GRACE_S = 20  # past a section's cap before its hard limit ends it (its loops stop at the cap)
MIN_SECTION_S = 5  # a section is skipped when less of the run's budget is left


@dataclass(frozen=True)
class Figure:
    label: str  # the row's name in RESULTS.md (no '|')
    unit: str


FIGURES = {  # in the order of the table
    "augment": Figure("1. augmentation alone: SimCLRAugment on the device", "views/s"),
    "ray_train": Figure("2a. SimCLR on Ray Train (TorchTrainer, 1 worker, Ray Data stream)", "pairs/s"),
    "bare": Figure("2b. SimCLR, bare PyTorch loop (DataLoader, host uint8 to the device)", "pairs/s"),
    "ceiling": Figure("2c. SimCLR, data already on the device (ceiling)", "pairs/s"),
    "model_only": Figure("2d. SimCLR model step alone (views made once)", "pairs/s"),
    "drray_loop": Figure("2e. SimCLR, drray's fit loop without Ray (LocalRuntime, 2b's DataLoader)", "pairs/s"),
    "ray_vs_bare": Figure("2. ratio Ray Train / bare loop (2a / 2b)", "x"),
    "bare_vs_ceiling": Figure("2. ratio bare loop / ceiling (2b / 2c)", "x"),
    "loop_vs_bare": Figure("2. ratio drray's loop / bare loop (2e / 2b)", "x"),
    "ray_wait_share": Figure("2. Ray Train: data-wait share of step time", "share"),
    "distill": Figure("3. distillation: student train step on the device", "img/s"),
    "predict_nchw": Figure("4. pseudo-labels: predict_batch, NCHW model", "img/s"),
    "predict_cl": Figure("4. pseudo-labels: predict_batch, channels_last model", "img/s"),
    "ray_predict": Figure("4. pseudo-labels: Ray Data predictions pipeline, start-up included", "img/s"),
}
RATIOS = {"ray_vs_bare": ("ray_train", "bare"), "bare_vs_ceiling": ("bare", "ceiling"),
          "loop_vs_bare": ("drray_loop", "bare")}


class HardLimitExpired(KeyboardInterrupt):
    """A section ran past its hard limit. A KeyboardInterrupt, because Ray's waits turn that one
    into an interruption (Ray hands it on as a plain KeyboardInterrupt) and swallow any other
    exception raised by a signal handler until they return, which a hang never does."""


@dataclass
class Measured:
    value: float
    settings: str


@dataclass(frozen=True)
class Timing:
    steps: int  # timed
    wanted: int
    seconds: float
    waited: float  # in next(batches): the data pipeline

    def per_second(self, per_step: int) -> float:
        return per_step * self.steps / self.seconds

    def describe(self, warmup: int) -> str:
        capped = f" (time cap: {self.steps} of {self.wanted})" if self.steps < self.wanted else ""
        return f"{self.steps} steps timed{capped} after {warmup} warm-up"


@dataclass(frozen=True)
class SyntheticSet:
    prepared: Path  # a prepared-data folder (shards + manifest)
    encoded: list[bytes]  # its rows' JPEG bytes, in row order


# --- synthetic prepared data -------------------------------------------------------------------


def fundus_jpeg(rng: np.random.Generator, grade: int, size: int) -> bytes:
    """One synthetic fundus photograph, its central square at ``size`` px, JPEG q95 as drray
    prepares it (~23 KB at 299 px, like prepared EyePACS images: decoding cost follows that)."""
    from PIL import Image

    from drray.data.fundus import encode_image
    from drray.data.synthetic import EYEPACS_CAMERA, render_fundus

    frame = render_fundus(rng, grade, "right", EYEPACS_CAMERA, frame_scale=min(1.0, max(0.1, size / 300)))
    w, h = frame.size
    side = min(w, h)
    square = frame.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    return encode_image(square.resize((size, size), Image.BICUBIC))


def make_synthetic_set(out: Path, rows: int, size: int, seed: int = 0) -> SyntheticSet:
    """A prepared set of ``rows`` train images (DISTINCT_IMAGES rendered, repeated under new ids)
    in drray's shard format, with the manifest fields its readers use."""
    import json

    import pyarrow as pa

    from drray.data.shards import SHARD_SCHEMA, ShardWriter

    rng = np.random.default_rng(seed)
    distinct = [fundus_jpeg(rng, i % 5, size) for i in range(DISTINCT_IMAGES)]
    encoded = [distinct[i % len(distinct)] for i in range(rows)]
    table = pa.Table.from_pylist([{"image_id": f"bench{i}", "image": data, "grade": i % 5, "patient_id": f"p{i}",
                                   "source": "bench", "split": "train"} for i, data in enumerate(encoded)],
                                 schema=SHARD_SCHEMA)
    # 8 shards or more, as a real set has: Ray Data reads shards in parallel, and a one-block
    # stream would be timed as a single piece
    per_shard = max(16, math.ceil(rows / 8))
    writer = ShardWriter(out / "shards", rows_per_shard=min(500, per_shard), rows_per_group=min(250, per_shard))
    writer.write(table)
    manifest = {"source": "synthetic (bench/gpu.py)", "params": {"size": size}, "shards": writer.close(),
                "content_hash": f"bench-gpu-{rows}-{size}-{seed}"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return SyntheticSet(out, encoded)


class DecodedRows(torch.utils.data.Dataset):
    """The bare loop's data: ``length`` rows cycling over the set, decoded to uint8 CHW in the
    DataLoader's workers, as drray's streams ship them."""

    def __init__(self, encoded: list[bytes], length: int):
        self.encoded, self.length = encoded, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        from drray.data.transforms import decode_to_tensor

        return {"image": decode_to_tensor(self.encoded[i % len(self.encoded)])}


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # each loader worker decodes; torch threads there would fight the others


# --- time ----------------------------------------------------------------------------------


class HardLimit:
    """``with HardLimit(s):`` raises HardLimitExpired in the main thread after ``s`` seconds
    (SIGALRM), interrupting Python code and Ray's waits; ``expired`` tells it from a Ctrl-C
    afterwards. An outer timer (pytest-timeout's) is suspended meanwhile and resumes with the
    time it had left."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._armed = threading.current_thread() is threading.main_thread()  # signals reach it only

    def _expire(self, signum, frame):
        self.expired = True
        raise HardLimitExpired()

    def __enter__(self):
        if self._armed:
            self._previous = signal.signal(signal.SIGALRM, self._expire)
            self._outer, _ = signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self._started = time.monotonic()
        return self

    def __exit__(self, *exc):
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            if self._outer:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, self._outer - (time.monotonic() - self._started)))


def halfway(deadline: float) -> float:
    """Half the time left to ``deadline``: the first of a section's two loops leaves the second its share."""
    now = time.perf_counter()
    return now + (deadline - now) / 2


def until(deadline: float, items: Iterator) -> Iterator:
    """``items`` until the clock passes ``deadline`` (perf_counter), the first one in any case."""
    for i, item in enumerate(items):
        if i and time.perf_counter() >= deadline:
            return
        yield item


# --- the run -------------------------------------------------------------------------------


class Bench:
    """The run's settings, device, data, Ray and figures."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work = args, work
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        self.deadline = time.perf_counter() + args.budget
        self.figures: dict[str, Measured] = {}
        self.missing: dict[str, str] = {}  # figure -> why it is missing (unset: not run, --only)
        self.seconds: dict[str, float] = {}  # section -> wall time
        self._data: SyntheticSet | None = None
        self._ray_ours = False  # this run started Ray (and stops it)

    # -- what sections share --

    def record(self, key: str, value: float, settings: str) -> None:
        figure = FIGURES[key]
        self.figures[key] = Measured(value, settings)
        print(f"  {figure.label}: {value:.4g} {figure.unit} ({settings})", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def data(self) -> SyntheticSet:
        if self._data is None:
            start = time.perf_counter()
            self._data = make_synthetic_set(self.work / "prepared", self.args.images, self.args.size)
            print(f"  (synthetic prepared set: {self.args.images} rows at {self.args.size} px, "
                  f"{time.perf_counter() - start:.1f} s)", flush=True)
        return self._data

    def host_images(self, n: int) -> np.ndarray:
        from drray.data.transforms import decode_batch

        return decode_batch([self.data.encoded[i % len(self.data.encoded)] for i in range(n)], self.args.size)

    def device_images(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.host_images(n)).to(self.device)

    def loader(self, batch: int, batches: int) -> torch.utils.data.DataLoader:
        workers = self.args.loader_workers
        return torch.utils.data.DataLoader(
            DecodedRows(self.data.encoded, batch * batches), batch_size=batch, shuffle=True, drop_last=True,
            num_workers=workers, pin_memory=self.cuda, worker_init_fn=_one_thread if workers else None,
            prefetch_factor=4 if workers else None, timeout=LOADER_TIMEOUT_S if workers else 0)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def time_steps(self, batches: Iterator, step: Callable, warmup: int, steps: int, deadline: float) -> Timing:
        """Warm up, then time ``steps`` steps (fewer if ``deadline`` passes, one at least), the
        device synced before and after; the time spent in ``next(batches)`` is the data wait."""
        for _ in range(warmup):
            step(next(batches))
        self.sync()
        done, waited, start = 0, 0.0, time.perf_counter()
        while done < steps and (done == 0 or time.perf_counter() < deadline):
            asked = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - asked
            step(batch)
            done += 1
        self.sync()
        return Timing(done, steps, time.perf_counter() - start, waited)

    def ray(self) -> None:
        import ray

        from drray.distributed.runtime import ensure_ray

        if not ray.is_initialized():
            # logical CPUs: the training worker's plus room for the Ray Data tasks that feed it
            # (a pipeline without a free CPU deadlocks, DESIGN.md section 7)
            ensure_ray(num_cpus=max(usable_cpus(), self.args.worker_cpus + 2))
            self._ray_ours = True

    def stop_ray(self) -> None:
        """Stop the Ray this run started: after a failure its workers may still hold the device."""
        import ray

        if self._ray_ours and ray.is_initialized():
            ray.shutdown()
        self._ray_ours = False

    # -- SimCLR's pieces, shared by the bare loop, the ceiling and drray's plan --

    def simclr_model(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from drray.engine.model import ModelSpec

        model = ModelSpec("simclr", self.args.backbone, self.args.size).build()
        model = model.to(self.device, memory_format=torch.channels_last).train()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)  # drray's OptimConfig default

    def simclr_views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Both views of a uint8 batch on the device, standardised, channels_last: (2n, 3, s, s)."""
        from drray.data.augment import SimCLRAugment
        from drray.data.transforms import AugmentSpec, normalise

        view1, view2 = SimCLRAugment(AugmentSpec(size=self.args.size))(images, generator)
        return normalise(torch.cat([view1, view2])).contiguous(memory_format=torch.channels_last)

    def simclr_update(self, model, optimizer) -> Callable[[torch.Tensor], None]:
        from drray.losses import nt_xent

        def update(views: torch.Tensor) -> None:
            n = views.shape[0] // 2
            with self.autocast():
                z = model(views)
                loss = nt_xent(z[:n], z[n:], TEMPERATURE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return update

    def simclr_plan(self, name: str):
        """drray's plan for the same run: 2 epochs of --steps steps (warm-up, timed) in one pass."""
        from drray.config import OptimConfig
        from drray.data.transforms import AugmentSpec
        from drray.engine.fit import FitPlan
        from drray.engine.model import ModelSpec
        from drray.methods import SimCLR

        a = self.args
        return FitPlan(name=name, out_dir=str(self.work / name), spec=ModelSpec("simclr", a.backbone, a.size),
                       method=SimCLR(AugmentSpec(size=a.size), TEMPERATURE), epochs=2, batch_size=a.batch,
                       steps_per_epoch=a.steps, optim=OptimConfig(), precision=a.precision, channels_last=True,
                       checkpoint_every=2, epochs_per_pass=2)  # one checkpoint, after the timed epoch

    def simclr_settings(self, timing: str) -> str:
        a = self.args
        return f"{a.backbone}, batch {a.batch} pairs, {a.size} px, {timing}"

    # -- running sections --

    def run(self, section: Section) -> None:
        left = self.deadline - time.perf_counter()
        if left < MIN_SECTION_S:
            self._missing(section, f"skipped: the run's budget (--budget {self.args.budget:g} s) was spent")
            print(f"[{section.name}] skipped: the run's budget is spent", flush=True)
            return
        cap = min(section.cap_s * self.args.cap_scale, left)
        print(f"[{section.name}] (time cap {cap:.0f} s)", flush=True)
        start, why, limit = time.perf_counter(), "not measured", HardLimit(cap + HARD_GRACE_S)
        try:
            with limit:
                section.run(self, start + cap)
        except KeyboardInterrupt:
            if not limit.expired:
                raise  # the user's Ctrl-C
            why = self._failed(section, f"ran past its hard limit of {limit.seconds:.0f} s (hung?)")
        except Exception as exc:  # noqa: BLE001 - one section's failure must not cost the others' figures
            traceback.print_exc()
            why = self._failed(section, explain(exc))
        finally:
            self.seconds[section.name] = time.perf_counter() - start
            free_device_memory(self.cuda)
        self._missing(section, why)
        print(f"[{section.name}] {self.seconds[section.name]:.1f} s", flush=True)

    def _failed(self, section: Section, reason: str) -> str:
        print(f"[{section.name}] failed: {reason}", flush=True)
        if section.uses_ray:
            self.stop_ray()  # its workers may still be running, and holding the device
        return f"failed: {reason}"

    def _missing(self, section: Section, why: str) -> None:
        for key in section.figures:
            if key not in self.figures:
                self.missing[key] = why

    def ratios(self) -> None:
        for key, (top, bottom) in RATIOS.items():
            if top in self.figures and bottom in self.figures:
                self.figures[key] = Measured(self.figures[top].value / self.figures[bottom].value, "same run")
            else:
                self.missing[key] = f"needs both {top} and {bottom}"


def explain(exc: BaseException) -> str:
    """One line for the table: the error under Ray's wrappers (a worker's, an actor's)."""
    from drray.distributed.runtime import describe, root_cause

    return describe(root_cause(exc)).replace("|", "/")[:300]


def free_device_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the Ray Train worker is another process: leave it the memory


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the sections ----------------------------------------------------------------------------


def run_augment(b: Bench, deadline: float) -> None:
    from drray.data.augment import SimCLRAugment
    from drray.data.transforms import AugmentSpec
    from drray.engine.fit import augmentation_generator

    a = b.args
    augment, generator = SimCLRAugment(AugmentSpec(size=a.size)), augmentation_generator(0, 0, 0)
    t = b.time_steps(itertools.repeat(b.device_images(a.batch)), lambda x: augment(x, generator),
                     a.warmup, a.steps, deadline)
    b.record("augment", t.per_second(2 * a.batch),
             f"batch {a.batch} images -> {2 * a.batch} views, {a.size} px, AugmentSpec defaults, {t.describe(a.warmup)}")


def run_ceiling(b: Bench, deadline: float) -> None:
    from drray.engine.fit import augmentation_generator

    a = b.args
    model, optimizer = b.simclr_model()
    update, generator = b.simclr_update(model, optimizer), augmentation_generator(0, 0, 0)
    images = b.device_images(a.batch)
    t = b.time_steps(itertools.repeat(images), lambda x: update(b.simclr_views(x, generator)),
                     a.warmup, a.steps, halfway(deadline))
    b.record("ceiling", t.per_second(a.batch), b.simclr_settings(f"views made every step, {t.describe(a.warmup)}"))
    views = b.simclr_views(images, generator)
    t = b.time_steps(itertools.repeat(views), update, a.warmup, a.steps, deadline)
    b.record("model_only", t.per_second(a.batch), b.simclr_settings(t.describe(a.warmup)))


def run_bare(b: Bench, deadline: float) -> None:
    from drray.engine.fit import augmentation_generator

    a = b.args
    model, optimizer = b.simclr_model()
    update, generator = b.simclr_update(model, optimizer), augmentation_generator(0, 0, 0)
    loader = b.loader(a.batch, 2 * a.steps + 1)
    batches = (batch["image"].to(b.device, non_blocking=True) for batch in loader)
    t = b.time_steps(batches, lambda x: update(b.simclr_views(x, generator)), a.steps, a.steps, deadline)
    b.record("bare", t.per_second(a.batch), b.simclr_settings(
        f"{t.describe(a.steps)}, DataLoader {a.loader_workers} workers, pinned memory {b.cuda}, "
        f"data wait {t.waited / t.seconds:.1%} (no sync per step)"))


def run_drray_loop(b: Bench, deadline: float) -> None:
    from drray.engine.fit import LocalRuntime, fit

    a = b.args
    plan = b.simclr_plan("simclr-local")
    batches = plan.epochs * plan.steps_per_epoch + 1
    runtime = LocalRuntime({"train": lambda batch_size, drop_last: b.loader(batch_size, batches)},
                           b.work / "simclr-local-checkpoints", keep=1, device=str(b.device))
    fit(plan, runtime)
    timed = timed_epoch(plan)
    b.record("drray_loop", timed["images"] / timed["seconds"], b.simclr_settings(
        f"drray.engine.fit.fit, epoch 2 of 2 ({a.steps} steps) timed, DataLoader {a.loader_workers} workers, "
        f"data wait {timed['data_wait_s'] / timed['seconds']:.1%}"))


def run_ray_train(b: Bench, deadline: float) -> None:
    from drray.config import ScalingConfig
    from drray.distributed.datasets import Selection, Stream
    from drray.distributed.train import fit_stage

    a = b.args
    b.ray()
    plan = b.simclr_plan("simclr-ray")
    rows = (plan.epochs * plan.steps_per_epoch + 1) * plan.batch_size
    selection = Selection(str(b.data.prepared), plan.method.train_views, a.size, split="train")
    streams = {"train": Stream(selection, plan.batch_size, epochs_per_pass=math.ceil(rows / len(b.data.encoded)))}
    scaling = ScalingConfig(num_workers=1, use_gpu=b.cuda, cpus_per_worker=a.worker_cpus, precision=a.precision,
                            channels_last=True, runtime="ray")
    fit_stage(plan, streams, scaling, b.work / "ray-storage", keep_checkpoints=1, max_failures=0)
    timed = timed_epoch(plan)
    settings = b.simclr_settings(f"drray.distributed.train.fit_stage, epoch 2 of 2 ({a.steps} steps) timed, "
                                 f"{a.worker_cpus} worker CPUs, use_gpu {b.cuda}")
    b.record("ray_train", timed["images"] / timed["seconds"], settings)
    b.record("ray_wait_share", timed["data_wait_s"] / timed["seconds"],
             f"data_wait_s {timed['data_wait_s']:.3f} of {timed['seconds']:.3f} s in the timed epoch "
             "(drray.engine.loop.train_epoch)")


def timed_epoch(plan) -> dict:
    """The second (timed) epoch's metrics from the stage's metrics.jsonl (written by rank 0)."""
    epochs = [r for r in plan.stage_dir.metrics() if r.get("epoch") == 1]
    if not epochs:
        raise RuntimeError(f"{plan.stage_dir.metrics_file} has no line for epoch 2")
    return epochs[-1]


def run_distill(b: Bench, deadline: float) -> None:
    from drray.engine.fit import augmentation_generator
    from drray.engine.loop import make_scaler, train_epoch
    from drray.engine.model import ModelSpec
    from drray.methods import Classify, augment_batch

    a = b.args
    method, generator = Classify(), augmentation_generator(0, 0, 0)
    model = ModelSpec("classifier", a.student, a.size).build().to(b.device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = make_scaler(b.device, b.dtype)
    # a host batch, as a stream delivers it (pinned on CUDA: the copy overlaps the step; drray's
    # to_device pins host tensors, and fails on tensors already on the GPU), soft pseudo-labels
    images = torch.from_numpy(b.host_images(a.distill_batch))
    batch = {"image": images.pin_memory() if b.cuda else images, "target": torch.rand(a.distill_batch)}

    def epoch(steps: int, stop: float) -> dict:
        return train_epoch(model, until(stop, itertools.repeat(batch, steps)), method.step(), optimizer, scheduler,
                           scaler, device=b.device, dtype=b.dtype, channels_last=True,
                           augment=lambda x: augment_batch(method, x, generator))

    epoch(a.warmup, math.inf)
    timed = epoch(a.steps, deadline)
    steps = timed["images"] // a.distill_batch
    capped = f" (time cap: {steps} of {a.steps})" if steps < a.steps else ""
    b.record("distill", timed["images"] / timed["seconds"],
             f"{a.student}, batch {a.distill_batch}, {a.size} px, drray.engine.loop.train_epoch with Classify's "
             f"noise views, one host uint8 batch moved every step, {steps} steps timed{capped} after "
             f"{a.warmup} warm-up")


def run_predict(b: Bench, deadline: float) -> None:
    from drray.engine.model import ModelSpec
    from drray.engine.predict import predict_batch

    a = b.args
    model = ModelSpec("classifier", a.backbone, a.size).build().to(b.device).eval()
    images = b.host_images(a.predict_batch)
    images.flags.writeable = False  # as Ray Data hands out numpy batches (predict_batch copies them)
    for key, channels_last in (("predict_nchw", False), ("predict_cl", True)):
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        t = b.time_steps(itertools.repeat(images), lambda x, m=model, cl=channels_last: predict_batch(
            m, x, device=b.device, dtype=b.dtype, channels_last=cl), a.warmup, a.steps,
            deadline if channels_last else halfway(deadline))
        b.record(key, t.per_second(a.predict_batch), f"{a.backbone} classifier, eval, batch {a.predict_batch}, "
                 f"{a.size} px, host uint8 batches (read-only), {t.describe(a.warmup)}")


def run_ray_predict(b: Bench, deadline: float) -> None:
    from drray.distributed.datasets import Selection
    from drray.distributed.inference import Inference, check_resources, predictions, prob_column
    from drray.engine.checkpoint import save_checkpoint
    from drray.engine.model import ModelSpec

    a = b.args
    b.ray()
    spec = ModelSpec("classifier", a.backbone, a.size)
    teacher = b.work / "teacher"
    save_checkpoint(teacher, model=spec.build(), spec=spec, epoch=0, metrics={})
    inference = Inference(batch_size=a.predict_batch, concurrency=1, cpus_per_actor=1, use_gpu=b.cuda,
                          precision=a.precision)
    check_resources(inference, "pseudolabel")
    rows = predictions({None: Selection.clean(str(b.data.prepared), a.size, split="train")},
                       {"teacher": str(teacher)}, inference)
    start, first, images = time.perf_counter(), None, 0
    for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
        images += len(batch[prob_column("teacher")])
        first = first or (time.perf_counter(), images)  # (when, images so far) at the first block
    end = time.perf_counter()
    if images != len(b.data.encoded):
        raise RuntimeError(f"the pipeline predicted {images} of {len(b.data.encoded)} images")
    # Ray Data bundles rows into blocks of its own choosing: a rate after the first block only
    # when more than one came
    after = (f"; {(images - first[1]) / (end - first[0]):.4g} img/s after it" if images > first[1]
             else " (the only one)")
    b.record("ray_predict", images / (end - start),
             f"{a.backbone} classifier, 1 ModelActor (use_gpu {b.cuda}), batch {a.predict_batch}, {a.size} px, "
             f"{images} images in {end - start:.1f} s, first block ({first[1]} images) after {first[0] - start:.1f} s"
             f"{after}")


@dataclass(frozen=True)
class Section:
    name: str
    cap_s: float  # its time cap: ~3x its estimated time at the GPU defaults on one H100
    figures: tuple[str, ...]
    run: Callable[[Bench, float], None]
    uses_ray: bool = False


SECTIONS = (
    Section("augment", 30, ("augment",), run_augment),
    Section("simclr-ceiling", 75, ("ceiling", "model_only"), run_ceiling),
    Section("simclr-bare", 90, ("bare",), run_bare),
    Section("simclr-drray-loop", 90, ("drray_loop",), run_drray_loop),
    Section("simclr-ray-train", 180, ("ray_train", "ray_wait_share"), run_ray_train, uses_ray=True),
    Section("distill", 60, ("distill",), run_distill),
    Section("pseudolabel", 45, ("predict_nchw", "predict_cl"), run_predict),
    Section("pseudolabel-ray", 90, ("ray_predict",), run_ray_predict, uses_ray=True),
)


# --- report ----------------------------------------------------------------------------------


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only (no GPU)"


def environment(device: torch.device) -> str:
    import ray

    cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}" if torch.version.cuda else "no CUDA"
    memory = ""
    if device.type == "cuda":
        memory = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    return (f"{card_name(device)}{memory}; torch {torch.__version__}, {cuda}, Ray {ray.__version__}; "
            f"host {machine()}")


def table(b: Bench) -> str:
    lines = ["| figure | value | unit | settings |", "|---|---|---|---|"]
    for key, figure in FIGURES.items():
        if key in b.figures:
            m = b.figures[key]
            lines.append(f"| {figure.label} | {m.value:.4g} | {figure.unit} | {m.settings} |")
        else:
            lines.append(f"| {figure.label} | - | {figure.unit} | {b.missing.get(key, 'not run (--only)')} |")
    return "\n".join(lines)


def section_body(b: Bench, argv: list[str]) -> str:
    a = b.args
    spent = ", ".join(f"{name} {s:.0f} s" for name, s in b.seconds.items())
    return (
        f"`python bench/gpu.py {' '.join(argv)}`, {date.today().isoformat()}: {environment(b.device)}.\n"
        f"Synthetic fundus photographs prepared at {a.size} px (JPEG q95, {a.images} rows); "
        f"{'bf16 autocast' if b.dtype else 'fp32'}, channels_last{', cuDNN benchmark on' if b.cuda else ''}; "
        "SimCLR views and the student's noise made on the device from uint8 batches (drray.data.augment). "
        f"{a.worker_cpus} torch thread(s) in every training loop. Pipeline-fed runs (2a, 2b, 2e) warm up for one "
        "epoch of the timed length.\n\n"
        f"{table(b)}\n\n"
        f"Section wall times: {spent}.\n"
    )


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the GPU node) or cpu (a smoke test at tiny sizes)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file; only this run's section changes")
    p.add_argument("--size", type=int, default=299, help="image side (px): prepared images and views")
    p.add_argument("--batch", type=int, default=128, help="SimCLR pairs per step; also the augmentation's batch")
    p.add_argument("--steps", type=int, default=50, help="timed steps of every loop")
    p.add_argument("--warmup", type=int, help="warm-up steps of the loops not fed by a pipeline (10; 2 on a CPU)")
    p.add_argument("--backbone", default="resnet50", help="SimCLR's backbone and the teacher's")
    p.add_argument("--student", default="densenet161", help="the distilled student's backbone")
    p.add_argument("--distill-batch", type=int, help="student batch (default 64 on a GPU, --batch on a CPU)")
    p.add_argument("--predict-batch", type=int, help="inference batch (default 256 on a GPU, 2 x --batch on a CPU)")
    p.add_argument("--images", type=int, help="rows of the synthetic prepared set (default 4096 on a GPU, 256 on a CPU)")
    p.add_argument("--loader-workers", type=int, help="bare loop's DataLoader workers (default min(8, CPUs - 2); 1 on a CPU)")
    p.add_argument("--worker-cpus", type=int, help="CPUs of the Ray Train worker (default 2 on a GPU, 1 on a CPU)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="autocast dtype (bf16; fp32 on a CPU, where bf16's first steps at tiny sizes cost seconds)")
    p.add_argument("--budget", type=float, default=440, help="seconds for all sections (8 min with start and end)")
    p.add_argument("--cap-scale", type=float, default=1.0,
                   help="multiplies every section's time cap (a slower card, a shared machine)")
    p.add_argument("--only", help=f"comma-separated sections: {', '.join(s.name for s in SECTIONS)}")
    p.add_argument("--work", type=Path, help="folder for the data, stages and checkpoints (kept); default: temporary")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = {"warmup": 10 if gpu else 2, "precision": "bf16" if gpu else "fp32",
                "distill_batch": 64 if gpu else args.batch, "predict_batch": 256 if gpu else 2 * args.batch,
                "images": 4096 if gpu else 256, "loader_workers": max(1, min(8, usable_cpus() - 2)) if gpu else 1,
                "worker_cpus": 2 if gpu else 1}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def selected_sections(only: str | None) -> list[Section]:
    if not only:
        return list(SECTIONS)
    names = only.split(",")
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(s.name for s in SECTIONS)}")
    return [s for s in SECTIONS if s.name in names]


def expected_figures(sections: list[Section]) -> list[str]:
    """The figures these sections yield, with the ratios of theirs."""
    measured = [key for s in sections for key in s.figures]
    return measured + [key for key, pair in RATIOS.items() if set(pair) <= set(measured)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sections = selected_sections(args.only)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run it on the GPU node, or smoke-test it with --device cpu and tiny sizes "
              "(see the docstring)", file=sys.stderr)
        return 2
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="drray-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, work)
    if bench.cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes; drray's fit loop turns it on for CUDA too
    print(environment(bench.device), flush=True)
    # this process's loops get the torch threads the Ray Train worker gets (its CPUs), so the
    # runs differ in their data path only (and a shared CPU's barrier stalls hit all alike)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.worker_cpus)
    try:
        for section in sections:
            bench.run(section)
    finally:
        torch.set_num_threads(threads)
        bench.stop_ray()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    bench.ratios()
    body = section_body(bench, argv)
    # a run of some sections (a rerun of the ones that failed) keeps the whole run's section
    title = f"GPU throughput (bench/gpu.py): {card_name(bench.device)}" + (f", only {args.only}" if args.only else "")
    write_section(title, body, args.results)
    print(f"\n{body}\nwritten to {args.results}", flush=True)
    missing = [FIGURES[k].label for k in expected_figures(sections) if k not in bench.figures]
    if missing:
        print(f"{len(missing)} figure(s) missing: {'; '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
