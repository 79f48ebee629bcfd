"""Person poses: the prompts of SAM-pose2seg, and which keypoint score channel ranks and gates
them.

A pose carries per-keypoint score channels (`SCORE_NAMES`): 'visibility' (ProbPose's, or binary
v > 0 for ground truth), 'presence', 'expected_oks' and 'confidence' (the s of each [x, y, s]).
A run uses two of them: the *visibility channel* ranks MaxVis and filters candidates, the
*confidence channel* gates a person's prompt and ranks MaxSpread (`inference.prompting`).
`resolve_channels` is the one rule every command applies: unnamed, the visibility channel is
'visibility' where the poses carry it, else 'confidence' (all a plain keypoint-results file
has), and the confidence channel is the visibility channel; a channel the poses lack is an
error naming the file and the option that chose it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from p2s_jax.keypoints import NUM_KEYPOINTS
from p2s_jax.utils.errors import InputError

# Per-keypoint score arrays a PoseInstances may carry ('confidence' is the s of each [x, y, s]).
SCORE_NAMES = ("visibility", "presence", "expected_oks", "confidence")


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) [x, y, w, h] -> (..., 4) [x0, y0, x1, y1], float32."""
    boxes = np.asarray(boxes, np.float32)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class PoseInstances:
    """The P person poses of one image: the prompts of SAM-pose2seg.

    Attributes:
      keypoints: (P, J, 2) float32 x, y in image pixels, in the order of the file's keypoint
        schema (`p2s_jax.keypoints`; J = 17 for COCO); NaN = absent.
      scores: name -> (P, J) float32 per-keypoint scores, names among `SCORE_NAMES`.
      boxes: (P, 4) float32 [x0, y0, x1, y1] person boxes, or None.
      det_score: (P,) float32 instance scores (1.0 for ground truth; ones when not given).
      ann_ids: (P,) int64 ground-truth annotation ids, or None for detections.
    """

    keypoints: np.ndarray
    scores: Mapping[str, np.ndarray]
    boxes: np.ndarray | None = None
    det_score: np.ndarray | None = None
    ann_ids: np.ndarray | None = None

    def __post_init__(self):
        keypoints = np.asarray(self.keypoints, np.float32)
        if keypoints.ndim != 3 or keypoints.shape[2] != 2:
            raise ValueError(f"keypoints must have shape (P, J, 2), got {keypoints.shape}")
        num, joints = keypoints.shape[:2]
        scores = {}
        for name, value in self.scores.items():
            if name not in SCORE_NAMES:
                raise ValueError(f"unknown keypoint score {name!r}; expected one of {SCORE_NAMES}")
            scores[name] = _shaped(value, (num, joints), f"scores[{name!r}]", np.float32)
        boxes = None if self.boxes is None else _shaped(self.boxes, (num, 4), "boxes", np.float32)
        det_score = (np.ones(num, np.float32) if self.det_score is None
                     else _shaped(self.det_score, (num,), "det_score", np.float32))
        ann_ids = None if self.ann_ids is None else _shaped(self.ann_ids, (num,), "ann_ids",
                                                            np.int64)
        for field, value in (("keypoints", keypoints), ("scores", scores), ("boxes", boxes),
                             ("det_score", det_score), ("ann_ids", ann_ids)):
            object.__setattr__(self, field, value)

    def __len__(self) -> int:
        return self.keypoints.shape[0]

    @classmethod
    def empty(cls, score_names: Iterable[str] = (), with_boxes: bool = False,
              num_keypoints: int = NUM_KEYPOINTS) -> PoseInstances:
        """No person (P = 0), with the given score names (and boxes), so that shapes line up."""
        return cls(np.zeros((0, num_keypoints, 2), np.float32),
                   {n: np.zeros((0, num_keypoints), np.float32) for n in score_names},
                   np.zeros((0, 4), np.float32) if with_boxes else None)

    def select(self, index: np.ndarray | Sequence[int]) -> PoseInstances:
        """The persons picked by integer indices or a (P,) boolean mask, in that order."""
        index = np.asarray(index)
        return PoseInstances(
            self.keypoints[index], {k: v[index] for k, v in self.scores.items()},
            None if self.boxes is None else self.boxes[index], self.det_score[index],
            None if self.ann_ids is None else self.ann_ids[index])


def _shaped(value: Any, shape: tuple[int, ...], name: str, dtype) -> np.ndarray:
    array = np.asarray(value, dtype)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


# ------------------------------------------------------------------------------ score channels


class ScoreChannels(NamedTuple):
    """The two score channels of a run (names among `SCORE_NAMES`)."""

    visibility: str  # ranks MaxVis, filters candidates
    confidence: str  # gates a person's prompt, ranks MaxSpread


def resolve_channels(poses: PoseInstances | Iterable[PoseInstances],
                     visibility: str | None = None, confidence: str | None = None,
                     source: Any = "the poses") -> ScoreChannels:
    """The channels a run uses on `poses` (one image's, or every image's: they carry the same
    names): `visibility` None -> 'visibility' where the poses carry it, else 'confidence';
    `confidence` None -> the visibility channel.

    Raises:
      InputError: a channel the poses do not carry, naming `source`, what they have, and the
        option that chooses the channel.
    """
    if isinstance(poses, PoseInstances):
        poses = [poses]
    carried = next((sorted(p.scores) for p in poses), ["confidence", "visibility"])
    visibility = visibility or ("visibility" if "visibility" in carried else "confidence")
    channels = ScoreChannels(visibility, confidence or visibility)
    for option, name in (("--score-type", channels.visibility),
                         ("--confidence-score", channels.confidence)):
        if name not in carried:
            raise InputError(f"{source}: the poses carry no {name!r} keypoint scores (they have "
                             f"{carried}); choose another {option}")
    return channels


# ------------------------------------------------------------------------------ arrays for a run


class PoseArrays(NamedTuple):
    """One image's people as arrays for the device."""

    keypoints: np.ndarray  # (P, J, 2) float32, NaN = absent
    scores: np.ndarray  # (P, J) float32 visibility channel
    confidence: np.ndarray  # (P, J) float32 confidence channel
    boxes: np.ndarray | None  # (P, 4) float32 xyxy
    det_score: np.ndarray  # (P,) float32


def pose_arrays(poses: PoseInstances, channels: ScoreChannels, box: str = "none",
                where: Any = "the poses") -> PoseArrays:
    """The arrays a run feeds the device for one image's `poses`, checked (`check_pose_arrays`);
    `box`: the prompt's box mode (`PromptConfig.box`; any but "none" needs every person's
    box). Errors name `where`."""
    for name in channels:
        if name not in poses.scores:
            raise InputError(f"{where}: the poses carry no {name!r} keypoint scores (they have "
                             f"{sorted(poses.scores)}); choose another score type (e.g. "
                             "--score-type confidence for plain COCO keypoint results)")
    if box != "none" and poses.boxes is None:
        raise InputError(f"{where}: box prompts ({box!r}) need person boxes, but the poses have "
                         "none (a keypoint file needs a 'bbox' for every person)")
    scores, confidence = poses.scores[channels.visibility], poses.scores[channels.confidence]
    check_pose_arrays(poses.keypoints, scores, where, poses.boxes)
    check_pose_arrays(poses.keypoints, confidence, where)
    return PoseArrays(poses.keypoints, scores, confidence, poses.boxes, poses.det_score)


def check_pose_arrays(keypoints, scores, where: Any, boxes=None) -> None:
    """Raises InputError on malformed poses of one image, naming `where` and the person.

    keypoints (P, J, 2), scores (P, J) finite (NaN coordinates are allowed and mean "absent";
    a NaN score is an error), boxes None or (P, 4).
    """
    keypoints, scores = np.asarray(keypoints), np.asarray(scores)
    if keypoints.ndim != 3 or keypoints.shape[2] != 2:
        raise InputError(f"{where}: keypoints must have shape (P, J, 2), got {keypoints.shape}")
    if scores.shape != keypoints.shape[:2]:
        raise InputError(f"{where}: scores shape {scores.shape} does not match keypoints "
                         f"shape {keypoints.shape} (expected {keypoints.shape[:2]})")
    if boxes is not None and np.shape(boxes) != (keypoints.shape[0], 4):
        raise InputError(f"{where}: boxes must have shape ({keypoints.shape[0]}, 4), "
                         f"got {np.shape(boxes)}")
    bad_people = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad_people.size:
        person = int(bad_people[0])
        raise InputError(f"{where}: person index {person} has non-finite keypoint scores "
                         f"{scores[person].tolist()} (people affected: {bad_people.tolist()})")
