"""Fundus geometry and decoding on frames with known circles and on every awkward file kind."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

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
    img, scale = decode_rgb(path, min_side=299, max_pixels=MAX)
    assert scale == 0.125 and img.size == (400, 300)
    img, scale = decode_rgb(path, min_side=1000, max_pixels=MAX)  # both sides must reach 1000
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
    rgb, _ = decode_rgb(path, 299, MAX)
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
    rgb, _ = decode_rgb(path, 299, MAX)
    assert np.asarray(rgb)[:, :100].max() == 0


def test_exif_rotation_is_applied(tmp_path):
    img = frame(w=600, h=400, cx=250.0, cy=200.0, r=150.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif.tobytes())
    rgb, _ = decode_rgb(path, 400, MAX)
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
