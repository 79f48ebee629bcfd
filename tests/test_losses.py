"""Tests of p2s_jax.train.losses against the official training.loss_fns.MultiStepMultiMasksAndIous."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2s_jax.train.losses import (CORE_LOSS_KEY, LOSS_KEYS, LossConfig, _num_objects, reduce_loss,
                                  step_loss_terms)
from support.reference import import_torch, reference_available

Array = jax.Array

needs_reference = pytest.mark.skipif(not reference_available(),
                                     reason="official sam2 not installed")
ALL_KEYS = (*LOSS_KEYS, CORE_LOSS_KEY)
# The official loss over several steps, composed from the package's per-step terms and
# reduction exactly as the correction loop composes them (the loop sums the terms of its steps).
def step_losses(pred_masks: Array, pred_ious: Array, object_score_logits: Array,
                target_masks: Array, num_objects: float | Array | None = None,
                config: LossConfig = LossConfig()) -> dict[str, Array]:
    """:func:`step_loss_terms` plus ``core_loss`` for a single step."""
    terms = step_loss_terms(pred_masks, pred_ious, object_score_logits, target_masks,
                            num_objects, config)
    return {**terms, CORE_LOSS_KEY: reduce_loss(terms, config)}


def _groups(pred_masks, pred_ious, object_score_logits):
    """Normalises the multistep inputs to a list of (masks, ious, scores) groups."""
    if isinstance(pred_masks, (list, tuple)):
        if not (len(pred_masks) == len(pred_ious) == len(object_score_logits)):
            raise ValueError("pred_masks, pred_ious and object_score_logits differ in length")
        return list(zip(pred_masks, pred_ious, object_score_logits))
    return [(pred_masks, pred_ious, object_score_logits)]


def multistep_losses(pred_masks: Array | Sequence[Array], pred_ious: Array | Sequence[Array],
                     object_score_logits: Array | Sequence[Array], target_masks: Array,
                     num_objects: float | Array | None = None,
                     config: LossConfig = LossConfig()) -> dict[str, Array]:
    """Official ``MultiStepMultiMasksAndIous`` for one frame: terms summed over steps.

    Each of the first three arguments is either one array with a leading step axis
    (pred_masks (S, N, M, H, W), pred_ious (S, N, M), object_score_logits (S, N, 1)), or a
    sequence whose items are single steps (no step axis) or stacked steps (with one), e.g. the
    multimask first step followed by the ``lax.scan`` output of the correction steps::

        multistep_losses([masks0, masks_scan], [ious0, ious_scan], [obj0, obj_scan], gt)

    Args:
      target_masks: (N, H, W) bool, the same for every step.
      num_objects, config: as :func:`step_loss_terms`.
    Returns:
      {"loss_mask", "loss_dice", "loss_iou", "loss_class", "core_loss"}: float32 scalars.
    """
    num = _num_objects(target_masks, num_objects)
    totals = {k: jnp.zeros((), jnp.float32) for k in LOSS_KEYS}
    for masks, ious, scores in _groups(pred_masks, pred_ious, object_score_logits):
        if masks.ndim == 4:
            terms = step_loss_terms(masks, ious, scores, target_masks, num, config)
        elif masks.ndim == 5:
            per_step = jax.vmap(lambda mk, io, sc: step_loss_terms(
                mk, io, sc, target_masks, num, config))(masks, ious, scores)
            terms = {k: jnp.sum(v) for k, v in per_step.items()}
        else:
            raise ValueError(
                f"pred_masks must be (N, M, H, W) or (S, N, M, H, W), got {masks.shape}")
        totals = {k: totals[k] + terms[k] for k in LOSS_KEYS}
    return {**totals, CORE_LOSS_KEY: reduce_loss(totals, config)}


MULTISTEP = jax.jit(multistep_losses, static_argnames="config")  # compiled once per shape / config


def make_inputs(seed=0, n=5, h=24, w=32, steps=3, m0=3):
    """A first multimask step (m0 masks) then single-mask steps; objects 1 and 3 absent.

    Logits are noisy versions of the target (so IoUs and the best-mask choice are non-trivial),
    with a few saturated values.  Returns lists of per-step (N, M, H, W), (N, M), (N, 1) float32
    arrays and the (N, H, W) bool target.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform((0, 0), (h, w), (n, 1, 1, 2))
    radii = rng.uniform(3, 10, (n, 1, 1))
    target = (yy - centres[..., 0]) ** 2 + (xx - centres[..., 1]) ** 2 <= radii ** 2
    target[[1, 3]] = False
    masks, ious, scores = [], [], []
    for s in range(steps):
        m = m0 if s == 0 else 1
        signal = rng.uniform(0, 6, (n, m, 1, 1)) * (target[:, None] - 0.5)
        logits = (signal + rng.normal(0, 2, (n, m, h, w))).astype(np.float32)
        logits[0, 0, :2] = 40.0  # saturated, both signs
        logits[2, -1, -2:] = -40.0
        masks.append(logits)
        ious.append(rng.uniform(0, 1, (n, m)).astype(np.float32))
        score = rng.normal(0, 3, (n, 1)).astype(np.float32)
        score[4, 0] = 30.0
        scores.append(score)
    return masks, ious, scores, target


def official_losses(masks, ious, scores, target, config: LossConfig, with_grad=False):
    """Official loss dict (floats), and the gradients of core_loss w.r.t. the step-0 inputs."""
    torch = import_torch()
    from training.loss_fns import MultiStepMultiMasksAndIous

    loss_fn = MultiStepMultiMasksAndIous(
        weight_dict=dict(config.weights), focal_alpha=config.focal_alpha,
        focal_gamma=config.focal_gamma, supervise_all_iou=config.supervise_all_iou,
        iou_use_l1_loss=config.iou_use_l1_loss, pred_obj_scores=config.pred_obj_scores,
        focal_gamma_obj_score=config.focal_gamma_obj_score,
        focal_alpha_obj_score=config.focal_alpha_obj_score)
    with torch.enable_grad():
        tensors = [[torch.tensor(a, requires_grad=with_grad) for a in arrays]
                   for arrays in (masks, ious, scores)]
        outs = {"multistep_pred_multimasks_high_res": tensors[0],
                "multistep_pred_ious": tensors[1], "multistep_object_score_logits": tensors[2]}
        losses = loss_fn([outs], torch.from_numpy(target)[None])
        values = {k: float(v.detach()) for k, v in losses.items()}
        if not with_grad:
            return values, None
        grads = torch.autograd.grad(losses[CORE_LOSS_KEY], [t[0] for t in tensors])
    return values, [g.numpy() for g in grads]


def assert_terms_close(ours, ref, rtol=1e-5):
    assert set(ours) == set(ALL_KEYS) and set(ALL_KEYS) <= set(ref)
    for k in ALL_KEYS:
        a, b = float(ours[k]), ref[k]
        assert abs(a - b) <= rtol * abs(b) + 1e-12, f"{k}: ours {a!r} official {b!r}"


@needs_reference
def test_parity_with_official_recipe():
    """The SAM-pose2seg recipe: values of every term and gradients of core_loss."""
    masks, ious, scores, target = make_inputs(0)
    config = LossConfig()
    ref, ref_grads = official_losses(masks, ious, scores, target, config, with_grad=True)
    assert all(ref[k] > 0 for k in ALL_KEYS)

    # first step alone, the correction steps stacked as after lax.scan; under jit
    def total(m0, i0, s0, m_rest, i_rest, s_rest):
        out = multistep_losses([m0, m_rest], [i0, i_rest], [s0, s_rest], target, config=config)
        return out[CORE_LOSS_KEY], out

    stacked = [np.stack(a[1:]) for a in (masks, ious, scores)]
    grad_fn = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True))
    (_, ours), grads = grad_fn(masks[0], ious[0], scores[0], *stacked)
    assert_terms_close(ours, ref)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max())


@needs_reference
@pytest.mark.parametrize("change", [
    dict(supervise_all_iou=False, iou_use_l1_loss=False, focal_alpha_obj_score=0.25,
         focal_gamma_obj_score=2.0, weight_dice=0.5, weight_iou=0.0),
    dict(pred_obj_scores=False, focal_alpha=0.5, focal_gamma=1.5),
])
def test_parity_with_official_options(change):
    masks, ious, scores, target = make_inputs(1)
    config = dataclasses.replace(LossConfig(), **change)
    ref, _ = official_losses(masks, ious, scores, target, config)
    assert_terms_close(MULTISTEP(masks, ious, scores, target, config=config), ref)


def test_steps_sum_and_scan():
    """A stacked step axis (from lax.scan) = the sum of single steps; num_objects divides."""
    masks, ious, scores, target = make_inputs(2, m0=1)

    def body(carry, xs):
        m, i, s = xs
        return carry, (m * 1.0, i, s)  # stands for the decoder producing one step per iteration

    @jax.jit
    def scanned(m, i, s, num_objects):
        _, (ms, is_, ss) = jax.lax.scan(body, None, (m, i, s))
        return multistep_losses(ms, is_, ss, target, num_objects)

    inputs = [np.stack(a) for a in (masks, ious, scores)]
    stacked = scanned(*inputs, len(target))
    step_fn = jax.jit(step_losses)
    singles = [step_fn(m, i, s, target) for m, i, s in zip(masks, ious, scores)]
    halved = scanned(*inputs, 2 * len(target))
    for k in ALL_KEYS:
        np.testing.assert_allclose(stacked[k], sum(float(d[k]) for d in singles), rtol=1e-5)
        np.testing.assert_allclose(halved[k], stacked[k] / 2, rtol=1e-5)


def test_only_best_mask_and_present_objects_get_mask_gradients():
    masks, ious, scores, target = make_inputs(3, steps=1, m0=3)
    core = lambda m, s: step_losses(m, ious[0], s, target)[CORE_LOSS_KEY]
    saturated = np.full((len(target), 1), 200.0, np.float32)  # BCE (gamma 0): finite gradients
    grad, g_scores = map(np.asarray, jax.jit(jax.grad(core, argnums=(0, 1)))(masks[0], saturated))
    assert np.isfinite(grad).all() and np.isfinite(g_scores).all()
    m, t = masks[0].astype(np.float64), target[:, None].astype(np.float64)
    p = 1 / (1 + np.exp(-m))  # numpy float64 reference of 20 * focal + dice per mask
    ce = np.logaddexp(0, m) - m * t
    focal = ((0.25 * t + 0.75 * (1 - t)) * ce * (1 - (p * t + (1 - p) * (1 - t))) ** 2).mean((2, 3))
    dice = 1 - (2 * (p * t).sum((2, 3)) + 1) / (p.sum((2, 3)) + t.sum((2, 3)) + 1)
    best = np.argmin(20 * focal + dice, axis=1)
    present = target.reshape(len(target), -1).any(1)
    for obj in range(len(target)):
        for k in range(masks[0].shape[1]):
            nonzero = np.abs(grad[obj, k]).max() > 0
            assert nonzero == (present[obj] and k == best[obj]), (obj, k)


def test_absent_objects_only_get_the_class_loss():
    masks, ious, scores, target = make_inputs(4)
    out = MULTISTEP(masks, ious, scores, np.zeros_like(target))
    assert float(out["loss_mask"]) == float(out["loss_dice"]) == float(out["loss_iou"]) == 0.0
    assert float(out["loss_class"]) > 0 and float(out[CORE_LOSS_KEY]) == float(out["loss_class"])


def test_shape_errors():
    masks, ious, scores, target = make_inputs(5, steps=1)
    with pytest.raises(ValueError, match="target_masks"):
        step_losses(masks[0], ious[0], scores[0], target[:, :-1])
    with pytest.raises(ValueError, match="differ in length"):
        multistep_losses(masks, ious[:0], scores, target)
