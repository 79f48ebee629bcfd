"""Image encoder = Hiera trunk + FPN neck (`sam2/modeling/backbones/image_encoder.py`)."""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from p2s_jax.model.configs import SAM2Config
from p2s_jax.model.hiera import Hiera
from p2s_jax.model.position_encoding import sine_position_encoding


class BackboneOutput(NamedTuple):
    """FPN levels after `scalp`, finest first: (B, h_i, w_i, d_model) each, and their encodings."""

    backbone_fpn: List[jax.Array]
    vision_pos_enc: List[jax.Array]


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """F.interpolate(scale_factor=2, mode='nearest') on (B, H, W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FpnNeck(nnx.Module):
    """Lateral 1x1 convs (as Linear), top-down fusion only on `fpn_top_down_levels`."""

    def __init__(self, cfg: SAM2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        neck = cfg.neck
        if neck.fpn_interp_model != "nearest":
            raise NotImplementedError("SAM 2.1 configs use nearest top-down interpolation")
        self.cfg = neck
        self.convs = nnx.List([nnx.Linear(dim, neck.d_model, dtype=dtype, rngs=rngs)
                               for dim in neck.backbone_channel_list])

    def __call__(self, trunk_out: List[jax.Array]) -> BackboneOutput:
        n = len(self.convs) - 1
        out, pos = [None] * (n + 1), [None] * (n + 1)
        prev = None
        for i in range(n, -1, -1):  # coarsest level first
            lateral = self.convs[n - i](trunk_out[i])
            if i in self.cfg.fpn_top_down_levels and prev is not None:
                prev = lateral + upsample_nearest_2x(prev.astype(jnp.float32)).astype(lateral.dtype)
                if self.cfg.fuse_type == "avg":
                    prev = prev / 2
            else:
                prev = lateral
            out[i] = prev
            h, w = prev.shape[1:3]
            pos[i] = jnp.broadcast_to(
                sine_position_encoding(h, w, self.cfg.d_model, self.cfg.pos_temperature),
                prev.shape).astype(prev.dtype)
        return BackboneOutput(out, pos)


class ImageEncoder(nnx.Module):
    def __init__(self, cfg: SAM2Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.scalp = cfg.neck.scalp
        self.trunk = Hiera(cfg.trunk, dtype=dtype, rngs=rngs)
        self.neck = FpnNeck(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, drop_path_rate: float = 0.0,
                 keys: Optional[jax.Array] = None) -> BackboneOutput:
        """(B, S, S, 3) normalised images -> FPN levels (S/4, S/8, S/16 at scalp = 1); with
        keys (B,), the trunk's stochastic depth at `drop_path_rate` (training)."""
        fpn, pos = self.neck(self.trunk(images, drop_path_rate, keys))
        if self.scalp > 0:
            fpn, pos = fpn[: -self.scalp], pos[: -self.scalp]
        return BackboneOutput(fpn, pos)
