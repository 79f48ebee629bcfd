"""Small building blocks shared by the model parts (all channels-last)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A constant tensor that travels with the weights but is never trained (torch `register_buffer`)."""


def gelu(x):
    """torch.nn.GELU(): the exact erf form."""
    return jax.nn.gelu(x, approximate=False)


def layer_norm(dim: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with the two-pass variance torch uses."""
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


class MLP(nnx.Module):
    """`sam2.modeling.sam2_utils.MLP`: Linear layers with `activation` between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 activation: Callable = jax.nn.relu, sigmoid_output: bool = False, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs)
                                for a, b in zip(dims[:-1], dims[1:])])
        self.activation = activation
        self.sigmoid_output = sigmoid_output

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return jax.nn.sigmoid(x) if self.sigmoid_output else x


class ConvTranspose2x2(nnx.Module):
    """torch.nn.ConvTranspose2d(kernel_size=2, stride=2): each pixel becomes a 2x2 block.

    kernel: (in, 2, 2, out) — torch's (in, out, 2, 2) with the output axis moved last.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3))
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, 2, 2, out_dim), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_dim,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., H, W, in) -> (..., 2H, 2W, out)."""
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("...hwc,cabo->...hawbo", x.astype(self.dtype), kernel)
        *lead, h, a, w, b, o = y.shape
        return y.reshape(*lead, h * a, w * b, o) + self.bias[...].astype(self.dtype)


# Above this many logits per head the queries are processed in chunks (lax.map), so the
# (Lq, Lk) matrix never exists whole: 1.7x faster for Hiera's 4096-token global attention on CPU.
CHUNK_LOGITS = 1 << 22
QUERY_CHUNK = 512


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              key_mask: Optional[jax.Array] = None) -> jax.Array:
    """Scaled dot-product attention, heads on axis -2.

    q: (..., Lq, heads, d); k, v: (..., Lk, heads, d); key_mask: (..., Lk) bool, False = ignored.
    Returns (..., Lq, heads, d).
    """
    lq, lk = q.shape[-3], k.shape[-3]
    if lq * lk > CHUNK_LOGITS and lq % QUERY_CHUNK == 0 and key_mask is None:
        chunks = jnp.moveaxis(q.reshape(q.shape[:-3] + (lq // QUERY_CHUNK, QUERY_CHUNK)
                                        + q.shape[-2:]), -4, 0)
        out = jax.lax.map(lambda chunk: _attention(chunk, k, v, None), chunks)
        return jnp.moveaxis(out, 0, -4).reshape(q.shape[:-1] + v.shape[-1:])
    return _attention(q, k, v, key_mask)


def _attention(q, k, v, key_mask):
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("...qhd,...khd->...hqk", q * scale, k)
    if key_mask is not None:
        big_negative = jnp.finfo(logits.dtype).min
        logits = jnp.where(key_mask[..., None, None, :], logits, big_negative)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, v)
