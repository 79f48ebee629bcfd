"""The authors' inference, transcribed from reading BBoxMaskPose (`bboxmaskpose/sam2_utils.py`)
and the official `SAM2Transforms.postprocess_masks`, as test references. Written anew in plain
NumPy / scipy, one person at a time, as their code runs it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def authors_select(coords, confidence, visibility, method: str, num_points: int, argsort_desc,
                   thr: float = 0.5):
    """A transcription of BMP's `_pose2seg` positive-point path for one person, written from
    their code: gate `confidence > thr and visibility > thr` (strict, counted), the face anchor
    on visibility (not for k_most_visible), the `visibility >= thr` filter, then
    `k_most_visible` ranks by visibility and `distance+confidence` by confidence with the 80th
    percentile rule; the first `num_points` are kept. Returns keypoint indices, or None when
    the gate fails (their single mode then predicts with no points). `method`:
    'k_most_visible' or 'distance+confidence'.

    Unusable keypoints (ours: NaN or outside the image) enter with both scores -1.
    `argsort_desc(x)` is their `np.argsort(x)[::-1]`; pass a stable variant for ties."""
    if int(np.sum((confidence > thr) & (visibility > thr))) <= 0:
        return None
    kept = np.arange(len(coords))
    if method != "k_most_visible" and len(coords) >= 3:
        face = int(np.argmax(visibility[:3]))
        if visibility[face] >= thr:
            kept = np.concatenate([[face], np.arange(3, len(coords))])
    kept = kept[visibility[kept] >= thr]
    if method == "k_most_visible":
        return kept[argsort_desc(visibility[kept])][:num_points].tolist()
    ordered = kept[argsort_desc(confidence[kept])]
    points, available = coords[ordered], confidence[ordered].copy()
    greedy = [0]
    if len(ordered) > 1:
        dist = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2)
        available[0] = -1
        for _ in range(len(ordered) - 1):
            min_dist = np.min(dist[:, greedy], axis=1)
            min_dist[available < np.percentile(available, 80)] = -1
            greedy.append(int(np.argmax(min_dist)))
            available[greedy[-1]] = -1
    return ordered[greedy][:num_points].tolist()


def literal_argsort_desc(values):
    return np.argsort(values)[::-1]


def stable_argsort_desc(values):
    """The project's tie rule: equal scores rank the lower keypoint index first."""
    return np.lexsort((np.arange(len(values)), -values))


def authors_exclusive(masks: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """BMP `_apply_exclusive_masks`: per pixel the mask with the highest mask * score."""
    masks = np.asarray(masks, bool)
    winner = np.argmax(masks * iou[:, None, None], axis=0)
    owned = winner[None] == np.arange(len(masks))[:, None, None]
    return owned & masks.any(axis=0)[None]


def scipy_connected_components(mask):
    """A stand-in for the official CUDA `get_connected_components`: (N, 1, H, W) -> labels and
    areas (N, 1, H, W), 8-connected (`scipy.ndimage.label` with a 3 x 3 structure)."""
    import torch

    array = mask.cpu().numpy().astype(bool)
    labels = np.zeros(array.shape, np.int32)
    areas = np.zeros(array.shape, np.int32)
    for n in range(array.shape[0]):
        lab, _ = ndimage.label(array[n, 0], structure=np.ones((3, 3), int))
        labels[n, 0] = lab
        areas[n, 0] = np.where(lab > 0, np.bincount(lab.ravel())[lab], 0)
    return torch.from_numpy(labels), torch.from_numpy(areas)


class ConstantScheduler:
    """fvcore's ConstantParamScheduler (fvcore is not a dependency): the value at any `where`.
    The yaml's cosine lr schedulers start at their start_value, all the param groups need."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, where: float) -> float:
        return self.value
