"""Keypoint files of another skeleton made from COCO-17 ones: CrowdPose-14 in COCO format,
its neck the shoulders' midpoint (as CrowdPose defines it)."""

from __future__ import annotations

import numpy as np

from p2s_jax.keypoints import CROWDPOSE14

# COCO-17 slot of each CrowdPose-14 keypoint; None: the neck
FROM_COCO = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, None]


def crowdpose_keypoints(coco_keypoints) -> list[float]:
    """A person's 51 COCO-17 numbers -> its 42 CrowdPose-14 numbers (unlabelled: 0, 0, 0)."""
    coco = np.asarray(coco_keypoints, np.float64).reshape(17, 3)
    neck = np.append((coco[5, :2] + coco[6, :2]) / 2, min(coco[5, 2], coco[6, 2]))
    crowd = np.stack([coco[j] if j is not None else neck for j in FROM_COCO])
    crowd[crowd[:, 2] == 0] = 0
    return [round(float(v), 2) for v in crowd.ravel()]


def as_crowdpose(data: dict, title_case: bool = False) -> dict:
    """A COCO-format dict with COCO-17 keypoints -> the same persons in CrowdPose-14 (names as
    CrowdPose writes them, or title-cased as some published files do)."""
    annotations = []
    for ann in data["annotations"]:
        keypoints = crowdpose_keypoints(ann["keypoints"])
        annotations.append({**ann, "keypoints": keypoints,
                            "num_keypoints": int(np.count_nonzero(keypoints[2::3]))})
    names = [n.replace("_", " ").title() if title_case else n
             for n in CROWDPOSE14.keypoint_names]
    categories = [{**c, "keypoints": names,
                   "skeleton": [[a + 1, b + 1] for a, b in CROWDPOSE14.skeleton]}
                  for c in data["categories"]]
    return {**data, "annotations": annotations, "categories": categories}
