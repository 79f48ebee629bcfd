"""Small building blocks shared by the model parts (all channels-last)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx


class Buffer(nnx.Variable):
    """A constant tensor that travels with the weights but is never trained (torch `register_buffer`)."""


def gelu(x):
    """torch.nn.GELU(): x / 2 (1 + erf(x / sqrt 2)), the formula torch's CPU and CUDA kernels use.

    `jax.nn.gelu(approximate=False)` computes x erfc(-x / sqrt 2) / 2 instead: the same function,
    but XLA's erfc costs 2.6x its erf on CPU (22.6 vs 8.6 ms for 29 M values), which made the
    Hiera MLPs' GELU 1.7x slower than torch's.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * (0.5 ** 0.5)))


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

    def blocks(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., 2, 2, out): each pixel's output block, not yet interleaved."""
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("...c,cabo->...abo", x.astype(self.dtype), kernel)
        return y + self.bias[...].astype(self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., H, W, in) -> (..., 2H, 2W, out)."""
        y = self.blocks(x)
        *lead, h, w, _, _, out = y.shape
        n = len(lead)
        return y.transpose(*range(n), n, n + 2, n + 1, n + 3, n + 4).reshape(*lead, 2 * h, 2 * w, out)


def to_blocks(x: jax.Array, levels: int) -> jax.Array:
    """Space-to-depth, coarse to fine: (..., H, W, C) -> (..., H/s, W/s, 2, 2, ..., 2, 2, C).

    s = 2**levels; pixel (s i + 2**(L-1) a_1 + ... + a_L, same for j and b) goes to
    (i, j, a_1, b_1, ..., a_L, b_L): the layout that `levels` stacked `ConvTranspose2x2.blocks`
    produce, so a map can be added to their output without interleaving it.
    """
    *lead, h, w, c = x.shape
    s, n = 2 ** levels, len(lead)
    x = x.reshape(*lead, h // s, *([2] * levels), w // s, *([2] * levels), c)
    rows, cols = list(range(n + 1, n + 1 + levels)), list(range(n + 2 + levels, n + 2 + 2 * levels))
    pairs = [axis for pair in zip(rows, cols) for axis in pair]
    return x.transpose(*range(n), n, n + 1 + levels, *pairs, n + 2 + 2 * levels)


def from_blocks(x: jax.Array, levels: int) -> jax.Array:
    """Inverse of `to_blocks` without the channel axis: (..., h, w, 2, 2, ..., 2, 2) -> (..., H, W)."""
    n = x.ndim - 2 - 2 * levels
    *lead, h, w = x.shape[: n + 2]
    rows, cols = list(range(n + 2, x.ndim, 2)), list(range(n + 3, x.ndim, 2))
    x = x.transpose(*range(n), n, *rows, n + 1, *cols)
    s = 2 ** levels
    return x.reshape(*lead, h * s, w * s)


# How attention is computed (`SAM2Config.attention`, `sam2.with_attention`):
#   cpu_chunked  head-major products; above CHUNK_LOGITS logits per head the queries go one head
#                and one QUERY_CHUNK at a time (nested lax.map), so a chunk's logits stay in
#                cache: 2.6x faster for Hiera's 4096-token global attention on CPU (714 -> 270 ms,
#                b+). On an accelerator the nested maps are a serial loop: CPU only.
#   einsum       the same head-major products, never chunked: on TPU XLA's cost model rates them
#                above jax.nn.dot_product_attention's XLA path, which moves more bytes and holds
#                more memory (docs/performance.md, TPU table).
#   xla          jax.nn.dot_product_attention's XLA path.
#   cudnn        jax.nn.dot_product_attention's cuDNN flash attention (GPU, bf16 / fp16, head
#                dims up to 128 in multiples of 8); its gradient goes through the XLA path.
#   auto         cpu_chunked on CPU, einsum on TPU, cudnn on GPU where the dtype and head dim
#                allow, else xla.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu_chunked", "einsum")
CHUNK_LOGITS = 1 << 22
QUERY_CHUNK = 512


def resolve_attention(implementation: str, dtype, head_dim: int,
                      backend: Optional[str] = None) -> str:
    """The implementation `attention` runs for `implementation` on `backend` (default: JAX's
    default backend when traced)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        return "cpu_chunked"
    if backend == "tpu":
        return "einsum"
    if (backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return "xla"


def cpu_formulations(implementation: str) -> bool:
    """Whether a model whose attention is `implementation` also runs the CPU-tuned formulations
    of its other parts (Hiera's qkv on the real tokens, the decoder's space-to-depth upscaling):
    exactly when the attention resolves to `cpu_chunked`. Both formulations give the same
    numbers; the CPU ones save FLOPs, the others lay out fewer narrow tensors."""
    return resolve_attention(implementation, jnp.float32, 64) == "cpu_chunked"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: Optional[jax.Array] = None,
              implementation: str = "auto") -> jax.Array:
    """Scaled dot-product attention, heads on axis -2; softmax in float32.

    q: (..., Lq, heads, d); k, v: (..., Lk, heads, d); key_mask: (..., Lk) bool, False = ignored.
    Leading axes broadcast against each other. Returns (..., Lq, heads, d) in q's dtype.
    """
    implementation = resolve_attention(implementation, q.dtype, q.shape[-1])
    if implementation in ("cpu_chunked", "einsum"):
        return _einsum_attention(q, k, v, key_mask, chunked=implementation == "cpu_chunked")
    return _library_attention(q, k, v, key_mask, implementation)


def _library_attention(q, k, v, key_mask, implementation: str):
    """`jax.nn.dot_product_attention` on the broadcast leading axes flattened to one batch."""
    lead = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3],
                                () if key_mask is None else key_mask.shape[:-1])
    q, k, v = (jnp.broadcast_to(x, lead + x.shape[-3:]).reshape((-1,) + x.shape[-3:])
               for x in (q, k, v))
    mask = None
    if key_mask is not None:
        key_mask = jnp.broadcast_to(key_mask, lead + key_mask.shape[-1:])
        mask = key_mask.reshape(-1, 1, 1, key_mask.shape[-1])
        if implementation == "cudnn":  # cuDNN takes a mask of the logits' full shape only
            mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    if implementation == "cudnn":
        out = _cudnn_attention(q, k, v, mask)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.reshape(lead + out.shape[-3:])


@jax.custom_vjp
def _cudnn_attention(q, k, v, mask):
    """cuDNN flash attention forward; the backward through XLA's path. cuDNN's backward takes
    only sequence lengths in multiples of 64, which the decoder's token attentions (a few
    prompt and output tokens) are not, and the paper's training differentiates exactly those."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def _cudnn_attention_fwd(q, k, v, mask):
    return _cudnn_attention(q, k, v, mask), (q, k, v, mask)


def _cudnn_attention_bwd(residuals, cotangent):
    q, k, v, mask = residuals
    _, vjp = jax.vjp(lambda *qkv: jax.nn.dot_product_attention(*qkv, mask=mask,
                                                               implementation="xla"), q, k, v)
    return (*vjp(cotangent), None)


_cudnn_attention.defvjp(_cudnn_attention_fwd, _cudnn_attention_bwd)


def _einsum_attention(q, k, v, key_mask, chunked: bool):
    """The products run head-major, (..., heads, L, d): XLA's CPU batched dot is 4x slower when
    the batch axis (heads) sits between the contracted and the free axes; `chunked`: large
    unmasked attention one head and query chunk at a time."""
    q, k, v = (jnp.swapaxes(x, -3, -2) for x in (q, k, v))
    if key_mask is not None:
        key_mask = key_mask[..., None, None, :]
    lq, lk = q.shape[-2], k.shape[-2]
    if chunked and lq * lk > CHUNK_LOGITS and lq % QUERY_CHUNK == 0 and key_mask is None:
        out = _chunked_attention(q, k, v)
    else:
        out = _attention(q, k, v, key_mask)
    return jnp.swapaxes(out, -3, -2)


def _chunked_attention(q, k, v):
    """(..., Lq, d), (..., Lk, d) x2 -> (..., Lq, d), one leading index and query chunk at a time."""
    lead, (lq, d) = q.shape[:-2], q.shape[-2:]
    flat = [x.reshape((-1,) + x.shape[-2:]) for x in (q, k, v)]
    chunks = flat[0].reshape(-1, lq // QUERY_CHUNK, QUERY_CHUNK, d).swapaxes(0, 1)

    def one_chunk(q_chunk):  # (G, chunk, d)
        return jax.lax.map(lambda qkv: _attention(*qkv, None), (q_chunk, flat[1], flat[2]))

    out = jax.lax.map(one_chunk, chunks).swapaxes(0, 1)
    return out.reshape(lead + (lq, v.shape[-1]))


def _attention(q, k, v, key_mask):
    """Head-major core: q (..., Lq, d), k / v (..., Lk, d), key_mask broadcastable to the logits."""
    scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("...qd,...kd->...qk", q * scale, k)
    if key_mask is not None:
        big_negative = jnp.finfo(logits.dtype).min
        logits = jnp.where(key_mask, logits, big_negative)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v)
