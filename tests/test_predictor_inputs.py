"""Bad input to the predictor gets a clear error; grayscale and RGBA images are converted."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import model_pair, photo


@pytest.fixture(scope="module")
def predictor():
    from p2s_jax.inference.predictor import Predictor

    _, ours = model_pair("sam2.1_hiera_t", 256)
    pred = Predictor(ours)
    pred.set_image(photo("camera")[..., 0][:200, :300])  # grayscale, 300 wide x 200 high
    return pred


def test_predict_before_set_image():
    from p2s_jax.inference.predictor import Predictor

    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(model_pair("sam2.1_hiera_t", 256)[1]).predict(np.zeros((1, 1, 2)), np.ones((1, 1), int))


@pytest.mark.parametrize("coords, labels, message", [
    (np.zeros((2, 3)), np.ones((2, 3), int), r"point_coords must be \(N, K, 2\)"),
    (np.zeros((2, 3, 2)), np.ones((2, 4), int), r"\(2, 3, 2\) and \(2, 4\)"),
    (np.full((1, 2, 2), 10.0), np.array([[1, 5]]), r"point_labels\[0, 1\] = 5"),
    (np.full((1, 2, 2), 10.0), np.array([[1.0, 1.0]]), "must be integers"),
    (np.array([[[10.0, 10.0], [np.nan, 3.0]]]), np.array([[1, 1]]), r"point_coords\[0, 1\] .* not finite"),
    (np.array([[[10.0, 10.0], [301.0, 3.0]]]), np.array([[1, 0]]), r"outside the 300x200"),
    (np.array([[[10.0, -0.5]]]), np.array([[1]]), r"point_coords\[0, 0\] = \[10.0, -0.5\] lies outside"),
])
def test_bad_points(predictor, coords, labels, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(coords, labels)


def test_nan_in_padding_slot_is_ignored(predictor):
    """A padding slot carries no coordinate: NaN there is not an error and changes nothing."""
    base = predictor.predict(np.array([[[50.0, 60.0], [0.0, 0.0]]]), np.array([[1, -1]]))
    padded = predictor.predict(np.array([[[50.0, 60.0], [np.nan, np.nan]]]), np.array([[1, -1]]))
    np.testing.assert_array_equal(base.low_res_logits, padded.low_res_logits)


def test_bad_boxes_and_masks(predictor):
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        predictor.predict(boxes=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"box_coords\[0, 1\] .* outside"):
        predictor.predict(boxes=np.array([[10, 10, 400, 50]]))
    with pytest.raises(ValueError, match="boxes give 1 instances but point_coords 2"):
        predictor.predict(np.zeros((2, 1, 2)), np.ones((2, 1), int), boxes=np.array([[1, 1, 5, 5]]))
    with pytest.raises(ValueError, match=r"mask_input must be \(N, 1, 64, 64\)"):
        predictor.predict(np.zeros((1, 1, 2)), np.ones((1, 1), int), mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(ValueError, match="give point_coords"):
        predictor.predict()


@pytest.mark.parametrize("image, message", [
    (np.zeros((20, 30, 3), np.float32), "float32"),
    (np.zeros((20, 30, 5), np.uint8), r"\(20, 30, 5\)"),
    (np.zeros((2, 20, 30, 3), np.uint8), r"\(2, 20, 30, 3\)"),
])
def test_bad_images(predictor, image, message):
    with pytest.raises(ValueError, match=message):
        predictor.set_image(image)


def test_grayscale_and_rgba_equal_their_rgb(predictor):
    """set_image(gray) == set_image(gray repeated to RGB); set_image(RGBA) == set_image(RGB)."""
    import jax

    from p2s_jax.inference.predictor import Predictor

    other = Predictor(model_pair("sam2.1_hiera_t", 256)[1])
    gray = photo("camera")[..., 0][:200, :300]
    other.set_image(np.repeat(gray[..., None], 3, -1))
    for a, b in zip(jax.tree.leaves(predictor._features), jax.tree.leaves(other._features)):
        np.testing.assert_array_equal(a, b)
    rgb = photo("astronaut")[:120, :160]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 77, np.uint8)], -1)
    predictor.set_image(rgba)
    other.set_image(rgb)
    for a, b in zip(jax.tree.leaves(predictor._features), jax.tree.leaves(other._features)):
        np.testing.assert_array_equal(a, b)
    predictor.set_image(gray)  # leave the module fixture as it was
