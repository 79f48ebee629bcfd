"""Mask AP of person results: pycocotools' COCOeval (iouType 'segm', person category).

COCO* (Tables 2 and 3 of the paper): COCO val2017 without the persons that carry no pose, i.e.
ground-truth persons that are small (area < 32**2) or have no annotated keypoint. They are not
deleted (a prediction on a deleted person would count as a false positive) but turned into ignore
regions, so predictions on them count neither as TP nor as FP. How that is done, and why:

- `COCOeval._prepare` overwrites every ground truth's 'ignore' with its 'iscrowd' flag
  (`gt['ignore'] = 'iscrowd' in gt and gt['iscrowd']`) for iouType 'segm'/'bbox'; an 'ignore' key
  in the annotation file is therefore a no-op for mask AP.
- The ignore mechanism pycocotools does honour for masks is 'iscrowd'. `evaluate_segm` sets
  `iscrowd = 1` on shallow copies of the excluded persons (the caller's COCO object is never
  modified). A crowd ground truth is ignored, its IoU with a prediction is |pred & gt| / |pred|
  and it may absorb any number of predictions: every prediction lying (at the IoU threshold) on an
  excluded person is dropped from the ranking, duplicates and partial masks included, while
  predictions on regular persons are matched to those first, exactly as COCO does for crowds.
- Predictions that match nothing remain false positives, as in plain COCO.

Empty results are valid input: with ground-truth persons present AP is 0.0; where no ground truth
and no prediction exist (e.g. APs under COCO*, where every small person is ignored) pycocotools
reports -1, and so do we.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from p2s_jax.data.coco import (SMALL_AREA, CocoFormatError, check_image_id, person_category_id,
                               quiet, rle_areas)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _keypoint_count(ann: dict) -> int | None:
    """Number of labelled keypoints (v > 0) of an annotation; None when it carries no pose field."""
    if "num_keypoints" in ann:
        return int(ann["num_keypoints"])
    if ann.get("keypoints"):
        return int(np.count_nonzero(np.asarray(ann["keypoints"], np.float64)[2::3] > 0))
    return None


def coco_star_excluded(ann: dict) -> bool:
    """Whether COCO* ignores this ground-truth person: small (area < 32**2) or no keypoint."""
    return ann["area"] < SMALL_AREA or not _keypoint_count(ann)


def _person_ground_truth(coco_gt: COCO, person: int, coco_star: bool) -> COCO:
    """The person annotations of `coco_gt` as a new COCO, on shallow copies of the annotations.

    COCOeval writes into the ground truth it evaluates ('segmentation' becomes RLE, 'ignore' is
    added); the copies keep the caller's object as it was. With `coco_star`, the excluded persons
    become crowd (ignore) regions, see the module docstring.
    """
    anns = [dict(a) for a in coco_gt.dataset["annotations"] if a["category_id"] == person]
    if coco_star:
        if anns and all(_keypoint_count(a) is None for a in anns):
            raise CocoFormatError("COCO* needs keypoint annotations ('num_keypoints' or "
                                  "'keypoints'), e.g. person_keypoints_val2017.json; this ground "
                                  "truth has none")
        for ann in anns:
            if not ann["iscrowd"] and coco_star_excluded(ann):
                ann["iscrowd"] = 1
    gt = COCO()
    gt.dataset = {"images": list(coco_gt.dataset["images"]),
                  "categories": [c for c in coco_gt.dataset["categories"] if c["id"] == person],
                  "annotations": anns}
    with quiet():
        gt.createIndex()
    return gt


def _results_coco(gt: COCO, results: Sequence[dict], person: int) -> COCO:
    """Validated results as a COCO object (what COCO.loadRes builds, without its pitfalls).

    loadRes fails on an empty list, prefers a 'bbox' key over the mask for the area, and writes
    into the caller's dicts; here each result is checked, copied, and given its mask area / box.
    """
    anns = []
    for i, r in enumerate(results):
        where = f"results[{i}]"
        if not isinstance(r, dict) or any(k not in r for k in
                                          ("image_id", "category_id", "segmentation", "score")):
            raise CocoFormatError(f"{where}: expected an object with 'image_id', 'category_id', "
                                  f"'segmentation' and 'score' (see encode_results), got {r!r:.80}")
        image = gt.imgs.get(r["image_id"])
        if image is None:
            raise CocoFormatError(f"{where}: image_id {r['image_id']} is not in the ground truth")
        where += f" (image_id={r['image_id']})"
        if r["category_id"] != person:
            raise CocoFormatError(f"{where}: category_id {r['category_id']} is not the person "
                                  f"category ({person})")
        seg = r["segmentation"]
        if not (isinstance(seg, dict) and "size" in seg and "counts" in seg):
            raise CocoFormatError(f"{where}: 'segmentation' must be a compressed RLE "
                                  "{'size': [H, W], 'counts': ...} (see encode_results)")
        if list(seg["size"]) != [image["height"], image["width"]]:
            raise CocoFormatError(f"{where}: mask size {list(seg['size'])} differs from the image "
                                  f"size [{image['height']}, {image['width']}] (H, W)")
        score = r["score"]
        if not isinstance(score, int | float) or not math.isfinite(score):
            raise CocoFormatError(f"{where}: 'score' must be a finite number, got {score!r}")
        anns.append({"id": i + 1, "image_id": r["image_id"], "category_id": person,
                     "segmentation": {"size": list(seg["size"]), "counts": seg["counts"]},
                     "score": float(score), "iscrowd": 0})
    if anns:
        rles = [a["segmentation"] for a in anns]
        for ann, area, box in zip(anns, rle_areas(rles), mask_utils.toBbox(rles)):
            ann["area"], ann["bbox"] = float(area), [float(v) for v in box]
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                  "annotations": anns}
    with quiet():
        dt.createIndex()
    return dt


def format_metrics(metrics: Mapping[str, float], title: str = "segm AP (person)") -> str:
    """Two-line table of `METRIC_NAMES` in percent; '-' where pycocotools reports -1."""
    cells = ["     -" if metrics[n] < 0 else f"{100 * metrics[n]:6.1f}" for n in METRIC_NAMES]
    return "\n".join([title, " ".join(f"{n:>6}" for n in METRIC_NAMES), " ".join(cells)])


def evaluate_segm(coco_gt: COCO, results: Iterable[dict], image_ids: Iterable[int] | None = None,
                  coco_star: bool = False) -> dict:
    """Mask AP of person results with pycocotools' COCOeval (iouType 'segm', person category).

    Args:
      coco_gt: ground truth from `load_coco`; not modified.
      results: dicts as `encode_results` returns them (an empty list is valid: AP 0.0 when
        ground-truth persons exist, -1 where pycocotools has nothing to measure).
      image_ids: the images to evaluate; all images of `coco_gt` by default (as COCO does: an
        image without results counts its persons as missed).
      coco_star: the paper's COCO*: small persons (area < 32**2) and persons without annotated
        keypoints become ignore regions (see the module docstring).

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl"}: floats in [0, 1] (or -1), COCOeval.stats[:6];
      and "table": those metrics formatted in percent by `format_metrics`.
    """
    person = person_category_id(coco_gt)
    results = list(results)
    if image_ids is None:
        image_ids = sorted(coco_gt.getImgIds())
    else:
        image_ids = sorted({check_image_id(coco_gt, i) for i in image_ids})
        if not image_ids:
            raise ValueError("image_ids is empty: nothing to evaluate")
    gt = _person_ground_truth(coco_gt, person, coco_star)
    dt = _results_coco(gt, results, person)
    evaluator = COCOeval(gt, dt, iouType="segm")
    evaluator.params.imgIds = image_ids
    evaluator.params.catIds = [person]
    with quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}
    title = (f"{'COCO* ' if coco_star else ''}segm AP (person), {len(image_ids)} images, "
             f"{len(results)} results")
    metrics["table"] = format_metrics(metrics, title)
    return metrics
