"""The correction loop against the official SAM2Train (forward, loss and gradients), and the
lax.scan loop against a Python loop of the same steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from support import reference
from support.shared import photo, rel_err
from p2s_jax.train import losses
from p2s_jax.model.configs import get_config
from p2s_jax.train.correction import CorrectionConfig, LoopTargets, correction_loop, decode_step
from p2s_jax.inference.preprocess import preprocess_image
from p2s_jax.model.sam2 import abstract_model

SIZE = 256
NAME = "sam2.1_hiera_t"


@functools.lru_cache(maxsize=None)
def train_pair():
    """(official SAM2Train, our SAM2Image) with the same random weights, t at 256."""
    from weights_conversion.convert import from_state_dict

    official = reference.official_model(NAME, SIZE, apply_postprocessing=False, train=True)
    ours = abstract_model(get_config(NAME, SIZE))
    from_state_dict(ours, reference.official_state_dict(official))
    return official, ours


def _ellipse(cx, cy, rx, ry, angle=0.0):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


@functools.lru_cache(maxsize=None)
def scene():
    """A real photo, two person-like ground-truth masks and their keypoints (P = 2)."""
    image = preprocess_image(photo("astronaut"), SIZE)
    person0 = _ellipse(90, 120, 35, 80) | _ellipse(90, 40, 20, 22)
    person1 = _ellipse(180, 150, 30, 70, 0.3) & ~person0
    masks = np.stack([person0, person1])
    rng = np.random.default_rng(3)
    keypoints = np.zeros((2, 17, 2), np.float32)
    visibility = np.zeros((2, 17), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        pick = rng.choice(len(xs), 17, replace=False)
        keypoints[i] = np.stack([xs[pick], ys[pick]], -1) + rng.uniform(-0.4, 0.4, (17, 2))
        visibility[i] = rng.uniform(0.0, 1.0, 17)
    keypoints[1, 3] = [5.0, 5.0]  # one keypoint on the background: a negative when chosen
    visibility[1, 3] = 0.99
    targets = LoopTargets(jnp.asarray(masks), jnp.asarray(keypoints), jnp.asarray(visibility),
                          jnp.ones((2,), bool))
    return image, targets


def _run_ours(model, image, targets, config, key=0):
    features = jax.tree.map(lambda x: x[0], model.encode_image(jnp.asarray(image[None])))
    return correction_loop(model, features, targets, jax.random.key(key), config)


def loop_gradients(model, image, targets, config, key: int):
    """d core_loss / d params (an nnx.State) of the correction loop, frozen encoder."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fpn = jax.jit(lambda: model.image_encoder(jnp.asarray(image[None])).backbone_fpn)()

    def loss(params):
        merged = nnx.merge(graphdef, params, rest)
        features = jax.tree.map(lambda x: x[0], merged.image_features(fpn))
        out = correction_loop(merged, features, targets, jax.random.key(key), config)
        return losses.reduce_loss(out.loss_terms)

    return jax.jit(jax.grad(loss))(params)


OBJECT_SCORE_BIAS = "sam_mask_decoder.pred_obj_score_head.layers.2.bias"


@functools.lru_cache(maxsize=None)
def gated_pair():
    """`train_pair` with the object-score head's bias moved so that the two objects' scores
    straddle 0 (the one below 0 is gated: the official `_forward_sam_heads` sets its logits to
    -1024); -> (official, ours, the shift)."""
    import copy

    from weights_conversion.convert import from_state_dict

    official, ours = train_pair()
    image, targets = scene()
    config = CorrectionConfig(num_points=1, sampler="pose_mask_refine")
    scores = np.asarray(jax.jit(lambda: _run_ours(ours, image, targets, config))()
                        .first.object_score_logits)
    shift = -float(scores.mean())  # one object's score below 0, the other's above
    gated = copy.deepcopy(official)
    with reference.import_torch().no_grad():
        dict(gated.named_parameters())[OBJECT_SCORE_BIAS].add_(shift)
    twin = abstract_model(get_config(NAME, SIZE))
    from_state_dict(twin, reference.official_state_dict(gated))
    return gated, twin, shift


@functools.lru_cache(maxsize=None)
def official_run(sampler: str, gated: bool = False):
    """Our loop, then the official track_step fed the same points (its sampler patched); with
    `gated`, on `gated_pair`."""
    torch = reference.import_torch()
    import training.model.sam2 as official_sam2
    from training.loss_fns import MultiStepMultiMasksAndIous

    official, ours = gated_pair()[:2] if gated else train_pair()
    image, targets = scene()
    config = CorrectionConfig(num_points=8, sampler=sampler)
    out = jax.jit(lambda: _run_ours(ours, image, targets, config))()
    coords = np.asarray(out.point_coords)
    labels = np.asarray(out.point_labels)

    queue = [(torch.from_numpy(coords[:, t:t + 1].copy()),
              torch.from_numpy(labels[:, t:t + 1].copy())) for t in range(1, 8)]
    calls = []

    def fake_next_point(gt_masks, pred_masks, method):
        calls.append(None if pred_masks is None else pred_masks.numpy().copy())
        return queue.pop(0)

    original = official_sam2.get_next_point
    official_sam2.get_next_point = fake_next_point
    try:
        with torch.enable_grad():
            official.zero_grad()
            for name, p in official.named_parameters():  # freeze_image_encoder=True
                p.requires_grad_(not name.startswith("image_encoder."))
            img = torch.from_numpy(image.copy()).permute(2, 0, 1)[None]
            gt = torch.from_numpy(np.array(targets.masks))[:, None]
            backbone_out = official.forward_image(img.expand(2, -1, -1, -1))
            _, feats, pos, sizes = official._prepare_backbone_features(backbone_out)
            current = official.track_step(
                frame_idx=0, is_init_cond_frame=True, current_vision_feats=feats,
                current_vision_pos_embeds=pos, feat_sizes=sizes,
                point_inputs={"point_coords": torch.from_numpy(coords[:, :1]),
                              "point_labels": torch.from_numpy(labels[:, :1])},
                mask_inputs=None, output_dict={"cond_frame_outputs": {},
                                               "non_cond_frame_outputs": {}},
                num_frames=1, run_mem_encoder=False, frames_to_add_correction_pt=[0],
                gt_masks=gt)
            loss_fn = MultiStepMultiMasksAndIous(
                weight_dict={"loss_mask": 20, "loss_dice": 1, "loss_iou": 1, "loss_class": 1},
                supervise_all_iou=True, iou_use_l1_loss=True, pred_obj_scores=True,
                focal_gamma_obj_score=0.0, focal_alpha_obj_score=-1.0)
            official_losses = loss_fn([current], gt[:, 0][None].float())
            official_losses["core_loss"].backward()
        grads = {name: p.grad.numpy().copy() for name, p in official.named_parameters()
                 if p.grad is not None}
    finally:
        official_sam2.get_next_point = original
        official.zero_grad()
        for p in official.parameters():
            p.requires_grad_(False)
    official_losses = {k: float(v) for k, v in official_losses.items()}
    return out, current, official_losses, grads, calls


# PoseMaskRefine runs on the gated pair (one object gated at some steps, the other not), so it
# checks both branches; MaskRefine on the plain one.
@pytest.mark.parametrize("sampler, gated", [("mask_refine", False), ("pose_mask_refine", True)])
def test_loop_matches_official_sam2train(sampler, gated):
    """Every step's masks, IoUs, object scores, the kept masks and the losses against the
    official `SAM2Train`; `gated`: with objects whose object score is <= 0, whose logits the
    training path gates to -1024 (steps where it is and where it is not)."""
    out, current, official_losses, _, calls = official_run(sampler, gated)
    if gated:
        scores = np.concatenate([np.asarray(out.first.object_score_logits)[None],
                                 np.asarray(out.rest.object_score_logits)])
        assert (scores <= 0).any() and (scores > 0).any(), scores
        low = [np.asarray(out.first.low_res_logits)] + list(np.asarray(out.rest.low_res_logits))
        for t, step_scores in enumerate(scores):
            for i, score in enumerate(step_scores):
                assert np.all(low[t][i] == -1024.0) == (score <= 0), (t, i)
    # every step's masks, IoUs and object scores
    off_masks = [m.detach().numpy() for m in current["multistep_pred_multimasks"]]
    off_ious = [m.detach().numpy() for m in current["multistep_pred_ious"]]
    off_obj = [m.detach().numpy()[:, 0] for m in current["multistep_object_score_logits"]]
    ours_masks = [out.first.low_res_logits] + list(out.rest.low_res_logits)
    ours_ious = [out.first.iou] + list(out.rest.iou)
    ours_obj = [out.first.object_score_logits] + list(out.rest.object_score_logits)
    assert len(off_masks) == len(ours_masks) == 8
    assert off_masks[0].shape[1] == 3 and off_masks[1].shape[1] == 1
    for t in range(8):
        assert np.asarray(ours_masks[t]).shape == off_masks[t].shape
        assert rel_err(ours_masks[t], off_masks[t]) < 1e-4, t
        np.testing.assert_allclose(ours_ious[t], off_ious[t], atol=1e-5)
        np.testing.assert_allclose(ours_obj[t], off_obj[t], rtol=1e-4, atol=1e-4)
    # the official loop fed its kept high-res mask (> 0) to the sampler: ours kept the same one
    for t, pred in enumerate(calls):
        ours_prev = (out.first if t == 0 else jax.tree.map(lambda x: x[t - 1], out.rest))
        best = np.argmax(np.asarray(ours_prev.iou), -1)
        if pred is not None:  # the point came from the error of the kept mask
            iou_off = [(pred[i, 0] & np.asarray(scene()[1].masks[i])).sum()
                       / max((pred[i, 0] | np.asarray(scene()[1].masks[i])).sum(), 1)
                       for i in range(2)]
            np.testing.assert_allclose(np.asarray(ours_prev.kept_iou_with_gt), iou_off,
                                       atol=2e-3)
            assert best.shape == (2,)
    # the loss, term by term
    for name in losses.LOSS_KEYS + (losses.CORE_LOSS_KEY,):
        ours_value = float(out.loss_terms[name]) if name != "core_loss" else float(
            losses.reduce_loss(out.loss_terms))
        assert abs(ours_value - official_losses[name]) <= 1e-5 * max(abs(official_losses[name]),
                                                                     1e-3), name


@pytest.mark.parametrize("attention, gated", [("cpu_chunked", True), ("einsum", False)])
def test_loop_gradients_match_official(attention, gated):
    """d core_loss / d params through all 8 steps (mask input not detached), frozen encoder;
    with the CPU formulations and with the accelerators' (`model.layers.cpu_formulations`);
    `gated`: with an object whose score is <= 0 (its logits gated to -1024: no gradient
    reaches its masks, only its object score)."""
    from p2s_jax.model.sam2 import with_attention
    from weights_conversion.convert import to_state_dict

    official, ours = gated_pair()[:2] if gated else train_pair()
    ours = with_attention(ours, attention)
    image, targets = scene()
    config = CorrectionConfig(num_points=8, sampler="pose_mask_refine")
    _, _, _, official_grads, _ = official_run("pose_mask_refine", gated)

    graphdef, _, rest = nnx.split(ours, nnx.Param, ...)
    grad_model = nnx.merge(graphdef, loop_gradients(ours, image, targets, config, 0), rest)
    ours_grads = to_state_dict(grad_model)
    encoder = [k for k in official_grads if k.startswith("image_encoder.")]
    assert not encoder, f"the frozen encoder got gradients: {encoder[:3]}"
    # relative to each tensor's largest gradient, floored at 1e-4 of the largest overall: the
    # key-projection biases have an exactly-zero gradient (softmax shift invariance), so both
    # codes give only rounding noise there
    floor = 1e-4 * max(np.abs(g).max() for g in official_grads.values())
    checked, worst = 0, 0.0
    for name, g in official_grads.items():
        assert name in ours_grads, name
        err = np.abs(np.asarray(ours_grads[name]) - g).max() / max(np.abs(g).max(), floor)
        worst = max(worst, err)
        assert err < 2e-3, (name, err)
        checked += 1
    print(f"gradient parity: {checked} tensors, worst relative error {worst:.2e}")
    assert checked > 50
    assert "no_mem_embed" in official_grads and "sam_mask_decoder.conv_s0.weight" in official_grads


@pytest.mark.slow  # 25-40 s; the scan itself is checked against the official loop in CI
def test_scan_equals_python_loop():
    """The compiled loop equals the same steps called one by one from Python."""
    _, ours = train_pair()
    image, targets = scene()
    config = CorrectionConfig(num_points=3, sampler="pose_mask_refine")
    key = jax.random.key(11)
    out = jax.jit(lambda: _run_ours(ours, image, targets, config, 11))()

    from p2s_jax.train.correction import _sample  # the loop's own sampler call

    features = jax.tree.map(lambda x: x[0], ours.encode_image(jnp.asarray(image[None])))
    p = 2
    coords = np.zeros((p, 3, 2), np.float32)
    labels = np.full((p, 3), -1, np.int32)
    mask_input, kept_high = None, None
    total = {k: 0.0 for k in losses.LOSS_KEYS}
    for t in range(3):
        point, label = _sample(config, jax.random.fold_in(key, t), targets, kept_high,
                               jnp.int32(t))
        coords[:, t], labels[:, t] = np.asarray(point), np.asarray(label)
        step_out, mask_input, kept_high = decode_step(
            ours, features, targets, jnp.asarray(coords), jnp.asarray(labels), mask_input,
            multimask=(t == 0), num_objects=2.0, loss_config=losses.LossConfig())
        ref = out.first if t == 0 else jax.tree.map(lambda x: x[t - 1], out.rest)
        np.testing.assert_allclose(step_out.low_res_logits, ref.low_res_logits, atol=2e-4)
        np.testing.assert_array_equal(point, ref.point)
        np.testing.assert_array_equal(label, ref.label)
        total = {k: total[k] + float(step_out.loss_terms[k]) for k in total}
    np.testing.assert_array_equal(coords, out.point_coords)
    np.testing.assert_array_equal(labels, out.point_labels)
    for k in total:
        assert abs(total[k] - float(out.loss_terms[k])) < 1e-5 * max(1.0, abs(total[k]))


def test_padding_objects_change_nothing():
    """A padded (valid=False) object slot leaves the valid objects' losses and points alone."""
    _, ours = train_pair()
    image, targets = scene()
    config = CorrectionConfig(num_points=3, sampler="pose_mask_refine")
    one = LoopTargets(*(x[:1] for x in targets))
    padded = LoopTargets(targets.masks, targets.keypoints, targets.visibility,
                         jnp.array([True, False]))
    out_one = jax.jit(lambda: _run_ours(ours, image, one, config, 5))()
    out_pad = jax.jit(lambda: _run_ours(ours, image, padded, config, 5))()
    for k in losses.LOSS_KEYS:
        np.testing.assert_allclose(out_pad.loss_terms[k], out_one.loss_terms[k], rtol=1e-5,
                                   atol=1e-7)
    np.testing.assert_array_equal(out_pad.point_coords[:1], out_one.point_coords)


@pytest.mark.slow  # 33 s; bf16 inference against float32 stays in CI (test_evaluation)
def test_bf16_compute_follows_float32():
    """The paper's bf16 compute (float32 weights): the first step (its point does not depend on a
    prediction) gives losses and IoUs close to float32's."""
    import jax.numpy as jnp
    from weights_conversion.convert import from_state_dict

    official, ours = train_pair()
    bf16 = abstract_model(get_config(NAME, SIZE), dtype=jnp.bfloat16)
    from_state_dict(bf16, reference.official_state_dict(official))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    image, targets = scene()
    config = CorrectionConfig(num_points=1, sampler="pose_mask_refine")

    def first_step(model):
        out = jax.jit(lambda: _run_ours(model, image, targets, config, 4))()
        return float(losses.reduce_loss(out.loss_terms)), np.asarray(out.first.kept_iou_with_gt)

    ref_loss, ref_iou = first_step(ours)
    loss, iou = first_step(bf16)
    assert np.isfinite(loss) and abs(loss - ref_loss) < 0.05 * abs(ref_loss), (loss, ref_loss)
    np.testing.assert_allclose(iou, ref_iou, atol=0.05)

    def first_step_gradients(model):
        grads = loop_gradients(model, image, targets, config, 4)
        return np.concatenate([np.ravel(np.asarray(g, np.float64))
                               for g in jax.tree.leaves(grads)])

    ref_grads, grads = first_step_gradients(ours), first_step_gradients(bf16)
    cosine = grads @ ref_grads / (np.linalg.norm(grads) * np.linalg.norm(ref_grads))
    assert cosine >= 0.99, cosine
