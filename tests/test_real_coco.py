"""Real COCO val2017 persons (`../shared/data/real/coco`: 4 photos, 14 persons with published
polygons and keypoints, two of them without keypoints) through our writer, pycocotools, both
COCO* definitions, and the authors' inference preset against the official predictor.

The model is the official SAM 2.1 tiny at 256 px with seeded random weights and its converted
twin (no real checkpoint can be downloaded here); the reference runs the authors' pipeline as
their code does: their keypoint selection (tests/support/authors.py),
`SAM2ImagePredictor(max_hole_area=10, max_sprinkle_area=50)` with scipy labelling in place of
the CUDA kernel, `multimask_output=False`, then their exclusive masks.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support import reference
from support.authors import authors_exclusive, authors_select, scipy_connected_components
from support.shared import NEEDS_REAL_COCO_AND_REFERENCE, REAL_COCO, model_pair
from p2s_jax.data import coco as coco_lib
from p2s_jax.data.poses import PoseInstances
from p2s_jax.data.prepare import coco_persons
from p2s_jax.evaluation import plan, presets
from p2s_jax.evaluation import runner as ev
from p2s_jax.evaluation.metrics import coco_star_excluded, evaluate_segm
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.keypoints import labelled_points
from p2s_jax.parallel import make_mesh
from p2s_jax.utils.files import write_json
from p2s_jax.utils.images import load_image

MODEL, SIZE = "sam2.1_hiera_t", 256

pytestmark = NEEDS_REAL_COCO_AND_REFERENCE


@pytest.fixture(scope="module")
def coco():
    return coco_lib.load_coco(REAL_COCO / "test_coco.json")


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

    subset = coco_persons(json.loads((REAL_COCO / "test_coco.json").read_text()))
    assert sorted(a["id"] for a in subset["annotations"]) == sorted(
        a["id"] for a in coco.anns.values() if a["num_keypoints"] > 0)
    assert len(subset["images"]) == 4
    small_too = coco_persons(json.loads((REAL_COCO / "test_coco.json").read_text()), 32.0**2)
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
    poses = plan.ground_truth_prompt_poses(coco)
    config = presets.settings("sam-pose2seg", ground_truth=True, images_per_device=2)
    return ev.run_dataset(models[1], coco, REAL_COCO, poses, config,
                          mesh=make_mesh(jax.devices()[:1]), progress=False)


def ground_truth_keypoints(coco, image_id):
    """(P, 17, 2) with NaN for unlabelled points, (P, 17) binary visibility."""
    gt = coco_lib.ground_truth_poses(coco, image_id)
    triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], -1)
    return labelled_points(triplets)


def just_outside(keypoints, image_hw):
    """Each person's extreme labelled keypoints moved just past the four borders (left, top,
    right, bottom): what a pose estimator predicts for a limb cut by the frame."""
    keypoints = keypoints.copy()
    height, width = image_hw
    for person in keypoints:
        labelled = np.flatnonzero(np.isfinite(person[:, 0]))
        if len(labelled) < 4:
            continue
        x, y = person[labelled, 0], person[labelled, 1]
        person[labelled[np.argmin(x)], 0] = -2.5
        person[labelled[np.argmin(y)], 1] = -0.5
        person[labelled[np.argmax(x)], 0] = width + 1.5
        person[labelled[np.argmax(y)], 1] = height + 3.0
    return keypoints


def authors_pipeline(coco, models, keypoints_of):
    """The authors' inference on the real photos: their selection (MaxSpread_3 on binary
    visibility, tests/support/authors.py) of `keypoints_of(image_id) -> (P, 17, 2), (P, 17)`, the
    official predictor with holes / sprinkles cleaned, their exclusive masks.
    -> image_id -> (masks (P, H, W) bool, picks per person or None)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(models[0], max_hole_area=10.0, max_sprinkle_area=50.0)
    predictor._bb_feat_sizes = [(SIZE // 4 // s, SIZE // 4 // s) for s in (1, 2, 4)]
    out = {}
    for image_id in sorted(coco.getImgIds()):
        image = load_image(REAL_COCO / coco.imgs[image_id]["file_name"])
        keypoints, visibility = keypoints_of(image_id)
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
def authors_run(coco, models, monkeypatch_module):
    monkeypatch_module.setattr("sam2.utils.misc.get_connected_components",
                               scipy_connected_components)
    return authors_pipeline(coco, models, lambda i: ground_truth_keypoints(coco, i))


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


def assert_equals_the_authors(run, authors, keypoints_of) -> tuple[int, int]:
    """Person by person: the same prompt points and the same mask after exclusive masks.
    -> (empty prompts, prompt points outside their photo)."""
    by_image = {}
    for result in run.results:
        by_image.setdefault(result["image_id"], []).append(result)
    empty_prompts = outside = 0
    for image_id, (expected, picks) in authors.items():
        prompts = run.prompts[image_id]
        assert prompts.has_prompt.all()  # the authors prompt everyone (the empty prompt included)
        results = by_image[image_id]
        assert len(results) == len(expected)
        keypoints, _ = keypoints_of(image_id)
        for person, (result, mask, chosen) in enumerate(zip(results, expected, picks)):
            labels = prompts.labels[person]
            if chosen is None:
                empty_prompts += 1
                np.testing.assert_array_equal(labels[:1], [-2])
            else:
                np.testing.assert_array_equal(labels[labels >= 0], 1)
                points = prompts.coords[person][labels == 1]
                np.testing.assert_allclose(points, keypoints[person, chosen])
                mask_h, mask_w = mask.shape
                outside += int(((points < 0) | (points >= [mask_w, mask_h])).any(-1).sum())
            ours = mask_utils.decode(result["segmentation"]).astype(bool)
            assert result["score"] == 1.0  # ground-truth poses: Pose2Seg's constant score
            assert (ours != mask).mean() < 2e-3, (image_id, person)
    for image_id, results in by_image.items():  # exclusive: no pixel in two masks
        masks = np.stack([mask_utils.decode(r["segmentation"]) for r in results])
        assert masks.sum(axis=0).max() <= 1
    return empty_prompts, outside


def test_preset_equals_the_authors_pipeline_person_by_person(coco, preset_run, authors_run):
    empty, _ = assert_equals_the_authors(preset_run, authors_run,
                                         lambda i: ground_truth_keypoints(coco, i))
    assert empty == 2  # the two persons without keypoints


def test_keypoints_just_outside_the_photo_as_the_authors_run_them(coco, models, authors_run,
                                                                  monkeypatch_module):
    """Each person's extreme keypoints moved just past the four borders: the preset prompts
    them as given, as the authors' selection and the official predictor do, person by person
    (exclusive masks included); `--outside-keypoints drop` never prompts them."""
    def shifted(image_id):
        keypoints, visibility = ground_truth_keypoints(coco, image_id)
        info = coco.imgs[image_id]
        return just_outside(keypoints, (info["height"], info["width"])), visibility

    poses = {}
    for image_id, pose in plan.ground_truth_prompt_poses(coco).items():
        poses[image_id] = dataclasses.replace(pose, keypoints=shifted(image_id)[0])
    config = presets.settings("sam-pose2seg", ground_truth=True, images_per_device=2)
    run = ev.run_dataset(models[1], coco, REAL_COCO, poses, config,
                         mesh=make_mesh(jax.devices()[:1]), progress=False)
    authors = authors_pipeline(coco, models, shifted)
    empty, outside = assert_equals_the_authors(run, authors, shifted)
    assert empty == 2 and outside >= 5
    dropped = ev.run_dataset(models[1], coco, REAL_COCO, poses, dataclasses.replace(
        config, prompt=dataclasses.replace(config.prompt, outside_keypoints="drop")),
        mesh=make_mesh(jax.devices()[:1]), progress=False)
    for image_id, prompts in dropped.prompts.items():
        height, width = coco.imgs[image_id]["height"], coco.imgs[image_id]["width"]
        points = prompts.coords[prompts.labels == 1]
        assert ((points >= 0) & (points < [width, height])).all()


def test_postprocess_changes_masks_on_these_photos(coco, models, preset_run):
    """The post-processing is not idle on real photos: without it some masks differ."""
    poses = plan.ground_truth_prompt_poses(coco)
    config = presets.settings("sam-pose2seg", ground_truth=True, images_per_device=2,
                                       postprocess=MaskPostprocess())
    plain = ev.run_dataset(models[1], coco, REAL_COCO, poses, config,
                           mesh=make_mesh(jax.devices()[:1]), progress=False)
    differ = sum(a["segmentation"]["counts"] != b["segmentation"]["counts"]
                 for a, b in zip(plain.results, preset_run.results))
    assert differ >= 3


# ------------------------------------------------------------------------------ boxes by OKS


def test_oks_equals_pycocotools_and_gt_boxes_follow_it(coco):
    """OKS of jittered real poses against the real ground truth equals COCOeval.computeOks;
    each pose then takes the box of its own person, and a pose far from everyone keeps its box."""
    from pycocotools.cocoeval import COCOeval

    from p2s_jax.data.matching import ground_truth_boxes, keypoint_similarity

    rng = np.random.default_rng(0)
    detections = []
    for ann in coco.anns.values():
        if ann["num_keypoints"] == 0:
            continue
        triplets = np.asarray(ann["keypoints"], np.float64).reshape(17, 3)
        jitter = rng.normal(0, 4.0, (17, 2))
        keypoints = np.where(triplets[:, 2:] > 0, triplets[:, :2] + jitter, 0.0)
        detections.append({"image_id": ann["image_id"], "category_id": 1,
                           "score": float(rng.uniform(0.5, 1)), "ann": ann["id"],
                           "keypoints": np.concatenate([keypoints, np.ones((17, 1))], 1)
                           .ravel().tolist()})
    evaluator = COCOeval(coco, coco.loadRes(copy_entries(detections)), iouType="keypoints")
    evaluator.params.imgIds = sorted(coco.getImgIds())
    with coco_lib.quiet():
        evaluator.evaluate()
    for image_id in sorted(coco.getImgIds()):
        mine = [d for d in detections if d["image_id"] == image_id]
        gt = coco_lib.ground_truth_poses(coco, image_id)
        keep = np.asarray([coco.anns[int(i)]["num_keypoints"] > 0 for i in gt.ann_ids])
        triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], -1)
        areas = np.asarray([coco.anns[int(i)]["area"] for i in gt.ann_ids])
        det_keypoints = np.asarray([d["keypoints"] for d in mine]).reshape(-1, 17, 3)[..., :2]
        ours = keypoint_similarity(det_keypoints, triplets, areas)
        # pycocotools orders detections by score; it compares persons without keypoints to
        # their box instead, which no pose can be matched to here (0)
        order = np.argsort([-d["score"] for d in mine], kind="mergesort")
        np.testing.assert_allclose(ours[order][:, keep], evaluator.ious[(image_id, 1)][:, keep],
                                   rtol=1e-12, atol=1e-15)
        assert (ours[:, ~keep] == 0).all()
        poses = PoseInstances(
            det_keypoints.astype(np.float32), {"confidence": np.ones(det_keypoints.shape[:2])},
            np.tile(np.float32([0, 0, 5, 5]), (len(mine), 1)),
            np.asarray([d["score"] for d in mine], np.float32))
        boxes, matched = ground_truth_boxes(gt, triplets, areas, poses)
        assert matched.all()
        for d, box in zip(mine, boxes):
            np.testing.assert_allclose(box, gt.boxes[list(gt.ann_ids).index(d["ann"])])
    far = PoseInstances(np.full((1, 17, 2), 5000.0, np.float32),
                                 {"confidence": np.ones((1, 17))},
                                 np.float32([[1, 2, 3, 4]]), np.ones(1, np.float32))
    gt = coco_lib.ground_truth_poses(coco, 785)
    triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], -1)
    boxes, matched = ground_truth_boxes(gt, triplets, np.asarray([1e4]), far)
    assert not matched[0] and boxes[0].tolist() == [1, 2, 3, 4]
    # persons without keypoints (as all of CIHP's) match by box IoU
    gt = coco_lib.ground_truth_poses(coco, 40083)
    triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], -1)
    bare = int(np.flatnonzero(~(triplets[..., 2] > 0).any(-1))[0])
    near = gt.boxes[bare] + np.float32([1, -1, 1, 1])
    pose = PoseInstances(np.full((1, 17, 2), np.nan, np.float32),
                                  {"confidence": np.zeros((1, 17))}, near[None],
                                  np.ones(1, np.float32))
    boxes, matched = ground_truth_boxes(gt, triplets, np.ones(len(gt)), pose)
    assert matched[0] and np.array_equal(boxes[0], gt.boxes[bare])


def copy_entries(detections):
    return [{k: v for k, v in d.items() if k != "ann"} for d in detections]


# ------------------------------------------------------------------------------ Fig. 2


def test_correction_curve_command_and_first_point_against_the_predictor(coco, models, tmp_path,
                                                                        capsys):
    """`p2s curve` on the real photos; its first value equals, person by person, the IoU of the
    interactive predictor's best-of-three mask for the official evaluation point (the centre of
    the ground truth, scipy's exact distance transform)."""
    from PIL import Image
    from scipy import ndimage

    from p2s_jax import cli
    from p2s_jax.inference.predictor import Predictor
    from p2s_jax.train.correction import CorrectionConfig
    from p2s_jax.train.curve import CurveConfig, correction_curve, image_targets
    from weights_conversion import save_orbax

    ours = models[1]
    curve = correction_curve(ours, coco, REAL_COCO, CurveConfig(CorrectionConfig(
        num_points=3, sampler="center")))
    assert curve.num_persons == 14 and curve.num_images == 4 and curve.mean_iou.shape == (3,)
    assert np.all((curve.mean_iou >= 0) & (curve.mean_iou <= 1))

    predictor = Predictor(ours)
    ious = []
    for image_id in sorted(coco.getImgIds()):
        image, targets, _ = image_targets(coco, image_id, REAL_COCO, SIZE, 8)
        predictor.set_image(image)
        for mask in targets.masks[targets.valid]:
            depth = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
            row, col = np.unravel_index(np.argmax(depth), depth.shape)
            out = predictor.predict(np.float32([[[col, row]]]), np.int32([[1]]),
                                    multimask_output=True)
            best = out.masks[0, np.argmax(out.iou[0])]
            ious.append((best & mask).sum() / (best | mask).sum())
    assert curve.mean_iou[0] == pytest.approx(np.mean(ious), abs=2e-3)

    folder = tmp_path / "converted"
    save_orbax(ours, folder)
    out = tmp_path / "curve.png"
    assert cli.main(["curve", "--annotations", str(REAL_COCO / "test_coco.json"), "--images",
                     str(REAL_COCO), "--checkpoint", str(folder), "--points", "3", "--out",
                     str(out)]) == 0
    printed = capsys.readouterr().out
    assert "converted center (14 persons): mean IoU after each point: " + " ".join(
        f"{v:.4f}" for v in curve.mean_iou) in printed  # deterministic
    assert Image.open(out).size == (760, 480)


def test_segment_a_real_photo_with_the_preset(coco, models, tmp_path, capsys):
    """`p2s segment --preset sam-pose2seg` on a real photo with its published keypoints: an
    overlay of the photo's size and one mask per person."""
    from PIL import Image

    from p2s_jax import cli
    from weights_conversion import save_orbax

    image_id = 197388
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    poses = tmp_path / "poses.json"
    poses.write_text(json.dumps([{"keypoints": a["keypoints"], "score": 1.0} for a in anns]))
    folder = tmp_path / "converted"
    save_orbax(models[1], folder)
    out, masks_out = tmp_path / "overlay.png", tmp_path / "masks.json"
    info = coco.imgs[image_id]
    assert cli.main(["segment", "--image", str(REAL_COCO / info["file_name"]), "--keypoints",
                     str(poses), "--checkpoint", str(folder), "--preset", "sam-pose2seg",
                     "--out", str(out), "--masks-out", str(masks_out)]) == 0
    assert "5 people, 5 masks" in capsys.readouterr().out
    assert Image.open(out).size == (info["width"], info["height"])
    people = json.loads(masks_out.read_text())["people"]
    masks = np.stack([mask_utils.decode(p["segmentation"]) for p in people])
    assert masks.sum(axis=0).max() <= 1  # exclusive, as the preset says
    assert all(len(p["prompt"]) == 3 for p in people)  # MaxVis_3 on these well-labelled persons


# ------------------------------------------------------------------------------ Tab. 7 crops


def test_crop_to_box_equals_the_official_predictor_on_each_crop(coco, models):
    """Each person on its own 1.5x box crop (the authors' rounding and clipping), the mask
    pasted back: person by person the official predictor's on the same crop; with exclusive
    masks the pasted masks no longer overlap."""
    from p2s_jax.evaluation.plan import crop_window

    poses = plan.ground_truth_prompt_poses(coco)
    config = presets.settings("sam-pose2seg", ground_truth=True, images_per_device=2,
                                       crop_to_box=1.5, exclusive=False,
                                       postprocess=MaskPostprocess())
    mesh = make_mesh(jax.devices()[:1])
    run = ev.run_dataset(models[1], coco, REAL_COCO, poses, config, mesh=mesh, progress=False)
    assert run.report.num_images == 4 and run.report.num_people == 14
    predictor = reference.official_predictor(models[0])
    by_image = {}
    for result in run.results:
        by_image.setdefault(result["image_id"], []).append(result)
    for image_id, results in by_image.items():
        image = load_image(REAL_COCO / coco.imgs[image_id]["file_name"])
        prompts = run.prompts[image_id]
        assert len(results) == len(prompts.has_prompt)
        for person, result in enumerate(results):
            x0, y0, x1, y1 = crop_window(poses[image_id].boxes[person], 1.5, image.shape[:2])
            predictor.set_image(image[y0:y1, x0:x1])
            labels = prompts.labels[person]
            points = prompts.coords[person][labels >= 0] - np.float32([x0, y0])
            logits, _, _ = predictor.predict(point_coords=points.reshape(-1, 2),
                                             point_labels=labels[labels >= 0],
                                             multimask_output=False, return_logits=True)
            expected = np.zeros(image.shape[:2], bool)
            expected[y0:y1, x0:x1] = logits[0] > 0
            ours = mask_utils.decode(result["segmentation"]).astype(bool)
            differ = ours != expected
            assert differ.mean() < 1e-3, (image_id, person)
            outside = np.ones(image.shape[:2], bool)
            outside[y0:y1, x0:x1] = False
            assert not ours[outside].any()  # nothing outside the crop
    overlaps = [np.stack([mask_utils.decode(r["segmentation"]) for r in results]).sum(0).max()
                for results in by_image.values()]
    assert max(overlaps) > 1  # the crops' masks do overlap before exclusivity
    exclusive = ev.run_dataset(models[1], coco, REAL_COCO, poses,
                               dataclasses.replace(config, exclusive=True), mesh=mesh,
                               progress=False)
    for image_id in by_image:
        masks = np.stack([mask_utils.decode(r["segmentation"]) for r in exclusive.results
                          if r["image_id"] == image_id])
        assert masks.sum(axis=0).max() <= 1
