"""Fundus geometry and decoding on frames with known circles and on every awkward file kind."""

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from drray.data.fundus import (
    Circle,
    ImageRejected,
    crop_to_circle,
    decode_rgb,
    find_fundus,
    prepare_fundus,
)

MAX = 178_956_970


def frame(w=600, h=400, cx=300.0, cy=200.0, r=190.0, brightness=1.0, background=(0, 0, 0),
          notch=False, noise=0.0, seed=0) -> Image.Image:
    """A fundus-like frame: a textured red disc with vessels-ish lines at a known circle."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), background)
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx - cx, yy - cy)
    inside = d <= r
    arr = np.asarray(img, dtype=np.float32).copy()
    shade = (1 - 0.35 * (d / r) ** 2) * brightness
    base = np.array([200.0, 80.0, 30.0])
    arr[inside] = (base[None, :] * shade[inside][:, None]) + rng.normal(0, 3, (inside.sum(), 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k in range(6):  # a few dark lines, like vessels
        a = k * 1.1
        draw.line([(cx, cy), (cx + 0.8 * r * np.cos(a), cy + 0.8 * r * np.sin(a))],
                  fill=tuple(int(v * brightness) for v in (110, 30, 20)), width=4)
    if notch:
        draw.polygon([(cx + r, cy - 12), (cx + r, cy + 12), (cx + r - 25, cy)], fill=background)
    if noise:  # sensor noise over the whole frame, background included (same in each channel)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (h, w, 1))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def assert_circle(found: Circle, cx, cy, r, tol=0.03):
    assert abs(found.cx - cx) <= tol * r, found
    assert abs(found.cy - cy) <= tol * r, found
    assert abs(found.r - r) <= tol * r, found


@pytest.mark.parametrize("kwargs", [
    {},  # centred, whole circle
    {"cx": 260.0, "cy": 215.0},  # offset
    {"r": 240.0},  # cut at top and bottom (diameter 480 > height 400)
    {"r": 250.0, "cx": 320.0, "cy": 190.0},  # cut and offset
    {"brightness": 0.12},  # very dark photograph
    {"background": (45, 45, 45)},  # grey background
    {"background": (40, 40, 40), "brightness": 0.3, "r": 235.0},  # dark on grey, cut
    {"notch": True},  # the camera's notch on the edge
    {"background": (50, 50, 50), "noise": 12.0},  # noisy grey background: speckles are not edges
    {"w": 360, "h": 240, "cx": 180.0, "cy": 120.0, "r": 105.0, "background": (50, 50, 50), "noise": 9.0},
    {"noise": 10.0, "brightness": 0.35, "r": 240.0},  # noisy, dark and cut
    # a very dark, noisy frame of a few hundred pixels (red ~12 on black, noise sigma 7): its
    # edge was ragged (rejected as "not a circle") until small frames got a blur (find_fundus)
    *({"w": 360, "h": 240, "cx": 180.0, "cy": 120.0, "r": 100.0, "brightness": b, "noise": 7.0,
       "seed": s} for b in (0.06, 0.08) for s in (0, 1)),
    {"w": 1200, "h": 800, "cx": 600.0, "cy": 400.0, "r": 470.0},  # larger than the detection side
])
def test_find_fundus_on_known_circles(kwargs):
    params = {"cx": 300.0, "cy": 200.0, "r": 190.0} | kwargs
    img = frame(**kwargs)
    assert_circle(find_fundus(img), params["cx"], params["cy"], params["r"])


@pytest.mark.parametrize("colour", [(0, 0, 0), (128, 128, 128), (30, 10, 5)])
def test_uniform_image_has_no_fundus(colour):
    with pytest.raises(ImageRejected) as exc:
        find_fundus(Image.new("RGB", (300, 200), colour))
    assert exc.value.kind == "no_fundus"


def test_noise_only_has_no_fundus():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    with pytest.raises(ImageRejected, match="no visible fundus"):
        find_fundus(noise)


def test_crop_centres_and_pads_cut_circle():
    img = frame(r=240.0)  # cut at top and bottom
    out = crop_to_circle(img, Circle(300.0, 200.0, 240.0), 64)
    arr = np.asarray(out).astype(int)
    assert out.size == (64, 64)
    # top and bottom rows were outside the frame: black; the middle row is fundus edge to edge
    assert arr[0].max() == 0 and arr[-1].max() == 0
    assert (arr[32, 4:60, 0] > 40).all()
    # the disc is centred: left/right symmetric in brightness extent
    row = arr[32, :, 0] > 20
    assert abs(np.flatnonzero(row)[0] - (63 - np.flatnonzero(row)[-1])) <= 1


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_prepare_reports_geometry_in_original_pixels(tmp_path):
    big = frame(w=3000, h=2000, cx=1500.0, cy=1000.0, r=1150.0)  # cut circle, EyePACS-like size
    path = save(big, tmp_path / "big.jpeg", quality=90)
    prepared = prepare_fundus(path, size=128)
    assert prepared.image.size == (128, 128) and prepared.image.mode == "RGB"
    assert prepared.original_size == (3000, 2000)
    assert_circle(prepared.circle, 1500, 1000, 1150)


def test_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = save(frame(w=3200, h=2400, cx=1600.0, cy=1200.0, r=1150.0), tmp_path / "big.jpg")
    img, scale, _ = decode_rgb(path, min_side=299, max_pixels=MAX)
    assert scale == 0.125 and img.size == (400, 300)
    img, scale, _ = decode_rgb(path, min_side=1000, max_pixels=MAX)  # both sides must reach 1000
    assert scale == 0.5 and img.size == (1600, 1200)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "I", "F", "LA", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = frame()
    if mode == "I;16":
        arr = (np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        img, ext = Image.fromarray(arr), "png"  # uint16 -> mode I;16
    elif mode == "F":
        img, ext = base.convert("L").convert("F"), "tif"
    else:
        img = base.convert(mode)
        ext = {"CMYK": "jpg", "I": "tif"}.get(mode, "png")
    path = save(img, tmp_path / f"x.{ext}")
    rgb, _, _ = decode_rgb(path, 299, MAX)
    assert rgb.mode == "RGB"
    if mode not in ("1",):
        # 16-bit data is scaled, not clipped to white: the middle of the disc is mid-grey
        assert 20 < np.asarray(rgb)[200, 300].mean() < 240, mode
    prepared = prepare_fundus(path, size=64)
    assert prepared.image.mode == "RGB"


def test_transparent_palette_and_alpha_composite_on_black(tmp_path):
    rgba = frame().convert("RGBA")
    arr = np.asarray(rgba).copy()
    arr[:, :100, 3] = 0  # transparent left strip
    path = save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")
    rgb, _, _ = decode_rgb(path, 299, MAX)
    assert np.asarray(rgb)[:, :100].max() == 0


def test_exif_rotation_is_applied(tmp_path):
    img = frame(w=600, h=400, cx=250.0, cy=200.0, r=150.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    rgb, _, _ = decode_rgb(path, 400, MAX)
    assert rgb.size == (400, 600)
    prepared = prepare_fundus(path, 64)
    assert prepared.original_size == (400, 600)
    assert_circle(prepared.circle, 200, 250, 150)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpeg"
    path.write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty file") as exc:
        decode_rgb(path, 299, MAX)
    assert exc.value.kind == "empty"


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file with an image extension\n" * 10)
    with pytest.raises(ImageRejected, match="not an image") as exc:
        decode_rgb(path, 299, MAX)
    assert exc.value.kind == "not_image"


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    frame().save(buf, format="JPEG")
    path = tmp_path / "cut.jpeg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageRejected, match="corrupt or truncated") as exc:
        decode_rgb(path, 299, MAX)
    assert exc.value.kind == "corrupt"


def test_corrupt_bytes(tmp_path):
    buf = io.BytesIO()
    frame().save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[200:400] = b"\x00" * 200  # damage the compressed stream
    path = tmp_path / "bad.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageRejected) as exc:
        decode_rgb(path, 299, MAX)
    assert exc.value.kind == "corrupt"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height but holds almost no data (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_without_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ImageRejected, match="decompression bomb") as exc:
        decode_rgb(path, 299, MAX)
    assert exc.value.kind == "decompression_bomb"
    # our own limit applies below PIL's: a 30 MP image with a 10 MP limit
    path2 = tmp_path / "big.png"
    path2.write_bytes(png_header_only(6000, 5000))
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_rgb(path2, 299, max_pixels=10_000_000)


def test_jpeg_noise_on_grey_background_is_not_an_edge(tmp_path):
    """Regression: JPEG blocks of background noise used to pass for fundus edges."""
    from drray.data.synthetic import EYEPACS_CAMERA, render_fundus

    rng = np.random.default_rng([0, 81])  # image 50_right of `drray synth --n 1000 --seed 0`
    img = render_fundus(rng, 0, "right", EYEPACS_CAMERA, frame_scale=0.6)
    path = save(img, tmp_path / "noisy.jpeg", quality=int(rng.integers(85, 96)))
    prepared = prepare_fundus(path, size=64)
    assert_circle(prepared.circle, 182.5, 120.5, 109.0, tol=0.04)


# ---------------------------------------------------------------------------------------------
# A real photograph, placed the ways cameras and exports place it
# ---------------------------------------------------------------------------------------------

RETINA = Path(__file__).with_name("retina.jpg")  # scikit-image's data.retina() (CC0), 1411x1411
# Its fundus circle, in pixels with centres at integers. Measured once at full resolution: every
# row and column's entry into the fundus, placed where the RGB distance from the background
# crosses half the rim's level (read 8-14 px inside the edge), interpolated between pixels (5568
# points); a Kasa circle fit, refitted 8 times without points beyond 3 robust sigmas (3% left out:
# the notch at the top right and rows tangent to the circle). Crossing at 30% or 70% of the rim's
# level instead moves the radius by +0.7 / -0.6 px and the centre by under 0.1 px; fits to either
# half of the points differ by under 0.7 px (0.1% of r).
RETINA_CX, RETINA_CY, RETINA_R = 704.10, 702.87, 695.28


@functools.cache
def retina_at(side: int) -> Image.Image:
    with Image.open(RETINA) as img:
        return img.convert("RGB").resize((side, side), Image.LANCZOS)


def placed(w: int, h: int, side: int, left: int | None = None, top: int | None = None,
           dim: float = 1.0) -> tuple[Image.Image, Circle]:
    """retina.jpg shrunk to side x side, pasted with its top-left corner at (left, top) onto a
    black w x h frame (centred by default; it may stick out), and where its circle then lies."""
    left = (w - side) // 2 if left is None else left
    top = (h - side) // 2 if top is None else top
    photo = retina_at(side)
    if dim != 1.0:
        photo = Image.fromarray((np.asarray(photo) * dim).astype(np.uint8))
    img = Image.new("RGB", (w, h))
    img.paste(photo, (left, top))
    g = side / 1411
    truth = Circle((RETINA_CX + 0.5) * g - 0.5 + left, (RETINA_CY + 0.5) * g - 0.5 + top, RETINA_R * g)
    return img, truth


def burn_text(img: Image.Image) -> Image.Image:
    """White date, ID and camera text in the four corners of the black border, as cameras do."""
    draw, h = ImageDraw.Draw(img), img.height
    font = ImageFont.load_default(size=max(8, h // 30))
    for x, y, text in [(h // 60, h // 60, "2014-03-12 10:22"), (h // 60, h - h // 20, "OD  ID 004711"),
                       (img.width - h // 4, h // 60, "TRC-NW8"), (img.width - h // 4, h - h // 20, "45 deg")]:
        draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return img


def add_glare(img: Image.Image, truth: Circle) -> Image.Image:
    """A flash reflex inside the fundus and a bright haze straddling its rim."""
    arr = np.asarray(img, dtype=np.float32)
    yy, xx = np.mgrid[0:img.height, 0:img.width]
    spots = [(truth.cx - 0.3 * truth.r, truth.cy + 0.35 * truth.r, 0.12 * truth.r),
             (truth.cx + truth.r * np.cos(2.6), truth.cy + truth.r * np.sin(2.6), 0.08 * truth.r)]
    for gx, gy, sigma in spots:
        arr = arr + 255 * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def assert_on_circle(found: Circle, truth: Circle):
    """Centre within 0.5% of the radius, radius within 1% (issue 17)."""
    centre = np.hypot(found.cx - truth.cx, found.cy - truth.cy) / truth.r
    radius = abs(found.r - truth.r) / truth.r
    assert centre <= 0.005 and radius <= 0.01, (found, truth, f"centre {centre:.2%}, radius {radius:.2%}")


def assert_no_crescent(out: Image.Image):
    """The prepared disc is fundus out to its edge all round: a circle found off-centre leaves a
    black crescent on one side of the masked disc."""
    arr = np.asarray(out, dtype=np.float32).max(axis=2)
    size = arr.shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    rho = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2) / (size / 2)
    ring = arr[(rho > 0.9) & (rho < 0.96)]
    assert (ring < 0.2 * np.median(arr[rho < 0.9])).mean() < 0.01


def prepared_at_both_sizes(path, truth: Circle, whole: bool = True):
    for size in (64, 299):
        prepared = prepare_fundus(path, size=size)
        assert_on_circle(prepared.circle, truth)
        if whole:  # a cut circle is black where the frame cut it
            assert_no_crescent(prepared.image)


# Black frames of the two common camera aspect ratios, 3:2 and 4:3, from long sides of 200-256 px
# (bug 1: a decode this size was blurred, not shrunk, but its circle divided as if shrunk) up to
# EyePACS originals. JPEG decoding at 1/2..1/8 brings 480x320, 512x384 and 2048x1536 down there at
# --size 64. The circle fills the frame's height, as in most cameras.
FRAMES = [(200, 133), (240, 160), (256, 171), (256, 192), (480, 320), (512, 384), (2048, 1536), (3888, 2592)]


@pytest.mark.parametrize("w, h", FRAMES, ids=[f"{w}x{h}" for w, h in FRAMES])
def test_real_photograph_on_black_frames(tmp_path, w, h):
    img, truth = placed(w, h, h - 2)
    prepared_at_both_sizes(save(img, tmp_path / "f.jpg", quality=95), truth)


def test_real_photograph_as_it_comes():
    """retina.jpg itself: 1411 px is no multiple of 8, so the decoded 1/8-scale image has a partial
    last pixel; its scale is still exactly 1/8 (not 177/1411), or the centre drifts by 0.4%."""
    decoded = decode_rgb(RETINA, 160, MAX)
    assert decoded.scale == 0.125 and decoded.image.size == (177, 177)
    assert decoded.original_size == (1411, 1411)
    prepared_at_both_sizes(RETINA, Circle(RETINA_CX, RETINA_CY, RETINA_R))


def with_glare(img: Image.Image, truth: Circle) -> tuple[Image.Image, Circle]:
    return add_glare(img, truth), truth


AWKWARD = {
    "off-centre": lambda: placed(720, 480, 400, left=40, top=70),
    "off-centre right": lambda: placed(720, 480, 400, left=300, top=10),
    "cut top and bottom": lambda: placed(1800, 1200, 1400),
    "cut on four sides": lambda: placed(1500, 1000, 1600),
    "cut deeper on four sides": lambda: placed(1500, 1000, 1700),
    "text in the corners": lambda: (burn_text(placed(300, 200, 196)[0]), placed(300, 200, 196)[1]),
    "dim, text in the corners": lambda: (burn_text(placed(1500, 1000, 980, dim=0.4)[0]),
                                         placed(1500, 1000, 980)[1]),
    "flash glare": lambda: with_glare(*placed(1200, 800, 780)),
}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_real_photograph_placed_awkwardly(tmp_path, name):
    """Regression (bug 3): the noise was the standard deviation of the darkest corner, so text in
    the border raised the threshold until a dim fundus was rejected, and fundus in the corners of
    a circle cut on four sides gave a wrong background."""
    img, truth = AWKWARD[name]()
    prepared_at_both_sizes(save(img, tmp_path / "f.jpg", quality=95), truth, whole="cut" not in name)


NO_BORDER = {
    "full frame, 3:2": lambda: retina_at(1411).crop((255, 405, 1155, 1005)),
    "full frame, square": lambda: retina_at(1411).crop((300, 300, 1100, 1100)),
    "corners cut to a sliver": lambda: placed(1500, 1000, 1800)[0],
}


@pytest.mark.parametrize("name", list(NO_BORDER))
def test_full_frame_photograph_is_rejected_as_no_border(tmp_path, name):
    """Policy: a photograph without a background border is rejected (kind no_border), not given
    the frame's inscribed circle: its fundus's size is unknown, and a guess would prepare it at a
    different magnification from the rest of the set without a word."""
    path = save(NO_BORDER[name](), tmp_path / "f.jpg", quality=95)
    with pytest.raises(ImageRejected, match="no border around the fundus") as exc:
        prepare_fundus(path, size=64)
    assert exc.value.kind == "no_border"


def test_monochrome_full_frame_gets_no_silent_circle():
    """A grey full frame cannot be told from a fundus on a grey border by colour; the plausibility
    checks (edge on the circle, region filling it, no large hole) reject it instead."""
    grey = retina_at(1411).crop((300, 300, 1100, 1100)).convert("L").convert("RGB")
    with pytest.raises(ImageRejected) as exc:
        find_fundus(grey)
    assert exc.value.kind == "no_fundus"


def test_twelve_bit_data_in_a_sixteen_bit_png(tmp_path):
    """Regression (bug 4): 16-bit files were scaled by 255/65535 whatever their depth, so 12-bit
    data came out at most 15 of 255: a black crop. Its depth is read from its maximum."""
    img, truth = placed(600, 400, 390)
    grey = np.asarray(img.convert("L"), dtype=np.uint32)
    path = save(Image.fromarray((grey * 4095 // 255).astype(np.uint16)), tmp_path / "twelve.png")  # I;16
    decoded = decode_rgb(path, 299, MAX)
    assert abs(int(np.asarray(decoded.image).max()) - int(grey.max())) <= 1  # 4095 is white
    prepared = prepare_fundus(path, size=64)
    assert_on_circle(prepared.circle, truth)
    eight_bit = prepare_fundus(save(img.convert("L"), tmp_path / "eight.png"), size=64)
    middle = (slice(24, 40), slice(24, 40))
    assert abs(np.asarray(prepared.image)[middle].mean() - np.asarray(eight_bit.image)[middle].mean()) < 3


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in arr)  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_colour_png(tmp_path):
    """Pillow decodes 16-bit colour to the high byte of each value: right for full-range data,
    which is prepared; 12-bit data would be near black, so it is rejected with what to do."""
    img, truth = placed(600, 400, 390)
    arr = np.asarray(img, dtype=np.uint32)
    full = tmp_path / "full.png"
    full.write_bytes(png_rgb16(arr * 257))
    assert_on_circle(prepare_fundus(full, size=64).circle, truth)
    twelve = tmp_path / "twelve.png"
    twelve.write_bytes(png_rgb16(arr * 4095 // 255))
    with pytest.raises(ImageRejected, match="convert it to 8-bit") as exc:
        decode_rgb(twelve, 299, MAX)
    assert exc.value.kind == "low_bit_depth"


def test_rescaling_keeps_pixel_centres():
    """Regression (bug 2): x -> x / f drifted the circle half a pixel up-left per rescale."""
    # an 8x8 image reduced by 2: pixel 0 of the small image covers pixels 0 and 1 (centre 0.5)
    assert Circle(0.0, 3.0, 2.0).scaled(2.0) == Circle(0.5, 6.5, 4.0)
    assert Circle(0.5, 6.5, 4.0).scaled(0.5) == Circle(0.0, 3.0, 2.0)


def test_crop_places_the_square_to_a_fraction_of_a_pixel():
    """A small decoded image is enlarged to the output, so rounding the crop box to whole decoded
    pixels shifted the disc by several output pixels."""
    cx, cy, r = 50.3, 40.7, 30.25
    yy, xx = np.mgrid[0:90, 0:110]
    disc = np.where(np.hypot(xx - cx, yy - cy) <= r, 200, 0).astype(np.uint8)
    out = crop_to_circle(Image.fromarray(disc).convert("RGB"), Circle(cx, cy, r), 299, mask_outside=False)
    bright = np.asarray(out)[:, :, 0] > 100
    ys, xs = np.nonzero(bright)
    assert abs(xs.mean() - 149) < 0.3 and abs(ys.mean() - 149) < 0.3
