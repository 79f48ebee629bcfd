"""From a photo to the model's input and from the model's logits back to the photo.

Everything here reproduces the official `SAM2Transforms` and `SAM2ImagePredictor` numerics:
- images are resized to S x S (not aspect preserving) with torchvision's antialiased bilinear
  resize and ImageNet-normalised: on the device (`preprocess_on_device`: uint8 photos padded to a
  canvas, the resize weights computed there from each photo's size, two matmuls), or on the host
  (`preprocess_image`, torch-exact taps of `p2s_jax.model.resample`);
- point coordinates are scaled from the original width / height (`to_model_coords`);
- low-res logits are upsampled bilinearly (align_corners=False) to the original size
  (`upsample_matrix` / `upsample_logits`) and thresholded at 0; low-res logits returned to the
  caller are clamped to [-LOW_RES_CLAMP, LOW_RES_CLAMP].
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from p2s_jax.model.resample import resize_taps, upsample_logits, upsample_matrix

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LOW_RES_CLAMP = 32.0


def _resize_axis(x: np.ndarray, out_size: int, axis: int, method: str) -> np.ndarray:
    """x resized along `axis` by its tap band: the matrix product, without the zeros."""
    index, weights = resize_taps(out_size, x.shape[axis], method)
    shape = [1] * x.ndim
    shape[axis] = out_size
    out = np.take(x, index[:, 0], axis=axis) * weights[:, 0].reshape(shape)
    for t in range(1, index.shape[1]):
        out += np.take(x, index[:, t], axis=axis) * weights[:, t].reshape(shape)
    return out


def resize_image_numpy(image: np.ndarray, out_hw, method: str = "bilinear_aa") -> np.ndarray:
    """Resize an (H, W, C) float32 array on the host with torch's resampling -> (oh, ow, C).

    Equal to Wy @ image @ Wx^T per channel (`resize_matrices`) but applies only each output
    pixel's taps: 164 -> 46 ms for `preprocess_image` of a 480 x 640 photo (2 cores).
    """
    rows = _resize_axis(image.astype(np.float32), int(out_hw[0]), 0, method)
    return _resize_axis(rows, int(out_hw[1]), 1, method)


def preprocess_image(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, S, 3) float32: /255, antialiased bilinear resize, ImageNet norm."""
    pixels = image.astype(np.float32) / np.float32(255)
    pixels = resize_image_numpy(pixels, (image_size, image_size), "bilinear_aa")
    return imagenet_normalize(pixels)


def imagenet_normalize(pixels):
    """(..., 3) float RGB in [0, 1] -> ImageNet-normalised (NumPy or JAX arrays alike)."""
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def to_model_coords(coords, orig_hw, image_size: int):
    """(..., 2) pixels (x, y) of the original image -> model-input pixels, as `transform_coords`:
    x / W, y / H, then * S, in float32. NumPy or JAX arrays (inside jit too); `orig_hw` is
    (H, W), or (..., 2) broadcasting against `coords` (one size per image)."""
    xp = jnp if isinstance(coords, jax.Array) or isinstance(orig_hw, jax.Array) else np
    width_height = xp.asarray(orig_hw, xp.float32)[..., ::-1]
    return xp.asarray(coords, xp.float32) / width_height * xp.float32(image_size)


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def upsample_matrices(orig_hw: Tuple[int, int], low_res: int, multiple: int = 64):
    """(up_y (Hp, low_res), up_x (Wp, low_res)) device arrays for an image of `orig_hw`, the
    output padded up to a multiple of `multiple` so that image sizes share compilations."""
    return tuple(jnp.asarray(upsample_matrix(size, low_res, padded))
                 for size, padded in zip(orig_hw, canvas_hw(orig_hw, multiple)))


@jax.jit
def upsample_masks(logits: jax.Array, upsample_y: jax.Array, upsample_x: jax.Array) -> jax.Array:
    """(..., h, w) unclamped logits -> (..., Hp, Wp) bool masks (`upsample_logits` > 0)."""
    return upsample_logits(logits, upsample_y, upsample_x) > 0


# ----------------------------------------------------------------------------- on the device

CANVAS_MULTIPLE = 128  # photos are padded to a canvas whose sides are multiples of this


def canvas_hw(hw: Tuple[int, int], multiple: int = CANVAS_MULTIPLE) -> Tuple[int, int]:
    """The canvas (H, W) a photo of `hw` is padded to: each side rounded up to `multiple`, so
    that photos of similar sizes share one compilation."""
    return tuple(-(-int(size) // multiple) * multiple for size in hw)


def antialias_resize_matrix(out_size: int, in_size: jax.Array, padded: int) -> jax.Array:
    """(out_size, padded) float32: torch's bilinear resize with antialias=True from `in_size`
    (a traced int) to `out_size` pixels; columns from `in_size` on are zero.

    The device twin of `model.resample.bilinear_aa_matrix`, in float32 with the same roundings
    (each product of two float32 numbers rounded once, as the host's float64 product then
    float32 cast gives), except where XLA fuses 1 - |t * invscale| into a multiply-add and the
    per-row normalising sum runs in another order: within a few float32 eps of the host's.
    """
    f32 = jnp.float32
    scale = jnp.asarray(in_size, f32) / f32(out_size)
    support = jnp.where(scale >= 1, scale, f32(1))
    invscale = jnp.where(scale >= 1, f32(1) / scale, f32(1))
    center = scale * (jnp.arange(out_size, dtype=f32) + f32(0.5))  # (out,)
    first = jnp.maximum(jnp.trunc(center - support + f32(0.5)), 0)
    stop = jnp.minimum(jnp.trunc(center + support + f32(0.5)), jnp.asarray(in_size, f32))
    taps = jnp.arange(padded, dtype=f32)[None]  # (1, padded)
    weights = jnp.maximum(0, 1 - jnp.abs(((taps - center[:, None]) + f32(0.5)) * invscale))
    weights = jnp.where((taps >= first[:, None]) & (taps < stop[:, None]), weights, 0)
    total = weights.sum(-1, keepdims=True)
    return jnp.where(total != 0, weights / jnp.where(total != 0, total, 1), weights)


def preprocess_on_device(images: jax.Array, image_hw: jax.Array, image_size: int) -> jax.Array:
    """(B, Hc, Wc, 3) uint8 photos on a canvas and their sizes (B, 2) int32 -> (B, S, S, 3)
    float32, ImageNet-normalised: what `preprocess_image` gives each photo, computed where the
    model runs (float32 throughout, full-precision matmuls on every backend).

    The products run channel-major ((B, 3, H, W) planes): with the channels last, XLA's GPU
    compiler fails to tile the second product for a single photo (H100, batch 1)."""
    _, hc, wc, _ = images.shape
    resize_y = jax.vmap(lambda h: antialias_resize_matrix(image_size, h, hc))(image_hw[:, 0])
    resize_x = jax.vmap(lambda w: antialias_resize_matrix(image_size, w, wc))(image_hw[:, 1])
    planes = jnp.moveaxis(images, -1, 1).astype(jnp.float32) / jnp.float32(255)  # (B, 3, H, W)
    highest = jax.lax.Precision.HIGHEST
    rows = jnp.einsum("bsh,bchw->bcsw", resize_y, planes, precision=highest)
    resized = jnp.einsum("btw,bcsw->bcst", resize_x, rows, precision=highest)
    return imagenet_normalize(jnp.moveaxis(resized, 1, -1))
