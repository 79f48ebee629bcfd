"""Detections <-> ground-truth persons: which detected pose belongs to which annotated person.

Used to train on detected keypoints (the builder's detection source) and to evaluate with
ground-truth boxes and detected keypoints. A detection naming its ground truth ('annotation_id',
or 'id') is matched to it; the others, highest score first, to the unmatched ground-truth person
of largest box IoU, if >= `IOU_THRESHOLD` (box: the detection's 'bbox', else the extent of its
keypoints).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from p2s_jax.data.coco import CocoFormatError, PoseInstances
from p2s_jax.keypoints import NUM_KEYPOINTS
from p2s_jax.utils.files import read_json

IOU_THRESHOLD = 0.5
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
    num = len(gt)
    keypoints = np.zeros((num, NUM_KEYPOINTS, 2), np.float32)
    visibility = np.zeros((num, NUM_KEYPOINTS), np.float32)
    score = np.zeros(num, np.float32)
    if len(detections):
        keypoints[found] = detections.keypoints[index[found]]
        visibility[found] = scores[index[found]]
        score[found] = detections.det_score[index[found]]
    return keypoints, visibility, score


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
