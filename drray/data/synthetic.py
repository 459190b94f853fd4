"""Procedural fundus photographs with DR grades 0-4: the embedded data set for demo and tests.

Each image: a fundus disc on a (mostly) black frame with choroidal texture, vignetting, an optic
disc, a macula and a branching vessel tree; left eyes are the mirror image of right eyes.
Lesions depend on the grade (microaneurysms, dot/blot haemorrhages, hard exudate clusters,
cotton-wool spots, new vessels) and every grade also carries look-alike distractors (drusen,
pigment spots), so that referable DR is a matter of lesions, not of global colour: camera
variety (frame size and aspect, circles cut at top and bottom, exposure from very dark to
bright, blur, colour cast, noise, a notch) swamps the colour statistics.

The ``messidor2`` style is a different camera (wider field of view, sharper, a yellow-green
cast, steadier exposure) so it works as an external test set.

Output layouts are those of the real data sets, so the real loaders are exercised:
- eyepacs: ``OUT/train/<id>.jpeg`` + ``OUT/trainLabels.csv`` (``image,level``), optionally
  ``OUT/test/<id>.jpeg`` + ``OUT/testLabels.csv`` (``image,level,Usage``); ids
  ``<patient>_left`` / ``<patient>_right``, whose two eyes are correlated as in screening data
  (:func:`eye_pairs`: about 87% of patients have the same grade in both eyes)
- messidor2: ``OUT/images/<name>.(png|JPG)`` + ``OUT/messidor_data.csv`` (Krause columns)

Deterministic per seed: image i draws from its own generator seeded by (seed, i).
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from drray.artifacts import clear_own_files, mark_files
from drray.progress import Progress

EYEPACS_GRADE_P = (0.735, 0.070, 0.151, 0.025, 0.020)  # EyePACS train proportions, grades 0-4
MESSIDOR_GRADE_P = (0.582, 0.154, 0.199, 0.043, 0.022)  # Krause adjudicated grades


@dataclass(frozen=True)
class Camera:
    frames: tuple[tuple[int, int], ...]  # (width, height) choices
    radius_full: tuple[float, float]  # circle radius / frame height, circle inside the frame
    radius_cut: tuple[float, float]  # radius / height when cut at top and bottom
    cut_prob: float
    exposure: tuple[float, float]  # log-uniform gain range
    blur: tuple[float, float]  # Gaussian blur sigma as a fraction of the diameter
    noise: tuple[float, float]  # noise sigma in grey levels
    cast: float  # per-channel colour multiplier spread
    cast_centre: tuple[float, float, float]
    disc_radius: float  # optic disc radius / fundus radius (field of view)
    notch_prob: float
    grey_background_prob: float
    offset: float  # circle centre offset / frame width


EYEPACS_CAMERA = Camera(
    frames=((480, 320), (512, 384), (600, 400), (640, 426), (560, 420), (720, 480)),
    radius_full=(0.44, 0.49), radius_cut=(0.53, 0.62), cut_prob=0.45,
    exposure=(0.22, 1.35), blur=(0.0, 0.007), noise=(0.0, 7.0), cast=0.18,
    cast_centre=(1.0, 1.0, 1.0), disc_radius=0.10, notch_prob=0.35,
    grey_background_prob=0.06, offset=0.03,
)
MESSIDOR_CAMERA = Camera(
    frames=((480, 320), (747, 496), (768, 512)),
    radius_full=(0.45, 0.48), radius_cut=(0.45, 0.48), cut_prob=0.0,
    exposure=(0.3, 1.4), blur=(0.0, 0.0015), noise=(0.0, 3.0), cast=0.22,
    cast_centre=(0.9, 1.12, 0.85), disc_radius=0.085, notch_prob=0.0,
    grey_background_prob=0.0, offset=0.01,
)
ORIGINAL_FRAME = (3888, 2592)  # the common EyePACS original size, for --original-size


# ---------------------------------------------------------------------------------------------
# Rendering one fundus
# ---------------------------------------------------------------------------------------------


def render_fundus(rng: np.random.Generator, grade: int, eye: str, camera: Camera,
                  original_size: bool = False, frame_scale: float = 1.0) -> Image.Image:
    """One synthetic fundus photograph (RGB frame) of the given grade and eye.

    ``frame_scale`` shrinks the camera's frames (faster to draw, for small outputs).
    """
    frame_w, frame_h = (round(s * frame_scale) for s in camera.frames[rng.integers(len(camera.frames))])
    cut = rng.random() < camera.cut_prob
    radius = frame_h * rng.uniform(*(camera.radius_cut if cut else camera.radius_full))
    diameter = max(32, round(2 * radius))
    retina = _render_retina(rng, grade, diameter, camera)
    if eye == "left":
        retina = retina.transpose(Image.FLIP_LEFT_RIGHT)
    frame = _compose_frame(rng, retina, (frame_w, frame_h), camera)
    if original_size:
        frame = frame.resize(ORIGINAL_FRAME, Image.BICUBIC)
        # sensor noise at full resolution; sigma 2 with quality 85-92 gives ~1-1.3 MB files,
        # the size of EyePACS originals (entropy decoding is most of a reduced-size decode)
        frame = _add_sensor_noise(rng, frame, 2)
    return frame


def _render_retina(rng: np.random.Generator, grade: int, d: int, camera: Camera) -> Image.Image:
    """A right-eye fundus of diameter d on black, float colour model -> 8-bit RGB."""
    yy, xx = np.mgrid[0:d, 0:d].astype(np.float32)
    u, v = (xx + 0.5) / d * 2 - 1, (yy + 0.5) / d * 2 - 1  # unit disc coordinates
    rho = np.sqrt(u**2 + v**2)
    pigment = rng.uniform(0.65, 1.1)
    base_colour = np.array([0.86, 0.36 * rng.uniform(0.8, 1.2), 0.14 * rng.uniform(0.7, 1.3)])
    texture = _smooth_noise(rng, d, cells=7, amplitude=0.10)
    shade = pigment * (1 - 0.38 * rho**2.4) * (1 + texture)
    img = base_colour[None, None, :] * shade[..., None]

    disc_r = camera.disc_radius * rng.uniform(0.9, 1.1)
    disc = np.array([0.45 + rng.normal(0, 0.03), rng.normal(0, 0.05)])
    macula = np.array([disc[0] - 0.52, disc[1] + rng.normal(0, 0.03)])
    mac = np.exp(-((u - macula[0]) ** 2 + (v - macula[1]) ** 2) / (2 * 0.11**2))
    img *= (1 - 0.28 * mac)[..., None]
    disc_d = np.sqrt(((u - disc[0]) / 1.0) ** 2 + ((v - disc[1]) / 1.12) ** 2)
    disc_a = np.clip((disc_r - disc_d) / (0.2 * disc_r) + 0.5, 0, 1)
    cup_a = np.clip((0.45 * disc_r - disc_d) / (0.15 * disc_r) + 0.5, 0, 1)
    img = _blend(img, np.array([1.0, 0.78, 0.48]) * pigment ** 0.3, disc_a * 0.9)
    img = _blend(img, np.array([1.0, 0.93, 0.75]), cup_a * 0.7)

    layers = _draw_layers(rng, grade, d, disc, disc_r, macula)
    for name, (rel_colour, blur) in LAYER_STYLE.items():
        box = layers[name].getbbox()
        if box is None:
            continue
        pad = math.ceil(3 * blur * d / 100) + 1  # blending only the drawn box keeps this cheap
        x0, y0, x1, y1 = max(0, box[0] - pad), max(0, box[1] - pad), min(d, box[2] + pad), min(d, box[3] + pad)
        alpha = layers[name].crop((x0, y0, x1, y1))
        if blur:
            alpha = alpha.filter(ImageFilter.GaussianBlur(blur * d / 100))
        a = np.asarray(alpha, dtype=np.float32) / 255.0
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = _blend(patch, np.clip(patch * np.array(rel_colour), 0, 1.2), a)
    img *= (rho <= 1.0)[..., None]
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


# relative colour (multiplies the local background) and blur in % of the diameter
LAYER_STYLE = {
    "vein": ((0.55, 0.30, 0.45), 0.15),
    "artery": ((0.80, 0.55, 0.65), 0.15),
    "new_vessel": ((0.65, 0.35, 0.50), 0.1),
    "pigment": ((0.45, 0.38, 0.40), 0.3),
    "drusen": ((1.15, 1.55, 1.6), 0.35),
    "haemorrhage": ((0.50, 0.20, 0.30), 0.2),
    "microaneurysm": ((0.55, 0.25, 0.35), 0.1),
    "exudate": ((1.25, 2.0, 2.2), 0.12),
    "cotton_wool": ((1.12, 1.7, 2.1), 0.9),
}

LESIONS_BY_GRADE = {  # (min, max) counts per lesion kind
    0: {"microaneurysm": (0, 0), "haemorrhage": (0, 0), "exudate": (0, 0), "cotton_wool": (0, 0), "new_vessel": (0, 0)},
    1: {"microaneurysm": (1, 6), "haemorrhage": (0, 0), "exudate": (0, 0), "cotton_wool": (0, 0), "new_vessel": (0, 0)},
    2: {"microaneurysm": (4, 14), "haemorrhage": (4, 10), "exudate": (1, 3), "cotton_wool": (0, 2), "new_vessel": (0, 0)},
    3: {"microaneurysm": (8, 20), "haemorrhage": (10, 22), "exudate": (1, 4), "cotton_wool": (1, 4), "new_vessel": (0, 0)},
    4: {"microaneurysm": (6, 16), "haemorrhage": (5, 16), "exudate": (1, 3), "cotton_wool": (0, 3), "new_vessel": (1, 3)},
}


def _draw_layers(rng, grade, d, disc, disc_r, macula) -> dict[str, Image.Image]:
    layers = {name: Image.new("L", (d, d), 0) for name in LAYER_STYLE}
    draws = {name: ImageDraw.Draw(img) for name, img in layers.items()}
    to_px = lambda p: ((p[0] + 1) / 2 * d, (p[1] + 1) / 2 * d)  # noqa: E731
    _draw_vessel_tree(rng, draws["vein"], draws["artery"], disc, d, to_px)
    # distractors on every grade: drusen (pale, soft) and pigment spots
    for _ in range(rng.integers(0, 11)):
        _blob(draws["drusen"], to_px(_random_point(rng, disc, disc_r)), d * rng.uniform(0.006, 0.014), rng, 200)
    for _ in range(rng.integers(0, 7)):
        _blob(draws["pigment"], to_px(_random_point(rng, disc, disc_r)), d * rng.uniform(0.006, 0.016), rng, 200)
    counts = {kind: rng.integers(lo, hi + 1) for kind, (lo, hi) in LESIONS_BY_GRADE[grade].items()}
    for _ in range(counts["microaneurysm"]):
        _blob(draws["microaneurysm"], to_px(_random_point(rng, disc, disc_r)), d * rng.uniform(0.004, 0.007), rng, 255)
    for _ in range(counts["haemorrhage"]):
        _blob(draws["haemorrhage"], to_px(_random_point(rng, disc, disc_r)), d * rng.uniform(0.014, 0.032), rng, 255,
              elongation=rng.uniform(1.0, 2.2))
    for _ in range(counts["exudate"]):  # hard exudates come in clusters, often around the macula
        centre = macula + rng.normal(0, 0.25, 2) if rng.random() < 0.6 else _random_point(rng, disc, disc_r)
        for _ in range(rng.integers(3, 10)):
            p = centre + rng.normal(0, 0.035, 2)
            _blob(draws["exudate"], to_px(p), d * rng.uniform(0.006, 0.012), rng, 255)
    for _ in range(counts["cotton_wool"]):
        _blob(draws["cotton_wool"], to_px(_random_point(rng, disc, disc_r, max_rho=0.6)), d * rng.uniform(0.018, 0.032), rng, 150,
              elongation=rng.uniform(1.0, 1.8))
    for _ in range(counts["new_vessel"]):
        near_disc = rng.random() < 0.6
        centre = disc + rng.normal(0, disc_r, 2) if near_disc else _random_point(rng, disc, disc_r)
        _draw_tuft(rng, draws["new_vessel"], centre, d, to_px)
    return layers


def _draw_vessel_tree(rng, vein_draw, artery_draw, disc, d, to_px) -> None:
    # four arcades leave the disc: superior/inferior temporal (wide arcs around the macula)
    # and superior/inferior nasal (shorter, straighter)
    for kind, draw, width0 in (("vein", vein_draw, 0.016), ("artery", artery_draw, 0.011)):
        for side in (-1, 1):
            offset = rng.normal(0, 0.08) + (0.12 if kind == "artery" else 0.0)
            _grow_vessel(rng, draw, disc.copy(), math.pi + side * (0.9 + offset), side * 0.035,
                         width0 * d, d, to_px, depth=0)  # temporal arcade curving around macula
            _grow_vessel(rng, draw, disc.copy(), side * (0.7 + offset), -side * 0.01,
                         width0 * 0.8 * d, d, to_px, depth=1)  # nasal


def _grow_vessel(rng, draw, pos, angle, curl, width, d, to_px, depth) -> None:
    step = 0.035
    points = [to_px(pos)]
    for _ in range(80):
        angle += curl + rng.normal(0, 0.12)
        pos = pos + step * np.array([math.cos(angle), math.sin(angle)])
        if np.hypot(*pos) > 0.97:
            break
        points.append(to_px(pos))
        if depth < 3 and rng.random() < 0.13:
            branch = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            _grow_vessel(rng, draw, pos.copy(), branch, rng.normal(0, 0.02), width * 0.7, d, to_px, depth + 1)
            width *= 0.88
        width *= 0.985
        if width < 0.6:
            break
    if len(points) > 1:
        draw.line(points, fill=255, width=max(1, round(width)), joint="curve")


def _draw_tuft(rng, draw, centre, d, to_px) -> None:
    """Neovascularisation: a small net of fine, tortuous vessels."""
    for _ in range(rng.integers(5, 10)):
        pos, angle = centre + rng.normal(0, 0.02, 2), rng.uniform(0, 2 * math.pi)
        pts = [to_px(pos)]
        for _ in range(rng.integers(4, 9)):
            angle += rng.normal(0, 0.9)
            pos = pos + 0.015 * np.array([math.cos(angle), math.sin(angle)])
            pts.append(to_px(pos))
        draw.line(pts, fill=255, width=max(1, round(d * 0.004)))


def _blob(draw, centre, radius, rng, opacity, elongation=1.0) -> None:
    angle = rng.uniform(0, math.pi)
    rx, ry = radius * elongation, radius / elongation
    # an ellipse as a polygon so it can be rotated; a few jittered vertices keep it irregular
    n = 12
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        jitter = rng.uniform(0.8, 1.15)
        x, y = rx * math.cos(t) * jitter, ry * math.sin(t) * jitter
        pts.append((centre[0] + x * math.cos(angle) - y * math.sin(angle),
                    centre[1] + x * math.sin(angle) + y * math.cos(angle)))
    draw.polygon(pts, fill=int(opacity))


def _random_point(rng, disc, disc_r, max_rho=0.9) -> np.ndarray:
    while True:
        p = rng.uniform(-max_rho, max_rho, 2)
        if np.hypot(*p) <= max_rho and np.hypot(*(p - disc)) > 1.6 * disc_r:
            return p


def _smooth_noise(rng, d, cells, amplitude) -> np.ndarray:
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, "F").resize((d, d), Image.BICUBIC)
    return np.asarray(img) * amplitude


def _blend(img, colour, alpha) -> np.ndarray:
    alpha = alpha[..., None]
    return img * (1 - alpha) + colour * alpha


# ---------------------------------------------------------------------------------------------
# The camera: frame, exposure, colour cast, blur, noise, notch
# ---------------------------------------------------------------------------------------------


def _compose_frame(rng, retina: Image.Image, frame_size, camera: Camera) -> Image.Image:
    w, h = frame_size
    d = retina.width
    blur = rng.uniform(*camera.blur) * d
    if blur > 0.3:
        retina = retina.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(retina, dtype=np.float32) / 255.0
    gain = math.exp(rng.uniform(math.log(camera.exposure[0]), math.log(camera.exposure[1])))
    cast = np.array(camera.cast_centre) * rng.uniform(1 - camera.cast, 1 + camera.cast, 3)
    gamma = rng.uniform(0.8, 1.25)
    arr = np.clip(arr * gain * cast, 0, 1) ** gamma
    fundus = Image.fromarray((arr * 255).astype(np.uint8), "RGB")

    grey = rng.random() < camera.grey_background_prob
    background = int(rng.integers(18, 60)) if grey else int(rng.integers(0, 4))
    frame = Image.new("RGB", (w, h), (background,) * 3)
    cx = w / 2 + rng.uniform(-camera.offset, camera.offset) * w
    cy = h / 2 + rng.uniform(-camera.offset, camera.offset) * h
    circle = Image.new("L", (d, d), 0)
    ImageDraw.Draw(circle).ellipse((0, 0, d - 1, d - 1), fill=255)
    frame.paste(fundus, (round(cx - d / 2), round(cy - d / 2)), circle)
    if rng.random() < camera.notch_prob:
        _notch(rng, frame, cx, cy, d / 2, background)
    sigma = rng.uniform(*camera.noise)
    if sigma > 0.5:
        frame = _add_sensor_noise(rng, frame, sigma)
    return frame


def _add_sensor_noise(rng: np.random.Generator, frame: Image.Image, sigma: float) -> Image.Image:
    """Grey Gaussian noise of ``sigma`` grey levels, the same on the three channels.

    Drawn from the image's own generator: Pillow's ``Image.effect_noise`` draws from C's
    ``rand()``, one sequence per process, so an image's noise depended on which images the same
    worker had drawn before it, and a data set made by two workers differed from run to run
    (measured: 267 of 300 CI images, and one dark image's edge then failed the fundus check in
    some runs only: the CI failures with 239 of 240 training images)."""
    noise = rng.standard_normal((frame.height, frame.width), dtype=np.float32) * sigma + 128.0
    grey = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "L")
    return ImageChops.add(frame, grey.convert("RGB"), scale=1.0, offset=-128)


def _notch(rng, frame, cx, cy, r, background) -> None:
    """The small mark many fundus cameras leave on the circle's edge."""
    angle = rng.uniform(0, 2 * math.pi)
    size = r * rng.uniform(0.05, 0.09)
    ex, ey = cx + r * math.cos(angle), cy + r * math.sin(angle)
    ix, iy = cx + (r - 2 * size) * math.cos(angle), cy + (r - 2 * size) * math.sin(angle)
    px, py = -math.sin(angle) * size, math.cos(angle) * size
    ImageDraw.Draw(frame).polygon(
        [(ex + px, ey + py), (ex - px, ey - py), (ix, iy)], fill=(background,) * 3
    )


# ---------------------------------------------------------------------------------------------
# Data sets on disk
# ---------------------------------------------------------------------------------------------


def exact_grades(n: int, proportions, rng: np.random.Generator) -> np.ndarray:
    """n grades in the given proportions (largest remainder), shuffled."""
    p = np.asarray(proportions, dtype=float)
    raw = p / p.sum() * n  # the published proportions are rounded and sum to 1.001
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[i] += 1
    grades = np.repeat(np.arange(len(proportions)), counts)
    rng.shuffle(grades)
    return grades


# How far apart a patient's two eyes may be, in grades: eyes are paired as neighbours in an
# ordering by grade plus Gaussian noise of this spread. 0.45 gives (10,000 images, 3 seeds)
# ~87% of patients the same grade in both eyes (Cohen's kappa ~0.69, quadratic ~0.92), 99%
# within one grade, the fellow eye of a referable eye referable ~90% of the time and at least
# mild ~98%: within the 80-90% equal reported for EyePACS patients (issue 16's figure), where
# grades drawn independently for each eye agree for ~57% (kappa ~0).
EYE_SPREAD = 0.45


def eye_pairs(grades: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``grades`` reordered as patients' eyes (left, right, left, right, ...): the same grades, so
    their proportions stay exact, with a patient's two eyes mostly of one grade and otherwise
    neighbours (:data:`EYE_SPREAD`). An odd last grade stays last: a patient with one eye."""
    paired = len(grades) - len(grades) % 2
    noisy = grades[:paired] + rng.normal(0.0, EYE_SPREAD, paired)
    pairs = grades[:paired][np.argsort(noisy, kind="stable")].reshape(-1, 2)
    pairs = pairs[rng.permutation(len(pairs))]  # patients in random order
    swap = rng.random(len(pairs)) < 0.5  # either eye may be the worse one
    pairs[swap] = pairs[swap][:, ::-1]
    return np.concatenate([pairs.reshape(-1), grades[paired:]])


@dataclass(frozen=True)
class _Job:
    path: str
    grade: int
    eye: str
    style: str
    seed: int
    index: int
    original_size: bool
    frame_scale: float


def _render_job(job: _Job) -> None:
    rng = np.random.default_rng([job.seed, job.index])
    camera = EYEPACS_CAMERA if job.style == "eyepacs" else MESSIDOR_CAMERA
    img = render_fundus(rng, job.grade, job.eye, camera, job.original_size, job.frame_scale)
    if job.path.endswith(".png"):
        img.save(job.path, compress_level=1)
    else:
        top = 93 if job.original_size else 96
        img.save(job.path, format="JPEG", quality=int(rng.integers(85, top)))


def synthesize(out: str | Path, n: int, style: str = "eyepacs", seed: int = 0, test_n: int = 0,
               original_size: bool = False, frame_scale: float = 1.0, workers: int | None = None,
               progress=None) -> dict:
    """Write a synthetic data set in the layout of the real one; return counts per grade."""
    out = Path(out)
    rng = np.random.default_rng([seed, 10**9])
    jobs: list[_Job] = []
    label_files: dict[str, list[list]] = {}
    if style == "eyepacs":
        plan = [("train", n), ("test", test_n)]
        first_patient = 10
        for split, count in plan:
            if count <= 0:
                continue
            (out / split).mkdir(parents=True, exist_ok=True)
            grades = eye_pairs(exact_grades(count, EYEPACS_GRADE_P, rng), rng)
            rows = label_files.setdefault(f"{split}Labels.csv", [])
            for i, grade in enumerate(grades):
                patient, eye = first_patient + i // 2, ("left", "right")[i % 2]
                image_id = f"{patient}_{eye}"
                path = out / split / f"{image_id}.jpeg"
                jobs.append(_Job(str(path), int(grade), eye, style, seed, len(jobs), original_size, frame_scale))
                usage = ["Public", "Private"][int(rng.random() < 0.8)]
                rows.append([image_id, int(grade)] + ([usage] if split == "test" else []))
            first_patient += count // 2 + 1
    elif style == "messidor2":
        (out / "images").mkdir(parents=True, exist_ok=True)
        grades = exact_grades(n, MESSIDOR_GRADE_P, rng)
        rows = label_files.setdefault("messidor_data.csv", [])
        for i, grade in enumerate(grades):
            eye = ("left", "right")[i % 2]
            name = (f"2005{(i % 12) + 1:02d}{(i % 28) + 1:02d}_{40000 + i:05d}_0100_PP.png"
                    if i % 5 < 3 else f"IM{i + 1:06d}.JPG")
            path = out / "images" / name
            jobs.append(_Job(str(path), int(grade), eye, style, seed, len(jobs), original_size, frame_scale))
            ungradable = rng.random() < 0.01
            if ungradable:
                rows.append([name, "", "", 0])
            else:
                dme = int(grade >= 2 and rng.random() < 0.5)
                rows.append([name, int(grade), dme, 1])
    else:
        raise ValueError(f"unknown synthetic style {style!r}: choose eyepacs or messidor2")

    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(_render_job, jobs, chunksize=16), start=1):
            if progress:
                progress(done, len(jobs))
    headers = {
        "trainLabels.csv": ["image", "level"],
        "testLabels.csv": ["image", "level", "Usage"],
        "messidor_data.csv": ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"],
    }
    for name, rows in label_files.items():
        with open(out / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(headers[name])
            writer.writerows(rows)
    counts = np.bincount([j.grade for j in jobs], minlength=5)
    return {"images": len(jobs), "grades": {g: int(c) for g, c in enumerate(counts)},
            "label_files": sorted(label_files)}


def write_dataset(out: str | Path, spec, workers: int | None = None) -> dict:
    """``drray synth``: a synthetic data set (a :class:`drray.config.SyntheticConfig`) in ``out``.

    The folder must be new, empty, or one this function wrote (its mark lists every file): a
    rerun removes the files of the last run first, so no stale image outlives a shorter labels
    file, and a folder holding anything else is refused before any work."""
    clear_own_files(out, what="synthetic-data folder")
    summary = synthesize(out, spec.n, style=spec.style, seed=spec.seed, test_n=spec.test_n,
                         original_size=spec.original_size, frame_scale=spec.frame_scale, workers=workers,
                         progress=Progress(f"synth {spec.style} -> {out}"))
    mark_files(out, what="synthetic-data folder")
    return summary
