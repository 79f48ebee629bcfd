"""Small-region clean-up of the low-res mask logits on the device (the official
`SAM2Transforms.postprocess_masks`).

The official predictor built with `max_hole_area` / `max_sprinkle_area` (the authors build it
with 10 and 50) edits the (S/4 x S/4) logits before upsampling them:

* a *hole* is an 8-connected component of background pixels (logit <= 0) with area <=
  `max_hole_area`; its logits become +10 (foreground);
* a *sprinkle* is an 8-connected component of foreground pixels (logit > 0) with area <=
  `max_sprinkle_area`; its logits become -10 (background).

Both are found on the logits as they came out of the decoder (a filled hole is not a sprinkle),
as in the official code. The official code labels components with a CUDA kernel
(`sam2/csrc/connected_components.cu`) and silently skips the step where the kernel is missing;
here it is a jit-able JAX function that runs the same on every backend.

How components are measured without a full labelling
    Every pixel of the region starts with its own flat index as label and takes, `steps` times,
    the smallest label of its 3 x 3 neighbourhood inside the region. After k steps a pixel holds
    the smallest index within k steps of it along the region. A component of area <= A has
    8-connected diameter <= A - 1, so after k >= A - 1 steps all its pixels share one label and
    the pixel count of that label is the component's area. A label whose pixels still border a
    pixel of the same region with another label belongs to a component that is not finished;
    since a component is connected, an unfinished component always shows such a border, and so
    a label is judged small only if its count is <= A *and* it has no such border. Larger
    components are therefore never mistaken for small ones, whatever their shape (a 1-pixel
    spiral included), and `A` steps of a 3 x 3 minimum are all it costs.

`exclusive_masks` is the authors' post-processing of the full-resolution masks (on in the
SAM-pose2seg preset): each pixel keeps only the covering mask with the highest predicted IoU.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from p2s_jax.utils.errors import InputError

FILL_LOGIT = 10.0  # |logit| written into a filled hole (+) or a removed sprinkle (-)


@dataclasses.dataclass(frozen=True)
class MaskPostprocess:
    """The official predictor's `max_hole_area` / `max_sprinkle_area` (hashable: pass it as a
    static argument).

    Attributes:
      max_hole_area: background components of at most this many low-res pixels become
        foreground; 0 turns hole filling off.
      max_sprinkle_area: foreground components of at most this many low-res pixels become
        background; 0 turns sprinkle removal off.
    """

    max_hole_area: float = 0.0
    max_sprinkle_area: float = 0.0

    def __post_init__(self):
        for name in ("max_hole_area", "max_sprinkle_area"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.max_hole_area > 0 or self.max_sprinkle_area > 0


def _window(labels: jax.Array, init, reducer) -> jax.Array:
    """(H, W) -> (H, W): `reducer` (jnp.minimum / jnp.maximum) over each pixel's 3 x 3
    neighbourhood (outside = `init`), separably by shifted slices, which XLA's CPU backend runs
    several times faster than `lax.reduce_window` (docs/performance.md)."""
    padded = jnp.pad(labels, 1, constant_values=init)
    rows = reducer(reducer(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return reducer(reducer(rows[:-2], rows[1:-1]), rows[2:])


def small_components(region: jax.Array, max_area: float) -> jax.Array:
    """region (H, W) bool -> (H, W) bool: the pixels whose 8-connected component of `region`
    has at most `max_area` pixels (see the module docstring for why this is exact)."""
    height, width = region.shape
    outside = height * width  # larger than every label
    max_pixels = int(math.floor(max_area))
    if max_pixels < 1:
        return jnp.zeros_like(region)
    labels = jnp.where(region, jnp.arange(outside, dtype=jnp.int32).reshape(height, width),
                       outside)

    def spread(_, labels):
        return jnp.where(region, _window(labels, outside, jnp.minimum), outside)

    labels = jax.lax.fori_loop(0, max_pixels, spread, labels)
    lowest = _window(labels, outside, jnp.minimum)
    highest = _window(jnp.where(region, labels, -1), -1, jnp.maximum)
    unfinished_pixel = region & ((lowest != labels) | (highest != labels))
    flat = labels.reshape(-1)
    counts = jnp.zeros(outside + 1, jnp.int32).at[flat].add(1)
    unfinished = jnp.zeros(outside + 1, bool).at[flat].max(unfinished_pixel.reshape(-1))
    small = (counts[flat] <= max_pixels) & ~unfinished[flat]
    return region & small.reshape(height, width)


def remove_small_regions(logits: jax.Array, postprocess: MaskPostprocess) -> jax.Array:
    """logits (..., h, w) low-res mask logits -> the same with holes filled (+10) and
    sprinkles removed (-10); unchanged when `postprocess` is off."""
    if not postprocess.enabled:
        return logits
    shape = logits.shape
    flat = logits.reshape((-1,) + shape[-2:]).astype(jnp.float32)

    def one(mask_logits):
        out = mask_logits
        if postprocess.max_hole_area > 0:
            holes = small_components(mask_logits <= 0, postprocess.max_hole_area)
            out = jnp.where(holes, FILL_LOGIT, out)
        if postprocess.max_sprinkle_area > 0:
            sprinkles = small_components(mask_logits > 0, postprocess.max_sprinkle_area)
            out = jnp.where(sprinkles, -FILL_LOGIT, out)
        return out

    return jax.vmap(one)(flat).reshape(shape)


def exclusive_masks(masks, iou) -> jax.Array:
    """masks (P, H, W) bool, iou (P,) finite predicted IoUs -> (P, H, W) bool.

    Each pixel keeps only the covering mask with the highest predicted IoU (ties: the lower
    index, numpy's first argmax as in the authors' `_apply_exclusive_masks`); uncovered pixels
    stay empty.  (The authors take the argmax of mask * iou, which hands a pixel to a
    non-covering mask when every covering IoU is <= 0; the covering mask wins here.)
    """
    masks = jnp.asarray(masks, bool)
    if masks.shape[0] == 0:
        return masks
    iou = jnp.asarray(iou, jnp.float32)
    winner = jnp.argmax(jnp.where(masks, iou[:, None, None], -jnp.inf), axis=0)  # (H, W)
    owners = jnp.arange(masks.shape[0])[:, None, None] == winner[None]
    return owners & jnp.any(masks, axis=0)[None]
