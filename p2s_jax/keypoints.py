"""The COCO-17 person keypoints: names, skeleton, left/right flip pairs and the face group.

Every part of the project that knows keypoint order takes it from here: prompting (MaxSpread's
face rule), drawing (the skeleton), COCO I/O (17 triplets per person) and the training data's
horizontal flip (left and right swap slots).

Absent keypoints are NaN coordinates throughout (`labelled_points`): no prompt rule, sampler or
drawing can use them.
"""

from __future__ import annotations

import numpy as np

NUM_KEYPOINTS = 17
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's skeleton, 1-based keypoint indices as in person_keypoints_*.json.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
# Slot j of a horizontally flipped pose holds the mirrored keypoint FLIP_PERMUTATION[j].
FLIP_PERMUTATION = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
# MaxSpread's face rule keeps only the best of these (nose, left eye, right eye).
FACE_KEYPOINTS = (0, 1, 2)
NUM_FACE_KEYPOINTS = len(FACE_KEYPOINTS)


def labelled_points(triplets) -> tuple[np.ndarray, np.ndarray]:
    """COCO ground-truth keypoints (..., 17, 3) or flat (..., 51) with v in {0, 1, 2} ->
    keypoints (..., 17, 2) float32 and binary visibility (..., 17) float32.

    Labelled points (v > 0) score 1.0. Unlabelled points (v = 0) score 0.0 and get NaN
    coordinates, so that no rule ever uses them (their COCO coordinates are (0, 0)).
    """
    array = np.asarray(triplets, dtype=np.float32)
    if array.shape[-1] == 3 * NUM_KEYPOINTS:
        array = array.reshape(*array.shape[:-1], NUM_KEYPOINTS, 3)
    if array.shape[-2:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"COCO keypoints must have shape (..., {NUM_KEYPOINTS}, 3) or "
                         f"(..., {3 * NUM_KEYPOINTS}), got {np.shape(triplets)}")
    labelled = array[..., 2] > 0
    keypoints = np.where(labelled[..., None], array[..., :2], np.float32(np.nan))
    return keypoints.astype(np.float32), labelled.astype(np.float32)
