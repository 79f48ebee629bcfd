"""Position encodings (`sam2/modeling/position_encoding.py`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def sine_position_encoding(h: int, w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
    """PositionEmbeddingSine(num_pos_feats=dim, normalize=True) for an (h, w) map -> (h, w, dim).

    Channels: dim/2 for y then dim/2 for x, each interleaving sin (even) and cos (odd) frequencies.
    A constant of the shape, computed on the host in float32 as the official code computes it.
    """
    half = dim // 2
    eps, scale = np.float32(1e-6), np.float32(2 * math.pi)
    y = np.arange(1, h + 1, dtype=np.float32)
    x = np.arange(1, w + 1, dtype=np.float32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    dim_t = np.arange(half, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(half))

    def encode(values):  # (n,) -> (n, half)
        pos = values[:, None] / dim_t
        return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=2).reshape(len(values), half)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (h, w, half))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (h, w, half))
    return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


def fourier_encoding(coords: jax.Array, gaussian: jax.Array) -> jax.Array:
    """PositionEmbeddingRandom._pe_encoding: (..., 2) in [0, 1] -> (..., 2 * F) [sin | cos]."""
    projected = (2 * coords - 1) @ gaussian.astype(coords.dtype)
    projected = 2 * np.pi * projected
    return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)


def fourier_grid_encoding(h: int, w: int, gaussian: jax.Array) -> jax.Array:
    """PositionEmbeddingRandom.forward((h, w)) channels-last: (h, w, 2 * F) at pixel centres."""
    ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return fourier_encoding(grid, gaussian)
