"""Reading images as (H, W, 3) uint8 RGB arrays, the one layout the rest of the package accepts.

EXIF orientation is deliberately NOT applied: COCO-format annotations (COCO, OCHuman, CIHP) are in
the pixel frame of the image as stored in the file, and rotating by the EXIF tag would misalign
every mask and keypoint. `load_image` therefore returns the stored pixel grid, as pycocotools and
the official evaluation scripts see it.

Grayscale images (COCO has a few) are replicated to three channels, an alpha channel is dropped
(not composited), palette / CMYK / YCbCr / 1-bit images are converted by PIL. High-bit-depth
images (16-bit or float PNG/TIFF) are refused rather than silently clipped.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import write_atomic

# PIL modes whose pixels NumPy can take as they are (then `to_rgb_uint8` finishes the job).
_ARRAY_MODES = ("RGB", "RGBA", "L", "LA")
# PIL modes that PIL itself converts losslessly (or as every decoder would) to RGB.
_PIL_CONVERTED_MODES = ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La")


class ImageError(InputError):
    """An image file that is missing or unreadable, or an array that is not an image."""


def to_rgb_uint8(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Returns `array` as (H, W, 3) uint8 RGB.

    Args:
      array: uint8 (H, W) or (H, W, 1) grayscale, (H, W, 2) grayscale + alpha, (H, W, 3) RGB or
        (H, W, 4) RGBA. Alpha is dropped, not composited.
      name: what the array is (a file name, "frame 3"), used in error messages.

    Returns:
      C-contiguous (H, W, 3) uint8; the input itself when it already is one.

    Raises:
      ImageError: on another dtype, rank or channel count, naming `name`, the shape and the dtype.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ImageError(
            f"{name}: expected a uint8 image, got dtype {array.dtype} with shape {array.shape}; "
            "convert it to 8-bit first (e.g. scale floats in [0, 1] by 255 and round)")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape[:2]:
        raise ImageError(
            f"{name}: expected an image of shape (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or "
            f"(H, W, 4) with H, W > 0, got shape {array.shape} (dtype {array.dtype})")
    channels = array.shape[2]
    if channels in (1, 2):  # gray (+ alpha)
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:  # RGBA
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _pil_to_array(image: Image.Image, name: str) -> np.ndarray:
    """Decoded PIL image -> (H, W, 3) uint8 RGB; refuses high-bit-depth modes."""
    if image.mode in _PIL_CONVERTED_MODES:
        has_alpha = image.mode in ("PA", "La", "RGBa") or "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
    elif image.mode not in _ARRAY_MODES:
        raise ImageError(
            f"{name}: unsupported PIL image mode {image.mode!r} (e.g. 16-bit or float pixels); "
            "expected an 8-bit grayscale, RGB, RGBA or palette image")
    return to_rgb_uint8(np.asarray(image), name)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as (H, W, 3) uint8 RGB, in its stored orientation.

    EXIF orientation is not applied (see the module docstring): the returned grid is the one
    COCO-format annotations refer to.

    Raises:
      ImageError: naming the file and the reason when it is missing, not a file, not an image,
        truncated or of an unsupported pixel format.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: image file not found")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Encoded JPEG / PNG bytes -> (H, W, 3) uint8 RGB, as `load_image` reads a file.

    Raises:
      ImageError: undecodable data or a high-bit-depth image, naming `name`.
    """
    return _decode(io.BytesIO(data), name)


def _decode(source, name: str) -> np.ndarray:
    """A file path or file object -> (H, W, 3) uint8 RGB; errors name `name`."""
    try:
        with Image.open(source) as image:
            image.load()  # decode now, inside the try: truncated data fails here
            return _pil_to_array(image, name)
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not a readable image: cannot decode image ({e})") from e
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports corrupt data as these
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e


def save_image(path: str | os.PathLike, image: Image.Image) -> Path:
    """Writes `image` atomically (`files.write_atomic`) in the format its suffix names (PNG for
    a path without a known one)."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return write_atomic(path, buffer.getvalue())


def pad_to_canvas(image: np.ndarray, canvas: tuple[int, int],
                  out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (Hc, Wc, 3) uint8, the photo in the top-left corner, zeros elsewhere;
    written into `out` when given (an (Hc, Wc, 3) uint8 array)."""
    h, w = image.shape[:2]
    if h > canvas[0] or w > canvas[1]:
        raise ValueError(f"image {h}x{w} (HxW) does not fit the canvas {canvas[0]}x{canvas[1]}")
    if out is None:
        out = np.zeros((*canvas, 3), np.uint8)
    else:
        out[h:] = 0
        out[:h, w:] = 0
    out[:h, :w] = image
    return out
