"""p2s_jax.data.matching: detections matched to ground-truth persons."""

from __future__ import annotations

import numpy as np
import pytest

from p2s_jax.data.matching import box_iou, match_detections

# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Using custom data configuration")


def test_match_two_overlapping_people():
    gt = np.array([[0, 0, 10, 20], [4, 0, 14, 20]], np.float32)  # IoU 6/14 with each other
    ids = np.array([7, 8])
    # 0: a false positive; 1: jittered person 8; 2: jittered person 7; 3: a lower duplicate of 7.
    dets = np.array([[40, 40, 50, 60], [4.5, 0, 14, 19], [0, 0.5, 10.5, 20], [0, 0, 9, 20]],
                    np.float32)
    scores = np.array([0.99, 0.8, 0.9, 0.5])
    np.testing.assert_array_equal(match_detections(gt, ids, dets, scores), [2, 1])
    for perm in ([3, 1, 0, 2], [2, 0, 3, 1], [1, 2, 3, 0]):
        inverse = np.argsort(perm)
        np.testing.assert_array_equal(match_detections(gt, ids, dets[perm], scores[perm]),
                                      inverse[[2, 1]])
    # Greedy by score: the best detection takes person 7 although it overlaps both people.
    both = np.array([[2, 0, 12, 20], [1, 0, 11, 20]], np.float32)
    assert box_iou(both[:1], gt)[0, 0] == box_iou(both[:1], gt)[0, 1]
    np.testing.assert_array_equal(match_detections(gt, ids, both, np.array([0.6, 0.9])), [1, 0])
    # A named id wins over a better box; an unknown id is an error.
    named = np.array([8, -1])
    np.testing.assert_array_equal(
        match_detections(gt, ids, dets[[2, 1]], scores[[2, 1]], named), [-1, 0])
    with pytest.raises(ValueError, match="annotation id 9"):
        match_detections(gt, ids, dets[:1], scores[:1], np.array([9]))
    # Below the IoU threshold: no match.
    far = np.array([[0, 12, 10, 32]], np.float32)
    np.testing.assert_array_equal(match_detections(gt, ids, far, np.array([1.0])), [-1, -1])
