"""Two-way transformer of the SAM mask decoder (`sam2/modeling/sam/transformer.py`).

Tokens (output tokens + prompt tokens) and image tokens attend to each other. `token_mask`
(..., T) marks the tokens that exist; padded prompt slots are removed from every attention in
which tokens are keys (token self-attention, image-to-token attention).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
from flax import nnx

from p2s_jax.model.layers import MLP, attention, layer_norm


class Attention(nnx.Module):
    """Multi-head attention with the internal width divided by `downsample_rate`."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, dtype,
                 rngs: nnx.Rngs):
        internal = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nnx.Linear(dim, internal, dtype=dtype, rngs=rngs)
        self.k_proj = nnx.Linear(dim, internal, dtype=dtype, rngs=rngs)
        self.v_proj = nnx.Linear(dim, internal, dtype=dtype, rngs=rngs)
        self.out_proj = nnx.Linear(internal, dim, dtype=dtype, rngs=rngs)
        self.attention = "auto"  # layers.ATTENTION_IMPLEMENTATIONS; set by SAM2Image

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_mask: Optional[jax.Array] = None) -> jax.Array:
        """q (..., Lq, C), k / v (..., Lk, C), key_mask (..., Lk) -> (..., Lq, C)."""

        def heads(x):
            return x.reshape(x.shape[:-1] + (self.num_heads, -1))

        out = attention(heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v)),
                        key_mask, self.attention)
        return self.out_proj(out.reshape(out.shape[:-2] + (-1,)))


class TwoWayAttentionBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 skip_first_layer_pe: bool, *, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, num_heads, **kw)
        self.norm1 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate, **kw)
        self.norm2 = layer_norm(dim, 1e-5, **kw)
        self.mlp = MLP(dim, mlp_dim, dim, 2, activation=jax.nn.relu, **kw)
        self.norm3 = layer_norm(dim, 1e-5, **kw)
        self.norm4 = layer_norm(dim, 1e-5, **kw)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate, **kw)

    def __call__(self, queries, keys, query_pe, key_pe, token_mask):
        """queries (..., T, C) tokens, keys (..., HW, C) image; returns both updated."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries, token_mask)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries, token_mask)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries, token_mask))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int,
                 *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, i == 0, dtype=dtype,
                                 rngs=rngs)
            for i in range(depth)])
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate, dtype=dtype,
                                                   rngs=rngs)
        self.norm_final_attn = layer_norm(dim, 1e-5, dtype=dtype, rngs=rngs)

    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array,
                 token_mask: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """image / image_pe (..., HW, C), tokens (..., T, C), token_mask (..., T) bool."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe, token_mask)
        q, k = queries + tokens, keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
