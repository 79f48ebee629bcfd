"""Resampling that reproduces `torch.nn.functional.interpolate` exactly, as separable matrices.

A 2-D resize with a separable kernel is `out = Wy @ in @ Wx.T`, with one (out, in) weight matrix
per axis. We build those matrices in NumPy with torch's formulas, so that:
- `bicubic` uses torch's cubic convolution with a = -0.75 (jax.image.resize uses Keys a = -0.5),
  clamped border indices, align_corners=False;
- `bilinear` (align_corners=False, antialias=False) clamps the source coordinate at 0 as torch does;
- `bilinear_aa` (antialias=True) is torch's / PIL's triangle filter widened by the scale factor
  when downsampling, normalised per output pixel, as torchvision's `Resize` applies to tensors.
The matrices are small constants; applying them is two matmuls, which XLA runs well on every device
(`resize_taps` gives their bands, for host-side resizing in `p2s_jax.inference.preprocess`).
`upsample_matrix` / `upsample_logits` are the mask decoder's low-res logits to full resolution:
the predictor's masks and the training loop's high-res predictions alike.
Source coordinates are rounded as torch's CPU kernels round them (one rounding of
`scale * (i + 0.5) - 0.5`, as a fused multiply-add gives), so the weights are bit-identical to torch's.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    one = np.float32(1)
    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def _source_coords(out_size: int, in_size: int) -> np.ndarray:
    """torch's `area_pixel_compute_source_index` (align_corners=False), rounded once to float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    return (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of torch bicubic, align_corners=False."""
    src = _source_coords(out_size, in_size)
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights((src - base).astype(np.float32)).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    for tap in range(4):
        idx = np.clip(base - 1 + tap, 0, in_size - 1)
        np.add.at(matrix, (np.arange(out_size), idx), weights[:, tap])
    return matrix


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of torch bilinear, align_corners=False, no antialias."""
    src = np.maximum(_source_coords(out_size, in_size), 0)
    lo = np.floor(src).astype(np.int64)
    lo = np.minimum(lo, in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), np.float32(1) - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


@functools.lru_cache(maxsize=64)
def bilinear_aa_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of torch bilinear with antialias=True."""
    scale = np.float32(in_size) / np.float32(out_size)
    support = scale if scale >= 1 else np.float32(1)  # interp_size / 2 * scale, interp_size = 2
    invscale = np.float64(np.float32(1) / scale if scale >= 1 else np.float32(1))
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = np.float32(np.float64(scale) * (i + 0.5))
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax).astype(np.float32)
        weights = np.maximum(0, 1 - np.abs((((taps - center) + 0.5) * invscale).astype(np.float32)))
        total = weights.sum(dtype=np.float32)
        matrix[i, xmin:xmax] = weights / total if total != 0 else weights
    return matrix


_BUILDERS = {"bicubic": bicubic_matrix, "bilinear": bilinear_matrix,
             "bilinear_aa": bilinear_aa_matrix}


def resize_matrices(out_hw, in_hw, method: str):
    """(Wy (out_h, in_h), Wx (out_w, in_w)) for `method` in bicubic | bilinear | bilinear_aa."""
    build = _BUILDERS[method]
    return build(int(out_hw[0]), int(in_hw[0])), build(int(out_hw[1]), int(in_hw[1]))


@functools.lru_cache(maxsize=64)
def resize_taps(out_size: int, in_size: int, method: str):
    """The band of non-zeros of a resize matrix: (index (out, T) int, weights (out, T) float32).

    Row i of the matrix is sum_t weights[i, t] * onehot(index[i, t]); T is the widest band
    (2 taps for bilinear upscaling, about 2 x scale for antialiased downscaling). Taps past
    the last input pixel get weight 0.
    """
    matrix = _BUILDERS[method](out_size, in_size)
    nonzero = matrix != 0
    first = nonzero.argmax(axis=1)
    last = in_size - 1 - nonzero[:, ::-1].argmax(axis=1)
    index = first[:, None] + np.arange(int((last - first).max()) + 1)
    inside = index < in_size
    index = np.minimum(index, in_size - 1)
    weights = np.where(inside, np.take_along_axis(matrix, index, axis=1), np.float32(0))
    return index, weights.astype(np.float32)


def upsample_matrix(size: int, low_res: int, padded_size: Optional[int] = None,
                    out: Optional[np.ndarray] = None) -> np.ndarray:
    """(padded_size, low_res) float32: torch bilinear (align_corners=False) from `low_res` to
    `size` pixels, `F.interpolate(..., "bilinear")` as a matrix; rows past `size` are zero, so
    masks of several image sizes share one canvas (and one compilation). Written into `out`
    when given."""
    padded_size = size if padded_size is None else padded_size
    if padded_size < size:
        raise ValueError(f"padded_size {padded_size} < size {size}")
    matrix = np.zeros((padded_size, low_res), np.float32) if out is None else out
    matrix[:size] = bilinear_matrix(size, low_res)
    matrix[size:] = 0
    return matrix


def upsample_logits(logits: jax.Array, upsample_y: jax.Array, upsample_x: jax.Array) -> jax.Array:
    """(..., h, w) logits -> (..., Hp, Wp) float32 through the torch-bilinear (align_corners=False)
    matrices upsample_y (Hp, h) and upsample_x (Wp, w): `F.interpolate(..., "bilinear")`."""
    highest = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes on accelerators
    rows = jnp.einsum("yh,...hw->...yw", upsample_y, logits.astype(jnp.float32), precision=highest)
    return jnp.einsum("xw,...yw->...yx", upsample_x, rows, precision=highest)
