"""Bad input to the predictor gets a clear error; grayscale and RGBA images are converted."""

from __future__ import annotations

import numpy as np
import pytest

from support.shared import model_pair, photo


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
])
def test_bad_points(predictor, coords, labels, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(coords, labels)


def test_points_and_boxes_outside_the_photo_as_the_official_predictor(predictor):
    """Prompts off the photo (a keypoint a pose estimator places past a border, a box beyond
    it) are taken as given and normalised without clipping, as the official predictor does."""
    from support import reference

    official = reference.official_predictor(model_pair("sam2.1_hiera_t", 256)[0])
    official.set_image(np.repeat(photo("camera")[..., 0][:200, :300, None], 3, -1))
    points = np.array([[-4.0, 50.0], [150.0, -2.5], [303.0, 120.0], [80.0, 207.0]], np.float32)
    labels = np.array([1, 1, 1, 0], np.int32)
    box = np.array([-10.0, 20.0, 320.0, 190.0], np.float32)
    for kwargs in ({"point_coords": points, "point_labels": labels}, {"box": box}):
        expected, iou, low_res = official.predict(**kwargs, multimask_output=False,
                                                  return_logits=True)
        ours = (predictor.predict(points[None], labels[None]) if "box" not in kwargs
                else predictor.predict(boxes=box[None]))
        np.testing.assert_allclose(ours.low_res_logits[0, 0], low_res[0], atol=1e-3 * np.abs(
            low_res).max())
        np.testing.assert_allclose(ours.iou[0, 0], iou[0], atol=1e-4)


def test_nan_in_padding_slot_is_ignored(predictor):
    """A padding slot carries no coordinate: NaN there is not an error and changes nothing."""
    base = predictor.predict(np.array([[[50.0, 60.0], [0.0, 0.0]]]), np.array([[1, -1]]))
    padded = predictor.predict(np.array([[[50.0, 60.0], [np.nan, np.nan]]]), np.array([[1, -1]]))
    np.testing.assert_array_equal(base.low_res_logits, padded.low_res_logits)


def test_bad_boxes_and_masks(predictor):
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        predictor.predict(boxes=np.zeros((2, 3)))
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
