"""The architecture's own FLOPs: matrix products, convolutions and attention at the model's real
shapes, counted from the config (2 FLOPs per multiply-add), for model-FLOPs utilisation (MFU).

What is counted is what the official PyTorch model computes in `nn.Linear`, `nn.Conv2d`,
`nn.ConvTranspose2d`, `torch.matmul` and the two products of `scaled_dot_product_attention`
(torch's `FlopCounterMode` counts the same operations). Normalisation, activations,
interpolation, pooling and the losses are not counted. Windowed attention counts the real
tokens of each window: the official code pads a map whose side is not a multiple of the window
(stage 3 and 4 of Hiera at 1024: 64 -> 70, 32 -> 35) and `padded=True` counts that padding as
it computes it (equal to `FlopCounterMode` at every size; at 448 no window is padded and the two
counts agree). How a backend formulates the same products (padded partitions, chunks, fused
heads) does not change the count: XLA's own count of a compiled program is hardware FLOPs.

All functions take a `SAM2Config` and return a float (FLOPs):
  * `encoder_flops`: one image through the Hiera trunk and the FPN neck;
  * `image_feature_flops`: the decoder's 1x1 convs on the two high-resolution levels (`conv_s0`,
    `conv_s1`, once per image);
  * `decoder_flops`: one prompt through the prompt encoder and the mask decoder (`points`
    point tokens, the official padding point included; `mask_input` adds the mask-prompt
    downscaling);
  * `train_flops_per_image`: the correction loop of one training image, forward + backward
    (3x the forward of everything trained; the frozen encoder forward only).
"""

from __future__ import annotations

import math

from p2s_jax.model.configs import SAM2Config
from p2s_jax.model.hiera import block_layout


def _linear(tokens: float, fan_in: int, fan_out: int) -> float:
    return 2.0 * tokens * fan_in * fan_out


def _window_sizes(side: int, window: int) -> list[int]:
    """Real tokens along one axis of each window of a `side`-long map cut into `window`s."""
    count = -(-side // window)
    return [min(window, side - i * window) for i in range(count)]


def _attention_pairs(side: int, window: int, q_stride: int, padded: bool) -> tuple[float, float]:
    """(query tokens, query-key pairs) of one attention layer on a side x side map: global
    (window 0), or per window; queries pooled by `q_stride` (1: none)."""
    q_side = side // q_stride
    if window == 0:
        return q_side ** 2, float(q_side ** 2) * side ** 2
    if padded:
        windows = (-(-side // window)) ** 2
        q_window = window // q_stride
        return windows * q_window ** 2, windows * float(q_window ** 2) * window ** 2
    keys = _window_sizes(side, window)
    queries = _window_sizes(q_side, window // q_stride)
    pairs = sum(float(qa * qb) * ka * kb for qa, ka in zip(queries, keys)
                for qb, kb in zip(queries, keys))
    return sum(queries) ** 2, pairs


def hiera_block_flops(side: int, dim: int, dim_out: int, window: int, q_stride: int,
                 mlp_ratio: float, padded: bool) -> tuple[float, float]:
    """(products, attention) FLOPs of one Hiera block on a side x side map (the official
    MultiScaleBlock): its linear layers, and the two products of its attention."""
    flops = 0.0
    if dim != dim_out:  # the pooled shortcut's projection, on the real tokens
        flops += _linear(side ** 2, dim, dim_out)
    qkv_side = -(-side // window) * window if (window and padded) else side
    flops += _linear(qkv_side ** 2, dim, 3 * dim_out)
    queries, pairs = _attention_pairs(side, window, q_stride, padded)
    attention = 2 * 2.0 * pairs * dim_out  # q k^T and (softmax) v, summed over the heads
    flops += _linear(queries, dim_out, dim_out)  # the output projection
    q_side = side // q_stride
    flops += 2 * _linear(q_side ** 2, dim_out, int(dim_out * mlp_ratio))
    return flops, attention


def encoder_flop_parts(config: SAM2Config, padded: bool = False) -> dict[str, float]:
    """One image through the trunk and the FPN neck, by kind: 'products' (the patch embedding
    and every linear layer: what `FlopCounterMode` counts in the official encoder) and
    'attention' (the two products of every attention)."""
    trunk = config.trunk
    side = config.image_size // trunk.patch_stride
    products = 2.0 * side ** 2 * trunk.embed_dim * 3 * trunk.patch_kernel ** 2
    attention = 0.0
    stage_sides = []
    for layout in block_layout(trunk):
        stride = layout["q_stride"][0] if layout["q_stride"] else 1
        block, block_attention = hiera_block_flops(side, layout["dim"], layout["dim_out"],
                                              layout["window_size"], stride, trunk.mlp_ratio,
                                              padded)
        products, attention = products + block, attention + block_attention
        side //= stride
        stage_sides.append((side, layout["dim_out"]))
    for level_side, channels in dict(stage_sides).items():  # every level's lateral conv
        products += _linear(level_side ** 2, channels, config.neck.d_model)
    return {"products": products, "attention": attention}


def encoder_flops(config: SAM2Config, padded: bool = False) -> float:
    """One image through the trunk (patch embedding, every block) and the FPN neck's laterals."""
    return sum(encoder_flop_parts(config, padded).values())


def image_feature_flops(config: SAM2Config) -> float:
    """The decoder's `conv_s0` / `conv_s1` on the stride-4 and stride-8 levels (per image)."""
    dim = config.decoder.embed_dim
    return (_linear((config.image_size // 4) ** 2, dim, dim // 8)
            + _linear((config.image_size // 8) ** 2, dim, dim // 4))


def _attention_layer(queries: float, keys: float, dim: int, internal: int) -> float:
    """A SAM `Attention`: q from `queries` tokens, k and v from `keys` tokens, width `internal`."""
    return (_linear(queries, dim, internal) + 2 * _linear(keys, dim, internal)
            + 2 * 2.0 * queries * keys * internal + _linear(queries, internal, dim))


def decoder_flops(config: SAM2Config, points: int, mask_input: bool = False) -> float:
    """One prompt of `points` point tokens (the official padding point included when there is
    no box) through the prompt encoder and the mask decoder; `mask_input`: a mask prompt too.
    The decoder computes every mask token's mask whatever output is asked for."""
    d = config.decoder
    dim, side = d.embed_dim, config.embedding_size
    pixels = side ** 2
    pe = dim // 2  # the random Fourier features: (x, y) @ (2, dim / 2)
    flops = _linear(points, 2, pe) + _linear(pixels, 2, pe)  # point PE and the dense PE
    if mask_input:
        flops += 2.0 * (2 * side) ** 2 * (d.mask_in_chans // 4) * 4  # 2x2 stride-2 conv 1 -> c/4
        flops += 2.0 * side ** 2 * d.mask_in_chans * (d.mask_in_chans // 4) * 4
        flops += _linear(pixels, d.mask_in_chans, dim)
    mask_tokens = d.num_multimask_outputs + 1
    tokens = int(d.pred_obj_scores) + 1 + mask_tokens + points  # object score, IoU, masks
    internal = dim // d.attention_downsample_rate
    layer = (_attention_layer(tokens, tokens, dim, dim)  # token self-attention
             + _attention_layer(tokens, pixels, dim, internal)  # tokens -> image
             + 2 * _linear(tokens, dim, d.transformer_mlp_dim)
             + _attention_layer(pixels, tokens, dim, internal))  # image -> tokens
    flops += d.transformer_depth * layer + _attention_layer(tokens, pixels, dim, internal)
    flops += 2.0 * pixels * dim * (dim // 4) * 4  # 2x2 transposed conv, dim -> dim / 4
    flops += 2.0 * (2 * side) ** 2 * (dim // 4) * (dim // 8) * 4  # dim / 4 -> dim / 8
    flops += mask_tokens * (2 * _linear(1, dim, dim) + _linear(1, dim, dim // 8))
    flops += 2.0 * mask_tokens * (dim // 8) * (4 * side) ** 2  # hypernetwork weights x pixels
    flops += (_linear(1, dim, d.iou_head_hidden_dim)
              + (d.iou_head_depth - 2) * _linear(1, d.iou_head_hidden_dim, d.iou_head_hidden_dim)
              + _linear(1, d.iou_head_hidden_dim, mask_tokens))
    if d.pred_obj_scores:
        flops += 2 * _linear(1, dim, dim) + _linear(1, dim, 1)
    return flops


def train_flops_per_image(config: SAM2Config, num_points: int, objects: int,
                          freeze_image_encoder: bool = True) -> float:
    """One image of a training step: the encoder forward (and backward when it is trained),
    then for each of `objects` persons the correction loop of `num_points` points (point t
    prompts with t + 1 clicks and the official padding point; from the second on with the
    previous mask as mask prompt), forward and backward (3x the forward FLOPs)."""
    encoder = encoder_flops(config)
    trained = image_feature_flops(config)
    for t in range(num_points):
        trained += objects * decoder_flops(config, points=t + 2, mask_input=t > 0)
    return (encoder if freeze_image_encoder else 3 * encoder) + 3 * trained


def inference_flops_per_image(config: SAM2Config, people: int, points: int) -> float:
    """One photo at inference: the encoder, the high-resolution convs, and one prompt of
    `points` clicks (plus the padding point) for each of `people` persons."""
    return (encoder_flops(config) + image_feature_flops(config)
            + people * decoder_flops(config, points=points + 1))


def gflops(flops: float) -> float:
    return round(flops / 1e9, 3) if math.isfinite(flops) else flops
