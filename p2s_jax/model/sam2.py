"""SAM 2.1 image model: encoder, prompt encoder and mask decoder, and its two pure steps.

`SAM2Image` holds the weights under the official module names (image_encoder, sam_prompt_encoder,
sam_mask_decoder, no_mem_embed), so a checkpoint maps onto it name for name. Two methods do all
the work, shared by the predictor, the evaluator and the trainer:

- `encode_image`: normalised images -> `ImageFeatures` (the decoder's view of `forward_image` +
  `_prepare_backbone_features` + `no_mem_embed`, as `SAM2ImagePredictor.set_image` builds it);
- `decode`: one image's features + N prompt sets -> `Decoded` (low-res logits, IoU, object score),
  as `SAM2ImagePredictor._predict` (and, with `object_score_gate=True`, `_forward_sam_heads`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from p2s_jax.model.configs import ConfigError, SAM2Config
from p2s_jax.model.hiera import MultiScaleAttention
from p2s_jax.model.image_encoder import ImageEncoder
from p2s_jax.model.layers import ATTENTION_IMPLEMENTATIONS
from p2s_jax.model.mask_decoder import MaskDecoder, select_masks
from p2s_jax.model.prompt_encoder import PromptEncoder
from p2s_jax.model.transformer import Attention

NO_OBJECT_SCORE = -1024.0  # sam2_base.NO_OBJ_SCORE


class ImageFeatures(NamedTuple):
    """Per image (leading batch axis B, or none for a single image)."""

    image_embed: jax.Array  # (B, h, w, C), h = S / 16, no_mem_embed added
    feat_s0: jax.Array  # (B, 4h, 4w, C / 8), stride-4 FPN level through conv_s0
    feat_s1: jax.Array  # (B, 2h, 2w, C / 4), stride-8 FPN level through conv_s1


class Decoded(NamedTuple):
    low_res_logits: jax.Array  # (N, M, 4h, 4w) float32
    iou: jax.Array  # (N, M)
    object_score_logits: jax.Array  # (N,)
    all_low_res_logits: jax.Array  # (N, 4, 4h, 4w): every mask token, for losses
    all_iou: jax.Array  # (N, 4)


class SAM2Image(nnx.Module):
    def __init__(self, config: SAM2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.image_encoder = ImageEncoder(config, dtype=dtype, rngs=rngs)
        self.sam_prompt_encoder = PromptEncoder(config, dtype=dtype, rngs=rngs)
        self.sam_mask_decoder = MaskDecoder(config, dtype=dtype, rngs=rngs)
        dim = config.decoder.embed_dim
        self.no_mem_embed = nnx.Param(nnx.initializers.truncated_normal(0.02)(
            rngs.params(), (1, 1, dim)))
        _set_attention(self, config.attention)

    def encode_image(self, images: jax.Array) -> ImageFeatures:
        """(B, S, S, 3) ImageNet-normalised float images -> `ImageFeatures`."""
        return self.image_features(self.image_encoder(images).backbone_fpn)

    def image_features(self, fpn) -> ImageFeatures:
        """The image encoder's FPN levels (finest first) -> the decoder's `ImageFeatures`.

        Split from `encode_image` so that a trainer can run a frozen encoder outside the gradient
        while `no_mem_embed` and the decoder's `conv_s0` / `conv_s1` (trainable) stay inside it.
        """
        decoder = self.sam_mask_decoder
        return ImageFeatures(
            image_embed=(fpn[-1] + self.no_mem_embed[...].astype(fpn[-1].dtype)),
            feat_s0=decoder.conv_s0(fpn[0]),
            feat_s1=decoder.conv_s1(fpn[1]),
        )

    def decode(self, features: ImageFeatures, point_coords: jax.Array, point_labels: jax.Array,
               mask_input: Optional[jax.Array] = None, has_mask_input: Optional[jax.Array] = None,
               *, multimask_output: bool = False, dynamic_stability: Optional[bool] = None,
               object_score_gate: bool = False, people_per_chunk: Optional[int] = None) -> Decoded:
        """Decode N prompt sets on one image.

        features: one image's `ImageFeatures` without batch axis (or with a leading N).
        point_coords (N, K, 2) model-input pixels (x, y) in [0, S]; point_labels (N, K) int32 with
        -1 for padding; mask_input (N, 4h, 4w, 1) logits or None, has_mask_input (N,) bool.
        dynamic_stability: None = the config's inference default; False as in training.
        object_score_gate: set the logits to -1024 where the object score is <= 0, as
        `SAM2Base._forward_sam_heads` does (the image predictor does not).
        people_per_chunk: decode the N sets in a `lax.map` over chunks of this many (N must be a
        multiple). Each set's result is the same; on CPU, chunks of 1-4 keep a person's
        activations in cache (1.3x faster at N = 32) and XLA hoists the person-independent work
        out of the loop. None: all N at once (what accelerators want).
        """
        n = point_coords.shape[0]
        if people_per_chunk is not None and n > people_per_chunk:
            return self._decode_chunked(features, point_coords, point_labels, mask_input,
                                        has_mask_input, people_per_chunk,
                                        multimask_output=multimask_output,
                                        dynamic_stability=dynamic_stability,
                                        object_score_gate=object_score_gate)
        pe = self.sam_prompt_encoder
        sparse, sparse_mask = pe.embed_points(point_coords, point_labels)
        dense = pe.embed_masks(mask_input, has_mask_input, (n,))
        out = self.sam_mask_decoder(features.image_embed, pe.dense_pe(), sparse, sparse_mask,
                                    dense, features.feat_s0, features.feat_s1)
        cfg = self.config.decoder
        dynamic = cfg.dynamic_multimask_via_stability if dynamic_stability is None else dynamic_stability
        masks, iou = select_masks(out, multimask_output, dynamic,
                                  cfg.dynamic_multimask_stability_delta,
                                  cfg.dynamic_multimask_stability_thresh)
        object_score = out.object_score_logits[:, 0]
        all_masks = out.masks
        if object_score_gate:
            present = (object_score > 0)[:, None, None, None]
            masks = jnp.where(present, masks, NO_OBJECT_SCORE)
            all_masks = jnp.where(present, all_masks, NO_OBJECT_SCORE)
        return Decoded(masks, iou, object_score, all_masks, out.iou)

    def _decode_chunked(self, features, point_coords, point_labels, mask_input, has_mask_input,
                        chunk: int, **settings) -> Decoded:
        n = point_coords.shape[0]
        if n % chunk:
            raise ValueError(f"people_per_chunk = {chunk} does not divide the {n} prompt sets")
        per_person = (point_coords, point_labels, mask_input, has_mask_input)
        if features.image_embed.ndim == 4:  # features with a leading N go with their people
            per_person += tuple(features)
        chunks = jax.tree.map(lambda x: x.reshape((n // chunk, chunk) + x.shape[1:]), per_person)

        def decode_chunk(args):
            chunk_features = ImageFeatures(*args[4:]) if len(args) > 4 else features
            return self.decode(chunk_features, *args[:4], **settings)

        out = jax.lax.map(decode_chunk, chunks)
        return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def _set_attention(model: nnx.Module, implementation: str) -> None:
    for _, node in nnx.iter_graph(model):
        if isinstance(node, (MultiScaleAttention, Attention)):
            node.attention = implementation


def with_attention(model: SAM2Image, implementation: str) -> SAM2Image:
    """A model sharing `model`'s weights whose attention runs `implementation` (one of
    `layers.ATTENTION_IMPLEMENTATIONS`); `model` itself is left as it is."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                          f"got {implementation!r}")
    config = model.config.replace(attention=implementation)
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    new.config = config
    _set_attention(new, implementation)
    return new


def build_model(config: SAM2Config, seed: int = 0, dtype=jnp.float32) -> SAM2Image:
    """A randomly initialised model (float32 weights; `dtype` is the compute dtype)."""
    return SAM2Image(config, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: SAM2Config, dtype=jnp.float32) -> SAM2Image:
    """The model's structure with shapes only (no memory, no random draws) — to be loaded into."""
    return nnx.eval_shape(lambda: SAM2Image(config, dtype=dtype, rngs=nnx.Rngs(0)))
