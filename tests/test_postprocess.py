"""Small-region clean-up on the device against scipy's 8-connected labelling (the semantics of
the official `get_connected_components` kernel and `SAM2Transforms.postprocess_masks`), and
exclusive masks against a per-pixel loop."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from p2s_jax.inference.postprocess import MaskPostprocess, exclusive_masks, remove_small_regions
from p2s_jax.utils.errors import InputError

EIGHT_CONNECTED = np.ones((3, 3), int)


def reference(logits: np.ndarray, max_hole: float, max_sprinkle: float) -> np.ndarray:
    """`postprocess_masks` before upsampling, with scipy.ndimage.label as the labeller."""
    out = logits.astype(np.float32).copy()
    for region, area, value in ((logits <= 0, max_hole, 10.0), (logits > 0, max_sprinkle, -10.0)):
        if area <= 0:
            continue
        labels, _ = ndimage.label(region, structure=EIGHT_CONNECTED)
        areas = np.bincount(labels.ravel())
        small = (labels > 0) & (areas[labels] <= area)
        out[small] = value
    return out


def snake(size: int, length: int) -> np.ndarray:
    """A 1-pixel-wide boustrophedon path of `length` pixels (rows two apart, joined at the
    ends), whose 8-connected diameter is length - 1."""
    mask = np.zeros((size, size), bool)
    y, x, step, placed = 0, 0, 1, 0
    while placed < length:
        mask[y, x] = True
        placed += 1
        nx = x + step
        if 0 <= nx < size:
            x = nx
        else:  # go down two rows through the connecting pixel
            if placed < length:
                mask[y + 1, x] = True
                placed += 1
            y, step = y + 2, -step
    return mask


def spiral(size: int) -> np.ndarray:
    """A 1-pixel-wide square spiral with 1-pixel gaps: one component of diameter ~ size^2 / 2."""
    mask = np.zeros((size, size), bool)
    top, left, bottom, right = 0, 0, size - 1, size - 1
    while top <= bottom and left <= right:
        mask[top, left:right + 1] = True
        mask[top:bottom + 1, right] = True
        if bottom - top >= 2:
            mask[bottom, left:right + 1] = True
        if right - left >= 2:
            mask[top + 2:bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
        if top <= bottom:
            mask[top - 1, left] = True  # link into the next, inner turn
    return mask


def hand_made(size: int = 64) -> list[np.ndarray]:
    masks = []
    ring = np.zeros((size, size), bool)  # a ring with a 3x3 hole: the hole is filled
    ring[10:15, 10:15] = True
    ring[11:14, 11:14] = False
    masks.append(ring)
    diagonal = np.zeros((size, size), bool)  # pixels touching only at corners: one component
    for i in range(40):
        diagonal[i, i] = True
    diagonal[50, 3] = diagonal[51, 4] = True
    masks.append(diagonal)
    border = np.zeros((size, size), bool)  # components on every edge and corner
    border[0, :7] = border[-3:, -1] = border[20:31, 0] = border[-1, -1] = True
    border[0, -20:] = True
    masks.append(border)
    masks.append(snake(size, 50))  # area 50: a sprinkle, diameter 49
    masks.append(snake(size, 51))  # area 51: kept
    masks.append(spiral(size))  # one huge component with a long geodesic diameter
    masks.append(~spiral(size))  # its complement: the gaps, long background corridors
    masks.append(np.ones((size, size), bool))
    masks.append(np.zeros((size, size), bool))
    checker = (np.indices((size, size)).sum(0) % 2).astype(bool)  # diagonally connected
    masks.append(checker)
    return masks


def as_logits(masks: np.ndarray, rng) -> np.ndarray:
    magnitude = rng.uniform(0.01, 5.0, masks.shape).astype(np.float32)
    return np.where(masks, magnitude, -magnitude).astype(np.float32)


def test_random_and_hand_made_masks_match_scipy():
    rng = np.random.default_rng(0)
    size = 64
    random = [rng.random((size, size)) < p for p in (0.05, 0.2, 0.45, 0.55, 0.8, 0.95)]
    blobs = [ndimage.gaussian_filter(rng.standard_normal((size, size)), s) > 0
             for s in (0.7, 1.0, 2.0)]
    masks = np.stack(hand_made(size) + random + blobs)
    logits = as_logits(masks, rng)
    logits[0, 0, 0] = 0.0  # a logit of exactly 0 is background
    postprocess = MaskPostprocess(max_hole_area=10.0, max_sprinkle_area=50.0)  # the authors'
    ours = np.asarray(jax.jit(remove_small_regions, static_argnums=1)(logits, postprocess))
    for i in range(len(masks)):
        np.testing.assert_array_equal(ours[i], reference(logits[i], 10, 50), err_msg=f"mask {i}")
    # the probes do probe: holes filled, sprinkles removed, and the long shapes kept
    changed = (ours != logits).any(axis=(1, 2))
    assert changed[0] and changed[3] and not changed[4] and not changed[5]


def test_full_size_logits_and_options():
    """256 x 256 (the b+ decoder's low-res size), holes only / sprinkles only, batch axes."""
    rng = np.random.default_rng(1)
    masks = rng.random((2, 3, 256, 256)) < 0.3
    logits = as_logits(masks, rng)
    for hole, sprinkle in ((10.0, 0.0), (0.0, 50.0), (4.5, 7.0)):
        ours = np.asarray(remove_small_regions(logits, MaskPostprocess(hole, sprinkle)))
        for index in np.ndindex(2, 3):
            np.testing.assert_array_equal(ours[index], reference(logits[index], hole, sprinkle))
    assert remove_small_regions(logits, MaskPostprocess()) is logits


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "10"])
def test_bad_areas_are_named(bad):
    with pytest.raises(InputError, match="max_hole_area"):
        MaskPostprocess(max_hole_area=bad)


def reference_exclusive_masks(masks, iou):
    out = np.zeros_like(masks)
    for y in range(masks.shape[1]):
        for x in range(masks.shape[2]):
            covering = [p for p in range(len(masks)) if masks[p, y, x]]
            if covering:
                out[max(covering, key=lambda p: (iou[p], -p)), y, x] = True
    return out


def test_exclusive_masks_match_loop():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 12, 16)) < 0.4
    for iou in (rng.random(5).astype(np.float32),
                np.array([0.7, 0.9, 0.9, 0.2, 0.7], np.float32),  # ties: lower index
                np.array([0.0, -0.5, 0.3, 0.0, 0.1], np.float32)):  # non-positive IoUs
        got = np.asarray(jax.jit(exclusive_masks)(masks, iou))
        np.testing.assert_array_equal(got, reference_exclusive_masks(masks, iou))
        assert got.sum(0).max() == 1 and (got <= masks).all()
        np.testing.assert_array_equal(got.any(0), masks.any(0))
    assert exclusive_masks(np.zeros((0, 4, 4), bool), np.zeros(0)).shape == (0, 4, 4)
