"""Hiera trunk of SAM 2.1 (`sam2/modeling/backbones/hieradet.py`), channels-last.

Stages of windowed attention blocks with a few global-attention blocks; the first block of each
new stage max-pools its queries 2x2 (q-pooling), halving the resolution and doubling the width.
Windows are zero-padded at the bottom/right exactly as the official code pads them (the padded
tokens take part in the attention, unmasked, as they do there).

Stochastic depth (`drop_path`, the official `DropPath` with `scale_by_keep`): in training, each
residual branch of block i is zeroed for a whole sample with probability rate_i and scaled by
1 / (1 - rate_i) otherwise, rate_i = linspace(0, drop_path_rate, depth)[i] as the official
constructor spreads it. It runs only when the caller passes per-sample PRNG keys; without them
(inference) the blocks are deterministic.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2s_jax.model.configs import HieraConfig
from p2s_jax.model.layers import MLP, attention, cpu_formulations, gelu, layer_norm
from p2s_jax.model.resample import resize_matrices


def max_pool_2x2(x: jax.Array, stride: Tuple[int, int]) -> jax.Array:
    """torch.nn.MaxPool2d(kernel=stride, stride=stride, ceil_mode=False) on (B, H, W, C)."""
    sh, sw = stride
    b, h, w, c = x.shape
    x = x[:, : h // sh * sh, : w // sw * sw]
    return x.reshape(b, h // sh, sh, w // sw, sw, c).max(axis=(2, 4))


def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C) after zero-padding H, W up to the window."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding away: -> (B, H, W, C)."""
    hp, wp = padded_hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : hw[0], : hw[1]]


class MultiScaleAttention(nnx.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, dim_out * 3, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim_out, dim_out, dtype=dtype, rngs=rngs)
        self.dtype = dtype
        self.attention = "auto"  # layers.ATTENTION_IMPLEMENTATIONS; set by SAM2Image

    def __call__(self, x: jax.Array, q_stride: Optional[Tuple[int, int]],
                 window: int = 0) -> jax.Array:
        """(B, H, W, dim) -> (B, H', W', dim_out); H' = H / q_stride when pooling.

        window > 0: attention within zero-padded windows, as the official block (which pads its
        input and runs qkv on the padding). Two orders give the same numbers: `_qkv_on_tokens`
        (CPU) and `_qkv_on_windows` (accelerators). The output projection runs after the
        padding is cropped (it is per token).
        """
        b, h, w, _ = x.shape
        head_dim = self.proj.kernel.shape[1] // self.num_heads
        if cpu_formulations(self.attention):
            q, k, v, padded = self._qkv_on_tokens(x, window)
        else:
            q, k, v, padded = self._qkv_on_windows(x, window)
        nb, wh, ww = q.shape[:3]
        if q_stride is not None:
            q = max_pool_2x2(q.reshape(nb, wh, ww, -1), q_stride)
            wh, ww = q.shape[1:3]
        q, k, v = (t.reshape(nb, -1, self.num_heads, head_dim) for t in (q, k, v))
        out = attention(q, k, v, implementation=self.attention).reshape(nb, wh, ww, -1)
        if window > 0:
            sh, sw = q_stride or (1, 1)
            out = window_unpartition(out, wh, (padded[0] // sh, padded[1] // sw),
                                     (h // sh, w // sw))
        return self.proj(out)

    def _qkv_on_tokens(self, x: jax.Array, window: int):
        """q, k, v (B', h, w, heads, d) and the padded map size: qkv of a zero token is the
        bias, so the projection runs on the real tokens only and the windows' padding gets the
        bias. Up to 1.7x fewer FLOPs in qkv when the window does not divide the map (14 on
        32 x 32 or 64 x 64): on a CPU, FLOPs are the time."""
        kernel = self.qkv.kernel[...].astype(self.dtype)
        qkv = jnp.einsum("bhwc,cd->bhwd", x.astype(self.dtype), kernel)
        padded = x.shape[1:3]
        if window > 0:
            qkv, padded = window_partition(qkv, window)
        qkv = qkv + self.qkv.bias[...].astype(self.dtype)
        qkv = qkv.reshape(*qkv.shape[:3], 3, self.num_heads, -1)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], padded

    def _qkv_on_windows(self, x: jax.Array, window: int):
        """As `_qkv_on_tokens`, in the official order (pad and partition the input, then qkv on
        every window token), q, k and v each from its own product with the heads split in the
        kernel. On TPU this partitions a third of the bytes (the input, not qkv) and never lays
        out one (..., 3, heads, d) tensor to slice, whose 56-wide heads pad to 128 lanes
        (docs/performance.md, TPU table)."""
        x = x.astype(self.dtype)
        padded = x.shape[1:3]
        if window > 0:
            x, padded = window_partition(x, window)
        kernel = self.qkv.kernel[...].astype(self.dtype)
        kernel = kernel.reshape(kernel.shape[0], 3, self.num_heads, -1)
        bias = self.qkv.bias[...].astype(self.dtype).reshape(3, self.num_heads, -1)
        nb, wh, ww, c = x.shape
        x = x.reshape(nb, wh * ww, c)
        q, k, v = (jnp.einsum("blc,cnd->blnd", x, kernel[:, i]) + bias[i] for i in range(3))
        return *(t.reshape(nb, wh, ww, *t.shape[2:]) for t in (q, k, v)), padded


def drop_path(x: jax.Array, rate: float, keys: Optional[jax.Array], stream: int) -> jax.Array:
    """x (B, ...) -> x with each sample kept with probability 1 - rate and scaled by
    1 / (1 - rate), else zero. keys (B,) typed PRNG keys, one per sample (None: identity);
    `stream` tells the draws of one call from another's."""
    if keys is None or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, stream), keep_prob))(keys)
    scale = jnp.where(keep, 1.0 / keep_prob, 0.0) if keep_prob > 0.0 else jnp.zeros_like(keep, float)
    return x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def drop_path_rates(cfg: HieraConfig, drop_path_rate: float) -> List[float]:
    """Per-block rates: torch.linspace(0, drop_path_rate, depth) as torch computes it in
    float32: the first half step * i, the second half end - step * (depth - 1 - i), each a
    fused multiply-add (one rounding; exact in float64 here, then rounded to float32)."""
    depth, end = cfg.depth, np.float32(drop_path_rate)
    step = np.float64(end / np.float32(max(depth - 1, 1)))
    rates = [step * i if i < depth // 2 else np.float64(end) - step * (depth - 1 - i)
             for i in range(depth)]
    return [float(np.float32(r)) for r in rates]


class MultiScaleBlock(nnx.Module):
    def __init__(self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float,
                 q_stride: Optional[Tuple[int, int]], window_size: int, *, dtype,
                 rngs: nnx.Rngs):
        self.dim, self.dim_out = dim, dim_out
        self.q_stride = q_stride
        self.window_size = window_size
        self.norm1 = layer_norm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim_out, 1e-6, dtype=dtype, rngs=rngs)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, activation=gelu,
                       dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim_out, dtype=dtype, rngs=rngs) if dim != dim_out else None

    def __call__(self, x: jax.Array, drop_rate: float = 0.0, keys: Optional[jax.Array] = None,
                 index: int = 0) -> jax.Array:
        """(B, H, W, dim) -> (B, H', W', dim_out); `drop_rate` / `keys` (B,): stochastic depth
        of this block (`drop_path`), `index` its place in the trunk."""
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_stride is not None:
                shortcut = max_pool_2x2(shortcut, self.q_stride)
        x = shortcut + drop_path(self.attn(x, self.q_stride, self.window_size), drop_rate, keys,
                                 2 * index)
        return x + drop_path(self.mlp(self.norm2(x)), drop_rate, keys, 2 * index + 1)


def block_layout(cfg: HieraConfig) -> List[dict]:
    """Per block: dim, dim_out, heads, window size and q_stride, as the official constructor."""
    layout, dim, heads, stage = [], cfg.embed_dim, cfg.num_heads, 1
    for i in range(cfg.depth):
        dim_out = dim
        window = cfg.window_spec[stage - 1]  # lags a block: a stage's first block keeps the old window
        if i in cfg.global_att_blocks:
            window = 0
        if i - 1 in cfg.stage_ends:
            dim_out = int(dim * cfg.dim_mul)
            heads = int(heads * cfg.head_mul)
            stage += 1
        layout.append(dict(dim=dim, dim_out=dim_out, num_heads=heads, window_size=window,
                           q_stride=cfg.q_stride if i in cfg.q_pool_blocks else None))
        dim = dim_out
    return layout


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: HieraConfig, *, dtype, rngs: nnx.Rngs):
        k, s, p = cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding
        self.proj = nnx.Conv(3, cfg.embed_dim, kernel_size=(k, k), strides=(s, s),
                             padding=((p, p), (p, p)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class Hiera(nnx.Module):
    def __init__(self, cfg: HieraConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        bh, bw = cfg.window_pos_embed_bkg_spatial_size
        win = cfg.window_spec[0]
        init = nnx.initializers.truncated_normal(0.02)
        self.pos_embed = nnx.Param(init(rngs.params(), (1, bh, bw, cfg.embed_dim)))
        self.pos_embed_window = nnx.Param(init(rngs.params(), (1, win, win, cfg.embed_dim)))
        self.blocks = nnx.List([MultiScaleBlock(mlp_ratio=cfg.mlp_ratio, dtype=dtype, rngs=rngs, **b)
                                for b in block_layout(cfg)])

    def position_embedding(self, hw: Tuple[int, int]) -> jax.Array:
        """(1, H, W, C): bicubic-resized (torch, a = -0.75) background plus the tiled window embed."""
        wy, wx = resize_matrices(hw, self.pos_embed.shape[1:3], "bicubic")
        pos = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(wx), self.pos_embed[...])
        pos = jnp.einsum("oh,bhpc->bopc", jnp.asarray(wy), pos)
        window = self.pos_embed_window[...]
        reps = (1, hw[0] // window.shape[1], hw[1] // window.shape[2], 1)
        return pos + jnp.tile(window, reps)

    def __call__(self, x: jax.Array, drop_path_rate: float = 0.0,
                 keys: Optional[jax.Array] = None) -> List[jax.Array]:
        """(B, S, S, 3) normalised image -> one (B, h_i, w_i, C_i) map per stage, finest first.

        drop_path_rate with keys (B,) typed PRNG keys, one per image: stochastic depth as in
        official training (module docstring); without keys the trunk is deterministic."""
        x = self.patch_embed(x.astype(self.dtype))
        x = x + self.position_embedding(x.shape[1:3]).astype(x.dtype)
        outputs = []
        rates = drop_path_rates(self.cfg, drop_path_rate)
        for i, block in enumerate(self.blocks):
            x = block(x, rates[i], keys, i)
            if i in self.cfg.stage_ends:
                outputs.append(x)
        return outputs
