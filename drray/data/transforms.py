"""Image transforms by purpose: SimCLR views, training noise, evaluation. Per sample, on uint8.

Each transform is applied image by image, so every image (and each of SimCLR's two views)
draws its own crop, flip, rotation and jitter: batched tensor transforms draw one set of
parameters for the whole batch, which is wrong for contrastive learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

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
    """uint8 NCHW images -> float32, scaled to [0, 1] and standardised (ImageNet statistics)."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def simclr_view(spec: AugmentSpec) -> v2.Compose:
    """One SimCLR view: crop, flips, rotation (fundus images have no canonical orientation),
    colour jitter, grayscale, blur."""
    s = spec.jitter_strength
    kernel = max(3, (spec.size // 10) | 1)  # odd, ~10% of the image as in SimCLR
    return v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(spec.hflip),
        v2.RandomVerticalFlip(spec.vflip),
        v2.RandomRotation(spec.rotation),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=spec.jitter_prob),
        v2.RandomGrayscale(spec.grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=spec.blur_prob),
    ])


def train_noise(jitter: float = 0.4) -> v2.Compose:
    """Supervised and student training: flips, right-angle rotations and colour jitter (the
    paper's student noise is colour jitter and horizontal flips)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, 0.05)], p=0.8 if jitter else 0.0),
    ])


def weak_view(translate: float = 0.125) -> v2.Compose:
    """FixMatch's and MixMatch's weak augmentation: a horizontal flip and a translation of up to
    ``translate`` of the side (12.5% in both papers)."""
    return v2.Compose([v2.RandomHorizontalFlip(0.5), v2.RandomAffine(degrees=0, translate=(translate, translate))])


class RandAugmentAnyMagnitude(torch.nn.Module):
    """RandAugment with a magnitude drawn anew for every image (FixMatch's "RA" variant),
    not one fixed magnitude for the whole run."""

    def __init__(self, num_ops: int = 2, bins: int = 31):
        super().__init__()
        self.num_ops, self.bins = num_ops, bins

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        magnitude = int(torch.randint(1, self.bins, ()))
        return v2.RandAugment(self.num_ops, magnitude=magnitude, num_magnitude_bins=self.bins)(image)


class Cutout(torch.nn.Module):
    """A grey square (value 127) of side up to ``max_side`` of the image's, at a random centre
    (clipped at the border), as FixMatch applies after RandAugment."""

    def __init__(self, max_side: float = 0.5):
        super().__init__()
        self.max_side = max_side

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        side = max(1, int(round(float(torch.rand(())) * self.max_side * min(h, w))))
        cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        out = image.clone()
        out[..., max(0, cy - side // 2):cy + (side + 1) // 2, max(0, cx - side // 2):cx + (side + 1) // 2] = 127
        return out


def strong_view(num_ops: int = 2, cutout: float = 0.5) -> v2.Compose:
    """FixMatch's strong augmentation: the weak view, RandAugment (``num_ops`` operations at a
    random magnitude), then Cutout."""
    return v2.Compose([weak_view(), RandAugmentAnyMagnitude(num_ops), Cutout(cutout)])


def evaluation() -> v2.Compose:
    return v2.Compose([v2.Identity()])


def decode_to_tensor(data: bytes) -> torch.Tensor:
    """A prepared image (shard ``image`` bytes) as a uint8 CHW tensor."""
    arr = np.asarray(decode_image(data))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def apply_each(transform, images: list[torch.Tensor], size: int) -> np.ndarray:
    """Apply ``transform`` to each image independently; stack to a uint8 NCHW array
    (an empty batch keeps the image shape, so every block has the same schema)."""
    if not images:
        return np.zeros((0, 3, size, size), np.uint8)
    return torch.stack([transform(img) for img in images]).numpy()


def iter_eval_batches(prepared: str, split: str | None = None, ids: set[str] | None = None,
                      batch_size: int = 64):
    """Plain (no Ray) iteration over prepared images as evaluation batches: for predictions in a
    single process, tests and baselines. Yields dicts with ``image_id`` and ``image`` (NCHW)."""
    import pyarrow.parquet as pq

    from drray.data.shards import read_manifest, shard_paths

    size = read_manifest(prepared)["params"]["size"]
    transform = evaluation()
    for path in shard_paths(prepared):
        table = pq.read_table(path, columns=["image_id", "image", "split"])
        rows = [r for r in table.to_pylist()
                if (split is None or r["split"] == split) and (ids is None or r["image_id"] in ids)]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [decode_to_tensor(r["image"]) for r in chunk]
            yield {"image_id": [r["image_id"] for r in chunk], "image": apply_each(transform, images, size)}
