"""Prompt encoder (`sam2/modeling/sam/prompt_encoder.py`), channels-last.

Point labels: 1 positive, 0 negative, 2 / 3 box corners, -1 "not a point". As in the official
predictor (which never passes `boxes` to the encoder: a box is two corner points), one extra
`not_a_point` token is always appended; it takes part in the attention like any token.

Our prompts have a fixed number of slots K so one compiled function serves every prompt count.
Slots with label -1 are *padding*: `point_key_mask` marks them so that the decoder masks them out
of attention, and each instance's result equals the official call with its unpadded prompts.
Label -2 (`LABEL_EMPTY`) is padding too, but keeps the appended token: the official predictor
called with an empty point array.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from p2s_jax.model.configs import SAM2Config
from p2s_jax.model.layers import Buffer, gelu
from p2s_jax.model.position_encoding import fourier_encoding, fourier_grid_encoding
from p2s_jax.model.layers import LayerNorm2d


class PromptEncoder(nnx.Module):
    def __init__(self, cfg: SAM2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dim, chans = cfg.decoder.embed_dim, cfg.decoder.mask_in_chans
        self.embed_dim = dim
        self.input_image_size = cfg.image_size
        self.embedding_size = cfg.embedding_size
        self.dtype = dtype
        self.gaussian = Buffer(jax.random.normal(rngs.params(), (2, dim // 2)))
        self.point_embeddings = nnx.List([nnx.Embed(1, dim, rngs=rngs) for _ in range(4)])
        self.not_a_point_embed = nnx.Embed(1, dim, rngs=rngs)
        self.no_mask_embed = nnx.Embed(1, dim, rngs=rngs)
        self.mask_downscaling = MaskDownscaling(chans, dim, dtype=dtype, rngs=rngs)

    def dense_pe(self) -> jax.Array:
        """(h, w, C) Fourier encoding of the decoder's image grid (`get_dense_pe`)."""
        return fourier_grid_encoding(self.embedding_size, self.embedding_size, self.gaussian[...])

    def embed_points(self, coords: jax.Array, labels: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """coords (..., K, 2) model-input pixels (x, y); labels (..., K) int.

        Returns sparse tokens (..., K + 1, C) (the appended not-a-point last) and their key mask
        (..., K + 1): padding slots (-1, -2) False; the appended token True when any slot is not
        -1. So a prompt of -1 slots only is the official call without points (no point tokens),
        and one with a -2 slot (`LABEL_EMPTY`) the official call with an empty point array (the
        appended not-a-point token alone).
        """
        size = jnp.float32(self.input_image_size)
        unit = (coords.astype(jnp.float32) + 0.5) / size
        emb = fourier_encoding(unit, self.gaussian[...])
        labels = labels[..., None]
        table = [e.embedding[...][0] for e in self.point_embeddings]
        emb = jnp.where(labels == -1, self.not_a_point_embed.embedding[...][0], emb)
        for value, vector in enumerate(table):
            emb = jnp.where(labels == value, emb + vector, emb)
        pad_token = jnp.broadcast_to(self.not_a_point_embed.embedding[...][0],
                                     emb.shape[:-2] + (1, self.embed_dim))
        tokens = jnp.concatenate([emb, pad_token], axis=-2)
        is_point = labels[..., 0] >= 0
        appended = (labels[..., 0] != -1).any(-1, keepdims=True)
        key_mask = jnp.concatenate([is_point, appended], axis=-1)
        return tokens.astype(self.dtype), key_mask

    def embed_masks(self, mask_input: Optional[jax.Array], has_mask: Optional[jax.Array],
                    batch_shape: Tuple[int, ...]) -> jax.Array:
        """Dense prompt (..., h, w, C): mask logits (..., 4h, 4w, 1) through the downscaling convs
        where `has_mask` (...) is True, the learned `no_mask_embed` elsewhere.

        Without `mask_input` the leading axes are all 1 (the same embedding for every prompt set,
        broadcastable to `batch_shape`), so that the decoder can share the work that follows.
        """
        no_mask = self.no_mask_embed.embedding[...][0].astype(self.dtype)
        shape = (1,) * len(batch_shape) + (self.embedding_size, self.embedding_size, self.embed_dim)
        if mask_input is None:
            return jnp.broadcast_to(no_mask, shape)
        dense = self.mask_downscaling(mask_input.astype(self.dtype))
        if has_mask is None:
            return dense
        return jnp.where(has_mask[..., None, None, None], dense, no_mask)


class MaskDownscaling(nnx.Module):
    """conv 2x2/2 -> LN2d -> GELU -> conv 2x2/2 -> LN2d -> GELU -> conv 1x1.

    Run space-to-depth: each 4 x 4 block of the 1-channel mask becomes 16 values on the last
    axis, so both strided convs are plain products over that axis (the first per 2 x 2
    sub-block). No map with 1 or 4 channels on its last axis is ever laid out: on TPU such a map
    pads to 128 lanes.
    """

    def __init__(self, chans: int, dim: int, *, dtype, rngs: nnx.Rngs):
        conv = dict(kernel_size=(2, 2), strides=(2, 2), padding="VALID", dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(1, chans // 4, **conv)
        self.norm1 = LayerNorm2d(chans // 4, rngs=rngs)
        self.conv2 = nnx.Conv(chans // 4, chans, **conv)
        self.norm2 = LayerNorm2d(chans, rngs=rngs)
        self.conv3 = nnx.Linear(chans, dim, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., 4h, 4w, 1) -> (..., h, w, dim)."""
        *lead, height, width, _ = x.shape
        n, h, w = len(lead), height // 4, width // 4
        # pixel (4i + 2a + c, 4j + 2b + d) -> (i, j, (a, b), (c, d)): (a, b) is the first conv's
        # output pixel within the second conv's 2 x 2 window, (c, d) the first conv's tap
        x = x.astype(self.dtype).reshape(*lead, h, 2, 2, w, 2, 2)
        x = x.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5).reshape(*lead, h, w, 4, 4)
        x = gelu(self.norm1(self._conv(self.conv1, x)))  # (..., h, w, 4, chans / 4)
        x = gelu(self.norm2(self._conv(self.conv2, x.reshape(*lead, h, w, -1))))
        return self.conv3(x)

    def _conv(self, conv: nnx.Conv, x: jax.Array) -> jax.Array:
        """A 2x2/2 conv on its windows' taps (..., 4 * in), laid out (kh, kw, in) like its kernel."""
        kernel = conv.kernel[...].astype(self.dtype)
        kernel = kernel.reshape(-1, kernel.shape[-1])
        return jnp.einsum("...k,ko->...o", x, kernel) + conv.bias[...].astype(self.dtype)
