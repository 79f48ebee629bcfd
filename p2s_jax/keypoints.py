"""Keypoint schemas: names, skeleton, left/right flip pairs and face group of each pose format.

Every part of the project that knows keypoint order takes it from a `KeypointSchema`:
prompting (MaxSpread's face rule), drawing (the skeleton), COCO I/O (J triplets per person) and
the training data's horizontal flip (left and right swap slots). Built in: COCO-17 (also the
body of COCO-WholeBody, whose files name the same 17), CrowdPose-14, AI Challenger-14, MPII-16
and Halpe-26; `register_schema` adds one.

A COCO-format file names its keypoints in `categories[].keypoints`; `schema_for_names` finds
the schema they spell, whatever the case and whether words are joined by spaces, hyphens or
underscores ("right_shoulder", "Right Shoulder", "r_shoulder" are one name). Flip pairs and the
face group follow from the names: "left_X" pairs with "right_X", and the face group is the
nose and eyes a schema has (empty without eyes: MaxSpread's face rule then keeps every point).

Absent keypoints are NaN coordinates throughout (`labelled_points`): no prompt rule, sampler or
drawing can use them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from p2s_jax.utils.errors import InputError

FACE_NAMES = ("nose", "left_eye", "right_eye")  # MaxSpread's face rule keeps the best of these


def normalize_name(name: str) -> str:
    """'Right Shoulder', 'right-shoulder', 'r_shoulder' -> 'right_shoulder'."""
    words = [w for w in re.split(r"[\s_\-]+", str(name).strip().lower()) if w]
    if words and words[0] in ("l", "r"):
        words[0] = {"l": "left", "r": "right"}[words[0]]
    return "_".join(words)


def mirrored_name(name: str) -> str:
    """'left_wrist' <-> 'right_wrist'; names without a side stay."""
    side, _, rest = name.partition("_")
    mirror = {"left": "right", "right": "left"}
    return f"{mirror[side]}_{rest}" if side in mirror else name


@dataclasses.dataclass(frozen=True)
class KeypointSchema:
    """One pose format.

    Attributes:
      name: what users call it ('coco17', 'crowdpose14', ...).
      keypoint_names: the J names in slot order (normalised: lower case, underscores).
      skeleton: limbs as 0-based slot pairs (for drawing).
    """

    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]

    def __post_init__(self):
        names = tuple(normalize_name(n) for n in self.keypoint_names)
        object.__setattr__(self, "keypoint_names", names)
        if len(set(names)) != len(names):
            raise InputError(f"schema {self.name!r}: repeated keypoint names {names}")
        for a, b in self.skeleton:
            if not (0 <= a < len(names) and 0 <= b < len(names)):
                raise InputError(f"schema {self.name!r}: skeleton pair ({a}, {b}) is outside "
                                 f"its {len(names)} keypoints")
        for name in names:
            if mirrored_name(name) not in names:
                raise InputError(f"schema {self.name!r}: {name!r} has no mirrored keypoint")

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)

    @property
    def flip_permutation(self) -> tuple[int, ...]:
        """Slot j of a horizontally flipped pose holds the mirrored keypoint [j]."""
        index = {n: i for i, n in enumerate(self.keypoint_names)}
        return tuple(index[mirrored_name(n)] for n in self.keypoint_names)

    @property
    def flip_pairs(self) -> tuple[tuple[int, int], ...]:
        """(left, right) slot pairs."""
        return tuple((i, j) for i, j in enumerate(self.flip_permutation)
                     if self.keypoint_names[i].startswith("left_"))

    @property
    def face(self) -> tuple[int, ...]:
        """The slots of the nose and eyes (in that order), for MaxSpread's face rule."""
        return tuple(self.keypoint_names.index(n) for n in FACE_NAMES if n in self.keypoint_names)


_COCO_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's skeleton, 1-based as in person_keypoints_*.json.
_COCO_SKELETON_1 = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
COCO17 = KeypointSchema("coco17", _COCO_NAMES, tuple((a - 1, b - 1) for a, b in _COCO_SKELETON_1))
CROWDPOSE14 = KeypointSchema(
    "crowdpose14",
    ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
     "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head",
     "neck"),
    ((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (0, 6), (1, 7), (6, 7),
     (6, 8), (8, 10), (7, 9), (9, 11)))
AIC14 = KeypointSchema(
    "aic14",
    ("right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
     "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "head_top",
     "neck"),
    ((12, 13), (13, 0), (13, 3), (0, 1), (1, 2), (3, 4), (4, 5), (0, 6), (3, 9), (6, 9),
     (6, 7), (7, 8), (9, 10), (10, 11)))
MPII16 = KeypointSchema(
    "mpii16",
    ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "pelvis",
     "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow", "right_shoulder",
     "left_shoulder", "left_elbow", "left_wrist"),
    ((0, 1), (1, 2), (2, 6), (3, 6), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (7, 12),
     (12, 11), (11, 10), (7, 13), (13, 14), (14, 15)))
HALPE26 = KeypointSchema(
    "halpe26",
    _COCO_NAMES + ("head", "neck", "hip", "left_big_toe", "right_big_toe", "left_small_toe",
                   "right_small_toe", "left_heel", "right_heel"),
    COCO17.skeleton + ((17, 18), (18, 19), (15, 20), (15, 22), (15, 24), (16, 21), (16, 23),
                       (16, 25)))

_SCHEMAS: dict[str, KeypointSchema] = {}


def register_schema(schema: KeypointSchema, *, overwrite: bool = False) -> KeypointSchema:
    """Adds `schema` under `schema.name` (files spelling its names then resolve to it)."""
    if schema.name in _SCHEMAS and not overwrite:
        raise InputError(f"schema {schema.name!r} is already registered (pass overwrite=True)")
    _SCHEMAS[schema.name] = schema
    return schema


for _schema in (COCO17, CROWDPOSE14, AIC14, MPII16, HALPE26):
    register_schema(_schema)


def available_schemas() -> tuple[str, ...]:
    return tuple(sorted(_SCHEMAS))


def get_schema(name: str) -> KeypointSchema:
    if name not in _SCHEMAS:
        raise InputError(f"unknown keypoint schema {name!r}; known: {list(available_schemas())}")
    return _SCHEMAS[name]


def schema_for_names(names: Sequence[str], where: str = "categories[].keypoints"
                     ) -> KeypointSchema:
    """The registered schema whose keypoints these names spell, in this order."""
    wanted = tuple(normalize_name(n) for n in names)
    for schema in _SCHEMAS.values():
        if schema.keypoint_names == wanted:
            return schema
    same_size = [s for s in _SCHEMAS.values() if s.num_keypoints == len(wanted)]
    if same_size:
        closest = max(same_size, key=lambda s: len(set(s.keypoint_names) & set(wanted)))
        unknown = sorted({n for n in wanted if n not in closest.keypoint_names})
        detail = (f"closest: {closest.name}, which has no {unknown}" if unknown else
                  f"{closest.name} has these names in another order")
    else:
        detail = f"no schema has {len(wanted)} keypoints"
    raise InputError(f"{where}: the keypoint names {list(names)} fit no known schema ({detail}); "
                     f"known: {list(available_schemas())}; read them by position with --schema "
                     "NAME (data.schema in a training config), or register one with "
                     "p2s_jax.keypoints.register_schema")


def schema_for_count(count: int, where: str = "keypoints") -> KeypointSchema:
    """The one registered schema with `count` keypoints (for files that do not name them)."""
    matches = [s for s in _SCHEMAS.values() if s.num_keypoints == count]
    if len(matches) != 1:
        names = [s.name for s in matches]
        raise InputError(f"{where}: {count} keypoints per person "
                         + (f"fit several schemas {names}; name one (--schema)" if matches
                            else f"fit no schema; known: {list(available_schemas())}"))
    return matches[0]


# COCO-17, the paper's format and the default everywhere.
NUM_KEYPOINTS = COCO17.num_keypoints
KEYPOINT_NAMES = COCO17.keypoint_names
SKELETON = _COCO_SKELETON_1  # 1-based, as COCO files write it
FLIP_PERMUTATION = COCO17.flip_permutation
FACE_KEYPOINTS = COCO17.face
NUM_FACE_KEYPOINTS = len(FACE_KEYPOINTS)


def labelled_points(triplets, num_keypoints: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth keypoints (..., J, 3) or flat (..., 3 J) with v in {0, 1, 2} ->
    keypoints (..., J, 2) float32 and binary visibility (..., J) float32 (J = 17 unless
    `num_keypoints` says otherwise for flat input).

    Labelled points (v > 0) score 1.0. Unlabelled points (v = 0) score 0.0 and get NaN
    coordinates, so that no rule ever uses them (their COCO coordinates are (0, 0)).
    """
    array = np.asarray(triplets, dtype=np.float32)
    if array.ndim >= 2 and array.shape[-1] == 3:  # (..., J, 3)
        if num_keypoints and array.shape[-2] != num_keypoints:
            raise ValueError(f"keypoints must have shape (..., {num_keypoints}, 3), got "
                             f"{np.shape(triplets)}")
    else:  # flat (..., 3 J)
        joints = num_keypoints or NUM_KEYPOINTS
        if array.ndim == 0 or array.shape[-1] != 3 * joints:
            raise ValueError(f"keypoints must have shape (..., {joints}, 3) or "
                             f"(..., {3 * joints}), got {np.shape(triplets)}")
        array = array.reshape(*array.shape[:-1], joints, 3)
    labelled = array[..., 2] > 0
    keypoints = np.where(labelled[..., None], array[..., :2], np.float32(np.nan))
    return keypoints.astype(np.float32), labelled.astype(np.float32)
