"""Shared pieces of the SAM heads (`sam2/modeling/sam2_utils.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LayerNorm2d(nnx.Module):
    """LayerNorm over channels of a channels-last map, eps 1e-6, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        x = (x - mean) / jnp.sqrt(var + self.eps)
        return (self.weight[...] * x + self.bias[...]).astype(dtype)
