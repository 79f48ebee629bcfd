"""Prompt-point samplers for interactive fine-tuning (SAM-pose2seg, Sec. 3.2 and Table 1).

SAM 2 is trained with one initial prompt point and then seven correction points, each drawn from
the error between the ground truth and the thresholded high-resolution prediction of the previous
step (official ``SAM2Train._iter_correct_pt_sampling`` in ``training/model/sam2.py``).  This module
holds that draw, and the pose-guided variants of the paper, as pure, jit-able JAX functions.

Every sampler works on **one object** (the training loop vmaps over objects) and has the signature
of :class:`Sampler`::

    sample(key, gt_mask, pred_mask, keypoints, visibility, step) -> (point_xy, label)

    key         PRNG key (typed or raw uint32).
    gt_mask     (H, W) bool, ground truth.
    pred_mask   (H, W) bool, thresholded prediction (logits > 0), or ``None`` (static) for the
                first point.
    keypoints   (J, 2) float32, the schema's J keypoints, (x, y) in the point convention below.
    visibility  (J,) float32, ``<= 0`` (or a non-finite coordinate) means unavailable.
    step        int32 scalar, index of the point being drawn (0 = first point).  The built-in
                samplers decide first-versus-correction by ``pred_mask is None``; ``step`` is there
                for samplers that change with the round (see docs/samplers.md).
    point_xy    (2,) float32.
    label       int32 scalar: 1 positive (on a false negative), 0 negative (on a false positive).

Point convention (the official one): a point ``(x, y)`` with integer coordinates is the **centre of
pixel** ``mask[y, x]``.  ``sample_random_points_from_errors`` returns ``(col, row)`` of the drawn
pixel as floats, without +0.5; the prompt encoder adds 0.5 itself.  Keypoints are taken in the same
convention (as the authors' inference passes them to the predictor): the pixel under a keypoint is
``(floor(x + 0.5), floor(y + 0.5))``, and a keypoint is returned unchanged (not snapped).

Registered samplers (``available_samplers()``):

* ``mask_refine``       MaskRefine, the official default: ``sample_random_points_from_errors``
                        plus ``prob_to_sample_from_gt`` (0.1).
* ``pose_mask_refine``  PoseMaskRefine (the paper's method, "PmR").
* ``pose1_mask_refine`` Pose1MaskRefine ("P1mR"): pose first point, then MaskRefine.
* ``center``            official evaluation mode, ``sample_one_point_from_error_center``.
* ``max_vis``           Table 1's fixed-keypoint training ("mV"): point t is the t-th keypoint
                        of MaxVis_n (n = ``num_keypoints``, 6); when the person has fewer, the
                        remaining points are MaskRefine draws.
* ``max_spread``        the same with MaxSpread_n ("mS").

Differences from the official code, all deliberate: the GT-draw coin (``prob_to_sample_from_gt``)
is tossed per object, not once per batch (``self.rng.random()`` in the official loop); and the
uniform draw uses one noise channel over the union of the disjoint FP/FN regions instead of two
channels, which gives the same distribution.
"""

from __future__ import annotations

import functools
import inspect
from typing import Protocol

import jax
import jax.numpy as jnp

from p2s_jax.inference.prompting import PromptConfig, person_keypoints
from p2s_jax.utils.errors import InputError

Array = jax.Array

__all__ = [
    "Sampler",
    "register_sampler",
    "get_sampler",
    "available_samplers",
    "sample_random_point_from_errors",
    "sample_point_from_error_center",
    "squared_distance_transform",
    "distance_transform",
    "keypoint_pixels",
    "pose_first_point",
    "mask_refine",
    "pose_mask_refine",
    "pose1_mask_refine",
    "center",
    "max_vis",
    "max_spread",
]

PROB_TO_SAMPLE_FROM_GT = 0.1  # official `prob_to_sample_from_gt_for_train` (MOSE / BMP configs)


class Sampler(Protocol):
    """The common sampler signature (see the module docstring for shapes)."""

    def __call__(self, key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
                 visibility: Array, step: Array) -> tuple[Array, Array]: ...


# ------------------------------------------------------------------------------------------------
# Registry (the only global state of the module)
# ------------------------------------------------------------------------------------------------

_SAMPLERS: dict[str, Sampler] = {}
_DETERMINISTIC: set[str] = set()  # samplers that ignore their key (a study runs them once)


def register_sampler(name: str, sampler: Sampler | None = None, *, overwrite: bool = False,
                     deterministic: bool = False):
    """Registers ``sampler`` under ``name``; usable as ``@register_sampler(name)`` or plain call.

    Hyperparameters must be keyword-only arguments with defaults, after the six common ones, so
    that ``get_sampler(name, **config)`` can bind them.  ``deterministic``: the sampler ignores
    its key, so a sampler study (`train.study`) runs it once instead of once per seed. Returns
    the sampler (or the decorator).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")

    def _register(fn: Sampler) -> Sampler:
        if not callable(fn):
            raise TypeError(f"sampler {name!r} is not callable: {fn!r}")
        if name in _SAMPLERS and not overwrite:
            raise ValueError(f"sampler {name!r} is already registered (pass overwrite=True)")
        _SAMPLERS[name] = fn
        (_DETERMINISTIC.add if deterministic else _DETERMINISTIC.discard)(name)
        return fn

    return _register if sampler is None else _register(sampler)


def is_deterministic(name: str) -> bool:
    """Whether the sampler registered as `name` ignores its key (`register_sampler`)."""
    return name in _DETERMINISTIC


def available_samplers() -> tuple[str, ...]:
    """Sorted names of the registered samplers."""
    return tuple(sorted(_SAMPLERS))


def get_sampler(name: str, **config) -> Sampler:
    """The sampler registered as ``name``, hyperparameters ``config`` bound by functools.partial.

    Raises ValueError for an unknown name (listing the known ones) or an unknown hyperparameter.
    """
    try:
        fn = _SAMPLERS[name]
    except KeyError:
        raise InputError(
            f"unknown sampler {name!r}; available: {', '.join(available_samplers())} (a sampler "
            "of your own: pass --import MODULE, the module that registers it)") from None
    if not config:
        return fn
    params = inspect.signature(fn).parameters
    accepted = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise InputError(f"sampler {name!r} has no hyperparameter(s) {unknown}; "
                         f"it accepts {sorted(accepted) or 'none'}")
    return functools.partial(fn, **config)


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def _check_masks(gt_mask: Array, pred_mask: Array | None) -> tuple[Array, Array | None]:
    if gt_mask.ndim != 2:
        raise ValueError(f"gt_mask must be (H, W), got shape {gt_mask.shape}")
    for name, m in (("gt_mask", gt_mask), ("pred_mask", pred_mask)):
        if m is not None and jnp.issubdtype(m.dtype, jnp.floating):
            raise TypeError(f"{name} must be boolean (threshold logits with > 0), got {m.dtype}")
    gt = jnp.asarray(gt_mask, bool)
    if pred_mask is None:
        return gt, None
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred_mask {pred_mask.shape} and gt_mask {gt_mask.shape} differ")
    return gt, jnp.asarray(pred_mask, bool)


def _check_prob(p) -> None:
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"prob_to_sample_from_gt must be in [0, 1], got {p}")


def _flat_index_to_xy(idx: Array, width: int) -> Array:
    """Flat row-major pixel index -> (2,) float32 (x, y) = (col, row)."""
    return jnp.stack([idx % width, idx // width]).astype(jnp.float32)


def _uniform_index(key: Array, region: Array) -> Array:
    """Flat index of a pixel drawn uniformly from ``region`` (H, W) bool; 0 if it is empty.

    As the official code: argmax of uniform noise masked by the region (noise in (0, 1] here, so
    that a region pixel never ties with the outside).
    """
    noise = 1.0 - jax.random.uniform(key, region.shape, jnp.float32)
    return jnp.argmax(jnp.where(region, noise, 0.0).reshape(-1))


def _error_regions(gt: Array, pred: Array | None) -> tuple[Array, Array]:
    """(false positives, false negatives), each (H, W) bool; no prediction = empty prediction."""
    if pred is None:
        return jnp.zeros_like(gt), gt
    return ~gt & pred, gt & ~pred


def sample_random_point_from_errors(key: Array, gt_mask: Array,
                                    pred_mask: Array | None) -> tuple[Array, Array]:
    """One point uniform over the error region (official ``sample_random_points_from_errors``).

    Args:
      key: PRNG key.
      gt_mask: (H, W) bool.
      pred_mask: (H, W) bool or None (= empty prediction: the point is uniform in the GT, label 1).
    Returns:
      point_xy (2,) float32 pixel index (x, y), label int32: 1 on a false negative, 0 on a false
      positive.  A perfect prediction (also: empty GT with no prediction) gives a negative point
      uniform over the background; a perfect prediction of a full-image GT gives (0, 0), label 0.
    """
    gt, pred = _check_masks(gt_mask, pred_mask)
    fp, fn = _error_regions(gt, pred)
    all_correct = ~jnp.any(fp | fn)
    region = fp | fn | (all_correct & ~gt)
    idx = _uniform_index(key, region)
    return _flat_index_to_xy(idx, gt.shape[1]), fn.reshape(-1)[idx].astype(jnp.int32)


def squared_distance_transform(mask: Array) -> Array:
    """Exact squared Euclidean distance of each pixel to the nearest False pixel.

    Separable: an exact 1-D pass along the longer axis (running max / min of the last / next
    False index), then a brute-force min-plus pass along the shorter axis,
    ``D[i, j] = min_k g[i, k]^2 + (j - k)^2``, mapped over rows (O(H W min(H, W)) work, O(W^2)
    memory per row).  Integer arithmetic: exact, no ties lost to rounding.

    Args:
      mask: (H, W) bool.
    Returns:
      (H, W) int32, 0 on False pixels.  Without any False pixel the values are a large sentinel.
    """
    mask = jnp.asarray(mask, bool)
    if mask.shape[1] > mask.shape[0]:
        return squared_distance_transform(mask.T).T
    h, w = mask.shape  # h >= w: the quadratic pass runs along the (shorter) rows
    far = h + w  # more than any real 1-D distance; far^2 + w^2 fits in int32 for h, w < 2^14
    rows = jnp.arange(h, dtype=jnp.int32)[:, None]
    last_zero = jax.lax.cummax(jnp.where(mask, -far, rows), axis=0)
    next_zero = jax.lax.cummin(jnp.where(mask, h + far, rows), axis=0, reverse=True)
    g = jnp.minimum(jnp.minimum(rows - last_zero, next_zero - rows), far)
    g2 = g * g  # (h, w) squared vertical distance
    cols = jnp.arange(w, dtype=jnp.int32)
    dx2 = (cols[:, None] - cols[None, :]) ** 2  # (w, w)
    return jax.lax.map(lambda row: jnp.min(row[None, :] + dx2, axis=1), g2,
                       batch_size=max(1, min(h, 2 ** 22 // max(w * w, 1))))


def distance_transform(mask: Array) -> Array:
    """(H, W) float32 exact Euclidean distance to the nearest False pixel (scipy's
    ``distance_transform_edt``, cv2's ``distanceTransform(DIST_L2, DIST_MASK_PRECISE)``)."""
    return jnp.sqrt(squared_distance_transform(mask).astype(jnp.float32))


def sample_point_from_error_center(gt_mask: Array, pred_mask: Array | None) -> tuple[Array, Array]:
    """The point deepest inside the error regions (official ``sample_one_point_from_error_center``,
    padding=True; the RITM clicker).

    The FN and FP maps are padded by one False pixel (so the image border is a boundary), their
    distance transforms taken, and the first (row-major) maximum of each kept; the FN point wins
    only if strictly deeper (a tie, and a perfect prediction, give the FP point, label 0; with no
    error at all that is pixel (0, 0)).  Squared integer distances are compared, which orders
    exactly as the official float32 cv2 distances (``cv2.DIST_L2`` with mask size 0 is the exact
    Felzenszwalb EDT, not the 3x3 / 5x5 chamfer approximation).

    Args:
      gt_mask: (H, W) bool.  pred_mask: (H, W) bool or None (empty prediction).
    Returns:
      point_xy (2,) float32, label int32.  Deterministic.
    """
    gt, pred = _check_masks(gt_mask, pred_mask)
    fp, fn = _error_regions(gt, pred)
    padded = jnp.pad(jnp.stack([fn, fp]), ((0, 0), (1, 1), (1, 1)))
    d2 = jax.vmap(squared_distance_transform)(padded)[:, 1:-1, 1:-1].reshape(2, -1)
    best = jnp.argmax(d2, axis=1)
    is_positive = d2[0, best[0]] > d2[1, best[1]]
    idx = jnp.where(is_positive, best[0], best[1])
    return _flat_index_to_xy(idx, gt.shape[1]), is_positive.astype(jnp.int32)


def keypoint_pixels(keypoints: Array, visibility: Array,
                    shape: tuple[int, int]) -> tuple[Array, Array]:
    """Pixel under each keypoint and whether the keypoint is available.

    Args:
      keypoints: (K, 2) float (x, y), integer = pixel centre.  visibility: (K,) float.
      shape: (H, W) of the mask.
    Returns:
      (K, 2) int32 (col, row), clipped into the image; (K,) bool available = visibility > 0,
      finite coordinates and the pixel inside the image.
    """
    h, w = shape
    kp = jnp.asarray(keypoints, jnp.float32)
    finite = jnp.all(jnp.isfinite(kp), axis=-1)
    pix = jnp.floor(jnp.where(finite[:, None], kp, -1.0) + 0.5)
    inside = (pix[:, 0] >= 0) & (pix[:, 0] < w) & (pix[:, 1] >= 0) & (pix[:, 1] < h)
    available = finite & inside & (jnp.asarray(visibility, jnp.float32) > 0)
    pix = jnp.clip(pix, 0, jnp.array([w - 1, h - 1], jnp.float32)).astype(jnp.int32)
    return pix, available


def pose_first_point(key: Array, gt_mask: Array, keypoints: Array,
                     visibility: Array) -> tuple[Array, Array]:
    """First point of PoseMaskRefine: the available keypoint with the highest visibility (the
    lowest index on ties), label 1.  Falls back to the official first point (uniform in the GT)
    when no keypoint is available or the GT is empty (an absent object gets the official negative
    background point rather than a positive keypoint)."""
    gt, _ = _check_masks(gt_mask, None)
    _, available = keypoint_pixels(keypoints, visibility, gt.shape)
    best = jnp.argmax(jnp.where(available, visibility, -jnp.inf))
    use_kp = jnp.any(available) & jnp.any(gt)
    fb_point, fb_label = sample_random_point_from_errors(key, gt, None)
    point = jnp.where(use_kp, jnp.asarray(keypoints, jnp.float32)[best], fb_point)
    return point, jnp.where(use_kp, 1, fb_label).astype(jnp.int32)


def _choose_keypoint(key: Array, candidates: Array, visibility: Array, rule: str) -> Array:
    """Index of one candidate keypoint: uniform among candidates, or the most visible."""
    if rule == "uniform":
        noise = 1.0 - jax.random.uniform(key, candidates.shape, jnp.float32)
        return jnp.argmax(jnp.where(candidates, noise, 0.0))
    if rule == "max_visibility":
        return jnp.argmax(jnp.where(candidates, visibility, -jnp.inf))
    raise ValueError(f"keypoint_choice must be 'uniform' or 'max_visibility', got {rule!r}")


def _drop_prediction(key: Array, pred: Array, prob: float | Array) -> Array:
    """With probability ``prob``: an empty prediction (the official ``pred_for_new_pt = None``)."""
    return pred & ~jax.random.bernoulli(key, prob)


# ------------------------------------------------------------------------------------------------
# Registered samplers
# ------------------------------------------------------------------------------------------------

@register_sampler("mask_refine")
def mask_refine(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
                visibility: Array, step: Array, *,
                prob_to_sample_from_gt: float = PROB_TO_SAMPLE_FROM_GT) -> tuple[Array, Array]:
    """MaskRefine, Meta's default (``_iter_correct_pt_sampling`` with method "uniform").

    First point (pred_mask None): uniform in the GT, label 1.  Correction point: uniform in the
    error region (label 1 on FN, 0 on FP); with probability ``prob_to_sample_from_gt`` drawn as if
    there were no prediction (uniform in the GT).  Keypoints are ignored.
    """
    del keypoints, visibility, step
    _check_prob(prob_to_sample_from_gt)
    gt, pred = _check_masks(gt_mask, pred_mask)
    if pred is None:
        return sample_random_point_from_errors(key, gt, None)
    k_coin, k_point = jax.random.split(key)
    pred = _drop_prediction(k_coin, pred, prob_to_sample_from_gt)
    return sample_random_point_from_errors(k_point, gt, pred)


@register_sampler("pose_mask_refine")
def pose_mask_refine(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
                     visibility: Array, step: Array, *,
                     prob_to_sample_from_gt: float = PROB_TO_SAMPLE_FROM_GT,
                     keypoint_choice: str = "uniform") -> tuple[Array, Array]:
    """PoseMaskRefine (paper Sec. 3.2).

    First point: :func:`pose_first_point`.  Correction point, in this order:
      1. with probability ``prob_to_sample_from_gt``: the MaskRefine draw from the GT (uniform in
         the GT, label 1), keypoints ignored;
      2. else, if available keypoints lie on error pixels: one of them (``keypoint_choice``:
         "uniform" among them, default, or "max_visibility"), returned unchanged, label 1 if its
         pixel is a false negative, 0 if a false positive.  The sampler keeps no history, so a
         keypoint may be drawn again while its pixel stays wrong;
      3. else uniform in the error region (a perfect prediction: negative background point).
    """
    del step
    _check_prob(prob_to_sample_from_gt)
    gt, pred = _check_masks(gt_mask, pred_mask)
    if pred is None:
        return pose_first_point(key, gt, keypoints, visibility)
    k_coin, k_kp, k_point = jax.random.split(key, 3)
    from_gt = jax.random.bernoulli(k_coin, prob_to_sample_from_gt)
    fp, fn = _error_regions(gt, pred)
    pix, available = keypoint_pixels(keypoints, visibility, gt.shape)
    on_fn = available & fn[pix[:, 1], pix[:, 0]]
    on_fp = available & fp[pix[:, 1], pix[:, 0]]
    j = _choose_keypoint(k_kp, on_fn | on_fp, jnp.asarray(visibility, jnp.float32), keypoint_choice)
    fb_point, fb_label = sample_random_point_from_errors(k_point, gt, pred & ~from_gt)
    use_kp = jnp.any(on_fn | on_fp) & ~from_gt
    point = jnp.where(use_kp, jnp.asarray(keypoints, jnp.float32)[j], fb_point)
    label = jnp.where(use_kp, on_fn[j].astype(jnp.int32), fb_label)
    return point, label


@register_sampler("pose1_mask_refine")
def pose1_mask_refine(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
                      visibility: Array, step: Array, *,
                      prob_to_sample_from_gt: float = PROB_TO_SAMPLE_FROM_GT
                      ) -> tuple[Array, Array]:
    """Pose1MaskRefine (paper Sec. 4.3.1, "P1mR"): :func:`pose_first_point`, then MaskRefine."""
    if pred_mask is None:
        return pose_first_point(key, gt_mask, keypoints, visibility)
    return mask_refine(key, gt_mask, pred_mask, keypoints, visibility, step,
                       prob_to_sample_from_gt=prob_to_sample_from_gt)


@register_sampler("center", deterministic=True)
def center(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
           visibility: Array, step: Array) -> tuple[Array, Array]:
    """Official evaluation mode (``pt_sampling_for_eval="center"``): deterministic,
    :func:`sample_point_from_error_center`; no GT-draw coin (the official loop tosses it only in
    training).  The key and the keypoints are ignored."""
    del key, keypoints, visibility, step
    return sample_point_from_error_center(gt_mask, pred_mask)


def _fixed_keypoints(selection: str, key: Array, gt_mask: Array, pred_mask: Array | None,
                     keypoints: Array, visibility: Array, step: Array, num_keypoints: int,
                     prob_to_sample_from_gt: float) -> tuple[Array, Array]:
    """Point ``step`` of the person's MaxVis / MaxSpread selection (label 1), or the MaskRefine
    draw once the selection is used up (or for an absent object)."""
    gt, _ = _check_masks(gt_mask, pred_mask)
    config = PromptConfig(selection=selection, num_points=num_keypoints)
    indices, valid = person_keypoints(keypoints, visibility, gt.shape, config)
    slot = jnp.clip(jnp.asarray(step, jnp.int32), 0, num_keypoints - 1)
    use_kp = valid[slot] & (jnp.asarray(step) < num_keypoints) & jnp.any(gt)
    fb_point, fb_label = mask_refine(key, gt_mask, pred_mask, keypoints, visibility, step,
                                     prob_to_sample_from_gt=prob_to_sample_from_gt)
    point = jnp.where(use_kp, jnp.asarray(keypoints, jnp.float32)[indices[slot]], fb_point)
    return point, jnp.where(use_kp, 1, fb_label).astype(jnp.int32)


@register_sampler("max_vis")
def max_vis(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
            visibility: Array, step: Array, *, num_keypoints: int = 6,
            prob_to_sample_from_gt: float = PROB_TO_SAMPLE_FROM_GT) -> tuple[Array, Array]:
    """Table 1's "mV" training: the t-th point is the t-th keypoint of MaxVis_n
    (`prompting.person_keypoints`), then MaskRefine; the prediction is not looked at while
    keypoints remain (the points are fixed, not corrections)."""
    return _fixed_keypoints("maxvis", key, gt_mask, pred_mask, keypoints, visibility, step,
                            num_keypoints, prob_to_sample_from_gt)


@register_sampler("max_spread")
def max_spread(key: Array, gt_mask: Array, pred_mask: Array | None, keypoints: Array,
               visibility: Array, step: Array, *, num_keypoints: int = 6,
               prob_to_sample_from_gt: float = PROB_TO_SAMPLE_FROM_GT) -> tuple[Array, Array]:
    """Table 1's "mS" training: as `max_vis` with MaxSpread_n."""
    return _fixed_keypoints("maxspread", key, gt_mask, pred_mask, keypoints, visibility, step,
                            num_keypoints, prob_to_sample_from_gt)
