"""p2s_jax.utils.images: conversions against NumPy references, file decoding and its errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from p2s_jax.utils.images import ImageError, load_image, to_rgb_uint8


@pytest.fixture
def rgba() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (13, 17, 4), dtype=np.uint8)


def test_grayscale_is_replicated(rgba):
    gray = rgba[:, :, 0]
    reference = np.stack([gray, gray, gray], axis=-1)
    for array in (gray, gray[:, :, None]):
        out = to_rgb_uint8(array, "gray")
        assert out.dtype == np.uint8 and out.shape == (13, 17, 3)
        np.testing.assert_array_equal(out, reference)


def test_alpha_is_dropped(rgba):
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgba[:, :, :3])
    gray_alpha = rgba[:, :, :2]
    np.testing.assert_array_equal(to_rgb_uint8(gray_alpha),
                                  np.repeat(gray_alpha[:, :, :1], 3, axis=2))


def test_rgb_passes_through(rgba):
    rgb = np.ascontiguousarray(rgba[:, :, :3])
    assert to_rgb_uint8(rgb) is rgb


@pytest.mark.parametrize("shape", [(5,), (4, 5, 5), (4, 5, 6), (2, 4, 5, 3), (0, 5, 3)])
def test_bad_shapes_are_named(shape):
    with pytest.raises(ImageError, match=rf"frame 7.*{re.escape(str(shape))}"):
        to_rgb_uint8(np.zeros(shape, np.uint8), "frame 7")


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int64, bool])
def test_bad_dtypes_are_named(dtype):
    with pytest.raises(ImageError, match=rf"photo\.png.*dtype {np.dtype(dtype)}.*\(4, 5, 3\)"):
        to_rgb_uint8(np.zeros((4, 5, 3), dtype), "photo.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_load_png_modes(tmp_path, rgba, mode):
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    path = tmp_path / f"x_{mode}.png"
    image.save(path)
    reference = np.asarray(image.convert("RGB"))
    if mode in ("L", "LA"):  # gray is replicated, not re-weighted
        reference = np.repeat(np.asarray(image)[:, :, None] if mode == "L"
                              else np.asarray(image)[:, :, :1], 3, axis=2)
    out = load_image(path)
    assert out.shape == (13, 17, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, reference)


def test_exif_orientation_is_not_applied(tmp_path):
    """Annotations refer to the stored pixel grid: a 'rotate 90' EXIF tag must be ignored."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.shape == (20, 40, 3)
    assert out[:, :20].mean() > 200 and out[:, 20:].mean() < 50


def test_missing_file(tmp_path):
    assert issubclass(ImageError, ValueError)
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg: image file not found"):
        load_image(path)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageError, match=r"garbage\.jpg: not a readable image"):
        load_image(garbage)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match=r"truncated\.jpg: cannot decode image"):
        load_image(truncated)


def test_sixteen_bit_is_refused(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, np.uint16)).save(path)
    with pytest.raises(ImageError, match=r"deep\.png: unsupported PIL image mode"):
        load_image(path)

