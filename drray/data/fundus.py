"""Fundus preprocessing (Voets et al. / Gulshan et al.): pure functions, no Ray.

decode (reduced-scale JPEG decoding, any mode -> RGB, EXIF rotation)
  -> find the fundus circle (robust to dark images, grey backgrounds, circles cut at the top
     and bottom, notches)
  -> crop the square around the whole circle (black where the circle is cut), centred
  -> resize so that the circle's diameter spans the output.

Reduced-scale decoding is the main performance lever: an EyePACS original is ~10 MP and the
output 0.09 MP; PIL's ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from scipy import ndimage

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp")
DETECT_SIDE = 192  # circle detection runs on an image of at most this side


class ImageRejected(Exception):
    """An input image cannot be prepared.

    ``kind`` is a short category for counting (``empty``, ``corrupt``, ``not_image``,
    ``decompression_bomb``, ``no_fundus``, ...); ``str(exc)`` is a reason a person understands.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Circle:
    cx: float
    cy: float
    r: float

    def scaled(self, factor: float) -> Circle:
        return Circle(self.cx * factor, self.cy * factor, self.r * factor)


@dataclass(frozen=True)
class Prepared:
    image: Image.Image  # RGB, size x size
    circle: Circle  # in original-resolution pixel coordinates
    original_size: tuple[int, int]  # (width, height) after EXIF rotation


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode_rgb(path: str | Path, min_side: int, max_pixels: int) -> tuple[Image.Image, float]:
    """Decode ``path`` to RGB, at reduced scale when the file allows it.

    Returns the image and its scale relative to the original (1.0, 0.5, 0.25, 0.125).
    Raises :class:`ImageRejected` for empty, corrupt, truncated, non-image and oversized files.
    """
    path = Path(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageRejected("empty", "empty file (0 bytes)")
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        "decompression_bomb",
                        f"decompression bomb: {width}x{height} = {width * height:,} pixels "
                        f"exceeds the limit of {max_pixels:,} (data.max_pixels)"
                    )
                if img.format == "JPEG":
                    img.draft(img.mode if img.mode in ("RGB", "L") else None, (min_side, min_side))
                img.load()
                scale = img.size[0] / width
                img = ImageOps.exif_transpose(img)
                return to_rgb(img), scale
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_image", "not an image: the file's contents are not a known image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageRejected("corrupt", f"corrupt or truncated image: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled, alpha composited on black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        if peak > 255:  # 16-bit (or wider) data: scale the full range to 8 bits
            arr = arr * (255.0 / (65535.0 if peak <= 65535 else peak))
        elif mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        gray = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_mode", f"unsupported image mode {mode!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Finding the fundus circle
# ---------------------------------------------------------------------------------------------


def find_fundus(img: Image.Image) -> Circle:
    """Locate the fundus circle in an RGB image; coordinates are in ``img``'s pixels.

    The circle is fitted to the left/right (and top/bottom) edges of the bright region, leaving
    out edges that touch the frame, so a circle cut at the top and bottom is still found whole.
    A trimmed refit ignores notches and stray bright pixels. Raises :class:`ImageRejected` when
    no fundus is visible.
    """
    factor = min(1.0, DETECT_SIDE / max(img.size))
    if factor < 0.75:  # a box-filtered reduction averages away noise on its own
        small = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))), Image.BOX)
    else:
        small = img.filter(ImageFilter.BoxBlur(1))
    rgb = np.asarray(small, dtype=np.float32)
    mask = _fundus_mask(rgb)
    points = _edge_points(mask)
    if len(points) < 12:
        raise ImageRejected("no_fundus", "no visible fundus: no circular edge between fundus and background")
    circle = _robust_circle_fit(points)
    _check_plausible(circle, mask)
    return circle.scaled(1.0 / factor)


def _fundus_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background colour: the fundus.

    The background colour is read from the frame's corners, which lie outside the circle even
    when it is cut at the top and bottom (the darkest corner, in case the circle reaches into
    another). Distance in RGB from that colour separates a dark red fundus from a black
    background by brightness and from a grey one by colour.
    """
    h, w, _ = rgb.shape
    ph, pw = max(2, h // 12), max(2, w // 12)
    corners = [rgb[:ph, :pw], rgb[:ph, -pw:], rgb[-ph:, :pw], rgb[-ph:, -pw:]]
    darkest = min(corners, key=lambda c: float(np.median(c.max(axis=2))))
    background = np.median(darkest.reshape(-1, 3), axis=0)
    distance = np.sqrt(((rgb - background) ** 2).sum(axis=2))
    noise = float(np.sqrt(((darkest - background) ** 2).sum(axis=2)).std())
    contrast = float(np.percentile(distance, 80))
    if contrast < 6.0:
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: image is nearly uniform (contrast {contrast:.1f} of 255)",
        )
    threshold = max(0.15 * contrast, 3.0 * noise + 2.0)
    return _largest_region(distance > threshold)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected bright region, after an opening that removes noise speckles
    (and stray marks such as text burnt into the frame), which would otherwise pass for edges."""
    opened = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
    labels, count = ndimage.label(opened)
    if count <= 1:
        return opened
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _edge_points(mask: np.ndarray) -> np.ndarray:
    """Where each row and column enters and leaves the fundus, except at the frame's border."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(axis=1) >= 3)
    first = mask[rows].argmax(axis=1)
    last = w - 1 - mask[rows, ::-1].argmax(axis=1)
    cols = np.flatnonzero(mask.sum(axis=0) >= 3)
    top = mask[:, cols].argmax(axis=0)
    bottom = h - 1 - mask[::-1, cols].argmax(axis=0)
    parts = [
        np.column_stack([first - 0.5, rows])[first > 0],
        np.column_stack([last + 0.5, rows])[last < w - 1],
        np.column_stack([cols, top - 0.5])[top > 0],
        np.column_stack([cols, bottom + 0.5])[bottom < h - 1],
    ]
    return np.concatenate(parts).astype(np.float64)


def _fit_circle(points: np.ndarray) -> Circle:
    """Algebraic (Kasa) least-squares circle fit."""
    x, y = points[:, 0], points[:, 1]
    a = np.column_stack([x, y, np.ones_like(x)])
    b = -(x**2 + y**2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2, -e / 2
    r2 = cx**2 + cy**2 - f
    return Circle(float(cx), float(cy), float(np.sqrt(max(r2, 0.0))))


def _robust_circle_fit(points: np.ndarray, rounds: int = 4, keep: float = 0.8) -> Circle:
    circle = _fit_circle(points)
    for _ in range(rounds):
        residual = np.abs(np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r)
        cutoff = np.quantile(residual, keep)
        inliers = points[residual <= max(cutoff, 1.0)]
        if len(inliers) < 12:
            break
        circle = _fit_circle(inliers)
    return circle


def _check_plausible(circle: Circle, mask: np.ndarray) -> None:
    h, w = mask.shape
    if not (0.2 * min(h, w) <= circle.r <= 0.75 * max(h, w)):
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: the bright region is not a fundus circle "
            f"(radius {circle.r:.0f} px in a {w}x{h} detection image)"
        )
    if not (0 <= circle.cx < w and 0 <= circle.cy < h):
        raise ImageRejected("no_fundus", "no visible fundus: fitted circle centre lies outside the image")
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx - circle.cx) ** 2 + (yy - circle.cy) ** 2 <= circle.r**2
    coverage = float(mask[inside].mean())
    spill = float(mask[~inside].mean()) if (~inside).any() else 0.0
    if coverage < 0.6 or spill > 0.15:
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: bright region is not circular "
            f"({coverage:.0%} of the circle is bright, {spill:.0%} outside it)"
        )


# ---------------------------------------------------------------------------------------------
# Cropping and the whole preprocessing
# ---------------------------------------------------------------------------------------------


def crop_to_circle(img: Image.Image, circle: Circle, size: int, mask_outside: bool = True) -> Image.Image:
    """The square around the whole circle (black where it leaves the frame), resized to size."""
    box = (
        round(circle.cx - circle.r),
        round(circle.cy - circle.r),
        round(circle.cx + circle.r),
        round(circle.cy + circle.r),
    )
    out = img.crop(box).resize((size, size), Image.BICUBIC)  # crop pads outside with black
    if mask_outside:
        out.paste(0, mask=_outside_mask(size))
    return out


@functools.lru_cache(maxsize=8)
def _outside_mask(size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    centre = (size - 1) / 2
    outside = (xx - centre) ** 2 + (yy - centre) ** 2 > (size / 2 + 0.5) ** 2
    return Image.fromarray((outside * 255).astype(np.uint8), "L")


def prepare_fundus(path: str | Path, size: int = 299, max_pixels: int = 178_956_970,
                   mask_outside: bool = True) -> Prepared:
    """Decode, find the fundus, centre, crop and resize one image file."""
    # at least ~160 px so that the circle fit has enough edge pixels even for tiny outputs
    img, scale = decode_rgb(path, min_side=max(size, 160), max_pixels=max_pixels)
    circle = find_fundus(img)
    out = crop_to_circle(img, circle, size, mask_outside)
    original = (round(img.width / scale), round(img.height / scale))
    return Prepared(out, circle.scaled(1.0 / scale), original)


def encode_image(img: Image.Image, image_format: str = "jpeg", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode a prepared image (shard ``image`` column) to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
