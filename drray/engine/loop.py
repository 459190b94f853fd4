"""The training loop, shared by every stage (prediction: drray.engine.predict). A stage supplies a step function
``step(model, batch) -> (loss, n_images)`` or ``(loss, n_images, stats)``, where ``stats`` are
detached scalars the epoch reports as means per image (FixMatch's mask rate); the loop does
precision, optimisation and timing, and makes the method's views of each batch on the device
(``augment``: batch -> batch, see drray.methods.base.Views)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from drray.data.transforms import normalise

Step = Callable[[torch.nn.Module, dict], tuple]  # (loss, n) or (loss, n, {name: scalar tensor})
Augment = Callable[[dict], dict]  # a batch on the device -> the batch with its views made


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None: plain fp32).

    ``auto``: bf16 on GPUs that support it (else fp16), bf16 on CPUs with native bf16
    (AVX512-BF16/AMX, 1.4-2.7x faster than fp32 here), fp32 on other CPUs.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}: choose auto, bf16, fp16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if native_bf16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def make_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling only where fp16 needs it (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")


def to_device(batch: dict, device: torch.device, channels_last: bool = False,
              augment: Augment | None = None) -> dict:
    """Move a batch to the device (images as uint8: a quarter of float's bytes), make its views
    there (``augment``), and normalise the uint8 images (NCHW) that are left."""
    out = {key: _moved(value, device) for key, value in batch.items()}
    if augment is not None:
        out = augment(out)
    return {key: _model_input(value, channels_last) for key, value in out.items()}


def _moved(value, device: torch.device):
    cuda = device.type == "cuda"
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        value = _host_tensor(value, pinned=cuda)
    if not isinstance(value, torch.Tensor):
        return value
    if cuda and value.device.type == "cpu" and not value.is_pinned():
        value = value.pin_memory()  # from page-locked memory the copy runs beside the GPU's work, not before it
    return value.to(device, non_blocking=True)


def _host_tensor(array: np.ndarray, pinned: bool) -> torch.Tensor:
    """A numpy batch as a CPU tensor: copied once, into page-locked memory for a GPU. Ray Data
    hands out read-only arrays; nothing writes into the tensor, but torch warns about every
    one, so a read-only one is copied (a uint8 batch: cheap next to a step)."""
    if pinned:
        out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, array.dtype)).dtype, pin_memory=True)
        out.numpy()[...] = array
        return out
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _model_input(value, channels_last: bool):
    if isinstance(value, torch.Tensor) and value.ndim == 4:
        if value.dtype == torch.uint8:
            value = normalise(value)
        if channels_last:
            value = value.contiguous(memory_format=torch.channels_last)
    return value


def ahead(items: Iterable, make: Callable, depth: int = 1) -> Iterator:
    """``make(item)`` for every item, in order, computed up to ``depth`` items ahead in a thread
    while the caller works on the current one. Views made on the device in the training thread
    left a CPU core idle between steps (the demo's pretraining: 221 s -> 259 s when they moved
    there from Ray Data's tasks); on a GPU the copy and the view kernels are queued while the
    step runs. Torch's ops release the GIL, so the two threads run side by side. The items are
    drawn in order by one thread (a seeded view generator gives the views it gave before); an
    error in ``make`` or in the items is raised in the caller; a caller that stops early stops
    the thread, having taken no item beyond ``depth`` ahead of what it used. At most
    ``depth`` + 2 made items exist at once (the caller's, the queued ones, the one being made):
    views of a 299 px FixMatch batch are ~1 GB on a GPU, so one is queued by default."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not offer((True, make(item))):
                    return
            offer((False, None))
        except BaseException as exc:  # handed to the caller, raised there
            offer((False, exc))

    worker = threading.Thread(target=fill, name="drray-ahead", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            more, value = slots.get()
            if not more:
                finished = True
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        # after the last item the thread has ended; a caller that stopped early (a failed step,
        # an interrupt) waits a little for the item in hand, not for a stream that may be stuck
        worker.join(timeout=None if finished else 30)


def train_epoch(model: torch.nn.Module, batches: Iterable[dict], step: Step, optimizer, scheduler,
                scaler, *, device: torch.device, dtype: torch.dtype | None,
                channels_last: bool = False, after_step: Callable[[], None] | None = None,
                augment: Augment | None = None) -> dict:
    """One pass over ``batches``; returns loss (mean per image), images, images/s, lr, and
    data_wait_s: the time the loop waited for a batch ready on the device (a slow input pipeline
    or views slower than the steps show here). Each batch is moved and given its views
    (``augment``) one step ahead, in a thread (:func:`ahead`). ``after_step`` runs after every
    optimizer step (an EMA of the weights). Nothing in a step waits for the device: the loss
    and the stats are summed where they are computed and read once, after the epoch."""
    model.train()
    total, seen, start, sums = 0.0, 0, time.perf_counter(), {}
    waited, ready, first_wait = 0.0, start, None
    for batch in ahead(batches, lambda b: to_device(b, device, channels_last, augment)):
        waited += time.perf_counter() - ready
        first_wait = waited if first_wait is None else first_wait
        with autocast(device, dtype):
            loss, n, *stats = step(model, batch)
        for name, value in (stats[0] if stats else {}).items():  # summed on the device: no sync per step
            sums[name] = sums.get(name, 0.0) + value.detach().float() * n
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()
        total = total + loss.detach().float() * n  # on the device: reading it per step would wait for the GPU
        seen += n
        ready = time.perf_counter()
    total = float(total)  # the epoch's one read of the device
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "images": seen, "seconds": round(seconds, 3),
            "images_per_s": round(seen / max(seconds, 1e-9), 2), "data_wait_s": round(waited, 3),
            "first_batch_wait_s": round(first_wait or 0.0, 3),
            "lr": optimizer.param_groups[0]["lr"],
            **{name: round(float(value) / max(seen, 1), 4) for name, value in sums.items()}}
