"""The interactive correction loop of SAM 2 training, compiled as one program (paper Sec. 3.2).

Official reference: ``SAM2Train.track_step`` + ``_iter_correct_pt_sampling`` (``training/model/
sam2.py``) on a single image, which calls ``SAM2Base._forward_sam_heads`` once per point:

* step 0: one point from the sampler (``pred_mask=None``), three masks (``multimask_output`` with
  ``multimask_min_pt_num`` 0 / ``multimask_max_pt_num`` 1), the one with the highest predicted IoU
  kept;
* steps 1 .. num_points - 1: one correction point drawn from the error between the ground truth and
  the kept high-res mask (> 0), appended to the prompts; the kept low-res logits of the previous
  step are the mask input (not detached: gradients flow through the whole loop); one mask.

Every step decodes through :meth:`SAM2Image.decode` (``dynamic_stability=False``: the training
configs have no ``dynamic_multimask_via_stability``; ``object_score_gate=True`` as
``_forward_sam_heads``), upsamples the logits bilinearly to the image size and evaluates the
official loss (:func:`p2s_jax.train.losses.step_loss_terms`) on the full-resolution masks.

Prompts live in a fixed buffer of ``num_points`` slots padded with label -1; padding slots are
masked out of the decoder's attention, so step t equals the official call with exactly its t + 1
points (plus the official not-a-point token).  Step 0 (no prediction to correct, no mask input,
three masks) runs first; the correction steps run in one ``lax.scan`` whose body is the same
:func:`decode_step`; the whole loop is one compiled program.  Everything is per image (``P`` objects of one image); the trainer ``vmap``s it over
the images of a batch.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from p2s_jax.train import losses
from p2s_jax.model.resample import upsample_logits, upsample_matrix
from p2s_jax.model.sam2 import ImageFeatures, SAM2Image
from p2s_jax.train.samplers import get_sampler
from p2s_jax.utils.errors import InputError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CorrectionConfig:
    """The loop's hyperparameters (hashable: a static argument of jit).

    num_points: 1 initial + the correction points (official: 1 + ``num_correction_pt_per_frame``
      = 8).
    sampler: a name registered in :mod:`p2s_jax.train.samplers`; ``sampler_kwargs`` its
      hyperparameters as ``(name, value)`` pairs.
    multimask_first: step 0 predicts 3 masks and keeps the best by predicted IoU (official).
    unroll: ``lax.scan``'s unroll of the correction steps (True: all of them). Unrolled, XLA
      fuses across steps and drops the loop's residual stacking: 10-20 % faster training steps
      on CPU (scripts/benchmark_train.py) for a longer compile; False keeps one loop body.
    """

    num_points: int = 8
    sampler: str = "pose_mask_refine"
    sampler_kwargs: tuple = ()
    multimask_first: bool = True
    unroll: bool = True

    def __post_init__(self):
        if self.num_points < 1:
            raise InputError(f"num_points must be >= 1, got {self.num_points}")
        get_sampler(self.sampler, **dict(self.sampler_kwargs))  # fails early on a bad name


class LoopTargets(NamedTuple):
    """One image's objects (P of them, padded)."""

    masks: Array  # (P, S, S) bool, ground truth at the model input size
    keypoints: Array  # (P, J, 2) float32 model-input pixels (integer = pixel centre)
    visibility: Array  # (P, J) float32, <= 0 unavailable
    valid: Array  # (P,) bool, False for padding slots


class StepOutputs(NamedTuple):
    """Per step (a leading step axis once stacked)."""

    loss_terms: dict  # {"loss_mask", "loss_dice", "loss_iou", "loss_class"}: scalars
    low_res_logits: Array  # (P, M, h, w) every mask of the step (gated by the object score)
    iou: Array  # (P, M) predicted IoU
    object_score_logits: Array  # (P,)
    kept_iou_with_gt: Array  # (P,) IoU of the kept high-res mask (> 0) with the ground truth
    point: Array  # (P, 2) the point this step added
    label: Array  # (P,) its label


class LoopOutputs(NamedTuple):
    first: StepOutputs  # step 0 (M = 3 with multimask_first, else 1)
    rest: Optional[StepOutputs]  # steps 1 .. num_points - 1 stacked (M = 1), or None
    loss_terms: dict  # summed over steps
    point_coords: Array  # (P, num_points, 2) every point, in order
    point_labels: Array  # (P, num_points)


class _Carry(NamedTuple):
    coords: Array  # (P, K, 2)
    labels: Array  # (P, K)
    mask_input: Array  # (P, h, w, 1) kept low-res logits of the previous step
    kept_high_res: Array  # (P, S, S) bool, kept mask of the previous step


def _sample(config: CorrectionConfig, key: Array, targets: LoopTargets,
            pred: Optional[Array], step: Array) -> tuple[Array, Array]:
    """One point per object: (P, 2) float32, (P,) int32."""
    sampler = get_sampler(config.sampler, **dict(config.sampler_kwargs))
    # one key per object slot, independent of the number of slots
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(targets.masks.shape[0]))
    # pred None (the first point) is an empty pytree: vmap passes it through as None
    return jax.vmap(lambda k, g, p, kp, v: sampler(k, g, p, kp, v, step))(
        keys, targets.masks, pred, targets.keypoints, targets.visibility)


def decode_step(model: SAM2Image, features: ImageFeatures, targets: LoopTargets, coords: Array,
                labels: Array, mask_input: Optional[Array], *, multimask: bool,
                num_objects, loss_config: losses.LossConfig):
    """One ``_forward_sam_heads`` call with its loss.

    Returns (StepOutputs without the point, kept low-res logits (P, h, w, 1), kept high-res
    mask (P, S, S) bool).
    """
    p = coords.shape[0]
    has_mask = None if mask_input is None else jnp.ones((p,), bool)
    out = model.decode(features, coords, labels, mask_input, has_mask,
                       multimask_output=multimask, dynamic_stability=False,
                       object_score_gate=True)
    size = model.config.image_size
    up = jnp.asarray(upsample_matrix(size, out.low_res_logits.shape[-1]))
    high_res = upsample_logits(out.low_res_logits, up, up)  # (P, M, S, S)
    terms = losses.step_loss_terms(high_res, out.iou, out.object_score_logits[:, None],
                                   targets.masks, num_objects, loss_config, targets.valid)
    best = jnp.argmax(out.iou, axis=-1)[:, None]
    kept_low = jnp.take_along_axis(out.low_res_logits, best[:, :, None, None], axis=1)[:, 0]
    kept_high = jnp.take_along_axis(high_res, best[:, :, None, None], axis=1)[:, 0]
    outputs = StepOutputs(terms, out.low_res_logits, out.iou, out.object_score_logits,
                          losses.actual_mask_iou(kept_high, targets.masks), None, None)
    return outputs, kept_low[..., None], kept_high > 0


def correction_loop(model: SAM2Image, features: ImageFeatures, targets: LoopTargets, key: Array,
                    config: CorrectionConfig = CorrectionConfig(),
                    loss_config: losses.LossConfig = losses.LossConfig(),
                    num_objects=None) -> LoopOutputs:
    """The whole 1 + (num_points - 1) step loop on one image's P objects.

    Args:
      model: the SAM 2.1 image model.
      features: one image's ``ImageFeatures`` (no batch axis).
      targets: ``LoopTargets`` of the image's P objects.
      key: PRNG key of this image (step t uses ``fold_in(key, t)``, split over objects).
      num_objects: the loss divisor (default: the number of valid objects, at least 1).
    Returns:
      ``LoopOutputs``; ``loss_terms`` are the official terms summed over steps.
    """
    k = config.num_points
    p = targets.masks.shape[0]
    if num_objects is None:
        num_objects = jnp.maximum(jnp.sum(targets.valid.astype(jnp.float32)), 1.0)

    point, label = _sample(config, jax.random.fold_in(key, 0), targets, None, jnp.int32(0))
    coords = jnp.zeros((p, k, 2), jnp.float32).at[:, 0].set(point)
    labels = jnp.full((p, k), -1, jnp.int32).at[:, 0].set(label)

    # Step 0: the first point is already in the buffer; no mask input.
    first_out, kept_low, kept_high = decode_step(
        model, features, targets, coords, labels, None,
        multimask=config.multimask_first, num_objects=num_objects, loss_config=loss_config)
    first = first_out._replace(point=point, label=label)
    carry = _Carry(coords, labels, kept_low, kept_high)

    rest = None
    if k > 1:
        def body(carry, t):
            point, label = _sample(config, jax.random.fold_in(key, t), targets,
                                   carry.kept_high_res, t)
            coords = carry.coords.at[:, t].set(point)
            labels = carry.labels.at[:, t].set(label)
            out, kept_low, kept_high = decode_step(
                model, features, targets, coords, labels, carry.mask_input,
                multimask=False, num_objects=num_objects, loss_config=loss_config)
            return (_Carry(coords, labels, kept_low, kept_high),
                    out._replace(point=point, label=label))

        carry, rest = jax.lax.scan(body, carry, jnp.arange(1, k, dtype=jnp.int32),
                                   unroll=config.unroll)

    terms = first.loss_terms
    if rest is not None:
        terms = {name: value + jnp.sum(rest.loss_terms[name]) for name, value in terms.items()}
    return LoopOutputs(first, rest, terms, carry.coords, carry.labels)
