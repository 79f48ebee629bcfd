"""Detections <-> ground-truth persons: which detected pose belongs to which annotated person.

Training on detected keypoints (the builder's detection source): a detection naming its ground
truth ('annotation_id', or 'id') is matched to it; the others, highest score first, to the
unmatched ground-truth person of largest box IoU, if >= `IOU_THRESHOLD` (box: the detection's
'bbox', else the extent of its keypoints).

Evaluating with ground-truth boxes and detected keypoints (Tab. 4, `ground_truth_boxes`): each
detection, highest score first, takes the unmatched ground-truth person of highest similarity,
if >= `OKS_THRESHOLD`, and is prompted with that person's box. The similarity is OKS (COCO's
keypoint similarity, `keypoint_similarity`, the measure the pose detector is evaluated with)
for persons with labelled keypoints, and box IoU for persons without (CIHP has none).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from p2s_jax.data.coco import CocoFormatError
from p2s_jax.data.poses import PoseInstances
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json

IOU_THRESHOLD = 0.5
OKS_THRESHOLD = 0.5
# COCO's per-keypoint OKS constants (pycocotools `COCOeval.Params.kpt_oks_sigmas`).
OKS_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                       .87, .89, .89]) / 10.0
NO_ID = -1  # "no annotation id" in integer arrays (COCO annotation ids are positive)


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) boxes [x0, y0, x1, y1] -> (N, M) intersection over union (0 if empty)."""
    a, b = np.asarray(boxes_a, np.float64)[:, None], np.asarray(boxes_b, np.float64)[None]
    size = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0,
                   None)
    inter = size[..., 0] * size[..., 1]
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def detection_boxes(detections: PoseInstances) -> np.ndarray:
    """(D, 4) [x0, y0, x1, y1]: the detections' boxes, else the extent of their 17 keypoints."""
    if detections.boxes is not None:
        return detections.boxes
    return np.concatenate([detections.keypoints.min(axis=1), detections.keypoints.max(axis=1)],
                          axis=1)


def match_detections(gt_boxes: np.ndarray, gt_ids: np.ndarray, det_boxes: np.ndarray,
                     det_scores: np.ndarray, det_ids: np.ndarray | None = None,
                     iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Assigns at most one detection to each ground-truth person.

    First, detections carrying a ground-truth id (det_ids != NO_ID) take that person, highest
    score first (a later claim on a taken person is dropped). Then the other detections, highest
    score first, take the still unmatched person of largest box IoU, if >= iou_threshold.

    Args:
      gt_boxes: (G, 4) [x0, y0, x1, y1]. gt_ids: (G,) annotation ids.
      det_boxes: (D, 4) [x0, y0, x1, y1]. det_scores: (D,) instance scores.
      det_ids: (D,) ground-truth annotation id named by each detection, NO_ID where none; None
        for no ids at all.

    Returns:
      (G,) int64: index of the detection matched to each person, -1 where none.

    Raises:
      ValueError: a detection names an id that is not among gt_ids.
    """
    gt_ids = np.asarray(gt_ids, np.int64)
    num_det = len(det_scores)
    det_ids = np.full(num_det, NO_ID, np.int64) if det_ids is None else np.asarray(det_ids)
    match = np.full(len(gt_ids), -1, np.int64)
    order = np.argsort(-np.asarray(det_scores, np.float64), kind="stable")
    for d in order[det_ids[order] != NO_ID]:
        (where,) = np.nonzero(gt_ids == det_ids[d])
        if where.size == 0:
            raise ValueError(f"detection {d} names annotation id {det_ids[d]}, which is not a "
                             f"non-crowd person of this image (ids {gt_ids.tolist()})")
        if match[where[0]] < 0:
            match[where[0]] = d
    iou = box_iou(det_boxes, gt_boxes).reshape(num_det, len(gt_ids))
    for d in order[det_ids[order] == NO_ID]:
        candidates = np.where(match < 0, iou[d], -1.0)
        best = int(np.argmax(candidates)) if candidates.size else 0
        if candidates.size and candidates[best] >= iou_threshold:
            match[best] = d
    return match


def matched_poses(gt: PoseInstances, detections: PoseInstances, det_ids: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints of the ground-truth persons from their matched detections.

    Args:
      gt: the ground-truth persons (boxes and ann_ids set), P of them.
      detections: the image's detections.
      det_ids: (D,) ground-truth ids named by the detections (NO_ID: none), or None.

    Returns:
      keypoints (P, 17, 2) float32, visibility (P, 17) float32 (the detection's 'visibility',
      else its 'confidence'; 0 for an unmatched person), score (P,) float32 (0 unmatched).
    """
    match = match_detections(gt.boxes, gt.ann_ids, detection_boxes(detections),
                             detections.det_score, det_ids)
    found = match >= 0
    index = np.where(found, match, 0)
    scores = detections.scores.get("visibility", detections.scores["confidence"])
    num, joints = len(gt), detections.keypoints.shape[1]
    keypoints = np.zeros((num, joints, 2), np.float32)
    visibility = np.zeros((num, joints), np.float32)
    score = np.zeros(num, np.float32)
    if len(detections):
        keypoints[found] = detections.keypoints[index[found]]
        visibility[found] = scores[index[found]]
        score[found] = detections.det_score[index[found]]
    return keypoints, visibility, score


def keypoint_similarity(det_keypoints: np.ndarray, gt_triplets: np.ndarray,
                        gt_areas: np.ndarray) -> np.ndarray:
    """COCO's OKS (`COCOeval.computeOks`) for ground truths with labelled keypoints.

    det_keypoints (D, 17, 2) (NaN coordinates count as infinitely far), gt_triplets (G, 17, 3)
    with v in {0, 1, 2}, gt_areas (G,) -> (D, G): mean over the ground truth's labelled
    keypoints of exp(-d^2 / (2 area (2 sigma)^2)); 0 for a ground truth without any labelled
    keypoint (COCO compares those to the box instead; no pose can be matched to them here).
    """
    det = np.asarray(det_keypoints, np.float64)[:, None]  # (D, 1, 17, 2)
    gt = np.asarray(gt_triplets, np.float64)[None]  # (1, G, 17, 3)
    if gt.shape[-2] != len(OKS_SIGMAS):
        raise InputError(f"OKS is defined for COCO's 17 keypoints; these poses have "
                         f"{gt.shape[-2]} (match by box instead: --box given)")
    variances = (2 * OKS_SIGMAS) ** 2
    squared = np.sum((det - gt[..., :2]) ** 2, axis=-1)  # (D, G, 17)
    squared = np.where(np.isnan(squared), np.inf, squared)
    area = np.asarray(gt_areas, np.float64)[None, :, None]
    similarity = np.exp(-squared / variances / (area + np.spacing(1)) / 2)
    labelled = gt[..., 2] > 0
    count = labelled.sum(-1)
    total = np.where(labelled, similarity, 0.0).sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def ground_truth_boxes(gt: PoseInstances, gt_triplets: np.ndarray, gt_areas: np.ndarray,
                       detections: PoseInstances,
                       oks_threshold: float = OKS_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's box replaced by its OKS-matched ground-truth person's box.

    gt: the image's ground-truth persons (boxes set); gt_triplets (G, 17, 3), gt_areas (G,);
    detections: the image's D detections. Returns boxes (D, 4) xyxy (a detection without a
    match keeps `detection_boxes`) and matched (D,) bool. Detections take persons highest score
    first, each person once (ties: the lower index).
    """
    boxes = detection_boxes(detections).astype(np.float32).copy()
    matched = np.zeros(len(detections), bool)
    if not len(detections) or not len(gt):
        return boxes, matched
    with_keypoints = (np.asarray(gt_triplets)[..., 2] > 0).any(-1)
    similarity = np.where(with_keypoints[None],
                          keypoint_similarity(detections.keypoints, gt_triplets, gt_areas),
                          box_iou(detection_boxes(detections), gt.boxes))
    taken = np.zeros(len(gt), bool)
    for d in np.argsort(-np.asarray(detections.det_score, np.float64), kind="stable"):
        candidates = np.where(taken, -1.0, similarity[d])
        best = int(np.argmax(candidates))
        if candidates[best] >= oks_threshold:
            taken[best], matched[d] = True, True
            boxes[d] = gt.boxes[best]
    return boxes, matched


def load_detection_ids(path: str | os.PathLike, coco: COCO) -> dict[int, np.ndarray]:
    """Ground-truth ids named by each detection ('annotation_id', else 'id'; NO_ID if neither).

    Per image, in file order, for the detections of images in `coco`: aligned with the persons of
    `load_keypoint_detections(path, coco)[image_id]`.

    Raises:
      CocoFormatError: an id that is not an integer, naming the file and the entry.
    """
    path = Path(path)
    entries = read_json(path, "keypoint detection file", CocoFormatError)
    ids: dict[int, list[int]] = {}
    for index, entry in enumerate(entries):
        if entry["image_id"] not in coco.imgs:
            continue
        value = entry.get("annotation_id", entry.get("id", NO_ID))
        if not isinstance(value, int) or isinstance(value, bool):
            raise CocoFormatError(f"{path}: entry {index} (image_id={entry['image_id']}): "
                                  f"'annotation_id' / 'id' must be an integer, got {value!r}")
        ids.setdefault(entry["image_id"], []).append(value)
    return {image_id: np.asarray(values, np.int64) for image_id, values in ids.items()}
