"""Model configurations: one frozen dataclass per model part, one preset per official SAM 2.1 size.

The values are those of the official yaml files `sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`
(and the defaults of the classes they instantiate). Only the image path is described: Hiera trunk,
FPN neck, prompt encoder and mask decoder; nothing of the video memory.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax.numpy as jnp

from p2s_jax.model.layers import ATTENTION_IMPLEMENTATIONS


class ConfigError(ValueError):
    """An unknown model name or an unusable model setting."""


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """Hiera trunk (`sam2/modeling/backbones/hieradet.py`).

    Attributes:
      embed_dim: channels of stage 1 (doubled by `dim_mul` at each later stage).
      num_heads: attention heads of stage 1 (multiplied by `head_mul` at each later stage).
      stages: blocks per stage.
      q_pool: number of stage transitions that pool the queries 2x2 (token count / 4).
      q_stride: the pooling stride of those transitions.
      dim_mul, head_mul: channel and head factors between stages.
      window_pos_embed_bkg_spatial_size: side of the background position embedding, which is
        interpolated (bicubic) to the stage-1 map.
      window_spec: attention window side per stage (0 = global).
      global_att_blocks: blocks that attend globally instead of in windows.
      mlp_ratio: hidden width of each block's MLP, relative to its channels.
      patch_kernel, patch_stride, patch_padding: the patch-embedding convolution.
    """

    embed_dim: int = 96
    num_heads: int = 1
    stages: Tuple[int, ...] = (2, 3, 16, 3)
    q_pool: int = 3
    q_stride: Tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    window_pos_embed_bkg_spatial_size: Tuple[int, int] = (14, 14)
    window_spec: Tuple[int, ...] = (8, 4, 14, 7)
    global_att_blocks: Tuple[int, ...] = (12, 16, 20)
    mlp_ratio: float = 4.0
    patch_kernel: int = 7
    patch_stride: int = 4
    patch_padding: int = 3

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> Tuple[int, ...]:
        return tuple(sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages)))

    @property
    def q_pool_blocks(self) -> Tuple[int, ...]:
        return tuple(end + 1 for end in self.stage_ends[:-1])[: self.q_pool]

    @property
    def channel_list(self) -> Tuple[int, ...]:
        """Output channels per stage, lowest resolution first (as the neck lists them)."""
        dims = [int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages))]
        return tuple(reversed(dims))


@dataclasses.dataclass(frozen=True)
class NeckConfig:
    """FPN neck (`sam2/modeling/backbones/image_encoder.py`, FpnNeck + ImageEncoder).

    Attributes:
      d_model: channels of every output level.
      backbone_channel_list: the trunk's stage channels, lowest resolution first.
      fpn_top_down_levels: levels that receive the upsampled coarser level.
      fpn_interp_model: interpolation of that upsampling.
      fuse_type: 'sum' (or 'avg') of lateral and top-down features.
      scalp: coarsest levels dropped from the output (1: the 1/32 level).
      pos_temperature: temperature of the sine position encoding.
    """

    d_model: int = 256
    backbone_channel_list: Tuple[int, ...] = (896, 448, 224, 112)
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1
    pos_temperature: float = 10000.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Prompt encoder + two-way transformer + mask decoder (`sam2/modeling/sam/*.py`).

    Attributes:
      embed_dim: token channels of prompts and image embedding.
      mask_in_chans: hidden channels of the mask-prompt downscaling.
      num_multimask_outputs: masks predicted in multimask mode (plus one single mask).
      transformer_depth, transformer_heads, transformer_mlp_dim: the two-way transformer.
      attention_downsample_rate: channel reduction of the token <-> image cross attention.
      iou_head_depth, iou_head_hidden_dim: the IoU prediction MLP.
      iou_prediction_use_sigmoid: IoU predictions through a sigmoid (SAM 2).
      pred_obj_scores, pred_obj_scores_mlp: the object-score head and whether it is an MLP.
      use_high_res_features: the decoder's upscaling adds the stride-4 and stride-8 features.
      dynamic_multimask_via_stability: with one output requested, fall back to the best of the
        multimask outputs when the single mask is unstable (`build_sam2(...,
        apply_postprocessing=True)` turns this on for inference).
      dynamic_multimask_stability_delta, dynamic_multimask_stability_thresh: the stability
        score's logit offset and the threshold below which the fallback happens.
    """

    embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_high_res_features: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


@dataclasses.dataclass(frozen=True)
class SAM2Config:
    """The image model: one of `CONFIGS` (`get_config`), at an input size.

    Attributes:
      name: the official config name ('sam2.1_hiera_b+').
      trunk, neck, decoder: see `HieraConfig`, `NeckConfig`, `DecoderConfig`.
      image_size: input side S in pixels (1024; a multiple of 32).
      backbone_stride: stride of the decoder's image embedding (S / 16 = 64 tokens a side).
      attention: how attention is computed, one of `layers.ATTENTION_IMPLEMENTATIONS` ('auto':
        the chunked path on CPU, head-major products on TPU, cuDNN flash attention on GPU where
        it applies, XLA's attention elsewhere). Results agree within float rounding.
    """

    name: str
    trunk: HieraConfig
    neck: NeckConfig
    decoder: DecoderConfig = DecoderConfig()
    image_size: int = 1024
    backbone_stride: int = 16
    attention: str = "auto"

    @property
    def embedding_size(self) -> int:
        """Side of the lowest-resolution feature map the decoder sees (64 at 1024)."""
        return self.image_size // self.backbone_stride

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits and of the mask input (256 at 1024)."""
        return 4 * self.embedding_size

    def replace(self, **changes) -> "SAM2Config":
        return dataclasses.replace(self, **changes)


def _sam21(name: str, embed_dim: int, num_heads: int, stages, global_att_blocks,
           bkg: Tuple[int, int], window_spec=(8, 4, 14, 7)) -> SAM2Config:
    trunk = HieraConfig(
        embed_dim=embed_dim,
        num_heads=num_heads,
        stages=tuple(stages),
        global_att_blocks=tuple(global_att_blocks),
        window_pos_embed_bkg_spatial_size=bkg,
        window_spec=tuple(window_spec),
    )
    neck = NeckConfig(backbone_channel_list=trunk.channel_list)
    return SAM2Config(name=name, trunk=trunk, neck=neck)


CONFIGS = {
    "sam2.1_hiera_t": _sam21("sam2.1_hiera_t", 96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7)),
    "sam2.1_hiera_s": _sam21("sam2.1_hiera_s", 96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7)),
    "sam2.1_hiera_b+": _sam21("sam2.1_hiera_b+", 112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14)),
    "sam2.1_hiera_l": _sam21("sam2.1_hiera_l", 144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7),
                             window_spec=(8, 4, 16, 8)),
}
ALIASES = {"t": "sam2.1_hiera_t", "tiny": "sam2.1_hiera_t", "s": "sam2.1_hiera_s",
           "small": "sam2.1_hiera_s", "b+": "sam2.1_hiera_b+", "base_plus": "sam2.1_hiera_b+",
           "l": "sam2.1_hiera_l", "large": "sam2.1_hiera_l"}


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """'float32' or 'bfloat16' -> the dtype the model computes in (weights stay float32; softmax,
    normalisation statistics and the mask logits are float32 in either)."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def get_config(name: str, image_size: int = 1024, attention: str = "auto") -> SAM2Config:
    """The preset `name` ('sam2.1_hiera_b+', 'b+', 'base_plus', ...) at `image_size`, with the
    attention implementation `attention` (`SAM2Config.attention`)."""
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(CONFIGS)} or {sorted(ALIASES)}")
    if image_size % 32:
        raise ConfigError(f"image_size must be a multiple of 32, got {image_size}")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                          f"got {attention!r}")
    return CONFIGS[key].replace(image_size=image_size, attention=attention)
