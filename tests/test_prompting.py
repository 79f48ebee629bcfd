"""Tests of p2s_jax.inference.prompting against a loop-based NumPy reference.

The reference (`support/prompts.py`) transcribes the authors' keypoint selection (BBoxMaskPose `sam2_utils.py`,
`_select_keypoints`: `k_most_visible` and `distance+confidence`, with the literal
`np.percentile(available_scores, 80)` rule and numpy's first `argmax`) one person at a time,
plus the project's documented rules: unusable (NaN / outside the image) keypoints are absent,
score ties rank the lower keypoint index first (the authors' `np.argsort(s)[::-1]` leaves that to
numpy's sort kernel), the single-best-keypoint fallback, negatives and boxes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from p2s_jax.inference.prompting import (
    PromptConfig,
    Prompts,
    _percentile_cutoff_ranks,
    select_prompts,
)
from p2s_jax.keypoints import NUM_KEYPOINTS, labelled_points
from support.authors import authors_select, literal_argsort_desc, stable_argsort_desc
from support.prompts import reference_positive_indices, reference_prompts

def assert_matches_reference(prompts: Prompts, expected, num_slots):
    coords, labels, has_prompt = (np.asarray(a) for a in prompts)
    assert coords.shape == (len(expected), num_slots, 2)
    assert labels.shape == (len(expected), num_slots)
    for p, (exp_coords, exp_labels) in enumerate(expected):
        k = len(exp_labels)
        assert has_prompt[p] == (k > 0), p
        np.testing.assert_array_equal(labels[p, :k], exp_labels, err_msg=f"person {p}")
        np.testing.assert_array_equal(labels[p, k:], -1, err_msg=f"person {p}")
        np.testing.assert_allclose(coords[p, :k], exp_coords, rtol=1e-6, atol=1e-4,
                                   err_msg=f"person {p}")
        np.testing.assert_array_equal(coords[p, k:], 0.0)


# --------------------------------------------------------------------------------------------
# One set of configurations and one person count for every test: each compiles once.

NUM_PEOPLE = 5
IMAGE_HW = (120, 160)

CONFIGS = {
    "maxvis3": PromptConfig(),
    "maxvis4_face_rule": PromptConfig(num_points=4, face_rule=True),
    "maxspread6": PromptConfig(selection="maxspread", num_points=6),
    "maxspread6_no_percentile": PromptConfig(selection="maxspread", num_points=6,
                                             spread_percentile=None),
    "ground_truth": PromptConfig(selection="maxspread"),
    "maxspread3_no_face_rule": PromptConfig(selection="maxspread", face_rule=False),
    "closest_given_box": PromptConfig(selection="maxspread", num_points=4,
                                      negatives="closest_other", box="given"),
    "closest_pose_centre": PromptConfig(negatives="closest_other", num_negatives=2,
                                        visibility_threshold=0.3),
    "least_visible_inflated": PromptConfig(
        selection="maxspread", num_points=6, spread_percentile=None,
        negatives="least_visible_own", num_negatives=2, box="inflated", max_slots=16),
}
NEEDS_BOXES = {"closest_given_box", "least_visible_inflated"}

jit_select_prompts = jax.jit(select_prompts, static_argnames="config")


def run(name, keypoints, scores, image_hw=(100, 100), boxes=None, config=None):
    """select_prompts under jit for CONFIGS[name]; boxes exactly when the configuration has one."""
    if name in NEEDS_BOXES and boxes is None:
        boxes = np.tile(np.float32([0, 0, 50, 50]), (len(keypoints), 1))
    return jit_select_prompts(keypoints, scores, image_hw, config or CONFIGS[name],
                              boxes if name in NEEDS_BOXES else None)


def blank_pose(num_people=NUM_PEOPLE):
    """People with every keypoint absent: NaN coordinates, zero scores."""
    return (np.full((num_people, NUM_KEYPOINTS, 2), np.nan, np.float32),
            np.zeros((num_people, NUM_KEYPOINTS), np.float32))


def positives(prompts, person=0):
    labels, coords = np.asarray(prompts.labels[person]), np.asarray(prompts.coords[person])
    return coords[labels == 1].tolist()


def negatives(prompts, person=0):
    labels, coords = np.asarray(prompts.labels[person]), np.asarray(prompts.coords[person])
    return coords[labels == 0].tolist()


# --------------------------------------------------------------------------------------------
# Random images against the reference.


def random_image(rng, num_people=NUM_PEOPLE, tie_heavy=False):
    """keypoints (P, 17, 2), scores (P, 17), boxes (P, 4): crowds reaching past the image."""
    height, width = IMAGE_HW
    centres = rng.uniform([-10, -10], [width + 10, height + 10], (num_people, 1, 2))
    keypoints = centres + rng.normal(0, 25, (num_people, NUM_KEYPOINTS, 2))
    if tie_heavy:  # a coarse grid and few score levels: many distance and score ties
        keypoints = np.round(keypoints / 10) * 10
        scores = rng.choice([0.0, 0.2, 0.3, 0.5, 0.7, 1.0], (num_people, NUM_KEYPOINTS))
    else:
        sharpness = rng.uniform(0.3, 3, (num_people, 1))
        scores = rng.uniform(0, 1, (num_people, NUM_KEYPOINTS)) ** sharpness
    keypoints[rng.random((num_people, NUM_KEYPOINTS)) < 0.05] = np.nan
    keypoints[rng.random(num_people) < 0.05] += 1000.0  # people entirely outside the image
    lo = np.nan_to_num(np.nanmin(keypoints, axis=1), nan=0.0)
    hi = np.nan_to_num(np.nanmax(keypoints, axis=1), nan=1.0)
    boxes = np.concatenate([lo, hi], axis=1) + rng.normal(0, 3, (num_people, 4))
    return keypoints.astype(np.float32), scores.astype(np.float32), boxes.astype(np.float32)


def random_images(seed, num_images, tie_heavy=False):
    rng = np.random.default_rng(seed)
    return [random_image(rng, tie_heavy=tie_heavy) for _ in range(num_images)]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_poses_match_reference(name):
    cfg = CONFIGS[name]
    images = random_images(sorted(CONFIGS).index(name), 16) + random_images(99, 16, tie_heavy=True)
    for keypoints, scores, boxes in images:
        boxes = boxes if name in NEEDS_BOXES else None
        prompts = run(name, keypoints, scores, IMAGE_HW, boxes)
        expected = reference_prompts(keypoints, scores, IMAGE_HW, cfg, boxes)
        assert_matches_reference(prompts, expected, cfg.num_slots)


def test_random_images_exercise_every_rule():
    """Guards the random tests against vacuous data: every branch shows up in them."""
    images = random_images(0, 16) + random_images(99, 16, tie_heavy=True)
    keypoints, scores = (np.stack(parts) for parts in list(zip(*images))[:2])
    height, width = IMAGE_HW
    usable = (np.isfinite(keypoints).all(-1) & (keypoints[..., 0] >= 0) & (keypoints[..., 1] >= 0)
              & (keypoints[..., 0] < width) & (keypoints[..., 1] < height))
    assert (~usable & (scores > 0.9)).any()  # good keypoints that must be ignored
    assert ((usable & (scores > 0.5)).sum(-1) == 0).any()  # fallback people
    assert (usable.sum(-1) == 0).any()  # people without a prompt
    with_rule, without_rule = CONFIGS["maxspread6"], CONFIGS["maxspread6_no_percentile"]
    rule_changes_picks = sum(
        reference_positive_indices(k, s, IMAGE_HW, with_rule)
        != reference_positive_indices(k, s, IMAGE_HW, without_rule)
        for k, s in zip(keypoints.reshape(-1, NUM_KEYPOINTS, 2), scores.reshape(-1, NUM_KEYPOINTS)))
    assert rule_changes_picks > 10


def test_vmap_over_images_matches_single_images():
    images = random_images(5, 8)
    keypoints, scores, boxes = (np.stack(parts) for parts in zip(*images))
    image_hw = np.tile(np.int32(IMAGE_HW), (len(images), 1))
    cfg = CONFIGS["closest_given_box"]
    batched = jax.jit(jax.vmap(lambda k, s, hw, b: select_prompts(k, s, hw, cfg, b)))(
        keypoints, scores, image_hw, boxes)
    for i in range(len(images)):
        single = run("closest_given_box", keypoints[i], scores[i], IMAGE_HW, boxes[i])
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[i], b), batched, single)


def test_vmapped_people_match_per_person_calls():
    keypoints, scores, boxes = random_images(11, 1)[0]
    name = "least_visible_inflated"  # no rule here looks at the other people
    together = run(name, keypoints, scores, IMAGE_HW, boxes)
    assert together.has_prompt.sum() >= 3
    for p in range(NUM_PEOPLE):
        alone = run(name, keypoints[p:p + 1], scores[p:p + 1], IMAGE_HW, boxes[p:p + 1])
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b[p]), alone, together)


def test_more_slots_only_add_padding():
    keypoints, scores, boxes = random_images(6, 1)[0]
    tight = run("closest_given_box", keypoints, scores, IMAGE_HW, boxes)
    wide = run("closest_given_box", keypoints, scores, IMAGE_HW, boxes,
               config=dataclasses.replace(CONFIGS["closest_given_box"], max_slots=16))
    assert tight.labels.shape == (NUM_PEOPLE, 7) and wide.labels.shape == (NUM_PEOPLE, 16)
    assert (np.asarray(tight.labels) >= 0).sum() > 3 * NUM_PEOPLE
    np.testing.assert_array_equal(wide.labels[:, :7], tight.labels)
    np.testing.assert_array_equal(wide.coords[:, :7], tight.coords)
    np.testing.assert_array_equal(wide.has_prompt, tight.has_prompt)
    np.testing.assert_array_equal(wide.labels[:, 7:], -1)
    np.testing.assert_array_equal(wide.coords[:, 7:], 0.0)
    assert wide.coords.dtype == np.float32 and wide.labels.dtype == np.int32


# --------------------------------------------------------------------------------------------
# Hand-made poses with known answers.


def face_and_wrist_pose():
    keypoints, scores = blank_pose()
    keypoints[0, :] = np.arange(NUM_KEYPOINTS * 2).reshape(NUM_KEYPOINTS, 2)
    scores[0, [0, 1, 2, 9]] = [0.9, 0.95, 0.8, 0.7]  # the whole face and a wrist
    return keypoints, scores


def test_maxvis_takes_best_scores_and_face_rule_only_when_asked():
    keypoints, scores = face_and_wrist_pose()
    out = run("maxvis3", keypoints, scores)
    assert positives(out) == [keypoints[0, j].tolist() for j in (1, 0, 2)]
    np.testing.assert_array_equal(out.labels[0], [1, 1, 1])
    out = run("maxvis4_face_rule", keypoints, scores)
    assert positives(out) == [keypoints[0, j].tolist() for j in (1, 9)]


def test_maxspread_face_rule_keeps_one_face_point():
    keypoints, scores = face_and_wrist_pose()
    for name in ("maxspread6_no_percentile", "ground_truth"):
        out = run(name, keypoints, scores)
        assert positives(out) == [keypoints[0, j].tolist() for j in (1, 9)]  # left eye, wrist
    # Without the face rule the 80th-percentile rule walks down the face scores.
    out = run("maxspread3_no_face_rule", keypoints, scores)
    assert positives(out) == [keypoints[0, j].tolist() for j in (1, 0, 2)]


def test_percentile_rule_skips_far_low_score_points():
    keypoints, scores = blank_pose()
    keypoints[0, 5:10] = [(0, 0), (0, 50), (50, 0), (10, 10), (99, 0)]
    scores[0, 5:10] = [0.99, 0.95, 0.9, 0.8, 0.6]
    # The 80th percentile of [-1, .95, .9, .8, .6] lies between .9 and .95: only (0, 50) may
    # follow, and so on down the scores.  Without the rule the farthest point comes second.
    assert positives(run("maxspread6", keypoints, scores)) == [
        [0, 0], [0, 50], [50, 0], [10, 10], [99, 0]]
    assert positives(run("maxspread6_no_percentile", keypoints, scores)) == [
        [0, 0], [99, 0], [0, 50], [50, 0], [10, 10]]


def test_percentile_rule_can_repick_first_point_like_the_authors():
    """Once the percentile is -1, picked points compete again (distance 0) and numpy's first
    argmax returns the most visible point: the authors emit it twice."""
    keypoints, scores = blank_pose()
    keypoints[0, 5:11] = [(10, 10), (90, 90), (90, 10), (10, 90), (50, 50), (50, 50)]
    scores[0, 5:11] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75]
    scores[0, :5] = 0.1
    expected = [[10, 10], [90, 90], [90, 10], [10, 90], [50, 50]]
    assert positives(run("maxspread6", keypoints, scores)) == expected + [[10, 10]]
    assert reference_positive_indices(keypoints[0], scores[0], (100, 100),
                                      CONFIGS["maxspread6"]) == [5, 6, 7, 8, 9, 5]
    assert positives(run("maxspread6_no_percentile", keypoints, scores)) == expected + [[50, 50]]


def test_ground_truth_ties_rank_lower_index_first():
    coco = np.zeros((NUM_PEOPLE, NUM_KEYPOINTS, 3), np.float32)
    coco[0, 0] = (50, 10, 2)  # nose
    coco[0, 1] = (48, 8, 1)  # left eye: dropped by the face rule (it ties with the nose)
    coco[0, 11] = (40, 60, 2)  # left hip
    coco[0, 15] = (30, 95, 1)  # left ankle: as far from the nose as the right ankle
    coco[0, 16] = (70, 95, 2)  # right ankle: farther from the left ankle than the hip is
    coco[0, 3] = (0, 0, 0)  # unlabelled, at the COCO origin
    keypoints, scores = labelled_points(coco)
    assert positives(run("ground_truth", keypoints, scores)) == [[50, 10], [30, 95], [70, 95]]
    coco[0, 11], coco[0, 12] = (40, 50, 2), (60, 50, 2)  # equally far from the nose
    coco[0, 15, 2] = coco[0, 16, 2] = 0
    keypoints, scores = labelled_points(coco)
    assert positives(run("ground_truth", keypoints, scores)) == [[50, 10], [40, 50], [60, 50]]


def test_coco_conversion_marks_unlabelled_points_absent():
    coco = np.arange(2 * NUM_KEYPOINTS * 3, dtype=np.float32).reshape(2, NUM_KEYPOINTS, 3)
    coco[..., 2] = np.tile([0, 1, 2], (2, 6))[:, :NUM_KEYPOINTS]
    keypoints, scores = labelled_points(coco.reshape(2, -1))
    assert keypoints.shape == (2, NUM_KEYPOINTS, 2) and scores.dtype == np.float32
    np.testing.assert_array_equal(scores, coco[..., 2] > 0)
    assert np.isnan(keypoints[coco[..., 2] == 0]).all()
    np.testing.assert_array_equal(keypoints[coco[..., 2] > 0], coco[..., :2][coco[..., 2] > 0])
    with pytest.raises(ValueError, match=r"\(2, 17, 2\)"):
        labelled_points(np.zeros((2, NUM_KEYPOINTS, 2)))


def test_unusable_keypoints_are_never_prompts():
    keypoints, scores = blank_pose()
    scores[:2] = 0.99
    keypoints[0, 0] = (100, 5)  # x == W
    keypoints[0, 1] = (5, 100)  # y == H
    keypoints[0, 2] = (-0.1, 5)
    keypoints[0, 3] = (np.nan, 5)  # NaN x, finite y
    keypoints[0, 4] = (20, 30)
    scores[0, 4] = 0.6
    keypoints[1, 5] = (25, 30)
    for name in ("closest_pose_centre", "least_visible_inflated"):
        out = run(name, keypoints, scores)
        assert np.isfinite(np.asarray(out.coords)).all()
        assert positives(out, 0) == [[20, 30]] and positives(out, 1) == [[25, 30]]
        if name == "closest_pose_centre":  # each other's only usable point
            assert negatives(out, 0) == [[25, 30]] and negatives(out, 1) == [[20, 30]]
        else:  # nothing usable is left to be a negative
            assert negatives(out, 0) == negatives(out, 1) == []
        np.testing.assert_array_equal(out.has_prompt, [True, True, False, False, False])


def test_no_visible_keypoint_falls_back_to_best_usable_one():
    keypoints, scores = blank_pose()
    keypoints[0, :] = np.linspace(1, 90, NUM_KEYPOINTS * 2).reshape(NUM_KEYPOINTS, 2)
    scores[0, :] = 0.1
    scores[0, 7], scores[0, 8] = 0.45, 0.4
    keypoints[0, 6], scores[0, 6] = (150, 5), 0.49  # better but outside
    for name in ("maxvis3", "maxspread6", "least_visible_inflated"):
        out = run(name, keypoints, scores)
        assert bool(out.has_prompt[0])
        assert positives(out) == [keypoints[0, 7].tolist()]


def test_threshold_gate_is_strict_but_filter_is_not():
    """The authors count points with score > threshold, then keep those >= threshold."""
    keypoints, scores = blank_pose()
    keypoints[0, :] = np.linspace(1, 90, NUM_KEYPOINTS * 2).reshape(NUM_KEYPOINTS, 2)
    scores[0, [5, 9, 12]] = 0.5
    out = run("maxvis3", keypoints, scores)
    assert positives(out) == [keypoints[0, 5].tolist()]  # nothing above 0.5: fallback
    scores[0, 14] = 0.51
    out = run("maxvis3", keypoints, scores)
    assert positives(out) == [keypoints[0, j].tolist() for j in (14, 5, 9)]


def test_person_without_usable_keypoint_gets_no_prompt():
    keypoints, scores = blank_pose()
    keypoints[0, :] = 50.0
    scores[:] = 0.9
    keypoints[1, :] = -5.0  # all outside; the others have NaN coordinates
    boxes = np.tile(np.float32([40, 40, 60, 60]), (NUM_PEOPLE, 1))
    out = run("least_visible_inflated", keypoints, scores, boxes=boxes)
    np.testing.assert_array_equal(out.has_prompt, [True, False, False, False, False])
    np.testing.assert_array_equal(out.labels[1:], -1)
    np.testing.assert_array_equal(out.coords[1:], 0.0)
    # Six positives (one spot), the two lowest-ranked non-positive points (the eyes), padding.
    np.testing.assert_array_equal(out.labels[0], [2, 3] + [1] * 6 + [0] * 2 + [-1] * 6)
    np.testing.assert_allclose(out.coords[0, :2], [[30, 30], [70, 70]])
    np.testing.assert_array_equal(out.coords[0, 2:10], 50.0)


def test_boxes_given_and_inflated_with_clipping():
    keypoints, scores = blank_pose()
    keypoints[:2, 10] = [(30, 40), (5, 5)]
    scores[:2, 10] = 0.9
    boxes = np.tile(np.float32([[20, 30, 60, 90], [0, 2, 10, 12]]), (3, 1))[:NUM_PEOPLE]
    given = run("closest_given_box", keypoints, scores, boxes=boxes)
    np.testing.assert_array_equal(given.labels[:2, :4], [[2, 3, 1, 0]] * 2)
    np.testing.assert_array_equal(given.coords[:2, :2], boxes[:2].reshape(2, 2, 2))
    inflated = run("least_visible_inflated", keypoints, scores, image_hw=(100, 70), boxes=boxes)
    np.testing.assert_array_equal(inflated.labels[:2, :4], [[2, 3, 1, -1]] * 2)
    # centre (40, 60), size (40, 60) -> (80, 120), clipped to W = 70, H = 100.
    np.testing.assert_allclose(inflated.coords[0, :2], [[0, 0], [70, 100]])
    np.testing.assert_allclose(inflated.coords[1, :2], [[0, 0], [15, 17]])
    with pytest.raises(ValueError, match="needs boxes"):
        jit_select_prompts(keypoints, scores, (100, 100), CONFIGS["closest_given_box"])


def test_least_visible_negatives_avoid_positives():
    keypoints, scores = blank_pose()
    keypoints[0, 5:13] = [(x, 10) for x in range(10, 24, 2)] + [(90, 90)]
    scores[0, 5:13] = [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]
    out = run("least_visible_inflated", keypoints, scores)
    # The least visible point, (90, 90), is the farthest and thus the second positive.
    assert positives(out) == [[10, 10], [90, 90], [22, 10], [16, 10], [12, 10], [14, 10]]
    assert negatives(out) == [[20, 10], [18, 10]]


def test_closest_other_uses_box_centre_or_pose_centre():
    keypoints, scores = blank_pose()
    keypoints[0, [0, 15]] = [(10, 10), (30, 50)]  # pose-box centre (20, 30)
    scores[0, [0, 15]] = 0.9
    keypoints[1, [3, 4]] = [(25, 30), (60, 60)]
    scores[1, [3, 4]] = [0.9, 0.9]
    keypoints[2, [5, 6]] = [(80, 80), (18, 31)]
    scores[2, [5, 6]] = [0.9, 0.2]  # closest of all, but not visible
    out = run("closest_pose_centre", keypoints, scores)
    assert negatives(out) == [[25, 30], [60, 60]]
    np.testing.assert_array_equal(out.labels[0], [1, 1, 0, 0, -1])
    boxes = np.tile(np.float32([70, 70, 90, 90]), (NUM_PEOPLE, 1))
    out = run("closest_given_box", keypoints, scores, boxes=boxes)
    assert negatives(out) == [[80, 80]]


# --------------------------------------------------------------------------------------------
# Configuration, validation, percentile.


def test_percentile_cutoff_matches_numpy():
    rng = np.random.default_rng(0)
    for percentile in (80.0, 50.0, 65.0, 100.0, 0.0):
        ranks = _percentile_cutoff_ranks(NUM_KEYPOINTS, percentile)
        for count in range(1, NUM_KEYPOINTS + 1):
            for _ in range(20):
                values = rng.choice([-1.0, 0.5, 0.6, 0.7, 0.9, 1.0], count).astype(np.float32)
                values[rng.random(count) < 0.5] = np.float32(rng.random())
                expected = values < np.percentile(values, percentile)
                np.testing.assert_array_equal(values < np.sort(values)[ranks[count]], expected)


def test_presets_and_config_validation():
    pose2seg, detected, ground_truth = (
        PromptConfig(), PromptConfig(selection="maxspread", num_points=6),
        PromptConfig(selection="maxspread"))
    assert (pose2seg.selection, pose2seg.num_points, pose2seg.uses_face_rule) == (
        "maxvis", 3, False)
    assert (detected.selection, detected.num_points, detected.uses_face_rule) == (
        "maxspread", 6, True)
    assert (ground_truth.selection, ground_truth.num_points) == ("maxspread", 3)
    assert detected.spread_percentile == 80.0 and detected.visibility_threshold == 0.5
    assert (detected.negatives, detected.box, detected.num_slots) == ("none", "none", 6)
    assert PromptConfig(selection="maxspread", num_points=6, negatives="closest_other",
                        box="given").num_slots == 9
    assert hash(PromptConfig()) == hash(PromptConfig())
    with pytest.raises(ValueError, match="max_slots"):
        PromptConfig(selection="maxspread", num_points=6, box="given", max_slots=7)
    with pytest.raises(ValueError, match="selection"):
        PromptConfig(selection="kmeans")
    with pytest.raises(ValueError, match="num_points"):
        PromptConfig(num_points=0)


# --------------------------------------------------------------------------------------------
# Two score channels and the authors' gate (BMP `_pose2seg` + `_select_keypoints`).


METHODS = {"maxvis": "k_most_visible", "maxspread": "distance+confidence"}
AUTHORS = {"maxvis3": PromptConfig(selection="maxvis", num_points=3, no_prompt="empty"),
           "maxspread6": PromptConfig(selection="maxspread", num_points=6, no_prompt="empty")}


@pytest.mark.parametrize("name", sorted(AUTHORS))
@pytest.mark.parametrize("tie_heavy", [False, True])
@pytest.mark.parametrize("outside", ["use", "drop"])
def test_two_channels_match_the_authors_transcription(name, tie_heavy, outside):
    """Ours against the transcription of the authors' `_pose2seg`; with outside="use" (the
    presets) a keypoint outside the photo enters their selection with its own scores, as in
    their code; with "drop" (ours) it enters with scores -1 (never selected)."""
    cfg = dataclasses.replace(AUTHORS[name], outside_keypoints=outside)
    rng = np.random.default_rng(7 + tie_heavy)
    argsort_desc = stable_argsort_desc if tie_heavy else literal_argsort_desc
    gate_failures = outside_picks = 0
    for keypoints, visibility, _ in random_images(3 + tie_heavy, 24, tie_heavy=tie_heavy):
        if tie_heavy:
            confidence = rng.choice([0.1, 0.4, 0.5, 0.6, 0.9], visibility.shape)
        else:
            confidence = (visibility + rng.random(visibility.shape)) / 2  # no ties
        confidence = confidence.astype(np.float32)
        prompts = jit_select_prompts(keypoints, visibility, IMAGE_HW, cfg, None, confidence)
        labels, coords = np.asarray(prompts.labels), np.asarray(prompts.coords)
        inside = ((keypoints[..., 0] >= 0) & (keypoints[..., 1] >= 0)
                  & (keypoints[..., 0] < IMAGE_HW[1]) & (keypoints[..., 1] < IMAGE_HW[0]))
        usable = np.isfinite(keypoints).all(-1) & (inside | (outside == "use"))
        for p in range(NUM_PEOPLE):
            picks = authors_select(np.nan_to_num(keypoints[p]),
                                   np.where(usable[p], confidence[p], -1.0).astype(np.float32),
                                   np.where(usable[p], visibility[p], -1.0).astype(np.float32),
                                   METHODS[cfg.selection], cfg.num_points, argsort_desc)
            assert bool(prompts.has_prompt[p])  # "empty" prompts everyone
            if picks is None:
                gate_failures += 1
                np.testing.assert_array_equal(labels[p], [-2] + [-1] * (cfg.num_slots - 1))
                continue
            k = len(picks)
            np.testing.assert_array_equal(labels[p, :k], 1, err_msg=f"person {p}")
            np.testing.assert_array_equal(labels[p, k:], -1, err_msg=f"person {p}")
            np.testing.assert_allclose(coords[p, :k], keypoints[p, picks], err_msg=f"person {p}")
            outside_picks += int((~inside[p, picks]).sum())
    assert gate_failures > 1  # the gate is exercised
    assert (outside_picks > 0) == (outside == "use")  # keypoints off the photo are prompted


def test_gate_needs_both_channels_and_modes_for_people_without_it():
    keypoints, visibility = blank_pose(3)
    keypoints[:, :] = np.arange(NUM_KEYPOINTS * 2).reshape(NUM_KEYPOINTS, 2)
    confidence = np.zeros_like(visibility)
    visibility[0, 5], confidence[0, 5] = 0.9, 0.4  # visible, not confident: fails the gate
    visibility[0, 6], confidence[0, 6] = 0.5, 0.9  # visibility not strictly above 0.5
    visibility[1, 5], confidence[1, 5] = 0.9, 0.6  # passes; selection then ignores confidence:
    visibility[1, 7], confidence[1, 7] = 0.7, 0.0  # a visible point with zero confidence
    expected_second = [keypoints[1, 5].tolist(), keypoints[1, 7].tolist()]
    for mode, first_labels, first_has in (("best_keypoint", [1, -1, -1], True),
                                          ("empty", [-2, -1, -1], True),
                                          ("skip", [-1, -1, -1], False)):
        cfg = PromptConfig(num_points=3, no_prompt=mode)
        out = jit_select_prompts(keypoints, visibility, (100, 100), cfg, None, confidence)
        np.testing.assert_array_equal(out.labels[0], first_labels)
        assert bool(out.has_prompt[0]) == first_has
        assert positives(out, 1) == expected_second
        # person 2 has usable keypoints but none visible: only "skip" leaves it without a mask
        assert bool(out.has_prompt[2]) == (mode != "skip")
    best = jit_select_prompts(keypoints, visibility, (100, 100),
                              PromptConfig(num_points=3), None, confidence)
    assert positives(best, 0) == [keypoints[0, 5].tolist()]  # the most visible usable point
