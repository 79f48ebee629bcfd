"""Model configurations: one frozen dataclass per model part, one preset per official SAM 2.1 size.

The values are those of the official yaml files `sam2/configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`
(and the defaults of the classes they instantiate). Only the image path is described: Hiera trunk,
FPN neck, prompt encoder and mask decoder; nothing of the video memory.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """Hiera trunk (`sam2/modeling/backbones/hieradet.py`)."""

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
    """FPN neck (`sam2/modeling/backbones/image_encoder.py`, FpnNeck + ImageEncoder)."""

    d_model: int = 256
    backbone_channel_list: Tuple[int, ...] = (896, 448, 224, 112)
    fpn_top_down_levels: Tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    fuse_type: str = "sum"
    scalp: int = 1
    pos_temperature: float = 10000.0


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Prompt encoder + two-way transformer + mask decoder (`sam2/modeling/sam/*.py`)."""

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
    # `build_sam2(..., apply_postprocessing=True)` turns this on for inference.
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


@dataclasses.dataclass(frozen=True)
class SAM2Config:
    name: str
    trunk: HieraConfig
    neck: NeckConfig
    decoder: DecoderConfig = DecoderConfig()
    image_size: int = 1024
    backbone_stride: int = 16

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


def get_config(name: str, image_size: int = 1024) -> SAM2Config:
    """The preset `name` ('sam2.1_hiera_b+', 'b+', 'base_plus', ...) at `image_size`."""
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(CONFIGS)} or {sorted(ALIASES)}")
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32, got {image_size}")
    return CONFIGS[key].replace(image_size=image_size)
