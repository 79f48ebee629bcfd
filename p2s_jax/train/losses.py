"""Multi-step mask losses of SAM 2 training, used to fine-tune SAM-pose2seg (paper Sec. 3.2, 4.1).

A JAX port of the official ``training/loss_fns.py``: ``MultiStepMultiMasksAndIous`` with its
helpers ``sigmoid_focal_loss``, ``dice_loss`` and ``iou_loss``, configured as in
``sam2.1_hiera_b+_MOSE_finetune.yaml`` (kept by the authors): weights mask (focal) 20, dice 1,
IoU 1, class 1; focal alpha 0.25, gamma 2; ``supervise_all_iou=True``; ``iou_use_l1_loss=True``;
``pred_obj_scores=True`` with a plain BCE on the object score (focal gamma 0, alpha -1).

Per prediction step, with N objects and M masks per object:

* focal (mean over pixels) and dice (+1 smoothing) of every mask against the target, divided by
  ``num_objects``; with M > 1 only the mask with the lowest ``20 * focal + dice`` counts;
* IoU prediction: L1 between the predicted and the actual IoU (mask = logits > 0), averaged over
  all M masks (``supervise_all_iou``);
* the three mask terms only for objects present in the target (``target_obj``);
* object score: BCE against ``target_obj``, for every object.

Terms are summed over steps and objects; ``core_loss`` is their weighted sum.  Everything is a pure
function of arrays, usable under ``jit``, ``grad`` and after ``lax.scan``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "CORE_LOSS_KEY",
    "LOSS_KEYS",
    "LossConfig",
    "sigmoid_focal_loss",
    "focal_loss_per_mask",
    "dice_loss_per_mask",
    "actual_mask_iou",
    "iou_loss_per_mask",
    "step_loss_terms",
    "reduce_loss",
]

CORE_LOSS_KEY = "core_loss"  # official training.trainer.CORE_LOSS_KEY
LOSS_KEYS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of ``MultiStepMultiMasksAndIous`` (defaults: the SAM-pose2seg recipe).

    Hashable, so it can be a static argument of ``jax.jit``.

    Attributes:
      weight_mask, weight_dice, weight_iou, weight_class: the official ``weight_dict`` of the
        focal, dice, IoU and object-score terms.
      focal_alpha, focal_gamma: the sigmoid focal loss of the masks.
      supervise_all_iou: train every predicted IoU of a multimask step, not only the best mask's.
      iou_use_l1_loss: L1 (True, official) or MSE between predicted and actual IoU.
      pred_obj_scores: the model predicts an object score (SAM 2.1): train it.
      focal_alpha_obj_score, focal_gamma_obj_score: the object score's focal loss (-1 / 0:
        plain binary cross-entropy, official).
    """

    weight_mask: float = 20.0
    weight_dice: float = 1.0
    weight_iou: float = 1.0
    weight_class: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    supervise_all_iou: bool = True
    iou_use_l1_loss: bool = True
    pred_obj_scores: bool = True
    focal_alpha_obj_score: float = -1.0
    focal_gamma_obj_score: float = 0.0

    @property
    def weights(self) -> dict[str, float]:
        """The official ``weight_dict``."""
        return {"loss_mask": self.weight_mask, "loss_dice": self.weight_dice,
                "loss_iou": self.weight_iou, "loss_class": self.weight_class}


def _float(x: Array) -> Array:
    """At least float32 (bf16 logits are promoted, as under torch autocast for these ops)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> Array:
    """Element-wise RetinaNet focal loss (unreduced); ``alpha < 0`` disables the class weighting.

    Args:
      logits, targets: same shape (targets in {0, 1}).
    Returns:
      loss with the shape of ``logits``.
    """
    x, t = _float(logits), _float(targets)
    prob = jax.nn.sigmoid(x)
    ce = jax.nn.softplus(x) - x * t  # binary_cross_entropy_with_logits
    p_t = prob * t + (1.0 - prob) * (1.0 - t)
    # gamma 0 (the object-score BCE) skips the factor: d/dx x**0 at x = 0 would be nan in JAX.
    loss = ce if gamma == 0 else ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss


def focal_loss_per_mask(logits: Array, targets: Array, alpha: float = 0.25,
                        gamma: float = 2.0) -> Array:
    """Focal loss averaged over pixels: (..., H, W) -> (...)."""
    return jnp.mean(sigmoid_focal_loss(logits, targets, alpha, gamma), axis=(-2, -1))


def dice_loss_per_mask(logits: Array, targets: Array) -> Array:
    """``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` with p = sigmoid(logits): (..., H, W) -> (...)."""
    p, t = jax.nn.sigmoid(_float(logits)), _float(targets)
    numerator = 2.0 * jnp.sum(p * t, axis=(-2, -1))
    denominator = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def actual_mask_iou(logits: Array, targets: Array) -> Array:
    """IoU of ``logits > 0`` with ``targets > 0`` (union clamped to >= 1): (..., H, W) -> (...)."""
    pred, gt = logits > 0, targets > 0
    inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


def iou_loss_per_mask(pred_ious: Array, logits: Array, targets: Array,
                      use_l1_loss: bool = True) -> Array:
    """L1 (or squared) error of the predicted IoUs (...) against :func:`actual_mask_iou`."""
    err = _float(pred_ious) - actual_mask_iou(logits, targets)
    return jnp.abs(err) if use_l1_loss else err * err


def _num_objects(target_masks: Array, num_objects) -> Array | float:
    if num_objects is None:
        return float(max(target_masks.shape[0], 1))
    return jnp.maximum(num_objects, 1.0)


def step_loss_terms(pred_masks: Array, pred_ious: Array, object_score_logits: Array,
                    target_masks: Array, num_objects: float | Array | None = None,
                    config: LossConfig = LossConfig(),
                    valid: Array | None = None) -> dict[str, Array]:
    """Unweighted terms of one prediction step (official ``_update_losses``).

    Args:
      pred_masks: (N, M, H, W) mask logits at the target resolution.
      pred_ious: (N, M) predicted IoUs.
      object_score_logits: (N, 1).
      target_masks: (N, H, W) bool (or {0, 1}).
      num_objects: divisor; default N (the official value on one device, clamped to >= 1).
      config: :class:`LossConfig`.
      valid: (N,) bool or None; objects with False (padding slots of a fixed-size batch) add
        nothing to any term.  ``num_objects`` should then count the valid objects only.
    Returns:
      {"loss_mask", "loss_dice", "loss_iou", "loss_class"}: float32 scalars.
    """
    n, m = pred_masks.shape[:2]
    if target_masks.shape != (n, *pred_masks.shape[2:]):
        raise ValueError(f"target_masks {target_masks.shape} does not match pred_masks "
                         f"{pred_masks.shape} (expected (N, H, W))")
    num = _num_objects(target_masks, num_objects)
    targets = jnp.broadcast_to(_float(target_masks)[:, None], pred_masks.shape)
    focal = focal_loss_per_mask(pred_masks, targets, config.focal_alpha, config.focal_gamma) / num
    dice = dice_loss_per_mask(pred_masks, targets) / num
    iou = iou_loss_per_mask(pred_ious, pred_masks, targets, config.iou_use_l1_loss) / num

    weight = (jnp.ones((n, 1), jnp.float32) if valid is None
              else jnp.asarray(valid, jnp.float32).reshape(n, 1))
    if config.pred_obj_scores:
        target_obj = jnp.any(target_masks.reshape(n, -1) > 0, axis=-1)[:, None].astype(jnp.float32)
        loss_class = jnp.sum(weight[:, 0] * jnp.mean(sigmoid_focal_loss(
            object_score_logits, target_obj, config.focal_alpha_obj_score,
            config.focal_gamma_obj_score), axis=-1)) / num
    else:
        target_obj = jnp.ones((n, 1), jnp.float32)
        loss_class = jnp.zeros((), jnp.float32)

    if m > 1:  # only the mask with the lowest weighted focal + dice gets the mask losses
        combo = focal * config.weight_mask + dice * config.weight_dice
        best = jnp.argmin(combo, axis=-1)[:, None]
        focal = jnp.take_along_axis(focal, best, axis=-1)
        dice = jnp.take_along_axis(dice, best, axis=-1)
        iou = (jnp.mean(iou, axis=-1, keepdims=True) if config.supervise_all_iou
               else jnp.take_along_axis(iou, best, axis=-1))

    present = target_obj * weight
    return {"loss_mask": jnp.sum(focal * present), "loss_dice": jnp.sum(dice * present),
            "loss_iou": jnp.sum(iou * present), "loss_class": loss_class}


def reduce_loss(terms: dict[str, Array], config: LossConfig = LossConfig()) -> Array:
    """``core_loss``: weighted sum of the terms (official ``reduce_loss``; zero weights skipped)."""
    total = jnp.zeros((), jnp.float32)
    for name, weight in config.weights.items():
        if weight != 0:
            total = total + terms[name] * weight
    return total
