"""Batched augmentation with per-image random parameters: one implementation for CPU and CUDA.

Every image of a batch, and every view of it, draws its own parameters (crop, flips, angle,
colour factors, which ops apply). An augmentation first draws them for the whole batch, a few
numbers per image, on the generator's device (the CPU unless a CUDA generator is given), then
renders the batch on the images' device; so one seed gives the same parameters, and the same
views up to float rounding, on every device, and which images an op applies to is decided on
the CPU: the GPU never waits for it. On a CPU the batch is rendered in chunks small enough to
stay in cache between ops.

Images go in as uint8 (or float in [0, 1]) NCHW tensors and come out as float32 in [0, 1] on the
same device. Geometry is one resampling per view (``F.affine_grid``'s grid, built by broadcast
sums, then ``F.grid_sample`` with per-image matrices); colour ops are per-image factors
broadcast over the batch; the Gaussian blur is separable and truncated where the Gaussian is
negligible (13 taps for sigma <= 2 instead of the 29x29 kernel of torchvision's per-image blur
at 299 px).

Differences from the torchvision v2 pipelines they replace (chosen for speed, say so if one
matters): colour jitter applies brightness, contrast, saturation, hue in that fixed order (not a
random order per image); SimCLR's crop, flips and rotation are one bilinear resampling
(torchvision: a bilinear resize, then a nearest-pixel rotation), and the rotation turns the crop
window inside the image, so its corners show image content where torchvision shows black;
RandAugment's shears turn about the image centre (torchvision: the top-left corner); colour ops
work in float, not on rounded uint8.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drray.data.transforms import AugmentSpec

GREY = 127 / 255  # Cutout's fill
RATIO = (3 / 4, 4 / 3)  # random-resized crop's aspect ratios (torchvision's default)
BLUR_SIGMA = (0.1, 2.0)  # SimCLR's blur sigma range
BLUR_RADIUS = math.ceil(3 * BLUR_SIGMA[1])  # taps beyond 3 sigma hold < 0.3% of the kernel's mass
LUMA = (0.2989, 0.587, 0.114)  # grayscale weights (ITU-R 601-2, as torchvision)


# --- random parameters -----------------------------------------------------------------------


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def uniform(n: int, low: float, high: float, generator=None) -> torch.Tensor:
    """``n`` draws from U(low, high) (float32, on the generator's device)."""
    u = torch.rand(n, generator=generator, device=_draw_device(generator))
    return low + (high - low) * u


def chance(n: int, p: float, generator=None) -> torch.Tensor:
    """``n`` coin flips that come up True with probability ``p``."""
    return torch.rand(n, generator=generator, device=_draw_device(generator)) < p


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """A new float32 copy of the images in [0, 1] (uint8 is scaled; float is taken to be in
    [0, 1] already): the renderers below own it and may change it in place."""
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.to(torch.float32, copy=True)


def _on(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(like.device, non_blocking=True)


def _where_chosen(x: torch.Tensor, chosen: torch.Tensor, op) -> torch.Tensor:
    """``op`` applied to the chosen images of ``x`` only, written back into ``x`` (in place):
    ``op(subset, index)``, the index on the draw device (to select the subset's parameters)."""
    index = chosen.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    device_index = _on(index, x)
    return x.index_copy_(0, device_index, op(x.index_select(0, device_index), index))


# --- geometry --------------------------------------------------------------------------------


def crop_boxes(n: int, scale: tuple[float, float], generator=None) -> torch.Tensor:
    """Random-resized-crop boxes, (n, 4): half-width, half-height (fractions of the side) and
    centre (x, y) in [-1, 1] coordinates. The area is U(scale); the aspect ratio is log-uniform
    in RATIO, narrowed where it would push the box out of the image, so no draw is rejected."""
    area = uniform(n, *scale, generator)
    low = torch.maximum(torch.full_like(area, math.log(RATIO[0])), area.log())
    high = torch.minimum(torch.full_like(area, math.log(RATIO[1])), -area.log())
    ratio = (low + (high - low) * uniform(n, 0, 1, generator)).exp()
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    cx, cy = uniform(n, -1, 1, generator) * (1 - w), uniform(n, -1, 1, generator) * (1 - h)
    return torch.stack([w, h, cx, cy], 1)


def affine(linear: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) sampling matrices from (n, 2, 2) linear parts and (n, 2) shifts."""
    return torch.cat([linear, shift.unsqueeze(2)], 2)


def rotations(degrees: torch.Tensor) -> torch.Tensor:
    rad = torch.deg2rad(degrees)
    cos, sin = rad.cos(), rad.sin()
    return torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)


def flips(horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """(n, 2, 2) diagonal matrices, -1 where an image is flipped."""
    return torch.diag_embed(torch.stack([1 - 2 * horizontal.float(), 1 - 2 * vertical.float()], 1))


def simclr_geometry(n: int, spec: AugmentSpec, generator=None) -> torch.Tensor:
    """Crop, flips and rotation as one sampling matrix per image, (n, 2, 3): an output pixel
    p samples the image at centre + S F R p (S the crop's half-sides, F the flips, R the
    rotation): the rotation of the flipped crop, as torchvision composes them."""
    box = crop_boxes(n, spec.crop_scale, generator)
    hflip, vflip = chance(n, spec.hflip, generator), chance(n, spec.vflip, generator)
    angle = uniform(n, -spec.rotation, spec.rotation, generator)
    linear = torch.diag_embed(box[:, :2]) @ flips(hflip, vflip) @ rotations(angle)
    return affine(linear, box[:, 2:])


def resample(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None,
             mode: str = "bilinear") -> torch.Tensor:
    """Each image sampled through its own matrix (output -> input, [-1, 1] coordinates), zeros
    outside the image. No antialiasing: crops are upsampled, or kept at their size."""
    out_h, out_w = size or x.shape[2:]
    grid = sampling_grid(_on(theta, x).to(x.dtype), out_h, out_w)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def sampling_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, c, h, w), align_corners=False)`` as two broadcast sums (the
    same grid; ``affine_grid``'s batched matmul with an inner dimension of 3 cost a third of
    the resampling here)."""
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    t = theta.view(-1, 2, 3, 1, 1)
    return torch.stack([t[:, k, 0] * xs + (t[:, k, 1] * ys.view(h, 1) + t[:, k, 2]) for k in (0, 1)], -1)


def whole_pixels(shift: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Shifts (n, 2) given in sides, rounded to whole pixels, in [-1, 1] coordinates."""
    side = torch.tensor([w, h], dtype=shift.dtype, device=shift.device)
    return (shift * side).round() * 2 / side


# --- rendering ------------------------------------------------------------------------------

# Pixels rendered at a time on a CPU (8 images of 299 px): a chunk's planes stay in cache from
# one op to the next (1.5x here against the whole batch of 32 at once).
CPU_CHUNK_PIXELS = 8 * 299 * 299


def render_in_chunks(render, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``render(as_unit(images), params)`` over chunks of about CPU_CHUNK_PIXELS on a CPU (each
    converted to float there: a whole batch's float copy costs more in fresh memory than the
    conversion itself), the whole batch at once elsewhere (a GPU wants large kernels). The
    parameters were drawn for the whole batch first, so the chunking changes no draw."""
    n, rows = images.shape[0], max(1, CPU_CHUNK_PIXELS // (images.shape[2] * images.shape[3]))
    if images.device.type != "cpu" or n <= rows:
        return render(as_unit(images), params)
    return torch.cat([render(as_unit(images[i:i + rows]), {k: v[i:i + rows] for k, v in params.items()})
                      for i in range(0, n, rows)])


class Augmentation(abc.ABC):
    """A view made in two steps: ``draw(n, generator)``, the per-image parameters (a dict of
    tensors whose first dimension is the image), then ``render(x, params)`` on the images'
    device (x: float32 in [0, 1], the renderer's own copy). Calling it does both."""

    @abc.abstractmethod
    def draw(self, n: int, generator=None) -> dict[str, torch.Tensor]:
        """The per-image parameters of ``n`` images."""

    @abc.abstractmethod
    def render(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """The view of ``x`` under the parameters ``p``."""

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """The view of ``images`` (uint8, or float in [0, 1], NCHW), float32 in [0, 1]."""
        return render_in_chunks(self.render, images, self.draw(images.shape[0], generator))


# --- colour ----------------------------------------------------------------------------------


def grey_of(x: torch.Tensor) -> torch.Tensor:
    """Luma, (n, 1, H, W): a weighted sum, not a 1x1 convolution, which a GPU may run in TF32."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _on(values, x).to(x.dtype).view(-1, 1, 1, 1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (factor (n, 1, 1, 1) on x's device)."""
    return torch.lerp(other.expand_as(x), x, factor).clamp_(0, 1)


def adjust_brightness(x, factor):
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x, factor):
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device)
    mean = (x.mean((2, 3)) * luma).sum(1).view(-1, 1, 1, 1)  # the mean of the grey image
    return blend(x, mean, factor)


def adjust_saturation(x, factor):
    return blend(x, grey_of(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` turns (per image, on x's device), keeping HSV value
    V and chroma C: the hue h (in sixths of a turn) as torchvision computes it, then each
    channel as V - C * clamp(2 - d, 0, 1), d the circular distance from h to the channel's
    centre (3 red, 5 green, 1 blue): the closed form of HSV -> RGB. Masks are float
    arithmetic, not ``torch.where``: a boolean select is 30x slower than a subtraction on CPU."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    is_r = torch.eq(maxc, r, out=torch.empty_like(maxc))
    is_g = torch.eq(maxc, g, out=torch.empty_like(maxc)).mul_(1 - is_r)
    is_b = 1 - is_r - is_g
    hue6 = is_r * (g - b) + is_g * (b - r + 2 * chroma) + is_b * (r - g + 4 * chroma)
    hue6.div_(chroma.clamp(min=1e-12)).add_(6 * shift.view(-1, 1, 1))
    hue6.sub_(torch.floor(hue6 / 6).mul_(6))  # into [0, 6)
    out = torch.empty_like(x)
    for channel, centre in enumerate((3.0, 5.0, 1.0)):
        d = (hue6 - centre).abs_()
        torch.minimum(d, 6 - d, out=d)
        out[:, channel] = maxc - chroma * (2 - d).clamp_(0, 1)
    return out


@dataclass(frozen=True)
class Jitter(Augmentation):
    """Colour jitter: factors U(1 - s, 1 + s) for brightness, contrast and saturation, a hue
    shift U(-hue, hue) turns, all per image, applied to each image with probability ``p``, in
    that fixed order."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float

    def draw(self, n: int, generator=None) -> dict[str, torch.Tensor]:
        factors = {name: uniform(n, max(0.0, 1 - s), 1 + s, generator)
                   for name, s in (("brightness", self.brightness), ("contrast", self.contrast),
                                   ("saturation", self.saturation))}
        return {**factors, "hue": uniform(n, -self.hue, self.hue, generator), "jittered": chance(n, self.p, generator)}

    def render(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        def jitter(images, index):
            images = adjust_brightness(images, _per_image(p["brightness"][index], images))
            images = adjust_contrast(images, _per_image(p["contrast"][index], images))
            images = adjust_saturation(images, _per_image(p["saturation"][index], images))
            return adjust_hue(images, _on(p["hue"][index], images).to(images.dtype)) if self.hue else images

        return _where_chosen(x, p["jittered"], jitter)


def grayscale_where(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return _where_chosen(x, chosen, lambda images, _: grey_of(images).expand_as(images))


def flip_where(x: torch.Tensor, chosen: torch.Tensor, dim: int) -> torch.Tensor:
    """The chosen images mirrored along ``dim`` (exact: no resampling)."""
    return _where_chosen(x, chosen, lambda images, _: images.flip(dim))


# --- blur ------------------------------------------------------------------------------------


def blur_kernels(sigma: torch.Tensor, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, (n, 2 * radius + 1), one per sigma."""
    taps = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    k = torch.exp(-0.5 * (taps / sigma.unsqueeze(1)) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur_along(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D convolution along ``dim`` (-1 or -2) with per-image kernels k (n, taps), reflect
    padding: one multiply-add of a shifted slice per tap (4-5x faster here than a depthwise
    convolution with a group per image channel, on CPU)."""
    radius, length = k.shape[1] // 2, x.shape[dim]
    pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
    padded = F.pad(x, pad, mode="reflect")
    taps = k.to(x.dtype).T.reshape(k.shape[1], -1, 1, 1, 1)
    out = padded.narrow(dim, 0, length) * taps[0]
    for t in range(1, k.shape[1]):
        out.addcmul_(padded.narrow(dim, t, length), taps[t])
    return out


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = BLUR_RADIUS) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (on x's device), truncated at ``radius``
    (capped below the image side, as reflect padding needs), reflect padding."""
    k = blur_kernels(sigma.to(x.dtype), min(radius, x.shape[2] - 1, x.shape[3] - 1))
    return _blur_along(_blur_along(x, k, -1), k, -2)


def blur_where(x: torch.Tensor, sigma: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return _where_chosen(x, chosen, lambda images, index: gaussian_blur(images, _on(sigma[index], images)))


# --- SimCLR ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimCLRAugment(Augmentation):
    """SimCLR's two views of every image: random-resized crop, flips and rotation (one
    resampling), colour jitter, grayscale, Gaussian blur, each image and view its own draws.

    >>> view1, view2 = SimCLRAugment(AugmentSpec(size=224))(images_uint8, torch.Generator().manual_seed(0))
    """

    spec: AugmentSpec

    @property
    def jitter(self) -> Jitter:
        s = self.spec.jitter_strength
        return Jitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, self.spec.jitter_prob)

    def draw(self, n: int, generator=None) -> dict[str, torch.Tensor]:
        """One view's parameters for ``n`` images (on the generator's device)."""
        s = self.spec
        return {"theta": simclr_geometry(n, s, generator), **self.jitter.draw(n, generator),
                "grey": chance(n, s.grayscale_prob, generator), "sigma": uniform(n, *BLUR_SIGMA, generator),
                "blurred": chance(n, s.blur_prob, generator)}

    def render(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x = resample(x, p["theta"], (self.spec.size, self.spec.size))
        x = grayscale_where(self.jitter.render(x, p), p["grey"])
        return blur_where(x, p["sigma"], p["blurred"])

    def view(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return super().__call__(images, generator)

    def __call__(self, images: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = self.draw(images.shape[0], generator), self.draw(images.shape[0], generator)
        return render_in_chunks(self.render, images, first), render_in_chunks(self.render, images, second)


# --- supervised noise, FixMatch, MixMatch ----------------------------------------------------


@dataclass(frozen=True)
class NoiseAugment(Augmentation):
    """Supervised and student training noise: flips and colour jitter of strength ``jitter``
    (the paper's student noise: colour jitter and horizontal flips)."""

    jitter: float = 0.4

    @property
    def colour(self) -> Jitter:
        j = self.jitter
        return Jitter(j, j, j, 0.05, 0.8 if j else 0.0)

    def draw(self, n, generator=None):
        return {"hflip": chance(n, 0.5, generator), "vflip": chance(n, 0.5, generator),
                **self.colour.draw(n, generator)}

    def render(self, x, p):
        x = flip_where(flip_where(x, p["hflip"], -1), p["vflip"], -2)
        return self.colour.render(x, p)


def _weak_draw(n: int, translate: float, generator) -> dict[str, torch.Tensor]:
    return {"weak_flip": chance(n, 0.5, generator), "weak_shift": uniform(2 * n, -translate, translate, generator).view(n, 2)}


def _weak_render(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    n, _, h, w = x.shape
    no = torch.zeros_like(p["weak_flip"])
    theta = affine(flips(p["weak_flip"], no), whole_pixels(p["weak_shift"], h, w))
    return resample(x, theta, mode="nearest")


@dataclass(frozen=True)
class WeakAugment(Augmentation):
    """FixMatch's and MixMatch's weak view: a horizontal flip and a whole-pixel translation of up
    to ``translate`` of each side (12.5% in both papers), zeros where the image moved away. The
    sampling is nearest-pixel, so the view only moves pixels."""

    translate: float = 0.125

    def draw(self, n, generator=None):
        return _weak_draw(n, self.translate, generator)

    def render(self, x, p):
        return _weak_render(x, p)


# RandAugment's operations, each f(x, strength) with strength in [-1, 1] per image: its sign is
# the op's direction (unsigned ops use |strength|), |strength| its magnitude over the range
# torchvision's RandAugment gives it at the top bin.
def _sheared(x, s, axis):
    n = x.shape[0]
    linear = torch.eye(2, device=s.device).repeat(n, 1, 1)
    linear[:, axis, 1 - axis] = 0.3 * s
    return resample(x, affine(linear, torch.zeros(n, 2, device=s.device)), mode="nearest")


def _translated(x, s, axis):
    n = x.shape[0]
    shift = torch.zeros(n, 2, device=s.device)
    shift[:, axis] = 150 / 331 * s  # up to 150 px of a 331 px image (RandAugment's reference size)
    shift = whole_pixels(shift, *x.shape[2:])
    return resample(x, affine(torch.eye(2, device=s.device).repeat(n, 1, 1), shift), mode="nearest")


def _rotated(x, s):
    return resample(x, affine(rotations(30 * s), torch.zeros(x.shape[0], 2, device=s.device)), mode="nearest")


def _sharpness(x, factor):
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    n, c, h, w = x.shape
    smooth = F.conv2d(x.reshape(n * c, 1, h, w), kernel.view(1, 1, 3, 3)).view(n, c, h - 2, w - 2)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth  # the border keeps its pixels, as torchvision's
    return blend(x, degenerate, factor)


def _quantised(x):
    return (x * 255).round_()


def _posterize(x, s):
    step = _per_image(2 ** (s.abs() * 4).round(), x)  # keep 8 - round(4 |s|) bits
    return torch.floor(_quantised(x) / step) * step / 255


def _solarize(x, s):
    above = torch.ge(x, _per_image(1 - s.abs(), x), out=torch.empty_like(x))
    return torch.addcmul(x, above, 1 - 2 * x)  # 1 - x where x >= the threshold


def _autocontrast(x, _):
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = high <= low  # a constant channel stays as it is
    low = low.masked_fill(flat, 0)
    return (x - low) / (high - low).masked_fill(flat, 1)


def _equalize(x, _):
    """Histogram equalisation per image and channel on the 256 uint8 levels (PIL's rule)."""
    n, c, h, w = x.shape
    q = _quantised(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, (q.amax(1, keepdim=True)))  # count of each channel's top level
    step = (h * w - last) // 255
    lut = ((torch.cumsum(hist, 1) - hist + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))  # step 0: unchanged
    return lut.gather(1, q).to(x.dtype).div_(255).view(n, c, h, w)


def _enhance(adjust):
    return lambda x, s: adjust(x, _per_image(1 + 0.9 * s, x))


RAND_OPS = {
    "identity": lambda x, s: x,
    "shear_x": lambda x, s: _sheared(x, s, 0),
    "shear_y": lambda x, s: _sheared(x, s, 1),
    "translate_x": lambda x, s: _translated(x, s, 0),
    "translate_y": lambda x, s: _translated(x, s, 1),
    "rotate": _rotated,
    "brightness": _enhance(adjust_brightness),
    "color": _enhance(adjust_saturation),
    "contrast": _enhance(adjust_contrast),
    "sharpness": _enhance(_sharpness),
    "posterize": _posterize,
    "solarize": _solarize,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
}


def rand_augment_plan(n: int, num_ops: int, bins: int = 31, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ops each image gets, (n, num_ops) indices into RAND_OPS, and their signed strengths,
    (n, num_ops): one magnitude per image, drawn from bins 1..bins-1 (FixMatch's "any
    magnitude" RandAugment), shared by its ops, each op its own sign."""
    device = _draw_device(generator)
    ops = torch.randint(len(RAND_OPS), (n, num_ops), generator=generator, device=device)
    level = torch.randint(1, bins, (n, 1), generator=generator, device=device) / (bins - 1)
    sign = torch.where(torch.rand(n, num_ops, generator=generator, device=device) < 0.5, -1.0, 1.0)
    return ops, sign * level


def rand_augment(x: torch.Tensor, ops: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """RandAugment with per-image ops and magnitudes: ops and strengths (n, num_ops) from
    :func:`rand_augment_plan`, applied slot by slot, each image through its own op."""
    for slot in range(ops.shape[1]):
        for k, op in enumerate(RAND_OPS.values()):
            x = _where_chosen(x, ops[:, slot] == k, lambda images, index, op=op, s=strength[:, slot]:
                              op(images, _on(s[index], images).to(images.dtype)))
    return x


def cutout(x: torch.Tensor, side: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """A grey (127/255) square per image: ``side`` (n,) as a fraction of the shorter side (at
    least one pixel), ``centre`` (n, 2) as fractions of the height and width; clipped at the
    border."""
    n, _, h, w = x.shape
    side = (side * min(h, w)).round().clamp(min=1).long()
    cy, cx = (centre[:, 0] * h).long().clamp(max=h - 1), (centre[:, 1] * w).long().clamp(max=w - 1)
    top, left, side = _on(cy - side // 2, x), _on(cx - side // 2, x), _on(side, x)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_rows = ((rows >= top[:, None]) & (rows < (top + side)[:, None])).to(x.dtype)
    inside_cols = ((cols >= left[:, None]) & (cols < (left + side)[:, None])).to(x.dtype)
    square = inside_rows[:, None, :, None] * inside_cols[:, None, None, :]  # 1 inside, 0 outside
    return x.lerp_(x.new_tensor(GREY), square)


@dataclass(frozen=True)
class StrongAugment(Augmentation):
    """FixMatch's strong view: the weak view, RandAugment (``num_ops`` per-image ops at a
    per-image magnitude), then Cutout (a grey square of side up to ``cutout`` of the image's)."""

    num_ops: int = 2
    cutout: float = 0.5
    translate: float = 0.125

    def draw(self, n, generator=None):
        ops, strength = rand_augment_plan(n, self.num_ops, generator=generator)
        return {**_weak_draw(n, self.translate, generator), "ops": ops, "strength": strength,
                "cut_side": uniform(n, 0, self.cutout, generator), "cut_centre": uniform(2 * n, 0, 1, generator).view(n, 2)}

    def render(self, x, p):
        x = rand_augment(_weak_render(x, p), p["ops"], p["strength"])
        return cutout(x, p["cut_side"], p["cut_centre"])
