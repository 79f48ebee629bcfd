"""p2s_jax.data: the tfds builder (no TensorFlow), the augmentations and the training loader.

The dataset is `p2s_jax.data.synthetic` (persons drawn on scikit-image photos, COCO format) with
ProbPose-like detections; pycocotools is the reference for masks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
import time

import numpy as np
import pytest
from PIL import Image

import reference
from conftest import REAL_COCO
from pycocotools import mask as mask_utils

from p2s_jax.data.coco import CocoFormatError, load_coco, person_category_id
from p2s_jax.keypoints import KEYPOINT_NAMES
from p2s_jax.data import augment as aug
from p2s_jax.data.builder import PersonSegmentationConfig, load_source, prepare
from p2s_jax.data.matching import box_iou, match_detections
from p2s_jax.utils.images import decode_image
from p2s_jax.data.loader import (DataError, TrainLoader, batch_positions,
                                 decode_masks, make_sample, position_records, sample_layout)
from p2s_jax.utils.images import load_image
from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

SIZE = (48, 64)  # (H, W) of the synthetic photos
# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Using custom data configuration")


def _partner(name: str) -> str:
    return name.replace("left", "#").replace("right", "left").replace("#", "right")


# Slot of the mirrored body part, derived from the names (independent of FLIP_PERMUTATION).
PARTNER = [KEYPOINT_NAMES.index(_partner(n)) for n in KEYPOINT_NAMES]
# Only geometry: no colour change (for the body-part tests).
NO_COLOR = dict(jitter=(0.0, 0.0, 0.0), grayscale_p=0.0, jitter_after_grayscale=(0.0, 0.0, 0.0))


class _HideTensorflow:
    """Wraps a meta-path finder so that it does not find tensorflow (other names pass through)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):  # find_distributions, invalidate_caches, ...
        return getattr(self.finder, attribute)


@contextlib.contextmanager
def no_tensorflow():
    """TensorFlow is neither loaded nor findable inside, even where it is installed."""
    assert _tensorflow_modules() == []
    saved = list(sys.meta_path)
    sys.meta_path[:] = [_HideTensorflow(f) for f in saved]
    try:
        yield
    finally:
        sys.meta_path[:] = saved


def _tensorflow_modules() -> list[str]:
    return [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]


# ----------------------------------------------------------------------------------------------
# Data set fixtures


def _person_ann_ids(coco) -> list[int]:
    """Non-crowd persons in the order make_keypoint_detections writes their detections."""
    person = person_category_id(coco)
    return [a for i in sorted(coco.getImgIds())
            for a in coco.getAnnIds(imgIds=[i], catIds=[person], iscrowd=False)]


def _add_crowds(annotations, images_dir) -> dict:
    """A crowd region on image 1 and an image 99 holding only a crowd region."""
    data = json.loads(annotations.read_text())
    first = data["images"][0]
    shutil.copy(images_dir / first["file_name"], images_dir / "crowd_only.jpg")
    data["images"].append({**first, "id": 99, "file_name": "crowd_only.jpg"})
    next_id = max(a["id"] for a in data["annotations"]) + 1
    polygon = [[2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]]
    for offset, image_id in enumerate((1, 99)):
        data["annotations"].append({"id": next_id + offset, "image_id": image_id,
                                    "category_id": 1, "segmentation": polygon, "area": 324.0,
                                    "bbox": [2.0, 2.0, 18.0, 18.0], "iscrowd": 1})
    annotations.write_text(json.dumps(data))
    return {"crowd_ids": {next_id, next_id + 1}}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The files in a manual dir, the truth (detection of each person) and the prepared data."""
    root = tmp_path_factory.mktemp("manual")
    annotations, images_dir = make_coco_dataset(root, num_images=7, people_per_image=(1, 4),
                                                seed=3, image_size=SIZE)
    info = _add_crowds(annotations, images_dir)
    coco = load_coco(annotations)
    raw = json.loads(make_keypoint_detections(coco, seed=4, noise_px=0.5,
                                              out_path=root / "raw.json").read_text())
    ann_ids = _person_ann_ids(coco)
    assert len(raw) == len(ann_ids)
    truth = dict(zip(ann_ids, raw))
    dropped = max((a for a in ann_ids if len(coco.getAnnIds(imgIds=[coco.anns[a]["image_id"]],
                                                            iscrowd=False)) > 1))
    rng = np.random.default_rng(5)
    kept = [d for a, d in truth.items() if a != dropped]
    (root / "detections.json").write_text(json.dumps([kept[i] for i in
                                                      rng.permutation(len(kept))]))
    # Named ids take priority: their boxes are useless for IoU matching.
    with_ids = [{**d, "annotation_id": a, "bbox": [0.0, 0.0, 1.0, 1.0]}
                for a, d in truth.items() if a != dropped]
    (root / "detections_ids.json").write_text(json.dumps([with_ids[i] for i in
                                                          rng.permutation(len(with_ids))]))
    data_dir = tmp_path_factory.mktemp("tfds")
    configs = {
        "synth_det": PersonSegmentationConfig(name="synth_det", annotations="annotations.json",
                                              images="images", detections="detections.json"),
        "synth_ids": PersonSegmentationConfig(name="synth_ids", annotations="annotations.json",
                                              images="images", detections="detections_ids.json"),
        "synth_gt": PersonSegmentationConfig(name="synth_gt", annotations="annotations.json",
                                             images="images"),
    }
    with no_tensorflow():
        for config in configs.values():
            prepare(root, data_dir, config)
        sources = {name: load_source(data_dir, name) for name in configs}
        records = {name: [source[i] for i in range(len(source))]
                   for name, source in sources.items()}
    return {"root": root, "coco": coco, "truth": truth, "dropped": dropped, "data_dir": data_dir,
            "sources": sources, "records": records, "annotations": annotations,
            "images_dir": images_dir, **info}


# ----------------------------------------------------------------------------------------------
# Builder


def test_prepared_without_tensorflow(synthetic):
    assert _tensorflow_modules() == []
    files = list((synthetic["data_dir"] / "p2s_person_segmentation" / "synth_det").rglob("*"))
    assert any(".array_record" in f.name for f in files), files


def test_records_hold_every_person_image_once(synthetic):
    coco = synthetic["coco"]
    person_images = {a["image_id"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
    for records in synthetic["records"].values():
        image_ids = [int(r["image_id"]) for r in records]
        assert sorted(image_ids) == sorted(person_images)  # once each; image 99 (crowd) skipped
        stored = {int(a) for r in records for a in r["annotation_id"]}
        assert stored == {a["id"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
        assert not stored & synthetic["crowd_ids"]


def test_records_match_ground_truth_pixels(synthetic):
    coco = synthetic["coco"]
    for record in synthetic["records"]["synth_det"]:
        info = coco.imgs[int(record["image_id"])]
        assert (int(record["height"]), int(record["width"])) == (info["height"], info["width"])
        assert record["file_name"].decode() == info["file_name"]
        pixels = decode_image(record["image"])
        np.testing.assert_array_equal(pixels,
                                      load_image(synthetic["images_dir"] / info["file_name"]))
        masks = decode_masks(list(record["rle"]), info["height"], info["width"])
        for mask, ann_id, box, area in zip(masks, record["annotation_id"], record["bbox"],
                                           record["area"]):
            ann = coco.anns[int(ann_id)]
            np.testing.assert_array_equal(mask, coco.annToMask(ann).astype(bool))
            np.testing.assert_allclose(box, ann["bbox"], rtol=1e-6)
            assert area == pytest.approx(ann["area"], rel=1e-6)


@pytest.mark.parametrize("name", ["synth_det", "synth_ids"])
def test_records_carry_the_matched_detection(synthetic, name):
    """Shuffled detections, IoU-matched or by named id, land on their own person."""
    checked = 0
    for record in synthetic["records"][name]:
        for ann_id, keypoints, visibility, score in zip(
                record["annotation_id"], record["keypoints"], record["visibility"],
                record["score"]):
            if int(ann_id) == synthetic["dropped"]:  # no detection: prompt falls back to mask
                assert not visibility.any() and score == 0
                continue
            det = synthetic["truth"][int(ann_id)]
            triplets = np.asarray(det["keypoints"], np.float32).reshape(17, 3)
            np.testing.assert_array_equal(keypoints, triplets[:, :2])
            np.testing.assert_array_equal(visibility, np.float32(det["visibility"]))
            assert score == np.float32(det["score"])
            checked += 1
    assert checked == len(synthetic["truth"]) - 1


def test_records_with_ground_truth_keypoints(synthetic):
    coco = synthetic["coco"]
    for record in synthetic["records"]["synth_gt"]:
        for ann_id, keypoints, visibility in zip(record["annotation_id"], record["keypoints"],
                                                 record["visibility"]):
            triplets = np.asarray(coco.anns[int(ann_id)]["keypoints"], np.float32).reshape(17, 3)
            np.testing.assert_array_equal(keypoints, triplets[:, :2])
            np.testing.assert_array_equal(visibility, (triplets[:, 2] > 0).astype(np.float32))


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


# ----------------------------------------------------------------------------------------------
# Augmentations: geometry


def _scene(height: int, width: int, radius: float = 4.0, seed: int = 0):
    """Random image; 17 keypoints on a grid (one person); a disk mask around each keypoint."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    xs = np.linspace(12, width - 13, 5)
    ys = np.linspace(12, height - 13, 4)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)[:17]
    keypoints = (grid + rng.uniform(-0.45, 0.45, grid.shape))[None].astype(np.float32)
    yy, xx = np.mgrid[:height, :width]
    disks = np.stack([(xx - x) ** 2 + (yy - y) ** 2 <= radius**2 for x, y in keypoints[0]])
    return image, disks, keypoints, np.ones((1, 17), np.float32)


def _assert_on_body_part(masks, keypoints, visibility, flipped: bool) -> int:
    """Slot j reads the disk of body part j (of its mirror partner after a flip)."""
    checked = 0
    for j in range(17):
        if visibility[0, j] <= 0:
            continue
        col, row = np.floor(keypoints[0, j] + 0.5).astype(int)
        part = PARTNER[j] if flipped else j
        assert masks[part, row, col], (j, KEYPOINT_NAMES[j], keypoints[0, j])
        checked += 1
    return checked


@pytest.mark.parametrize("case", ["flip", "affine", "resize", "all"])
def test_keypoints_stay_on_their_body_part(case):
    configs = {
        "flip": (aug.AugmentConfig(flip_p=1.0, degrees=0.0, shear=0.0, **NO_COLOR), (72, 72), 72),
        "affine": (aug.AugmentConfig(flip_p=0.0, **NO_COLOR), (72, 72), 72),
        "resize": (aug.NO_AUGMENT, (60, 80), 50),
        "all": (aug.AugmentConfig(), (60, 80), 56),
    }
    config, (height, width), size = configs[case]
    checked, flips, affines = 0, 0, 0
    for seed in range(25):
        image, disks, keypoints, visibility = _scene(height, width, seed=seed)
        params = aug.sample_params(np.random.default_rng(seed), config)
        out = aug.apply_params(params, image, disks, keypoints, visibility, size)
        assert out[0].shape == (size, size, 3) and out[1].shape == (17, size, size)
        checked += _assert_on_body_part(out[1], out[2], out[3], params.flip)
        flips += params.flip
        affines += bool(params.affines) and params.affines[0] != (0.0, 0.0)
    assert checked > 25 * 12
    assert flips == {"flip": 25, "affine": 0, "resize": 0}.get(case, flips)
    assert 0 < flips < 25 if case == "all" else True
    assert affines == (25 if case in ("affine", "all") else 0)


def test_flip_maps_pixel_centres_exactly():
    """A one-pixel mask and a keypoint on its centre stay together: x -> (W - 1) - x."""
    image, masks = np.zeros((32, 32, 3), np.uint8), np.zeros((1, 32, 32), bool)
    masks[0, 5, 3] = True
    keypoints = np.zeros((1, 17, 2), np.float32)
    keypoints[0, 0] = (3.0, 5.0)  # nose: no partner
    visibility = np.linspace(0.1, 0.9, 17, dtype=np.float32)[None]
    flip = aug.AugmentParams(flip=True)
    _, out_masks, out_keypoints, out_vis = aug.apply_params(flip, image, masks, keypoints,
                                                            visibility, 32)
    assert tuple(out_keypoints[0, 0]) == (28.0, 5.0)
    assert out_masks[0, 5, 28] and out_masks.sum() == 1
    np.testing.assert_array_equal(out_vis[0], visibility[0, PARTNER])  # moved with the slots


def test_flip_twice_is_identity():
    image, disks, keypoints, visibility = _scene(40, 56)
    visibility = np.random.default_rng(1).random((1, 17)).astype(np.float32)
    once = aug.hflip(image, disks, keypoints, visibility)
    assert not np.array_equal(once[2], keypoints)
    for original, back in zip((image, disks, keypoints, visibility), aug.hflip(*once)):
        np.testing.assert_array_equal(back, original)
    assert once[0].dtype == np.uint8 and once[1].dtype == np.bool_


def test_resize_maps_pixel_centres_exactly():
    """Integer upscaling: pixel (3, 5) becomes the pixels of its 4 x 4 block where its bilinear
    weight is >= 1/2 (the block without its corners, whose weight is (5/8)^2), centred on the
    moved keypoint."""
    image, masks = np.zeros((16, 16, 3), np.uint8), np.zeros((1, 16, 16), bool)
    masks[0, 5, 3] = True
    keypoints = np.full((1, 17, 2), 8.0, np.float32)
    keypoints[0, 0] = (3.0, 5.0)
    _, out_masks, out_keypoints = aug.resize(image, masks, keypoints, 64)
    block = np.kron(masks[0], np.ones((4, 4), bool))
    block[[20, 20, 23, 23], [12, 15, 12, 15]] = False
    np.testing.assert_array_equal(out_masks[0], block)
    rows, cols = np.nonzero(out_masks[0])
    assert tuple(out_keypoints[0, 0]) == (cols.mean(), rows.mean()) == (13.5, 21.5)


@pytest.mark.parametrize("rotation, shear", [(25.0, 0.0), (-17.0, 20.0), (8.0, -14.0)])
def test_affine_image_masks_and_points_share_one_map(rotation, shear):
    height, width = 40, 56
    linear = aug.affine_matrix(rotation, shear)
    assert np.linalg.det(linear) == pytest.approx(1.0)
    sheared = aug.affine_matrix(0.0, shear) @ [[3.0, 0.0], [2.0, 2.0]]  # columns: points
    np.testing.assert_allclose(sheared[1], [2.0, 2.0])  # an x-shear keeps rows horizontal
    inverse = np.linalg.inv(linear)
    rows, cols = np.mgrid[:height, :width]
    out_points = np.stack([cols, rows], -1).astype(np.float64)
    source = aug.transform_points(inverse, out_points, height, width)
    np.testing.assert_allclose(aug.transform_points(linear, source, height, width), out_points,
                               atol=1e-9)
    # Bilinear image warp of a linear ramp reads the source coordinates of each output pixel.
    ramp_x = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    warped = aug.warp_image(linear, ramp_x)
    inside = ((source[..., 0] >= 1) & (source[..., 0] <= width - 2) & (source[..., 1] >= 1)
              & (source[..., 1] <= height - 2))
    assert inside.sum() > 0.5 * height * width
    np.testing.assert_allclose(warped[inside], source[inside][:, 0], atol=1e-3)
    # Nearest mask warp reads the source pixel under each output pixel's centre.
    mask = np.random.default_rng(0).random((1, height, width)) < 0.5
    pixel = np.floor(source + 0.5).astype(int)
    in_image = ((pixel[..., 0] >= 0) & (pixel[..., 0] < width) & (pixel[..., 1] >= 0)
                & (pixel[..., 1] < height))
    expected = np.where(in_image, mask[0, pixel[..., 1].clip(0, height - 1),
                                       pixel[..., 0].clip(0, width - 1)], False)
    ambiguous = np.any(np.abs((source + 0.5) % 1.0 - 0.5) > 0.499, axis=-1)  # on a pixel edge
    got = aug.warp_masks(linear, mask)[0]
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got[~ambiguous], expected[~ambiguous])


def test_affine_clears_keypoints_that_leave():
    image, masks = np.zeros((40, 56, 3), np.uint8), np.zeros((1, 40, 56), bool)
    masks[0, 15:25, 20:36] = True  # central: survives the rotation
    keypoints = np.array([[[0.0, 0.0], [55.0, 39.0], [27.5, 19.5]] + [[28.0, 20.0]] * 14],
                         np.float32)
    visibility = np.ones((1, 17), np.float32)
    _, out_masks, out_keypoints, out_vis = aug.random_affine(((25.0, 0.0),), image, masks,
                                                             keypoints, visibility)
    expected = aug.transform_points(aug.affine_matrix(25.0, 0.0), keypoints, 40, 56)
    np.testing.assert_allclose(out_keypoints, expected, atol=1e-4)
    assert np.all(np.isfinite(out_keypoints))
    np.testing.assert_array_equal(out_vis[0, :3], [0.0, 0.0, 1.0])  # two corners left
    assert out_masks[0].sum() == pytest.approx(masks[0].sum(), rel=0.1)  # det = 1


def test_keypoints_outside_the_input_are_cleared():
    image, disks, keypoints, visibility = _scene(40, 56)
    keypoints[0, 0] = (-3.0, 5.0)
    keypoints[0, 1] = (np.nan, 5.0)
    keypoints[0, 2] = (55.49, 39.49)  # the last pixel: inside
    _, _, out_keypoints, out_vis = aug.augment(np.random.default_rng(0), image, disks, keypoints,
                                               visibility, aug.NO_AUGMENT, 28)
    assert np.all(np.isfinite(out_keypoints))
    np.testing.assert_array_equal(out_vis[0, :3], [0.0, 0.0, 1.0])


def test_affine_that_would_empty_a_mask_is_dropped():
    image, masks = np.zeros((40, 56, 3), np.uint8), np.zeros((1, 40, 56), bool)
    masks[0, 0, 0] = True  # a corner pixel: any rotation about the centre moves it out
    keypoints, visibility = np.zeros((1, 17, 2), np.float32), np.ones((1, 17), np.float32)
    out = aug.random_affine(((25.0, 0.0),), image, masks, keypoints, visibility)
    assert out[1] is masks and out[2] is keypoints
    out = aug.random_affine(((25.0, 0.0), (0.0, 0.0)), image, masks, keypoints, visibility)
    np.testing.assert_array_equal(out[1], masks)  # the second try keeps the corner


# ----------------------------------------------------------------------------------------------
# Augmentations: colour, rates, determinism


def test_color_ops_leave_masks_and_keypoints_untouched():
    image, disks, keypoints, visibility = _scene(48, 48)
    params = aug.AugmentParams(
        jitter=aug.ColorJitterParams((2, 0, 1), (1.1, 0.95, 1.04)), grayscale=True,
        jitter_after_grayscale=aug.ColorJitterParams((1, 2, 0), (0.92, 1.05, 0.95)))
    out_image, out_masks, out_keypoints, out_vis = aug.apply_params(params, image, disks,
                                                                    keypoints, visibility, 48)
    np.testing.assert_array_equal(out_masks, disks)
    np.testing.assert_array_equal(out_keypoints, keypoints)
    np.testing.assert_array_equal(out_vis, visibility)
    assert not np.array_equal(out_image, image)
    # Gray stays gray through the second jitter.
    np.testing.assert_array_equal(out_image[..., 0], out_image[..., 1])
    np.testing.assert_array_equal(out_image[..., 0], out_image[..., 2])
    jittered = aug.color_jitter(image, aug.ColorJitterParams((0, 1, 2), (1.1, 1.0, 1.0)))
    assert jittered.mean() > image.mean()  # brighter


def test_grayscale_gives_equal_channels():
    image = _scene(24, 30)[0]
    gray = aug.grayscale(image)
    assert gray.shape == image.shape and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])
    luma = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(gray[..., 0] - luma).max() <= 1.0


def _binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    sd = np.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def test_random_choices_at_the_configured_rates():
    n = 4000
    params = [aug.sample_params(np.random.default_rng(s), aug.AugmentConfig()) for s in range(n)]
    flips = sum(p.flip for p in params)
    grays = sum(p.grayscale for p in params)
    low, high = _binomial_bounds(n, 0.5)
    assert low < flips < high
    low, high = _binomial_bounds(n, 0.05)
    assert low < grays < high
    rotations = np.array([p.affines[0][0] for p in params])
    shears = np.array([p.affines[0][1] for p in params])
    assert -25 <= rotations.min() < -24 and 24 < rotations.max() <= 25
    assert -20 <= shears.min() < -19 and 19 < shears.max() <= 20
    brightness = np.array([p.jitter.factors[0] for p in params])
    contrast = np.array([p.jitter_after_grayscale.factors[1] for p in params])
    assert 0.9 <= brightness.min() < 0.91 and 1.09 < brightness.max() <= 1.1
    assert 0.95 <= contrast.min() < 0.951 and 1.049 < contrast.max() <= 1.05
    assert len({p.jitter.order for p in params}) == 6  # every order of the three operations
    assert aug.sample_params(np.random.default_rng(0), aug.NO_AUGMENT) == aug.IDENTITY


def test_augment_is_a_function_of_the_generator():
    image, disks, keypoints, visibility = _scene(40, 56)
    config = aug.AugmentConfig(flip_p=0.5, grayscale_p=0.5)
    outs = [aug.augment(np.random.default_rng(s), image, disks, keypoints, visibility, config, 32)
            for s in (11, 11, 12)]
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outs[0][0], outs[2][0])


def _official_augment(image, masks, params: aug.AugmentParams, size: int):
    """The official MOSE fine-tune transforms (`training/dataset/transforms.py`, the yaml's
    order and ranges) on one frame, their random draws replaced by `params`: flip and
    grayscale through `random.random`, the affine through `RandomAffine.get_params`, each
    colour jitter through `ColorJitter.get_params`. -> (image (S, S, 3) uint8, masks (M, S, S)
    bool)."""
    import random as python_random

    torch = reference.import_torch()
    import torchvision.transforms as T
    from PIL import Image
    from training.dataset import transforms as official
    from training.utils.data_utils import Frame, Object, VideoDatapoint

    (rotation, shear), = params.affines
    draws = iter([0.0 if params.flip else 1.0, 0.0 if params.grayscale else 1.0])
    jitters = iter([params.jitter, params.jitter_after_grayscale])

    def jitter_params(brightness, contrast, saturation, hue):
        drawn = next(jitters)
        return (torch.tensor([*drawn.order, 3]), *drawn.factors, None)

    patches = [(python_random, "random", lambda: next(draws)),
               (T.RandomAffine, "get_params", staticmethod(
                   lambda degrees, translate, scale_ranges, shears, img_size:
                   (rotation, (0, 0), 1.0, (shear, 0.0)))),
               (T.ColorJitter, "get_params", staticmethod(jitter_params))]
    saved = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else
              getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        transforms = official.ComposeAPI([
            official.RandomHorizontalFlip(consistent_transform=True),
            official.RandomAffine(degrees=25, shear=20, image_interpolation="bilinear",
                                  consistent_transform=True),
            official.RandomResizeAPI(sizes=size, square=True, consistent_transform=True),
            official.ColorJitter(consistent_transform=True, brightness=0.1, contrast=0.03,
                                 saturation=0.03, hue=None),
            official.RandomGrayscale(p=0.05, consistent_transform=True),
            official.ColorJitter(consistent_transform=False, brightness=0.1, contrast=0.05,
                                 saturation=0.05, hue=None)])
        objects = [Object(i, 0, torch.from_numpy(m.astype(np.uint8))) for i, m in enumerate(masks)]
        datapoint = transforms(VideoDatapoint([Frame(Image.fromarray(image), objects)], 0,
                                              image.shape[:2]))
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    frame = datapoint.frames[0]
    return np.asarray(frame.data), np.stack([o.segment.numpy() > 0 for o in frame.objects])


@pytest.mark.skipif(not reference.reference_available(), reason="needs the official sam2")
def test_augmentations_equal_the_official_transforms():
    """Flip, affine, square resize, both colour jitters and grayscale with the parameters drawn
    once (`sample_params`) and fed to ours and to the official transforms, on a real COCO photo
    with its published person masks and keypoints, at the training size: the same image (PIL
    does the resampling in both; within 1 grey level), masks IoU >= 0.99, and every keypoint
    where the official
    transforms carry a small disc drawn around it (the disc's centroid; a flip also swaps the
    slots by the schema's pairs)."""
    from pycocotools.coco import COCO

    from p2s_jax.keypoints import COCO17

    real = REAL_COCO
    if not (real / "test_coco.json").is_file():
        pytest.skip(f"the real COCO sample is not at {real}")
    coco = COCO(str(real / "test_coco.json"))
    image_id = 196141
    image = np.asarray(Image.open(real / coco.imgs[image_id]["file_name"]).convert("RGB"))
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if a["num_keypoints"]]
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    triplets = np.asarray([a["keypoints"] for a in anns], np.float32).reshape(-1, 17, 3)
    keypoints, visibility = triplets[..., :2], (triplets[..., 2] > 0).astype(np.float32)
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    size = 1024  # the training size (COCO photos are upsampled to it)
    rng = np.random.default_rng(0)
    flips = grays = 0
    for draw in range(6):
        params = aug.sample_params(rng, aug.AugmentConfig())
        if draw < 2:  # make sure both flip directions and grayscale are covered
            params = dataclasses.replace(params, flip=bool(draw), grayscale=bool(draw))
        flips, grays = flips + params.flip, grays + params.grayscale
        out_image, out_masks, out_keypoints, out_vis = aug.apply_params(
            params, image, masks, keypoints, visibility, size)
        # a disc around every keypoint that stays in the picture (a disc the affine would
        # empty would make the official transform drop the affine, as for any empty object);
        # a flip moves the keypoint of slot perm[j] to slot j
        perm = list(COCO17.flip_permutation) if params.flip else list(range(17))
        kept = [(p, j) for p in range(len(anns)) for j in range(17)
                if out_vis[p, j] and 8 < out_keypoints[p, j].min()
                and out_keypoints[p, j].max() < size - 8]
        discs = np.stack([(xx - keypoints[p, perm[j], 0]) ** 2
                          + (yy - keypoints[p, perm[j], 1]) ** 2 <= 16 for p, j in kept])
        ref_image, ref_masks = _official_augment(image, np.concatenate([masks, discs]), params,
                                                 size)
        assert np.abs(out_image.astype(int) - ref_image.astype(int)).max() <= 1, draw
        for ours, theirs in zip(out_masks, ref_masks[:len(anns)]):
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99, draw
        for (p, j), disc in zip(kept, ref_masks[len(anns):]):
            ys, xs = np.nonzero(disc)
            centre = np.array([xs.mean(), ys.mean()])
            assert np.abs(out_keypoints[p, j] - centre).max() < 1.0, (draw, p, j)
        assert len(kept) >= 30, draw
    assert flips and grays


def test_augment_config_errors():
    with pytest.raises(ValueError, match="flip_p"):
        aug.AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="shear"):
        aug.AugmentConfig(shear=90.0)
    image, disks, keypoints, visibility = _scene(40, 56)
    with pytest.raises(ValueError, match=r"masks must be \(M, H, W\) bool"):
        aug.augment(np.random.default_rng(0), image, disks[:, :-1], keypoints, visibility,
                    aug.NO_AUGMENT, 32)
    with pytest.raises(ValueError, match="visibility must be"):
        aug.augment(np.random.default_rng(0), image, disks, keypoints, visibility[:, :5],
                    aug.NO_AUGMENT, 32)


# ----------------------------------------------------------------------------------------------
# Loader


def _loader(source, **overrides) -> TrainLoader:
    kwargs = dict(global_batch_size=4, image_size=32, objects_per_image=2, seed=0,
                  augment_config=aug.AugmentConfig(), num_workers=0)
    kwargs.update(overrides)
    return TrainLoader(source, **kwargs)


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, objects_per_image=3) as loader:
        batch = loader.batch(0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "image": ((4, 32, 32, 3), np.uint8), "masks": ((4, 3, 32, 32), np.bool_),
        "keypoints": ((4, 3, 17, 2), np.float32), "visibility": ((4, 3, 17), np.float32),
        "valid": ((4, 3), np.bool_), "image_id": ((4,), np.int64),
        "record_index": ((4,), np.int64)}
    layout = sample_layout(32, 3, 17)  # what train.state.batch_shapes builds on
    assert list(layout) == list(batch) and shapes == {
        k: ((4, *shape), dtype) for k, (shape, dtype) in layout.items()}
    for i, index in enumerate(batch["record_index"]):
        assert batch["image_id"][i] == source[int(index)]["image_id"]


def test_same_seed_same_batch_and_workers_do_not_matter(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, num_workers=2, prefetch=1) as threaded:
        threaded_batches = [b for _, b in threaded.iterate(0, 3)]
    plain = _loader(source)
    for step, batch in enumerate(threaded_batches):
        _assert_batches_equal(batch, plain.batch(step))
    other = _loader(source, seed=1).batch(0)
    assert not np.array_equal(other["image"], threaded_batches[0]["image"])


def test_worker_processes_make_the_same_batches(synthetic):
    """grain worker processes (1 and 2, each making every n-th sample of the host's stream)
    give the batches of the calling thread, also when started mid-run; a failing sample is a
    DataError naming the record, raised in the training process."""
    source = synthetic["sources"]["synth_det"]
    plain = _loader(source)
    for workers in (1, 2):
        with _loader(source, num_workers=workers, prefetch=2, workers="processes") as loader:
            batches = list(loader.iterate(2, 3))
        assert [s for s, _ in batches] == [2, 3, 4]
        for step, batch in batches:
            _assert_batches_equal(batch, plain.batch(step))
    step = next(s for s in range(10) if 2 in plain.records(s)[1])
    with _loader(_Broken(source, 2), num_workers=2, workers="processes") as loader:
        with pytest.raises(DataError, match=rf"step {step}: record 2 .*cannot decode"):
            for _ in loader.iterate(0, step + 1):
                pass


def test_resume_equals_uninterrupted_run(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, num_workers=2, prefetch=2) as loader:
        full = list(loader.iterate(0, 5))
        state = loader.state_dict(next_step=3)
    with _loader(source, num_workers=2, prefetch=3) as resumed:
        start = resumed.resume_step(state)
        tail = list(resumed.iterate(start, 2))
    assert [s for s, _ in full] == [0, 1, 2, 3, 4] and [s for s, _ in tail] == [3, 4]
    for (_, a), (_, b) in zip(full[3:], tail):
        _assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        _loader(source, seed=7).resume_step(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _loader(source, global_batch_size=2).resume_step(state)


def test_hosts_split_the_global_batch(synthetic):
    source = synthetic["sources"]["synth_det"]
    single = _loader(source)
    hosts = [_loader(source, host_index=h, host_count=2) for h in (0, 1)]
    for step in range(3):
        parts = [h.batch(step) for h in hosts]
        assert all(len(p["image"]) == 2 for p in parts)
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _assert_batches_equal(joined, single.batch(step))
        positions = [set(batch_positions(step, 4, h, 2)) for h in (0, 1)]
        assert not positions[0] & positions[1]
    with pytest.raises(ValueError, match="divisible"):
        _loader(source, global_batch_size=5, host_count=2)


def test_epochs_visit_every_record_once(synthetic):
    source = synthetic["sources"]["synth_det"]
    n = len(source)
    loader = _loader(source, global_batch_size=3)
    stream = np.concatenate([loader.records(step)[1] for step in range(3 * n)])  # 3 * 3n >= 4n
    epochs = stream[:4 * n].reshape(4, n)
    for row in epochs:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    assert len({tuple(row) for row in epochs}) > 1  # reshuffled per epoch
    direct = position_records(0, np.arange(4 * n), n)[1]
    np.testing.assert_array_equal(direct, epochs.ravel())


def test_padding_and_person_consistency(synthetic):
    """Without augmentation each slot is one record person: its mask with its keypoints."""
    source = synthetic["sources"]["synth_det"]
    loader = _loader(source, objects_per_image=5, augment_config=aug.NO_AUGMENT, image_size=64)
    seen_counts = set()
    for step in range(3):
        batch = loader.batch(step)
        for i, index in enumerate(batch["record_index"]):
            record = source[int(index)]
            count = len(record["rle"])
            seen_counts.add(count)
            masks = decode_masks(list(record["rle"]), *SIZE)
            _, resized, keypoints = aug.resize(np.zeros((*SIZE, 3), np.uint8), masks,
                                               record["keypoints"], 64)
            np.testing.assert_array_equal(batch["valid"][i], np.arange(5) < count)
            assert not batch["masks"][i, count:].any()
            assert not batch["visibility"][i, count:].any()
            assert not batch["keypoints"][i, count:].any()
            persons = set()
            for slot in range(count):
                (match,) = [k for k in range(count)
                            if np.array_equal(resized[k], batch["masks"][i, slot])]
                persons.add(match)
                np.testing.assert_allclose(batch["keypoints"][i, slot], keypoints[match])
                expected = aug.clear_outside(keypoints[match:match + 1],
                                             record["visibility"][match:match + 1], 64, 64)[1]
                np.testing.assert_array_equal(batch["visibility"][i, slot], expected[0])
            assert persons == set(range(count))
    assert len(seen_counts) > 1


def test_more_people_than_slots_draws_different_people(synthetic):
    source = synthetic["sources"]["synth_det"]
    crowded = next(i for i in range(len(source)) if len(source[i]["rle"]) >= 3)
    loader = _loader(source, objects_per_image=1, augment_config=aug.NO_AUGMENT)
    drawn = set()
    for epoch in range(12):
        sample = loader.sample(0, epoch, crowded)
        assert sample["valid"].all()
        drawn.add(sample["masks"].tobytes())
    assert len(drawn) > 1


def test_person_lost_in_the_resize_is_invalid():
    height, width = 40, 56
    masks = np.zeros((2, height, width), np.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 0, 0] = 1  # nearest downscaling to 8 x 8 reads pixels 3, 10, ...: lost
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    record = {"image": buffer.getvalue(), "image_id": 5, "height": height, "width": width,
              "rle": np.array([r["counts"] for r in rles], dtype=object),
              "keypoints": np.full((2, 17, 2), 20.0, np.float32),
              "visibility": np.ones((2, 17), np.float32)}
    sample = make_sample(record, np.random.default_rng(0), image_size=8, objects_per_image=3,
                         augment_config=aug.NO_AUGMENT)
    kept = sample["masks"].any(axis=(1, 2))
    assert kept.sum() == 1
    np.testing.assert_array_equal(sample["valid"], kept)
    np.testing.assert_array_equal(sample["visibility"].any(axis=1), kept)


class _Broken:
    """A source whose record `bad` holds bytes that are not an image."""

    def __init__(self, source, bad: int):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        if index == self.bad:
            record["image"] = b"not an image"
        return record


def test_worker_errors_name_the_record(synthetic):
    source = synthetic["sources"]["synth_det"]
    plain = _loader(source)
    step = next(s for s in range(10) if 2 in plain.records(s)[1])
    image_id = int(source[2]["image_id"])
    broken = _Broken(source, 2)
    with _loader(broken, num_workers=2, prefetch=2) as loader:
        with pytest.raises(DataError, match=rf"step {step}: record 2 \(image_id {image_id}\): "
                                            r"ImageError: .*cannot decode"):
            for _ in loader.iterate(0, step + 1):
                pass


def test_leaving_early_and_close_do_not_hang(synthetic):
    loader = _loader(synthetic["sources"]["synth_det"], num_workers=2, prefetch=4)
    start = time.monotonic()
    for count, (step, _) in enumerate(loader.iterate(0)):
        assert step == count  # in order
        if count == 1:
            break
    loader.close()
    loader.close()
    assert time.monotonic() - start < 30
    _assert_batches_equal(loader.batch(1), _loader(synthetic["sources"]["synth_det"]).batch(1))


# ----------------------------------------------------------------------------------------------
# Errors of the builder


def _copy_manual(synthetic, tmp_path):
    root = tmp_path / "manual"
    shutil.copytree(synthetic["root"], root)
    return root


def test_missing_image_is_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    name = synthetic["coco"].imgs[3]["file_name"]
    (root / "images" / name).unlink()
    config = PersonSegmentationConfig(name="missing", annotations="annotations.json",
                                      images="images")
    with pytest.raises(FileNotFoundError, match=rf"1 image file\(s\) .* missing .*{name}"):
        prepare(root, tmp_path / "tfds", config)


def test_malformed_annotations_are_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    data = json.loads((root / "annotations.json").read_text())
    del data["annotations"][2]["segmentation"]
    (root / "annotations.json").write_text(json.dumps(data))
    config = PersonSegmentationConfig(name="malformed", annotations="annotations.json",
                                      images="images")
    with pytest.raises(CocoFormatError, match=r"annotations\.json: annotations\[2\].*"
                                              r"'segmentation'"):
        prepare(root, tmp_path / "tfds", config)


def test_wrong_image_size_and_foreign_id_are_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    data = json.loads((root / "annotations.json").read_text())
    kinds = {}  # image index -> whether all its persons are polygons
    for ann in (a for a in data["annotations"] if not a["iscrowd"]):
        index = next(i for i, im in enumerate(data["images"]) if im["id"] == ann["image_id"])
        kinds[index] = kinds.get(index, True) and isinstance(ann["segmentation"], list)
    polygons_only = next(i for i, only in kinds.items() if only)
    with_rle = next(i for i, only in kinds.items() if not only)
    for index, pattern in (
            (polygons_only, r"{name}: image is 64 x 48 .* says 65 x 48"),
            (with_rle, r"annotations_wrong_size\.json: image_id {id}: annotation id \d+: mask "
                       r"size \[48, 64\] differs from its image's \(height, width\) \[48, 65\]")):
        wrong = json.loads(json.dumps(data))
        wrong["images"][index]["width"] += 1
        (root / "annotations_wrong_size.json").write_text(json.dumps(wrong))
        config = PersonSegmentationConfig(name=f"size{index}",
                                          annotations="annotations_wrong_size.json",
                                          images="images")
        image = data["images"][index]
        with pytest.raises(CocoFormatError, match=pattern.format(name=image["file_name"],
                                                                 id=image["id"])):
            prepare(root, tmp_path / "tfds", config)
    detections = json.loads((root / "detections_ids.json").read_text())
    detections[0]["annotation_id"] = next(iter(synthetic["crowd_ids"]))
    (root / "detections_bad.json").write_text(json.dumps(detections))
    config = PersonSegmentationConfig(name="foreign", annotations="annotations.json",
                                      images="images", detections="detections_bad.json")
    with pytest.raises(CocoFormatError, match=r"detections_bad\.json: image_id \d+: detection "
                                              r"\d+ names annotation id"):
        prepare(root, tmp_path / "tfds", config)


def test_keypoint_names_of_no_schema_are_read_by_position(synthetic, tmp_path):
    """data.schema: a file whose keypoint names fit no schema is refused naming the option,
    and read by position in the schema named (the same records as with COCO's names)."""
    from p2s_jax.data.builder import generate_examples
    from p2s_jax.utils.errors import InputError

    data = json.loads(synthetic["annotations"].read_text())
    data["categories"][0]["keypoints"] = [f"k{i}" for i in range(17)]
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps(data))
    images = synthetic["images_dir"]
    with pytest.raises(InputError, match="data.schema in a training config"):
        next(generate_examples(custom, images))
    ours = list(generate_examples(custom, images, read_schema="coco17"))
    plain = list(generate_examples(synthetic["annotations"], images))
    assert [i for i, _ in ours] == [i for i, _ in plain] and len(ours) >= 5
    for (_, a), (_, b) in zip(ours, plain):
        for key in ("keypoints", "visibility", "rle"):
            np.testing.assert_array_equal(a[key], b[key])


def test_load_source_of_unprepared_config(synthetic):
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset 'nope'.*synth_det"):
        load_source(synthetic["data_dir"], "nope")
