"""Mask decoder of SAM 2.1 (`sam2/modeling/sam/mask_decoder.py`), channels-last.

Output tokens [object score, IoU, 4 mask tokens] plus the prompt tokens go through the two-way
transformer with the image embedding; the image side is upscaled 4x (fused with the stride-4 and
stride-8 high-resolution features) and each mask token's hypernetwork MLP turns it into a mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from p2s_jax.model.configs import SAM2Config
from p2s_jax.model.layers import (MLP, ConvTranspose2x2, cpu_formulations, from_blocks, gelu,
                                  to_blocks)
from p2s_jax.model.layers import LayerNorm2d
from p2s_jax.model.transformer import TwoWayTransformer


class MaskDecoderOutput(NamedTuple):
    masks: jax.Array  # (N, 4, 4h, 4w) logits of all mask tokens (single-mask token first)
    iou: jax.Array  # (N, 4) predicted IoU of each
    object_score_logits: jax.Array  # (N, 1)
    mask_tokens: jax.Array  # (N, 4, C) transformer outputs of the mask tokens


class OutputUpscaling(nnx.Module):
    """deconv 2x2/2 (+ stride-8 features) -> LN2d -> GELU -> deconv 2x2/2 (+ stride-4) -> GELU.

    `block_levels` says how many of the two deconvs, counted from the last, leave their 2x2
    output pixels on their own axes (`ConvTranspose2x2.blocks`, space-to-depth); the features
    they add are brought into that layout (`to_blocks`) and the decoder interleaves the masks at
    the end (`from_blocks`), so nothing 32 channels deep is interleaved. The CPU takes 2. On
    accelerators the first deconv interleaves its output (2 x 2 pixel axes beside 64 channels
    are narrow tensors that TPU layouts pad many times over, and the layer norm runs on them),
    the second does not: 1 (`UPSCALING_BLOCK_LEVELS`).
    """

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.deconv1 = ConvTranspose2x2(dim, dim // 4, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm2d(dim // 4, rngs=rngs)
        self.deconv2 = ConvTranspose2x2(dim // 4, dim // 8, dtype=dtype, rngs=rngs)

    def __call__(self, x, feat_s0, feat_s1, block_levels: int):
        """x (N, h, w, C), feat_s1 (..., 2h, 2w, C/4), feat_s0 (..., 4h, 4w, C/8)
        -> the layout of `to_blocks(upscaled (N, 4h, 4w, C/8), block_levels)`:
        (N, 2h, 2w, 2, 2, C/8) for 1 level, (N, h, w, 2, 2, 2, 2, C/8) for 2."""
        if block_levels == 2:
            x = gelu(self.norm(self.deconv1.blocks(x) + to_blocks(feat_s1, 1)))
        elif block_levels == 1:
            x = gelu(self.norm(self.deconv1(x) + feat_s1))
        else:
            raise ValueError(f"block_levels is 1 or 2, not {block_levels}")
        return gelu(self.deconv2.blocks(x) + to_blocks(feat_s0, block_levels))


# `OutputUpscaling`'s block_levels, by whether the CPU formulations run (`cpu_formulations`).
UPSCALING_BLOCK_LEVELS = {True: 2, False: 1}


class MaskDecoder(nnx.Module):
    def __init__(self, cfg: SAM2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.decoder
        if not (d.use_high_res_features and d.pred_obj_scores and d.pred_obj_scores_mlp):
            raise NotImplementedError("only the SAM 2.1 decoder (high-res features, object "
                                      "score MLP) is implemented")
        dim, kw = d.embed_dim, dict(dtype=dtype, rngs=rngs)
        self.cfg = d
        self.num_mask_tokens = d.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(d.transformer_depth, dim, d.transformer_heads,
                                             d.transformer_mlp_dim, d.attention_downsample_rate,
                                             **kw)
        self.iou_token = nnx.Embed(1, dim, rngs=rngs)
        self.mask_tokens = nnx.Embed(self.num_mask_tokens, dim, rngs=rngs)
        self.obj_score_token = nnx.Embed(1, dim, rngs=rngs)
        self.output_upscaling = OutputUpscaling(dim, **kw)
        self.conv_s0 = nnx.Linear(dim, dim // 8, **kw)
        self.conv_s1 = nnx.Linear(dim, dim // 4, **kw)
        self.output_hypernetworks_mlps = nnx.List(
            [MLP(dim, dim, dim // 8, 3, **kw) for _ in range(self.num_mask_tokens)])
        self.iou_prediction_head = MLP(dim, d.iou_head_hidden_dim, self.num_mask_tokens,
                                       d.iou_head_depth, sigmoid_output=d.iou_prediction_use_sigmoid,
                                       **kw)
        self.pred_obj_score_head = MLP(dim, dim, 1, 3, **kw)

    def output_tokens(self) -> jax.Array:
        """(6, C): object-score token, IoU token, then the 4 mask tokens."""
        return jnp.concatenate([self.obj_score_token.embedding[...], self.iou_token.embedding[...],
                                self.mask_tokens.embedding[...]], axis=0)

    def __call__(self, image_embed: jax.Array, image_pe: jax.Array, sparse: jax.Array,
                 sparse_mask: jax.Array, dense: jax.Array, feat_s0: jax.Array,
                 feat_s1: jax.Array) -> MaskDecoderOutput:
        """All mask tokens for N prompt sets on one image.

        image_embed (h, w, C) or (N, h, w, C); image_pe (h, w, C); sparse (N, S, C) with key mask
        sparse_mask (N, S); dense (N, h, w, C), or (1, h, w, C) when shared by all; feat_s0
        (4h, 4w, C/8), feat_s1 (2h, 2w, C/4) (or with a leading N).
        """
        n, dtype = sparse.shape[0], sparse.dtype
        out_tokens = jnp.broadcast_to(self.output_tokens().astype(dtype), (n, 6, sparse.shape[-1]))
        tokens = jnp.concatenate([out_tokens, sparse], axis=1)
        token_mask = jnp.concatenate([jnp.ones((n, 6), bool), sparse_mask], axis=1)

        # Without a mask prompt `dense` is one embedding for all N: the image side then enters
        # the transformer once, (1, hw, C), and its person-independent projections in the first
        # layer are computed once per image (broadcast in the attention products).
        src = image_embed.astype(dtype) + dense
        h, w, c = src.shape[-3:]
        src = src.reshape(src.shape[:-3] + (h * w, c))
        pos = image_pe.reshape(1, h * w, c).astype(dtype)
        hs, src = self.transformer(src, pos, tokens, token_mask)

        levels = UPSCALING_BLOCK_LEVELS[
            cpu_formulations(self.transformer.final_attn_token_to_image.attention)]
        upscaled = self.output_upscaling(src.reshape(n, h, w, c), feat_s0.astype(dtype),
                                         feat_s1.astype(dtype), levels)
        mask_tokens = hs[:, 2: 2 + self.num_mask_tokens]
        hyper = jnp.stack([mlp(mask_tokens[:, i]) for i, mlp in
                           enumerate(self.output_hypernetworks_mlps)], axis=1)
        masks = from_blocks(jnp.einsum("nmc,nhw...c->nmhw...", hyper, upscaled), levels)
        iou = self.iou_prediction_head(hs[:, 1])
        object_score = self.pred_obj_score_head(hs[:, 0])
        return MaskDecoderOutput(masks.astype(jnp.float32), iou.astype(jnp.float32),
                                 object_score.astype(jnp.float32), mask_tokens)


def stability_scores(mask_logits: jax.Array, delta: float) -> jax.Array:
    """IoU between the masks thresholded at +delta and -delta: (..., H, W) -> (...)."""
    area_i = (mask_logits > delta).sum(axis=(-2, -1)).astype(jnp.float32)
    area_u = (mask_logits > -delta).sum(axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1), 1.0)


def select_masks(out: MaskDecoderOutput, multimask_output: bool, dynamic_stability: bool,
                 delta: float = 0.05, thresh: float = 0.98):
    """The official output selection -> (masks (N, M, 4h, 4w), iou (N, M)), M = 3 or 1.

    multimask: the three multimask tokens. Otherwise with `dynamic_stability` (inference), the
    single-mask token unless its stability score is below `thresh`, then the multimask output
    with the highest predicted IoU; without it, the single-mask token.
    """
    if multimask_output:
        return out.masks[:, 1:], out.iou[:, 1:]
    single_mask, single_iou = out.masks[:, :1], out.iou[:, :1]
    if not dynamic_stability:
        return single_mask, single_iou
    best = jnp.argmax(out.iou[:, 1:], axis=-1) + 1
    best_mask = jnp.take_along_axis(out.masks, best[:, None, None, None], axis=1)
    best_iou = jnp.take_along_axis(out.iou, best[:, None], axis=1)
    stable = stability_scores(single_mask[:, 0], delta) >= thresh
    return (jnp.where(stable[:, None, None, None], single_mask, best_mask),
            jnp.where(stable[:, None], single_iou, best_iou))
