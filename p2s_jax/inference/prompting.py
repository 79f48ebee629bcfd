"""Human poses to SAM prompts (SAM-pose2seg, Sec. 3.3 and 4.3.2-4.3.3, Tables 3-5, Supp. A).

Every person of an image becomes one prompt: a fixed number K of slots, each a point in
original-image pixels (x, y) with a SAM label: 1 positive keypoint, 0 negative keypoint,
2 / 3 top-left / bottom-right box corner, -1 padding.  Real prompts come first, in the order the
official `SAM2ImagePredictor` concatenates them (box corners, positives, negatives); padding
fills the rest, with coordinates 0.  One compiled function therefore serves every pose, and the
functions here are pure, jit-able (the `PromptConfig` is static) and vmapped over the people.

Which keypoints may be used: two score channels, as in the authors' code
    Every keypoint has a *visibility* score (`scores`: ProbPose visibility by default, Supp.
    Tab. 6, or the binary 0 / 1 of ground-truth poses, `p2s_jax.keypoints.labelled_points`) and
    a *confidence* (`confidence`: the s of ProbPose's [x, y, s] triplets; the visibility itself
    when not given).  A keypoint is *usable* when its coordinates are finite and, with
    `outside_keypoints="drop"`, inside the image (0 <= x < W, 0 <= y < H); other keypoints
    never become prompts, not even negatives, and take part in no rule below (COCO v = 0
    points get NaN coordinates, so they are never used).  With `outside_keypoints="use"` (the
    authors, and both presets) a keypoint outside the photo that passes the thresholds is a
    prompt point as given: the authors' `_pose2seg` gates and ranks by scores only, and the
    official predictor normalises point coordinates without clipping them.  ProbPose predicts
    such keypoints by design.  A usable keypoint is *visible* when its visibility is >=
    `visibility_threshold`.
    The gate (BMP `_pose2seg`): a person is prompted from its visible keypoints only if some
    usable keypoint has confidence > `confidence_threshold` *and* visibility >
    `visibility_threshold` (both strict).  A person who fails the gate gets, by `no_prompt`:
    * "best_keypoint" (our default): its single most visible usable keypoint as the only
      positive point; `has_prompt = False` if it has no usable keypoint at all.  A weak pose
      still says where the person is, and a mask there is worth more to AP than none.
    * "empty": the official predictor called with an empty point array (one not-a-point
      token, label `LABEL_EMPTY` in the first slot), which is what the authors' single-image
      mode does (`bmp_v2.yaml`: batch False); SAM then segments what it finds salient.
    * "skip": no prompt and no mask (`has_prompt = False`), the authors' batch mode.

MaxVis_n (Sec. 4.3.2, the SAM-pose2seg prompt with n = 3; BMP `k_most_visible`)
    The n visible keypoints with the highest visibility, best first.  No face rule.

MaxSpread_n (Sec. 4.3.2, from BBox-Mask-Pose; BMP `distance+confidence`)
    1. Face rule: of nose and both eyes only the most visible usable one stays (ears stay).
    2. Candidates: the visible keypoints, ranked by confidence, best first.
    3. The first pick is the best candidate.  Each next pick is the candidate farthest (Euclidean,
       pixels) from its nearest already-picked point (k-means++ seeding, ref. [4]).
    4. The authors' percentile rule (`spread_percentile`, 80; None switches it off): before each
       pick, the candidates' "remaining scores" (confidences) are taken, with -1 for points already picked,
       and every candidate whose remaining score is below `np.percentile(remaining, 80)`
       (linear interpolation) is excluded (its distance is set to -1).  In exact arithmetic that
       percentile excludes precisely the scores below the sorted remaining score at index
       ceil(0.8 (m - 1)) of the m candidates, which is what is computed here (no float
       interpolation; numpy interpolates in float32 and can differ only when two scores are a
       couple of float32 ulps apart).  Picked points are excluded only through their -1 score,
       as in the authors' code: once the percentile itself is -1 a point can be picked again,
       which happens only when every remaining candidate sits exactly on a picked point.
       With the rule switched off, picked points are simply never picked again.
    Tie-breaking: candidates are ranked by score, then by keypoint index (lower first); a
    distance tie goes to the earlier-ranked candidate (numpy's first argmax, the authors' rule).
    The authors rank with `np.argsort(score)[::-1]`, whose order for equal scores depends on
    numpy's sort kernel (the SIMD kernels of numpy 2 are not stable), so the index rule is ours.

Negative points (Supp. A.1, Tab. 5), `num_negatives` of them, label 0
    * "closest_other": the visible keypoints of the other people of the image closest to this
      person's centre: the centre of its box when `boxes` are passed (the authors measure to the
      detection box centre), else the centre of the box around its usable keypoints.  Ties: lower
      (person, keypoint) index.  (The authors' code also runs the face rule over the first three
      entries of the concatenated other people's keypoints; that accident is not reproduced.)
    * "least_visible_own": the person's own usable keypoints with the lowest scores that are not
      positive prompts.  Ties: lower keypoint index.

Boxes (Sec. 4.3.3, Tab. 4): "given" uses the box as passed (x0, y0, x1, y1); "inflated" scales it
about its centre by `box_inflation` (2.0: every side pushed out by 50 % of the box size, 400 % of
the area) and clips it to [0, W] x [0, H].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from p2s_jax.keypoints import COCO17
from p2s_jax.utils.errors import InputError


LABEL_EMPTY = -2  # padding that keeps the not-a-point token: a prompt with no points
LABEL_PADDING = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

Selection = Literal["maxvis", "maxspread"]
Negatives = Literal["none", "closest_other", "least_visible_own"]
BoxMode = Literal["none", "given", "inflated"]
NoPrompt = Literal["best_keypoint", "empty", "skip"]
OutsideKeypoints = Literal["use", "drop"]


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a pose becomes a prompt (hashable: pass it as a static argument).

    Attributes:
      selection: 'maxvis' (highest scores) or 'maxspread' (farthest apart), see above.
      num_points: positive keypoints per person (n of MaxVis_n / MaxSpread_n).
      visibility_threshold: a usable keypoint is visible when its visibility is >= this.
      confidence_threshold: the gate's confidence bound (strict), see above; None: the
        visibility threshold (the authors set both to 0.5).
      no_prompt: what a person who fails the gate gets: 'best_keypoint', 'empty' or 'skip'.
      spread_percentile: MaxSpread's percentile rule; None disables it (MaxSpread only).
      face_rule: keep only the best of nose and eyes; None: on for MaxSpread, off for MaxVis
        (the authors' code).
      face: the slots of the nose and eyes in the pose's schema (`KeypointSchema.face`;
        COCO-17's by default, empty for schemas without eyes: the rule then keeps all).
      negatives: 'none', 'closest_other' (other people's keypoints) or 'least_visible_own'.
      num_negatives: negative points per person when `negatives` is not 'none'.
      box: 'none', 'given' (the pose's box) or 'inflated' (scaled about its centre).
      box_inflation: side-length factor of 'inflated'.
      max_slots: K, the prompt length; None: just enough slots for this configuration.
      outside_keypoints: 'drop' (the project's default: a point off the photo marks no pixel
        SAM sees, and its position encoding lies outside the range SAM was trained on) or
        'use' (the authors' code and both presets: such a keypoint is prompted as given).
    """

    selection: Selection = "maxvis"
    num_points: int = 3
    visibility_threshold: float = 0.5
    confidence_threshold: float | None = None
    no_prompt: NoPrompt = "best_keypoint"
    spread_percentile: float | None = 80.0
    face_rule: bool | None = None
    face: tuple = COCO17.face
    negatives: Negatives = "none"
    num_negatives: int = 1
    box: BoxMode = "none"
    box_inflation: float = 2.0
    max_slots: int | None = None
    outside_keypoints: OutsideKeypoints = "drop"

    def __post_init__(self):
        if self.selection not in ("maxvis", "maxspread"):
            raise InputError(f"selection must be 'maxvis' or 'maxspread', got {self.selection!r}")
        if self.negatives not in ("none", "closest_other", "least_visible_own"):
            raise InputError(f"unknown negatives mode {self.negatives!r}")
        if self.box not in ("none", "given", "inflated"):
            raise InputError(f"unknown box mode {self.box!r}")
        if self.outside_keypoints not in ("use", "drop"):
            raise InputError(f"outside_keypoints must be 'use' or 'drop', got "
                             f"{self.outside_keypoints!r}")
        if self.no_prompt not in ("best_keypoint", "empty", "skip"):
            raise InputError(f"no_prompt must be 'best_keypoint', 'empty' or 'skip', "
                             f"got {self.no_prompt!r}")
        if self.num_points < 1:
            raise InputError(f"num_points must be >= 1, got {self.num_points}")
        if self.visibility_threshold < 0.0:  # scores are probabilities; -1 marks picked points
            raise InputError(f"visibility_threshold must be >= 0, got {self.visibility_threshold}")
        if self.num_negatives < 1:
            raise InputError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if self.spread_percentile is not None and not 0.0 <= self.spread_percentile <= 100.0:
            raise InputError(f"spread_percentile must be in [0, 100], got {self.spread_percentile}")
        if self.box_inflation <= 0.0:
            raise InputError(f"box_inflation must be positive, got {self.box_inflation}")
        if self.max_slots is not None and self.max_slots < self.required_slots:
            raise InputError(
                f"max_slots={self.max_slots} < {self.required_slots} slots this configuration "
                f"needs ({self.num_box_slots} box + {self.num_points} positive + "
                f"{self.num_negative_slots} negative)")

    @property
    def gate_confidence(self) -> float:
        return (self.visibility_threshold if self.confidence_threshold is None
                else self.confidence_threshold)

    @property
    def uses_face_rule(self) -> bool:
        return self.selection == "maxspread" if self.face_rule is None else self.face_rule

    @property
    def num_negative_slots(self) -> int:
        return 0 if self.negatives == "none" else self.num_negatives

    @property
    def num_box_slots(self) -> int:
        return 0 if self.box == "none" else 2

    @property
    def required_slots(self) -> int:
        return self.num_box_slots + self.num_points + self.num_negative_slots

    @property
    def num_slots(self) -> int:
        """K, the length of every prompt."""
        return self.required_slots if self.max_slots is None else self.max_slots


class Prompts(NamedTuple):
    """SAM prompts of the people of one image (K = `PromptConfig.num_slots`)."""

    coords: jax.Array  # (P, K, 2) float32, (x, y) in original-image pixels; 0 in padding slots
    labels: jax.Array  # (P, K) int32: 1 positive, 0 negative, 2 / 3 box corners, -1 padding
    has_prompt: jax.Array  # (P,) bool: False when the person gets no mask (see `no_prompt`)


# --------------------------------------------------------------------------------------------
# Per-person rules (J keypoints of one person); vmapped over people by `select_prompts`.


def _usable_keypoints(keypoints: jax.Array, image_hw: jax.Array,
                      outside: OutsideKeypoints = "drop") -> jax.Array:
    """keypoints (..., 2) (x, y), image_hw (2,) -> (...) bool: finite, and inside the image
    unless `outside` is 'use'."""
    x, y = keypoints[..., 0], keypoints[..., 1]
    finite = jnp.isfinite(x) & jnp.isfinite(y)
    if outside == "use":
        return finite
    height, width = image_hw[0], image_hw[1]
    return finite & (x >= 0) & (y >= 0) & (x < width) & (y < height)


def _rank(keys: jax.Array, candidates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """keys (J,), candidates (J,) bool -> (order (J,) int32, count () int32).

    Indices sorted by ascending key, candidates first, ties to the lower index.
    """
    indices = jnp.arange(keys.shape[0])
    keys = jnp.where(candidates & (keys != 0), keys, 0.0)  # sorting tells -0.0 from +0.0
    order = jnp.lexsort((indices, keys, ~candidates))
    return order.astype(jnp.int32), candidates.sum(dtype=jnp.int32)


def _face_rule_keep(visibility: jax.Array, usable: jax.Array, face: tuple) -> jax.Array:
    """(J,), (J,) -> (J,) bool: False for the face keypoints (slots `face`) other than the most
    visible usable one; all True without a face group."""
    index = jnp.arange(visibility.shape[0])
    if not face:
        return jnp.ones(visibility.shape, bool)
    face = jnp.asarray(face)
    face_scores = jnp.where(usable[face], visibility[face], -jnp.inf)
    best_face = face[jnp.argmax(face_scores)]  # first maximum: nose, then left eye, right eye
    return ~jnp.isin(index, face) | (index == best_face)


def _pairwise_distance(points: jax.Array) -> jax.Array:
    """(J, 2) -> (J, J) Euclidean distances."""
    delta = points[:, None, :] - points[None, :, :]
    return jnp.sqrt(jnp.sum(delta * delta, axis=-1))


def _percentile_cutoff_ranks(num_keypoints: int, percentile: float) -> np.ndarray:
    """(J + 1,) int32: for m candidates, the index into their ascending scores of the smallest
    score not below their linear-interpolation `percentile` (numpy's default method), i.e. the
    ceiling of numpy's virtual index (m - 1) q / 100.  A fractional part below 1e-9 is float64
    noise (e.g. 4.000000000000001) that numpy's float32 interpolation cannot see either."""
    ranks = [0]
    for count in range(1, num_keypoints + 1):
        virtual_index = (count - 1) * (percentile / 100.0)
        floor = math.floor(virtual_index)
        ranks.append(min(floor + (virtual_index - floor > 1e-9), count - 1))
    return np.asarray(ranks, dtype=np.int32)


def _max_vis(scores: jax.Array, visible: jax.Array, num_points: int):
    """(J,), (J,) -> (indices (n,) int32, valid (n,) bool): the best-scoring visible keypoints."""
    order, count = _rank(-scores, visible)
    return order[:num_points], jnp.arange(num_points) < count


def _max_spread(points: jax.Array, scores: jax.Array, visible: jax.Array, num_points: int,
                percentile: float | None):
    """(J, 2), (J,), (J,) -> (indices (n,) int32, valid (n,) bool): farthest-point picks.

    Works in the score ranking, like the authors' code, so that `argmax` (first maximum) breaks
    distance ties towards the better-ranked candidate.
    """
    order, count = _rank(-scores, visible)
    ranked_points, ranked_scores, ranked_visible = points[order], scores[order], visible[order]
    distances = _pairwise_distance(ranked_points)
    if percentile is not None:
        cutoff_ranks = jnp.asarray(_percentile_cutoff_ranks(scores.shape[0], percentile))

    def pick_next(step, state):
        picks, picked, remaining_scores, nearest_pick = state
        if percentile is None:
            excluded = picked
        else:
            ascending = jnp.sort(jnp.where(ranked_visible, remaining_scores, jnp.inf))
            excluded = remaining_scores < ascending[cutoff_ranks[count]]
        spread = jnp.where(ranked_visible, jnp.where(excluded, -1.0, nearest_pick), -jnp.inf)
        pick = jnp.argmax(spread).astype(jnp.int32)
        return (picks.at[step].set(pick), picked.at[pick].set(True),
                remaining_scores.at[pick].set(-1.0), jnp.minimum(nearest_pick, distances[pick]))

    first_pick = (
        jnp.zeros(num_points, jnp.int32),  # picks, in ranking positions; the first is the best
        jnp.zeros(scores.shape[0], bool).at[0].set(True),  # picked
        ranked_scores.at[0].set(-1.0),  # the authors' "available scores": -1 once picked
        distances[0],  # distance of every candidate to its nearest picked point
    )
    picks = jax.lax.fori_loop(1, num_points, pick_next, first_pick)[0]
    return order[picks], jnp.arange(num_points) < count


def _positive_keypoints(points: jax.Array, visibility: jax.Array, confidence: jax.Array,
                        usable: jax.Array, config: PromptConfig):
    """One person: points (J, 2), visibility (J,), confidence (J,), usable (J,) ->
    (indices (n,), valid (n,), gated ()): the positive keypoints, and whether the person passed
    the gate (if not, the indices follow `config.no_prompt`)."""
    visible = usable & (visibility >= config.visibility_threshold)
    if config.uses_face_rule:
        visible &= _face_rule_keep(visibility, usable, config.face)
    if config.selection == "maxvis":
        indices, valid = _max_vis(visibility, visible, config.num_points)
    else:
        indices, valid = _max_spread(points, confidence, visible, config.num_points,
                                     config.spread_percentile)

    gated = jnp.any(usable & (confidence > config.gate_confidence)
                    & (visibility > config.visibility_threshold))
    if config.no_prompt == "best_keypoint":
        fallback = jnp.argmax(jnp.where(usable, visibility, -jnp.inf)).astype(jnp.int32)
        fallback_valid = (jnp.arange(config.num_points) == 0) & jnp.any(usable)
    else:
        fallback, fallback_valid = 0, jnp.zeros(config.num_points, bool)
    indices = jnp.where(gated, indices, fallback)
    valid = jnp.where(gated, valid, fallback_valid)
    return indices, valid, gated


def _least_visible_own(scores: jax.Array, usable: jax.Array, is_positive: jax.Array,
                       num_negatives: int):
    """(J,), (J,), (J,) -> (indices (m,), valid (m,)): own lowest-scoring non-positive points."""
    order, count = _rank(scores, usable & ~is_positive)
    return order[:num_negatives], jnp.arange(num_negatives) < count


def _closest_other(person: jax.Array, centre: jax.Array, all_points: jax.Array,
                   all_visible: jax.Array, num_negatives: int):
    """person (), centre (2,), all_points (P, J, 2), all_visible (P, J) ->
    (flat indices (m,) into P * J, valid (m,)): other people's visible points nearest `centre`."""
    other = jnp.arange(all_visible.shape[0])[:, None] != person
    candidates = (all_visible & other).reshape(-1)
    delta = all_points.reshape(-1, 2) - centre
    order, count = _rank(jnp.sqrt(jnp.sum(delta * delta, axis=-1)), candidates)
    return order[:num_negatives], jnp.arange(num_negatives) < count


def _pose_box_centre(points: jax.Array, usable: jax.Array) -> jax.Array:
    """(J, 2), (J,) -> (2,): centre of the box around the usable keypoints (0 if none)."""
    low = jnp.min(jnp.where(usable[:, None], points, jnp.inf), axis=0)
    high = jnp.max(jnp.where(usable[:, None], points, -jnp.inf), axis=0)
    return jnp.where(jnp.any(usable), (low + high) / 2, 0.0)


def _box_corners(box: jax.Array, image_hw: jax.Array, config: PromptConfig) -> jax.Array:
    """box (4,) xyxy -> (2, 2) corners [(x0, y0), (x1, y1)], inflated and clipped if asked."""
    corners = box.reshape(2, 2)
    if config.box == "inflated":
        centre = corners.mean(axis=0)
        half_size = (corners[1] - corners[0]) / 2 * config.box_inflation
        image_max = jnp.stack([image_hw[1], image_hw[0]])  # (W, H)
        corners = jnp.clip(jnp.stack([centre - half_size, centre + half_size]), 0.0, image_max)
    return corners


def _compact(coords: jax.Array, labels: jax.Array, num_slots: int):
    """coords (S, 2), labels (S,) -> (K, 2), (K,): real prompts first (order kept), then padding."""
    order = jnp.argsort(labels == LABEL_PADDING, stable=True)
    coords, labels = coords[order], labels[order]
    coords = jnp.where((labels < 0)[:, None], 0.0, coords)
    padding = num_slots - labels.shape[0]
    return (jnp.pad(coords, ((0, padding), (0, 0))),
            jnp.pad(labels, (0, padding), constant_values=LABEL_PADDING))


# --------------------------------------------------------------------------------------------
# Public entry points.


def person_keypoints(keypoints, visibility, image_hw, config: PromptConfig):
    """One person's positive keypoints in prompt order, without the `no_prompt` fallback:
    keypoints (J, 2), visibility (J,), image_hw (2,) -> (indices (n,) int32, valid (n,) bool).
    The training samplers `max_vis` / `max_spread` walk through them point by point."""
    keypoints = jnp.asarray(keypoints, jnp.float32)
    visibility = jnp.asarray(visibility, jnp.float32)
    usable = _usable_keypoints(keypoints, jnp.asarray(image_hw, jnp.float32))
    points = jnp.where(usable[:, None], keypoints, 0.0)
    indices, valid, gated = _positive_keypoints(points, visibility, visibility, usable,
                                                dataclasses.replace(config, no_prompt="skip"))
    return indices, valid & gated


def select_prompts(keypoints, scores, image_hw, config: PromptConfig, boxes=None,
                   confidence=None) -> Prompts:
    """Prompts for all people of one image.

    keypoints (P, J, 2) float (x, y) original-image pixels (NaN = absent); scores (P, J) float
    visibilities, finite (see `poses.check_pose_arrays`); image_hw (2,) = (H, W), Python ints or
    an array; boxes None or (P, 4) xyxy (needed when config.box != "none"; when given, also
    the reference point of "closest_other" negatives); confidence None (= scores) or (P, J)
    (the gate and MaxSpread's ranking).  Jit with `config` static:
    `jax.jit(select_prompts, static_argnames="config")`.  Returns `Prompts` with K slots.
    """
    keypoints = jnp.asarray(keypoints, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    confidence = scores if confidence is None else jnp.asarray(confidence, jnp.float32)
    image_hw = jnp.asarray(image_hw, jnp.float32)
    if config.box != "none" and boxes is None:
        raise ValueError(f"box mode {config.box!r} needs boxes (P, 4)")
    num_people, num_joints = scores.shape
    if keypoints.shape != (num_people, num_joints, 2):
        raise ValueError(f"keypoints {keypoints.shape} and scores {scores.shape} do not match")
    if config.num_points > num_joints or any(f >= num_joints for f in config.face):
        raise InputError(f"num_points {config.num_points} / face slots {config.face} do not fit "
                         f"poses of {num_joints} keypoints")

    usable = _usable_keypoints(keypoints, image_hw, config.outside_keypoints)  # (P, J)
    points = jnp.where(usable[..., None], keypoints, 0.0)  # no NaN past this point
    positive_index, positive_valid, gated = jax.vmap(
        lambda p, s, c, u: _positive_keypoints(p, s, c, u, config))(
            points, scores, confidence, usable)  # (P, n), (P, n), (P,)
    empty_prompt = ~gated if config.no_prompt == "empty" else jnp.zeros_like(gated)
    has_prompt = positive_valid[:, 0] | empty_prompt
    people = jnp.arange(num_people)[:, None]

    coords = [points[people, positive_index]]
    positive_labels = jnp.where(positive_valid, LABEL_POSITIVE, LABEL_PADDING)
    labels = [positive_labels.at[:, 0].set(
        jnp.where(empty_prompt, LABEL_EMPTY, positive_labels[:, 0]))]

    if config.negatives == "least_visible_own":
        is_positive = jnp.zeros_like(usable).at[people, positive_index].max(positive_valid)
        negative_index, negative_valid = jax.vmap(
            lambda s, u, pos: _least_visible_own(s, u, pos, config.num_negatives))(
                scores, usable, is_positive)
        coords.append(points[people, negative_index])
        labels.append(jnp.where(negative_valid, LABEL_NEGATIVE, LABEL_PADDING))
    elif config.negatives == "closest_other":
        if boxes is None:
            centres = jax.vmap(_pose_box_centre)(points, usable)
        else:
            centres = jnp.asarray(boxes, jnp.float32).reshape(num_people, 2, 2).mean(axis=1)
        visible = usable & (scores >= config.visibility_threshold)
        flat_index, negative_valid = jax.vmap(
            lambda person, centre: _closest_other(person, centre, points, visible,
                                                  config.num_negatives))(
                jnp.arange(num_people), centres)
        coords.append(points.reshape(-1, 2)[flat_index])
        labels.append(jnp.where(negative_valid, LABEL_NEGATIVE, LABEL_PADDING))

    if config.box != "none":
        corners = jax.vmap(lambda b: _box_corners(b, image_hw, config))(
            jnp.asarray(boxes, jnp.float32))
        coords.insert(0, corners)
        labels.insert(0, jnp.broadcast_to(
            jnp.array([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]), (num_people, 2)))

    all_labels = jnp.where(has_prompt[:, None], jnp.concatenate(labels, axis=1), LABEL_PADDING)
    prompt_coords, prompt_labels = jax.vmap(
        lambda c, l: _compact(c, l, config.num_slots))(jnp.concatenate(coords, axis=1), all_labels)
    return Prompts(coords=prompt_coords.astype(jnp.float32),
                   labels=prompt_labels.astype(jnp.int32), has_prompt=has_prompt)
