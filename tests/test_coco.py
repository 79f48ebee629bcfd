"""p2s_jax.data.coco (with p2s_jax.data.synthetic): pycocotools is the reference for masks and AP."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from p2s_jax.data.coco import (CocoFormatError, encode_results, ground_truth_poses, load_coco,
                               load_image_poses, load_keypoint_detections)
from p2s_jax.data.poses import resolve_channels
from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections
from p2s_jax.evaluation.metrics import evaluate_segm
from p2s_jax.keypoints import NUM_KEYPOINTS
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.images import load_image

SIZE = (240, 320)
# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    annotations, images = make_coco_dataset(root, num_images=6, people_per_image=(3, 6), seed=0,
                                            image_size=SIZE)
    detections = make_keypoint_detections(load_coco(annotations), seed=1, noise_px=2.0,
                                          out_path=root / "detections.json")
    return annotations, images, detections


@pytest.fixture(scope="module")
def coco(dataset):
    return load_coco(dataset[0])


def gt_masks(coco, image_id) -> np.ndarray:
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    masks = [coco.annToMask(a).astype(bool) for a in anns]
    return np.stack(masks) if masks else np.zeros((0, *SIZE), bool)


def results_from(coco, masks_of, scores_of=None) -> list[dict]:
    results = []
    for image_id in coco.getImgIds():
        masks = masks_of(image_id)
        scores = (np.linspace(0.9, 0.5, len(masks)) if scores_of is None
                  else scores_of(image_id, len(masks)))
        results += encode_results(image_id, masks, scores)
    return results


# ----------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_dataset_is_coco_like(dataset, coco):
    annotations, images, _ = dataset
    anns = list(coco.anns.values())
    assert len(coco.imgs) == 6 and len(anns) >= 18
    v = np.concatenate([np.asarray(a["keypoints"])[2::3] for a in anns])
    assert set(np.unique(v)) == {0, 1, 2}  # visible, occluded and unlabelled keypoints
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and (areas > 96**2).any()  # small, and large persons
    assert any(a["num_keypoints"] == 0 for a in anns)
    assert {type(a["segmentation"]) for a in anns} == {list, dict}  # polygons and RLE
    for a in anns:
        rle = coco.annToRLE(a)
        assert a["area"] == pytest.approx(float(mask_utils.area(rle)))
        np.testing.assert_allclose(a["bbox"], mask_utils.toBbox(rle), atol=0.01)
        assert a["num_keypoints"] == np.count_nonzero(np.asarray(a["keypoints"])[2::3])
        assert a["iscrowd"] == 0
    # Persons overlap: their visible masks are disjoint, but some boxes intersect.
    def intersect(a, b):
        return (a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3]
                and b[1] < a[1] + a[3])
    assert any(intersect(a["bbox"], b["bbox"]) for a in anns for b in anns
               if a["id"] < b["id"] and a["image_id"] == b["image_id"])
    modes = {Image.open(images / i["file_name"]).mode for i in coco.dataset["images"]}
    assert {"L", "RGB", "RGBA"} <= modes
    for image in coco.dataset["images"]:
        assert load_image(images / image["file_name"]).shape == (*SIZE, 3)


def test_synthetic_is_deterministic(tmp_path, dataset):
    first, images = make_coco_dataset(tmp_path / "a", 2, 4, seed=0, image_size=SIZE)
    again, images_again = make_coco_dataset(tmp_path / "b", 2, 4, seed=0, image_size=SIZE)
    other, _ = make_coco_dataset(tmp_path / "c", 2, 4, seed=5, image_size=SIZE)
    assert first.read_bytes() == again.read_bytes()
    assert json.loads(first.read_text())["annotations"] != json.loads(other.read_text())[
        "annotations"]
    for path in images.iterdir():
        assert path.read_bytes() == (images_again / path.name).read_bytes()
    coco = load_coco(first)
    det_a = make_keypoint_detections(coco, 3, 2.0, tmp_path / "d1.json").read_bytes()
    det_b = make_keypoint_detections(coco, 3, 2.0, tmp_path / "d2.json").read_bytes()
    assert det_a == det_b


# ----------------------------------------------------------------------------------------------
# Mask AP (pycocotools)


def test_ground_truth_masks_give_ap_one(coco):
    results = results_from(coco, lambda i: gt_masks(coco, i))
    for coco_star in (False, True):
        metrics = evaluate_segm(coco, results, coco_star=coco_star)
        for name in ("AP", "AP50", "AP75"):
            assert metrics[name] == pytest.approx(1.0), (coco_star, name, metrics["table"])
    assert "AP50" in metrics["table"] and "100.0" in metrics["table"]


def test_evaluation_leaves_the_ground_truth_alone(coco):
    before = copy.deepcopy(coco.dataset)
    evaluate_segm(coco, results_from(coco, lambda i: gt_masks(coco, i)), coco_star=True)
    assert coco.dataset == before


def shifted(masks: np.ndarray, dx: int) -> np.ndarray:
    return np.roll(masks, dx, axis=2)


def test_perturbed_predictions_lower_ap(coco):
    exact = evaluate_segm(coco, results_from(coco, lambda i: gt_masks(coco, i)))
    slight = evaluate_segm(coco, results_from(coco, lambda i: shifted(gt_masks(coco, i), 2)))
    strong = evaluate_segm(coco, results_from(coco, lambda i: shifted(gt_masks(coco, i), 6)))
    assert exact["AP"] > slight["AP"] > strong["AP"]
    assert strong["AP50"] >= strong["AP75"]


def test_shuffled_masks_and_confident_false_positives_lower_ap(coco):
    image_ids = coco.getImgIds()
    # Each image also gets the next image's persons as predictions (all images are SIZE).
    def with_others(i):
        other = image_ids[(image_ids.index(i) + 1) % len(image_ids)]
        return np.concatenate([gt_masks(coco, i), gt_masks(coco, other)])

    def scores(high_for_wrong):
        def of(i, n):
            own = len(coco.getAnnIds(imgIds=[i]))
            right, wrong = np.full(own, 0.5), np.full(n - own, 0.9 if high_for_wrong else 0.1)
            return np.concatenate([right, wrong])
        return of

    wrong_last = evaluate_segm(coco, results_from(coco, with_others, scores(False)))
    wrong_first = evaluate_segm(coco, results_from(coco, with_others, scores(True)))
    assert wrong_last["AP"] == pytest.approx(1.0)  # ranked below every correct mask
    assert wrong_first["AP"] < 0.9 and wrong_first["AP50"] < 0.9


def test_empty_results_do_not_crash(coco):
    metrics = evaluate_segm(coco, [])
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0 and metrics["AP75"] == 0.0
    assert evaluate_segm(coco, [], coco_star=True)["AP"] == 0.0


def test_image_subset(coco):
    first = coco.getImgIds()[0]
    results = results_from(coco, lambda i: gt_masks(coco, i) if i == first
                           else np.zeros((0, *SIZE), bool))
    assert evaluate_segm(coco, results)["AP"] < 1.0
    assert evaluate_segm(coco, results, image_ids=[first])["AP"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match="image_id 999"):
        evaluate_segm(coco, results, image_ids=[999])


# ----------------------------------------------------------------------------------------------
# COCO*: a hand-made case against a brute-force count


H = W = 200


def rect(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


GT = {  # name: (mask, number of labelled keypoints)
    "A": (rect(10, 90, 10, 50), 10),      # large, posed
    "B": (rect(100, 190, 60, 100), 8),    # large, posed
    "S": (rect(10, 30, 150, 170), 5),     # small (400 px): no pose in COCO*
    "K": (rect(100, 190, 120, 180), 0),   # large, no keypoint
}
PREDICTIONS = [  # (mask, score)
    (rect(150, 190, 10, 50), 0.95),  # on nothing: FP under both
    (GT["A"][0], 0.90),              # exact A: TP
    (rect(10, 18, 150, 170), 0.80),  # part of the small person, IoU 0.4: FP / ignored
    (GT["K"][0], 0.70),              # exact K: TP / ignored
    (rect(100, 190, 68, 108), 0.60),  # B shifted, IoU 2/3: TP at IoU <= 0.65, else FP
]


def write_gt(path) -> None:
    anns = []
    for i, (name, (mask, labelled)) in enumerate(GT.items()):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        keypoints = np.zeros((NUM_KEYPOINTS, 3))
        keypoints[:labelled] = [30, 30, 2]
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                     "segmentation": {"size": [H, W], "counts": rle["counts"].decode()},
                     "area": float(mask.sum()), "bbox": mask_utils.toBbox(rle).tolist(),
                     "keypoints": keypoints.ravel().tolist(), "num_keypoints": labelled})
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (1, 2)]
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "person"}]}))


def brute_force_ap(predictions, regular, ignored) -> tuple[float, dict]:
    """COCO's matching and 101-point AP, written out: -> (AP, {threshold: outcomes})."""
    order = sorted(predictions, key=lambda p: -p[1])
    aps, outcomes = [], {}
    for t in np.linspace(0.5, 0.95, 10):
        t = round(float(t), 2)
        matched, labels = set(), []
        for mask, _ in order:
            ious = {g: (mask & m).sum() / (mask | m).sum() for g, m in regular.items()
                    if g not in matched}
            best = max(ious, key=ious.get, default=None)
            if best is not None and ious[best] >= t:
                matched.add(best)
                labels.append("TP")
            elif any((mask & m).sum() / mask.sum() >= t for m in ignored.values()):
                labels.append("ignored")  # crowd IoU: intersection over the prediction
            else:
                labels.append("FP")
        outcomes[t] = labels
        kept = [label == "TP" for label in labels if label != "ignored"]
        tp, fp = np.cumsum(kept), np.cumsum(np.logical_not(kept))
        recall, precision = tp / len(regular), tp / np.maximum(tp + fp, 1)
        ap = [max(precision[recall >= r], default=0.0) for r in np.linspace(0, 1, 101)]
        aps.append(np.mean(ap))
    return float(np.mean(aps)), outcomes


def test_coco_star_matches_brute_force(tmp_path):
    write_gt(tmp_path / "gt.json")
    gt = load_coco(tmp_path / "gt.json")
    masks = np.stack([m for m, _ in PREDICTIONS])
    results = encode_results(1, masks, np.array([s for _, s in PREDICTIONS]))
    masks_of = {name: mask for name, (mask, _) in GT.items()}

    coco_ap, coco_outcomes = brute_force_ap(PREDICTIONS, masks_of, {})
    star_ap, star_outcomes = brute_force_ap(
        PREDICTIONS, {k: masks_of[k] for k in "AB"}, {k: masks_of[k] for k in "SK"})
    # The prediction on the small person (third by score): FP under COCO, ignored under COCO*;
    # the one on the unposed person: TP under COCO, ignored under COCO*.
    for t in coco_outcomes:
        assert coco_outcomes[t][2] == "FP" and star_outcomes[t][2] == "ignored"
        assert coco_outcomes[t][3] == "TP" and star_outcomes[t][3] == "ignored"
    assert coco_outcomes[0.65][4] == "TP" and coco_outcomes[0.7][4] == "FP"

    coco = evaluate_segm(gt, results, image_ids=[1])
    star = evaluate_segm(gt, results, image_ids=[1], coco_star=True)
    assert coco["AP"] == pytest.approx(coco_ap, abs=1e-12)
    assert star["AP"] == pytest.approx(star_ap, abs=1e-12)
    assert star["AP"] > coco["AP"]
    assert star["APs"] == -1.0 and coco["APs"] >= 0  # no small person is left to measure

    # Dropping the small-person prediction changes COCO (one FP fewer) but not COCO*.
    without = [r for i, r in enumerate(results) if i != 2]
    assert evaluate_segm(gt, without, image_ids=[1])["AP"] > coco["AP"]
    assert evaluate_segm(gt, without, image_ids=[1], coco_star=True)["AP"] == star["AP"]


def test_no_ground_truth_gives_minus_one(tmp_path):
    write_gt(tmp_path / "gt.json")
    gt = load_coco(tmp_path / "gt.json")
    metrics = evaluate_segm(gt, [], image_ids=[2])  # image 2 holds no person
    assert all(metrics[k] == -1.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert "     -" in metrics["table"]


def test_coco_star_needs_keypoints(tmp_path):
    write_gt(tmp_path / "gt.json")
    data = json.loads((tmp_path / "gt.json").read_text())
    for ann in data["annotations"]:
        del ann["keypoints"], ann["num_keypoints"]
    (tmp_path / "nokp.json").write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match="COCO\\* needs keypoint annotations"):
        evaluate_segm(load_coco(tmp_path / "nokp.json"), [], coco_star=True)


# ----------------------------------------------------------------------------------------------
# Results encoding and validation


def test_encode_results_round_trip():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 37, 51)) > 0.5
    results = encode_results(7, masks, np.array([0.3, 0.2, 0.1]))
    json.dumps(results)
    assert [r["score"] for r in results] == [0.3, 0.2, 0.1]
    for result, mask in zip(results, masks):
        assert result["image_id"] == 7 and result["category_id"] == 1
        assert isinstance(result["segmentation"]["counts"], str)
        assert result["segmentation"]["size"] == [37, 51]
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]).astype(bool), mask)
    assert encode_results(7, np.zeros((0, 5, 5), bool), np.zeros(0)) == []


def test_encode_results_errors():
    masks = np.zeros((2, 5, 5), bool)
    with pytest.raises(ValueError, match="boolean"):
        encode_results(1, masks.astype(np.float32), np.ones(2))
    with pytest.raises(ValueError, match=r"\(P, H, W\)"):
        encode_results(1, masks[0], np.ones(2))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        encode_results(1, masks, np.ones(3))
    with pytest.raises(ValueError, match="finite"):
        encode_results(1, masks, np.array([1.0, np.nan]))


def test_results_validation(coco):
    image_id = coco.getImgIds()[0]
    good = encode_results(image_id, gt_masks(coco, image_id)[:1], np.ones(1))[0]
    with pytest.raises(CocoFormatError, match="results\\[0\\]: image_id 12345 is not in"):
        evaluate_segm(coco, [dict(good, image_id=12345)])
    small = encode_results(image_id, np.zeros((1, 10, 10), bool), np.ones(1))[0]
    with pytest.raises(CocoFormatError, match=r"mask size \[10, 10\] differs .* \[240, 320\]"):
        evaluate_segm(coco, [good, small])
    with pytest.raises(CocoFormatError, match="category_id 3 is not the person category"):
        evaluate_segm(coco, [dict(good, category_id=3)])
    with pytest.raises(CocoFormatError, match="'score' must be a finite number"):
        evaluate_segm(coco, [dict(good, score=math.nan)])


# ----------------------------------------------------------------------------------------------
# Ground-truth files


def test_load_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "annotations": [,]}')
    with pytest.raises(CocoFormatError, match=r"broken\.json: invalid JSON: .* line 1, column 32"):
        load_coco(broken)
    no_anns = tmp_path / "no_anns.json"
    no_anns.write_text('{"images": [], "categories": []}')
    with pytest.raises(CocoFormatError,
                       match=r"no_anns\.json: missing top-level key 'annotations'"):
        load_coco(no_anns)
    write_gt(tmp_path / "gt.json")
    data = json.loads((tmp_path / "gt.json").read_text())
    del data["annotations"][2]["iscrowd"]
    (tmp_path / "no_crowd.json").write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=r"annotations\[2\] \(id=3\) lacks key\(s\) "
                                              r"\['iscrowd'\]"):
        load_coco(tmp_path / "no_crowd.json")
    data = json.loads((tmp_path / "gt.json").read_text())
    data["annotations"][1]["image_id"] = 77
    (tmp_path / "dangling.json").write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match="image_id 77 is not in 'images'"):
        load_coco(tmp_path / "dangling.json")


def test_ground_truth_poses(coco):
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        poses = ground_truth_poses(coco, image_id)
        assert len(poses) == len(anns)
        triplets = np.array([a["keypoints"] for a in anns], np.float32).reshape(-1, 17, 3)
        np.testing.assert_array_equal(poses.keypoints, triplets[..., :2])
        np.testing.assert_array_equal(poses.scores["visibility"], triplets[..., 2] > 0)
        assert set(np.unique(poses.scores["visibility"])) <= {0.0, 1.0}
        boxes = np.array([a["bbox"] for a in anns], np.float32)
        np.testing.assert_allclose(poses.boxes[:, :2], boxes[:, :2])
        np.testing.assert_allclose(poses.boxes[:, 2:], boxes[:, :2] + boxes[:, 2:], rtol=1e-6)
        np.testing.assert_array_equal(poses.det_score, 1.0)
        np.testing.assert_array_equal(poses.ann_ids, [a["id"] for a in anns])
    with pytest.raises(KeyError, match="image_id 999"):
        ground_truth_poses(coco, 999)


# ----------------------------------------------------------------------------------------------
# Keypoint detections


def test_load_keypoint_detections(dataset, coco):
    raw = json.loads(dataset[2].read_text())
    poses = load_keypoint_detections(dataset[2], coco)
    assert set(poses) == set(coco.getImgIds())
    assert sum(len(p) for p in poses.values()) == len(raw) == len(coco.anns)
    image_id = raw[0]["image_id"]
    entries = [e for e in raw if e["image_id"] == image_id]
    p = poses[image_id]
    assert p.keypoints.dtype == np.float32 and p.keypoints.shape == (len(entries), 17, 2)
    assert set(p.scores) == {"visibility", "presence", "expected_oks", "confidence"}
    triplets = np.array([e["keypoints"] for e in entries], np.float32).reshape(-1, 17, 3)
    np.testing.assert_array_equal(p.keypoints, triplets[..., :2])
    np.testing.assert_array_equal(p.scores["confidence"], triplets[..., 2])
    for key in ("visibility", "presence", "expected_oks"):
        np.testing.assert_array_equal(p.scores[key],
                                      np.array([e[key] for e in entries], np.float32))
    box = np.array(entries[0]["bbox"], np.float32)
    np.testing.assert_allclose(p.boxes[0], [*box[:2], *(box[:2] + box[2:])], rtol=1e-6)
    np.testing.assert_array_equal(p.det_score, np.array([e["score"] for e in entries],
                                                        np.float32))

    assert p.ann_ids is None
    # Detections sit near the ground truth they were made from.
    gt = ground_truth_poses(coco, image_id)
    labelled = gt.scores["visibility"] > 0
    assert np.abs(p.keypoints - gt.keypoints)[labelled].mean() < 5.0

@pytest.mark.parametrize("names", [("keypoints_visible", "probs", "keypoint_oks"),
                                   ("keypoint_vis", "keypoint_prob", "expected_oks")])
def test_detection_score_names_of_probpose_and_bboxmaskpose(dataset, coco, tmp_path, names):
    """ProbPose's results file and BBoxMaskPose write the same channels under other keys."""
    raw = json.loads(dataset[2].read_text())
    renamed = [{k: v for k, v in e.items() if k not in ("visibility", "presence", "expected_oks")}
               | dict(zip(names, (e["visibility"], e["presence"], e["expected_oks"])))
               for e in raw]
    path = tmp_path / "renamed.json"
    path.write_text(json.dumps(renamed))
    ours, theirs = load_keypoint_detections(dataset[2], coco), load_keypoint_detections(path, coco)
    for image_id in ours:
        assert set(theirs[image_id].scores) == set(ours[image_id].scores)
        for name in ours[image_id].scores:
            np.testing.assert_array_equal(theirs[image_id].scores[name], ours[image_id].scores[name])
    del renamed[3][names[0]]
    path.write_text(json.dumps(renamed))
    with pytest.raises(CocoFormatError, match=r"entry 3 .*missing key 'visibility'"):
        load_keypoint_detections(path, coco)


def write_detections(path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.mark.parametrize("corrupt, pattern", [
    (lambda e: e[3].update(keypoints=e[3]["keypoints"][:48]),
     r"entry 3 \(image_id=\d+\): 'keypoints' must hold 51 numbers, got 48"),
    (lambda e: e[1].update(visibility=e[1]["visibility"][:16]),
     r"entry 1 \(image_id=\d+\): 'visibility' must hold 17 numbers, got 16"),
    (lambda e: e[2].update(score=math.nan),
     r"entry 2 \(image_id=\d+\): 'score' must be a finite number, got nan"),
    (lambda e: e[4]["presence"].__setitem__(5, math.nan),
     r"entry 4 \(image_id=\d+\): 'presence' holds a non-finite value \(nan\) at position 5"),
    (lambda e: e[2].pop("expected_oks"),
     r"entry 2 \(image_id=\d+\): missing key 'expected_oks' \(entry 0 has it"),
    (lambda e: e[0].update(category_id=2), r"entry 0 .*category_id 2 is not the person"),
    (lambda e: e[1].update(bbox=[1, 2, 3]), r"entry 1 .*'bbox' must hold 4 numbers, got 3"),
    (lambda e: e[1].update(keypoints="oops"), r"entry 1 .*'keypoints' must be a list of 51"),
])
def test_detection_errors(tmp_path, dataset, coco, corrupt, pattern):
    entries = json.loads(dataset[2].read_text())
    corrupt(entries)
    path = write_detections(tmp_path / "bad.json", entries)
    with pytest.raises(CocoFormatError, match=r"bad\.json: " + pattern):
        load_keypoint_detections(path, coco)


def test_detection_file_errors(tmp_path, dataset, coco):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1, "score": }]')
    with pytest.raises(CocoFormatError, match=r"broken\.json: invalid JSON: .*line 1, column 27"):
        load_keypoint_detections(broken, coco)
    with pytest.raises(CocoFormatError, match="expected a JSON list"):
        load_keypoint_detections(write_detections(tmp_path / "d.json", {"a": 1}), coco)
    entries = json.loads(dataset[2].read_text())
    elsewhere = [dict(e, image_id=e["image_id"] + 1000) for e in entries]
    with pytest.raises(CocoFormatError, match="none of the .* detections refers to an image"):
        load_keypoint_detections(write_detections(tmp_path / "e.json", elsewhere), coco)
    with pytest.warns(UserWarning, match="dropped 1 of"):
        poses = load_keypoint_detections(
            write_detections(tmp_path / "f.json", entries + elsewhere[:1]), coco)
    assert sum(len(p) for p in poses.values()) == len(entries)
    minimal = [{k: e[k] for k in ("image_id", "category_id", "keypoints", "score")}
               for e in entries]
    poses = load_keypoint_detections(write_detections(tmp_path / "g.json", minimal), coco)
    assert all(set(p.scores) == {"confidence"} and p.boxes is None for p in poses.values())
    assert load_keypoint_detections(write_detections(tmp_path / "h.json", []), coco)[1].keypoints \
        .shape == (0, 17, 2)


def test_keypoint_files_share_one_absent_rule(tmp_path, dataset, coco):
    """Both keypoint-file readers: a triplet [0, 0, 0] is absent (NaN), anything else is kept as
    written, even with a zero score; the two readers give the same arrays for the same entry."""
    entries = json.loads(Path(dataset[2]).read_text())
    entry = dict(entries[0])
    triplets = np.asarray(entry["keypoints"], np.float64).reshape(NUM_KEYPOINTS, 3)
    triplets[3] = 0.0  # COCO's "not labelled"
    triplets[5, 2] = 0.0  # a located keypoint with zero confidence: kept
    entry["keypoints"] = triplets.ravel().tolist()
    detections = tmp_path / "detections.json"
    detections.write_text(json.dumps([entry]))
    one_image = tmp_path / "one_image.json"
    one_image.write_text(json.dumps([entry]))
    poses = load_keypoint_detections(detections, coco)[entry["image_id"]]
    image_poses = load_image_poses(one_image)
    for read in (poses, image_poses):
        assert np.isnan(read.keypoints[0, 3]).all()
        np.testing.assert_array_equal(read.keypoints[0, 5], triplets[5, :2].astype(np.float32))
        others = np.delete(np.arange(NUM_KEYPOINTS), 3)
        np.testing.assert_array_equal(read.keypoints[0, others],
                                      triplets[others, :2].astype(np.float32))
    np.testing.assert_array_equal(poses.keypoints, image_poses.keypoints)
    for name in poses.scores:
        np.testing.assert_array_equal(poses.scores[name], image_poses.scores[name])
    np.testing.assert_array_equal(poses.boxes, image_poses.boxes)


def test_more_than_255_results(coco):
    """pycocotools' mask.area overflows a uint8 count under NumPy 2 beyond 255 masks: our areas go
    in batches (brute-force pixel counts), and evaluate_segm takes a full dataset's results."""
    from p2s_jax.data.coco import rle_areas

    rng = np.random.default_rng(0)
    masks = rng.random((300, 24, 30)) < rng.random((300, 1, 1))
    rles = [r["segmentation"] for r in encode_results(1, masks, np.ones(300))]
    np.testing.assert_array_equal(rle_areas(rles), masks.sum((1, 2)))
    results = []
    for image_id in sorted(coco.getImgIds()):
        results += encode_results(image_id, gt_masks(coco, image_id).repeat(20, axis=0),
                                  np.linspace(1.0, 0.5, 20 * len(gt_masks(coco, image_id))))
    assert len(results) > 255
    ap = evaluate_segm(coco, results)["AP"]
    assert 0.0 < ap <= 1.0


def test_load_pose_file_formats(tmp_path):
    triplets = np.zeros((17, 3))
    triplets[:, 0], triplets[:, 1], triplets[:, 2] = np.arange(17), 2 * np.arange(17), 0.9
    triplets[16] = 0  # COCO's "not labelled"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([triplets.tolist()]))
    poses = load_image_poses(plain)
    assert resolve_channels(poses).visibility == "confidence"
    assert poses.boxes is None and len(poses) == 1
    assert np.isnan(poses.keypoints[0, 16]).all() and poses.keypoints[0, 3].tolist() == [3, 6]

    results = tmp_path / "results.json"
    entry = {"image_id": 7, "category_id": 1, "keypoints": triplets.ravel().tolist(),
             "score": 0.8, "visibility": [0.5] * 17, "bbox": [1, 2, 10, 20]}
    results.write_text(json.dumps([entry, entry]))
    poses = load_image_poses(results)
    assert resolve_channels(poses).visibility == "visibility" and len(poses) == 2
    np.testing.assert_allclose(poses.boxes[0], [1, 2, 11, 22])
    np.testing.assert_allclose(poses.det_score, [0.8, 0.8])
    with pytest.raises(InputError, match="carry no 'presence' keypoint scores"):
        resolve_channels(poses, "presence")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(CocoFormatError, match="broken.json: invalid JSON"):
        load_image_poses(broken)
