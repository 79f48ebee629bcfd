"""Real COCO val2017 persons (`../shared/data/real/coco`: 4 photos, 14 persons with published
polygons and keypoints, two of them without keypoints) through our writer, pycocotools, both
COCO* definitions, and the authors' inference preset against the official predictor.

The model is the official SAM 2.1 tiny at 256 px with seeded random weights and its converted
twin (no real checkpoint can be downloaded here); the reference runs the authors' pipeline as
their code does: their keypoint selection (tests/authors.py), `SAM2ImagePredictor(max_hole_area=10,
max_sprinkle_area=50)` with scipy labelling in place of the CUDA kernel, `multimask_output=False`,
then their exclusive masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

import reference
from authors import authors_exclusive, authors_select, scipy_connected_components
from conftest import model_pair
from p2s_jax.data import coco as coco_lib
from p2s_jax.data.prepare import coco_persons
from p2s_jax.evaluation import runner as ev
from p2s_jax.evaluation.metrics import coco_star_excluded, evaluate_segm
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.keypoints import labelled_points
from p2s_jax.parallel import make_mesh
from p2s_jax.utils.files import write_json
from p2s_jax.utils.images import load_image

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "coco"
MODEL, SIZE = "sam2.1_hiera_t", 256

pytestmark = [
    pytest.mark.skipif(not reference.reference_available(),
                       reason="needs torch, sam2 and hydra (the dev extra)"),
    pytest.mark.skipif(not (REAL / "test_coco.json").is_file(),
                       reason=f"the real COCO sample is not at {REAL}"),
]


@pytest.fixture(scope="module")
def coco():
    return coco_lib.load_coco(REAL / "test_coco.json")


def gt_results(coco, keep=lambda ann: True):
    """The ground-truth masks of the persons `keep` selects, as our results (score 1)."""
    results = []
    for image_id in sorted(coco.getImgIds()):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if keep(a)]
        if anns:
            masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
            results += coco_lib.encode_results(image_id, masks, np.ones(len(anns)))
    return results


def test_ground_truth_masks_give_ap_one(coco):
    metrics = evaluate_segm(coco, gt_results(coco))
    assert metrics["AP"] == metrics["AP50"] == metrics["AP75"] == 1.0
    assert evaluate_segm(coco, gt_results(coco), coco_star=True)["AP"] == 1.0


def test_the_two_coco_star_definitions(coco, tmp_path):
    """Ours turns the persons without a pose into ignore regions; COCOPersons deletes them, so
    a mask on one of them is a false positive there and nothing under ours."""
    excluded = [a["id"] for a in coco.anns.values() if coco_star_excluded(a)]
    no_keypoints = [a["id"] for a in coco.anns.values() if a["num_keypoints"] == 0]
    assert len(no_keypoints) == 2 and set(no_keypoints) <= set(excluded)

    subset = coco_persons(json.loads((REAL / "test_coco.json").read_text()))
    assert sorted(a["id"] for a in subset["annotations"]) == sorted(
        a["id"] for a in coco.anns.values() if a["num_keypoints"] > 0)
    assert len(subset["images"]) == 4
    small_too = coco_persons(json.loads((REAL / "test_coco.json").read_text()), 32.0**2)
    assert {a["id"] for a in small_too["annotations"]} == set(coco.anns) - set(excluded)
    subset_coco = coco_lib.load_coco(write_json(tmp_path / "persons.json", subset))
    small_coco = coco_lib.load_coco(write_json(tmp_path / "persons_32.json", small_too))

    with_pose = gt_results(coco, lambda a: a["id"] not in excluded)
    everyone = gt_results(coco)
    # Only the persons with a pose predicted: perfect under both definitions.
    assert evaluate_segm(coco, with_pose, coco_star=True)["AP"] == 1.0
    assert evaluate_segm(small_coco, with_pose)["AP"] == 1.0
    # A mask on every person: still perfect under ours, false positives on COCOPersons.
    assert evaluate_segm(coco, everyone, coco_star=True)["AP"] == 1.0
    assert evaluate_segm(subset_coco, everyone)["AP"] < 1.0
    # Plain COCO counts the persons without a pose as misses.
    assert evaluate_segm(coco, with_pose)["AP"] < 1.0


# ------------------------------------------------------------------------------ the preset


@pytest.fixture(scope="module")
def models():
    return model_pair(MODEL, SIZE)


@pytest.fixture(scope="module")
def preset_run(coco, models):
    poses = ev.ground_truth_prompt_poses(coco)
    config = ev.EvalConfig.from_preset("sam-pose2seg", ground_truth=True, images_per_device=2)
    return ev.run_dataset(models[1], coco, REAL, poses, config,
                          mesh=make_mesh(jax.devices()[:1]), progress=False)


@pytest.fixture(scope="module")
def authors_run(coco, models, monkeypatch_module):
    """image_id -> (masks (P, H, W) bool after exclusive masks, picks per person or None)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    monkeypatch_module.setattr("sam2.utils.misc.get_connected_components",
                               scipy_connected_components)
    predictor = SAM2ImagePredictor(models[0], max_hole_area=10.0, max_sprinkle_area=50.0)
    predictor._bb_feat_sizes = [(SIZE // 4 // s, SIZE // 4 // s) for s in (1, 2, 4)]
    out = {}
    for image_id in sorted(coco.getImgIds()):
        image = load_image(REAL / coco.imgs[image_id]["file_name"])
        gt = coco_lib.ground_truth_poses(coco, image_id)
        triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], -1)
        keypoints, visibility = labelled_points(triplets)
        predictor.set_image(image)
        masks, ious, picks = [], [], []
        for person in range(len(keypoints)):
            chosen = authors_select(np.nan_to_num(keypoints[person]), visibility[person],
                                    visibility[person], "distance+confidence", 3,
                                    lambda v: np.lexsort((np.arange(len(v)), -v)))
            points = (np.zeros((0, 2), np.float32) if chosen is None
                      else keypoints[person, chosen].astype(np.float32))
            mask, iou, _ = predictor.predict(point_coords=points,
                                             point_labels=np.ones(len(points), np.int32),
                                             multimask_output=False)
            masks.append(mask[0].astype(bool))
            ious.append(float(iou[0]))
            picks.append(chosen)
        out[image_id] = (authors_exclusive(np.stack(masks), np.asarray(ious)), picks)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def test_preset_equals_the_authors_pipeline_person_by_person(coco, preset_run, authors_run):
    by_image = {}
    for result in preset_run.results:
        by_image.setdefault(result["image_id"], []).append(result)
    empty_prompts = 0
    for image_id, (expected, picks) in authors_run.items():
        prompts = preset_run.prompts[image_id]
        assert prompts.has_prompt.all()  # the authors prompt everyone (the empty prompt included)
        results = by_image[image_id]
        assert len(results) == len(expected)
        for person, (result, mask, chosen) in enumerate(zip(results, expected, picks)):
            labels = prompts.labels[person]
            if chosen is None:
                empty_prompts += 1
                np.testing.assert_array_equal(labels[:1], [-2])
            else:
                np.testing.assert_array_equal(labels[labels >= 0], 1)
                gt = coco_lib.ground_truth_poses(coco, image_id)
                np.testing.assert_allclose(prompts.coords[person][labels == 1],
                                           gt.keypoints[person, chosen])
            ours = mask_utils.decode(result["segmentation"]).astype(bool)
            assert result["score"] == 1.0  # ground-truth poses: Pose2Seg's constant score
            assert (ours != mask).mean() < 2e-3, (image_id, person)
    assert empty_prompts == 2  # the two persons without keypoints
    for image_id, results in by_image.items():  # exclusive: no pixel in two masks
        masks = np.stack([mask_utils.decode(r["segmentation"]) for r in results])
        assert masks.sum(axis=0).max() <= 1


def test_postprocess_changes_masks_on_these_photos(coco, models, preset_run):
    """The post-processing is not idle on real photos: without it some masks differ."""
    poses = ev.ground_truth_prompt_poses(coco)
    config = ev.EvalConfig.from_preset("sam-pose2seg", ground_truth=True, images_per_device=2,
                                       postprocess=MaskPostprocess())
    plain = ev.run_dataset(models[1], coco, REAL, poses, config,
                           mesh=make_mesh(jax.devices()[:1]), progress=False)
    differ = sum(a["segmentation"]["counts"] != b["segmentation"]["counts"]
                 for a, b in zip(plain.results, preset_run.results))
    assert differ >= 3
