"""PoseMaskRefine as the paper's text describes it (Sec. 3.2), an exact probability
distribution over the point drawn, in plain NumPy, as the test reference of
`p2s_jax.train.samplers` (written from the text, not from that module).

Sec. 3.2: MaskRefine (Meta's default) draws the first point "uniformly from the ground-truth
mask" and each next one "from the error region between the GT mask and the previous prediction
(with a small probability, sampling is done from the GT mask instead)". PoseMaskRefine: "the
initial point is ... selected as an available pose keypoint with the highest visibility, unless
no keypoint is available. In subsequent iterations, the remaining seven points are
preferentially sampled from pose keypoints located within the current error region; with a
small probability, sampling follows the original MaskRefine strategy and selects points
uniformly from the ground-truth mask instead. If no such keypoints exist, sampling reverts to
uniform selection from the error region."

What the text leaves open, filled in from Meta's training code, which the paper builds on:
the small probability is `prob_to_sample_from_gt_for_train` (0.1); a point drawn from the
error region is positive on a false negative, negative on a false positive; an error-free
prediction gives a negative point on the background (Meta's `sample_random_points_from_errors`);
a keypoint is the pixel under it, (floor(x + 0.5), floor(y + 0.5)), "available" when its
visibility is > 0 and that pixel is inside the image; "preferentially sampled from keypoints"
is uniform among the keypoints on error pixels, each labelled as its pixel's error; equal
highest visibilities go to the lower keypoint index (the text does not say).

Outcomes are (x, y, label): pixels as their integer (column, row), keypoints as given.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

PROB_FROM_GT = 0.1


def keypoint_pixel(point) -> tuple[int, int] | None:
    if not np.all(np.isfinite(point)):
        return None
    return int(np.floor(point[0] + 0.5)), int(np.floor(point[1] + 0.5))


def _available(keypoints, visibility, shape) -> list[int]:
    height, width = shape
    out = []
    for j, (point, vis) in enumerate(zip(keypoints, visibility)):
        pixel = keypoint_pixel(point)
        if vis > 0 and pixel is not None and 0 <= pixel[0] < width and 0 <= pixel[1] < height:
            out.append(j)
    return out


def error_draw(gt: np.ndarray, pred: np.ndarray | None) -> dict:
    """Meta's draw from the error region (None: no prediction, every GT pixel a miss)."""
    pred = np.zeros_like(gt) if pred is None else pred
    false_pos, false_neg = ~gt & pred, gt & ~pred
    if not (false_pos | false_neg).any():  # all correct: a negative on the background
        region, labels = ~gt, np.zeros_like(gt, int)
        if not region.any():  # nothing but object: Meta's argmax of zeros, pixel (0, 0)
            return {(0, 0, 0): 1.0}
    else:
        region, labels = false_pos | false_neg, false_neg.astype(int)
    rows, cols = np.nonzero(region)
    return {(int(c), int(r), int(labels[r, c])): 1.0 / len(rows) for r, c in zip(rows, cols)}


def first_point(gt, keypoints, visibility) -> dict:
    """The PoseMaskRefine first point: the most visible available keypoint (positive), else
    MaskRefine's first point."""
    available = _available(keypoints, visibility, gt.shape)
    if not available or not gt.any():
        return error_draw(gt, None)
    best = max(available, key=lambda j: (visibility[j], -j))
    return {(float(keypoints[best][0]), float(keypoints[best][1]), 1): 1.0}


def correction_point(gt, pred, keypoints, visibility, prob_from_gt: float = PROB_FROM_GT
                     ) -> dict:
    """A PoseMaskRefine correction point (see the module docstring)."""
    out = defaultdict(float)
    for outcome, p in error_draw(gt, None).items():  # "uniformly from the ground-truth mask"
        out[outcome] += prob_from_gt * p
    false_pos, false_neg = ~gt & pred, gt & ~pred
    on_errors = []
    for j in _available(keypoints, visibility, gt.shape):
        x, y = keypoint_pixel(keypoints[j])
        if false_pos[y, x] or false_neg[y, x]:
            on_errors.append((float(keypoints[j][0]), float(keypoints[j][1]),
                              int(false_neg[y, x])))
    rest = 1.0 - prob_from_gt
    if on_errors:
        for outcome in on_errors:
            out[outcome] += rest / len(on_errors)
    else:
        for outcome, p in error_draw(gt, pred).items():
            out[outcome] += rest * p
    return dict(out)
