"""Fundus preprocessing (Voets et al. / Gulshan et al.): pure functions, no Ray.

decode (reduced-scale JPEG decoding, any mode -> RGB, 10-16-bit data by its real depth, EXIF
     rotation)
  -> find the fundus circle (robust to dark images, grey backgrounds, text burnt into the border,
     glare, circles cut at the top and bottom or on all four sides, notches; photographs without
     a border are rejected as ``no_border``)
  -> crop the square around the whole circle (black where the circle is cut), centred
  -> resize so that the circle's diameter spans the output.

Reduced-scale decoding is the main performance lever: an EyePACS original is ~10 MP and the
output 0.09 MP; PIL's ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale directly.

Coordinates: pixel centres lie at integers, so an image of width w spans -0.5 .. w - 0.5, and
every rescale (decoding at 1/8, the detection reduction) maps x to (x + 0.5) * factor - 0.5.
"""

from __future__ import annotations

import functools
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from scipy import ndimage

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp")
DETECT_SIDE = 192  # circle detection runs on a whole-factor reduction of at most this side


class ImageRejected(Exception):
    """An input image cannot be prepared.

    ``kind`` is a short category for counting (``empty``, ``corrupt``, ``not_image``,
    ``decompression_bomb``, ``no_fundus``, ``no_border``, ``low_bit_depth``, ...); ``str(exc)`` is a
    reason a person understands.
    """

    def __init__(self, kind: str, message: str, errno: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.errno = errno  # for ``unreadable``: the system's error, which may pass (drray.data.prepare)


@dataclass(frozen=True)
class Circle:
    cx: float
    cy: float
    r: float

    def scaled(self, factor: float) -> Circle:
        """The same circle in the image resized by ``factor``.

        Pixel centres lie at integer coordinates and an image spans -0.5 .. size - 0.5, so x maps to
        (x + 0.5) * factor - 0.5; plain x * factor would drift half a pixel up-left per rescale.
        """
        return Circle((self.cx + 0.5) * factor - 0.5, (self.cy + 0.5) * factor - 0.5, self.r * factor)


@dataclass(frozen=True)
class Prepared:
    image: Image.Image  # RGB, size x size
    circle: Circle  # in original-resolution pixel coordinates
    original_size: tuple[int, int]  # (width, height) after EXIF rotation


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


class Decoded(NamedTuple):
    image: Image.Image  # RGB, possibly at reduced scale
    scale: float  # of ``image`` relative to the original: 1.0, 0.5, 0.25 or 0.125
    original_size: tuple[int, int]  # (width, height) of the original, after EXIF rotation


def decode_rgb(path: str | Path, min_side: int, max_pixels: int) -> Decoded:
    """Decode ``path`` to RGB, at reduced scale when the file allows it.

    Raises :class:`ImageRejected` for empty, corrupt, truncated, non-image and oversized files.
    """
    path = Path(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageRejected("empty", "empty file (0 bytes)")
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}", errno=exc.errno) from exc
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
                scale = 1.0
                if img.format == "JPEG":
                    drafted = img.draft(img.mode if img.mode in ("RGB", "L") else None, (min_side, min_side))
                    # libjpeg scales by exactly 1/2, 1/4 or 1/8 (a partial last block still gives a
                    # pixel), so the scale is that fraction, not the ratio of the rounded-up sizes
                    scale = drafted[1][2] / width if drafted else 1.0
                wide_colour = _is_wide_colour(img)
                img.load()
                rotated = ImageOps.exif_transpose(img)
                original = (width, height) if rotated.size == img.size else (height, width)
                if wide_colour:
                    _check_high_bytes(rotated)
                return Decoded(to_rgb(rotated), scale, original)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("decompression_bomb", f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_image", "not an image: the file's contents are not a known image format") from exc
    except OSError as exc:
        if exc.errno is not None:  # the system failed to read it (I/O, permissions, open files): not its contents
            raise ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}", errno=exc.errno) from exc
        raise ImageRejected("corrupt", f"corrupt or truncated image: {exc}") from exc
    except (SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageRejected("corrupt", f"corrupt or truncated image: {exc}") from exc


def _is_wide_colour(img: Image.Image) -> bool:
    """A colour file with 16 bits per channel, which Pillow decodes to the high byte of each."""
    if img.mode not in ("RGB", "RGBA", "RGBX") or not img.tile:
        return False
    args = img.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args and isinstance(args[0], str) else "")
    return ";16" in rawmode


def _check_high_bytes(img: Image.Image) -> None:
    """Keeping the high bytes is right for full-range 16-bit colour, but 10-, 12- or 14-bit data
    stored in 16 bits leaves them below 64: a near-black, posterised image that no rescaling can
    repair, since the low bits are gone."""
    if max(high for _, high in img.getextrema()[:3]) < 64:
        raise ImageRejected(
            "low_bit_depth",
            "16-bit colour image holding data of 14 bits or fewer (e.g. 12-bit): the decoder keeps "
            "only the high 8 bits of each value, which leaves it nearly black; convert it to 8-bit "
            "RGB first (scale 12-bit values by 255/4095)",
        )


def _white_level(peak: float) -> float:
    """The full-scale value of integer data wider than 8 bits.

    Sensors store 10, 12 or 14 bits in 16-bit files, and nothing in a PNG or TIFF says which, so
    the depth is read from the maximum: the smallest of 10, 12, 14 and 16 bits that holds it (a
    16-bit image whose maximum is <= 4095 holds 12-bit data). A photograph reaches near its white
    level at the optic disc, so this is off only for one that is underexposed by 4x or more, and
    then it is brightened, which circle finding does not mind. Wider data: its own maximum.
    """
    for bits in (10, 12, 14, 16):
        if peak <= 2**bits - 1:
            return float(2**bits - 1)
    return float(peak)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit and float scaled, alpha composited on black."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0.0
        if peak > 255:  # data wider than 8 bits: scale its full range (its real depth) to 8 bits
            arr = arr * (255.0 / _white_level(peak))
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

    The circle is fitted to the edges of the bright region, leaving out edges that touch the
    frame, so a circle cut at the top and bottom (or on all four sides, as long as the corners
    show background) is still found whole. A trimmed refit ignores notches, glare and stray bright
    pixels. Raises :class:`ImageRejected` when no fundus is visible, and with kind ``no_border``
    for a photograph without a background border (see :func:`_check_border`).
    """
    # A whole-factor box reduction keeps the pixel grid: detection pixel i covers pixels
    # k*i .. k*i + k - 1, so the circle maps back exactly; and it averages away noise over k*k
    # pixels. An image under 4 * DETECT_SIDE px (k < 4) gets a 3x3 box blur on top, a symmetric
    # one that leaves the edge where it was: a dark, noisy frame of a few hundred pixels
    # otherwise had a ragged edge (measured on the CI and demo synthetic sets, frames 360-480 px
    # wide, k 2-3: 3 of 4,960 images rejected as "not a circle", on-circle 0.70-0.76 against the
    # 0.85 limit; with the blur none, the lowest 0.954). The blur widens the thresholded region by
    # ~0.5 detection pixels (radius +0.9 px instead of +0.4 on a drawn 100 px disc): a crop
    # ~0.5% wider, harmless.
    k = -(-max(img.size) // DETECT_SIDE)
    small = img.reduce(k) if k > 1 else img
    if k < 4:
        small = small.filter(ImageFilter.BoxBlur(1))
    rgb = np.asarray(small, dtype=np.float32)
    distance, threshold = _distance_from_background(rgb)
    mask = _largest_region(distance > threshold)
    points = _edge_points(mask, distance, threshold)
    if len(points) < 12:
        raise ImageRejected("no_fundus", "no visible fundus: no circular edge between fundus and background")
    circle = _robust_circle_fit(points)
    _check_plausible(circle, mask, points)
    return circle.scaled(k)


def _distance_from_background(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Each pixel's distance in RGB from the background colour, and the threshold above which a
    pixel is fundus. Distance separates a dark red fundus from a black background by brightness and
    from a grey one by colour."""
    background, noise = _background(rgb)
    distance = np.sqrt(((rgb - background) ** 2).sum(axis=2))
    contrast = float(np.percentile(distance, 80))
    if contrast < 6.0:
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: image is nearly uniform (contrast {contrast:.1f} of 255)",
        )
    _check_border(background)
    return distance, max(0.15 * contrast, 3.0 * noise + 2.0)


def _background(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The background's colour and noise (standard deviation per channel), from the frame's
    darkest corner, which lies outside the circle even when it is cut at the top and bottom.

    Median and median absolute deviation rather than mean and standard deviation: white text
    burnt into the border (dates, IDs) and fundus reaching into the corner of a circle cut on
    all four sides must not read as noise, which raises the threshold until no fundus is left.
    """
    h, w, _ = rgb.shape
    # small patches, so that even a circle cut on all four sides leaves them mostly background
    ph, pw = max(3, h // 24), max(3, w // 24)
    corners = [rgb[:ph, :pw], rgb[:ph, -pw:], rgb[-ph:, :pw], rgb[-ph:, -pw:]]
    darkest = min(corners, key=lambda c: float(np.median(c.max(axis=2))))
    background = np.median(darkest.reshape(-1, 3), axis=0).astype(np.float32)
    noise = 1.4826 * float(np.median(np.abs(darkest - background)))  # MAD -> standard deviation
    return background, noise


def _check_border(background: np.ndarray) -> None:
    """Full-frame photographs (fundus in every corner, no border) are rejected as ``no_border``.

    The circle's size cannot be measured there, and guessing it (say, the frame's inscribed
    circle) would give those images a different magnification from every other image of the set,
    without a word; a reject is counted and can be looked at. A border is black or grey and a
    fundus red, so a "background" whose colour is far from neutral for its brightness is fundus.
    """
    if float(np.ptp(background)) > 8.0 + 0.3 * float(background.max()):
        raise ImageRejected(
            "no_border",
            "no border around the fundus: the frame's corners show fundus, not background (a "
            "full-frame or cropped photograph), so the fundus circle and its size cannot be "
            "measured; prepare the uncropped original",
        )


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


def _edge_points(mask: np.ndarray, distance: np.ndarray, threshold: float) -> np.ndarray:
    """(x, y) where each row and column enters and leaves the fundus, except at the frame's border."""
    h, w = mask.shape
    rows, left = _entries(mask, distance, threshold)
    rows_r, right = _entries(mask[:, ::-1], distance[:, ::-1], threshold)
    cols, top = _entries(mask.T, distance.T, threshold)
    cols_b, bottom = _entries(mask.T[:, ::-1], distance.T[:, ::-1], threshold)
    parts = [
        np.column_stack([left, rows]),
        np.column_stack([w - 1 - right, rows_r]),
        np.column_stack([cols, top]),
        np.column_stack([cols_b, h - 1 - bottom]),
    ]
    return np.concatenate(parts).astype(np.float64)


def _entries(mask: np.ndarray, distance: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Where each row enters the fundus from the left, to a fraction of a pixel: (rows, x).

    Rows that enter at the frame's border are left out. The edge is placed where the distance
    crosses half the rim's level (read just inside the edge), not the detection threshold: a
    blurred step crosses its half level at the same place however much decoding and reduction
    blurred it, so the radius does not depend on the image's size.
    """
    rows = np.flatnonzero(mask.sum(axis=1) >= 3)
    first = mask[rows].argmax(axis=1)
    rows, first = rows[first > 0], first[first > 0]
    profile = distance[rows]
    last, index = mask.shape[1] - 1, np.arange(len(rows))

    def at(offset):
        return profile[index, np.minimum(first + offset, last)]

    a, b, c = at(1), at(2), at(3)
    rim = a + b + c - np.maximum(np.maximum(a, b), c) - np.minimum(np.minimum(a, b), c)  # median
    level = np.maximum(threshold, 0.5 * rim)
    x = first.astype(np.float64)
    below, above = at(-1), at(0)
    for offset in (1, 2):  # the half level can lie a pixel or two inside the thresholded edge
        step = above < level
        x += step
        below, above = np.where(step, above, below), np.where(step, at(offset), above)
    fraction = np.clip((level - below) / np.maximum(above - below, 1e-6), 0.0, 1.0)
    return rows, x - 1.0 + fraction


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


def _check_plausible(circle: Circle, mask: np.ndarray, points: np.ndarray) -> None:
    """The fitted circle must explain the fundus region: its edge lies on the circle, and the
    region fills the part of the circle inside the frame, hardly leaves it and has no large hole.
    Anything else (a wrong background, a region that is not round) would give a wrong crop
    without a word, so it is rejected."""
    h, w = mask.shape
    # a real rim lies on it but for notches, glare and vessels; the tolerance lets through
    # photographs stretched by up to ~15% (`drray synth --original-size` stretches 4:3 frames
    # to 3:2), not the ragged edge of a region that is no fundus
    residual = np.abs(np.hypot(points[:, 0] - circle.cx, points[:, 1] - circle.cy) - circle.r)
    on_circle = float(np.mean(residual <= max(1.0, 0.08 * circle.r)))
    if on_circle < 0.85:
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: the bright region's edge is not a circle (only {on_circle:.0%} "
            f"of it lies near the best-fitting circle)"
        )
    if not (0.2 * min(h, w) <= circle.r <= 0.75 * max(h, w)):
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: the bright region is not a fundus circle "
            f"(radius {circle.r:.0f} px in a {w}x{h} detection image)"
        )
    if not (0 <= circle.cx < w and 0 <= circle.cy < h):
        raise ImageRejected("no_fundus", "no visible fundus: fitted circle centre lies outside the image")
    covered, spill = _area_match(circle, mask)
    if covered < 0.9 or spill > 0.03:
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: the bright region does not match the fitted circle "
            f"(it covers {covered:.0%} of the circle within the frame, and {spill:.0%} of "
            f"that area lies outside the circle)"
        )
    hole = _largest_hole(mask) / (math.pi * circle.r**2)
    if hole > 0.01:  # a fundus's largest hole is under 0.2% of its circle (synthetic and real)
        raise ImageRejected(
            "no_fundus",
            f"no visible fundus: the bright region has a dark hole of {hole:.0%} of the fitted "
            f"circle's area (a full-frame photograph whose darkest corner was taken for background?)"
        )


def _area_match(circle: Circle, mask: np.ndarray) -> tuple[float, float]:
    """How much of the circle within the frame the region covers, and how much of the region
    lies outside the circle, as a fraction of the circle's area within the frame.

    A band around the circle is left out of both: the region's edge (at the detection threshold)
    lies up to a blur's width outside the fitted circle (at the rim's half level).
    """
    h, w = mask.shape
    yy, xx = np.ogrid[0:h, 0:w]
    d2 = (xx - circle.cx) ** 2 + (yy - circle.cy) ** 2
    band = 1.5 + 0.02 * circle.r
    inner, outer = d2 <= (circle.r - band) ** 2, d2 > (circle.r + band) ** 2
    area = max(1, np.count_nonzero(d2 <= circle.r**2))
    covered = np.count_nonzero(mask & inner) / max(1, np.count_nonzero(inner))
    return covered, np.count_nonzero(mask & outer) / area


def _largest_hole(mask: np.ndarray) -> int:
    """Pixels of the largest background region enclosed by ``mask`` (not touching the frame)."""
    labels, count = ndimage.label(~mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    sizes[0] = sizes[border] = 0
    return int(sizes.max())


# ---------------------------------------------------------------------------------------------
# Cropping and the whole preprocessing
# ---------------------------------------------------------------------------------------------


def crop_to_circle(img: Image.Image, circle: Circle, size: int, mask_outside: bool = True) -> Image.Image:
    """The square around the whole circle (black where it leaves the frame), resized to size.

    The square is placed to a fraction of a pixel (it spans cx + 0.5 - r .. cx + 0.5 + r in edge
    coordinates, pixel centres at integers); rounding it to whole pixels would shift the output
    by up to half a decoded pixel and leave a sliver of black on one side of the masked disc.
    """
    left, top, side = circle.cx + 0.5 - circle.r, circle.cy + 0.5 - circle.r, 2 * circle.r
    box = (math.floor(left), math.floor(top), math.ceil(left + side), math.ceil(top + side))
    square = img.crop(box)  # pads outside the frame with black
    within = (left - box[0], top - box[1], left + side - box[0], top + side - box[1])
    out = square.resize((size, size), Image.BICUBIC, box=within)
    if mask_outside:
        out = Image.composite(Image.new("RGB", out.size), out, _outside_mask(size))  # black outside
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
    img, scale, original = decode_rgb(path, min_side=max(size, 160), max_pixels=max_pixels)
    circle = find_fundus(img)
    out = crop_to_circle(img, circle, size, mask_outside)
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
