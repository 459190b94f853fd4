"""What a data stream does to prepared images: decode them to uint8 tensors (once: the views are
made in the training loop, on its device, by drray.data.augment), and standardise them for the
model. Also SimCLR's augmentation strengths (AugmentSpec)."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from drray.data.fundus import decode_image

# ImageNet statistics: they suit ImageNet-initialised backbones and are harmless otherwise.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentSpec:
    """SimCLR augmentation strengths (mirrors config.AugmentConfig, without importing it)."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    vflip: float = 0.5
    rotation: float = 180.0
    jitter_strength: float = 0.5
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5


def normalise(images: torch.Tensor) -> torch.Tensor:
    """NCHW images, uint8 or float in [0, 1] (augmented views) -> float32 standardised
    (ImageNet statistics)."""
    mean, std = _statistics(images.device)
    unit = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (unit - mean) / std


@functools.cache
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as (1, 3, 1, 1) tensors on ``device``, made once per device: building them
    in every call copied them host-to-device at every step."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(STD, device=device).view(1, 3, 1, 1))


def decode_to_tensor(data: bytes) -> torch.Tensor:
    """A prepared image (shard ``image`` bytes) as a uint8 CHW tensor."""
    arr = np.asarray(decode_image(data))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_batch(images: list[bytes], size: int) -> np.ndarray:
    """Prepared images (shard ``image`` bytes) as one uint8 NCHW array, what a stream ships: the
    training loop makes the views on its device (drray.data.augment). An empty batch keeps the
    image shape, so every block has the same schema."""
    if not images:
        return np.zeros((0, 3, size, size), np.uint8)
    return np.ascontiguousarray(np.stack([np.asarray(decode_image(data)) for data in images]).transpose(0, 3, 1, 2))


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_on_cpu(encoded: list[bytes], size: int) -> tuple[np.ndarray, list[str]]:
    """The images that decode to ``size`` x ``size`` RGB, as uint8 NCHW (in row order), with the
    training streams' decode (:func:`decode_batch`), and per row why it could not
    be decoded ("" for the decoded ones)."""
    try:  # the common case: every image decodes, in one call
        images = decode_batch(encoded, size)
        if images.shape[1:] == (3, size, size):
            return images, [""] * len(encoded)
    except Exception:  # noqa: BLE001 - a broken image raises whatever its decoder raises; found below
        pass
    decoded, errors = [], []
    for data in encoded:
        try:
            image = decode_batch([data], size)
            error = "" if image.shape[1:] == (3, size, size) else \
                f"decoded to {image.shape[3]}x{image.shape[2]}, not the prepared {size}x{size}"
        except Exception as exc:  # noqa: BLE001 - one bad image is that row's outcome, not the job's end
            error = f"{type(exc).__name__}: {exc}"
        errors.append(error)
        if not error:
            decoded.append(image)
    return (np.concatenate(decoded) if decoded else decode_batch([], size)), errors


def decode_jpeg_batch(encoded: list[bytes], size: int, device):
    """JPEG images as one uint8 NCHW tensor on ``device``, decoded in one batched call (nvJPEG on
    a CUDA device). Raises when any image is not a ``size`` x ``size`` JPEG that it can read: no
    partial results (the caller falls back to the CPU decode, which finds the bad rows)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in encoded]
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders for TorchCodec's
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    if any(tuple(image.shape) != (3, size, size) for image in images):
        raise ValueError(f"an image is not {size}x{size}")
    return torch.stack(images)


def decode_images(encoded: list[bytes], size: int, device) -> tuple[object, list[str]]:
    """A batch's decodable images (uint8 NCHW: a tensor already on a CUDA ``device``, else a
    numpy array) and per row why it could not be decoded ("" for the decoded ones)."""
    if device.type == "cuda" and encoded and all(d[:3] == JPEG_MAGIC for d in encoded):
        try:
            return decode_jpeg_batch(encoded, size, device), [""] * len(encoded)
        except (RuntimeError, ValueError):
            pass  # an image nvJPEG cannot read: the CPU decode says which, and decodes the rest
    return decode_on_cpu(encoded, size)


def iter_eval_batches(prepared: str, split: str | None = None, ids: set[str] | None = None,
                      batch_size: int = 64):
    """Plain (no Ray) iteration over prepared images as evaluation batches: for predictions in a
    single process, tests and baselines. Yields dicts with ``image_id`` and ``image`` (NCHW)."""
    import pyarrow.parquet as pq

    from drray.data.shards import read_manifest, shard_paths

    size = read_manifest(prepared)["params"]["size"]
    for path in shard_paths(prepared):
        table = pq.read_table(path, columns=["image_id", "image", "split"])
        rows = [r for r in table.to_pylist()
                if (split is None or r["split"] == split) and (ids is None or r["image_id"] in ids)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            yield {"image_id": [r["image_id"] for r in chunk], "image": decode_batch([r["image"] for r in chunk], size)}
