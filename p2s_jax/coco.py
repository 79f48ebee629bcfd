"""COCO-format person datasets: ground truth, keypoint prompts, mask results and AP (pycocotools).

pycocotools is the reference throughout: annotations are indexed by `pycocotools.coco.COCO`, masks
are encoded with `pycocotools.mask`, and AP is `pycocotools.cocoeval.COCOeval` with iouType 'segm'
restricted to the person category. This module only adds input validation (errors that name the
file, the entry and the key) and the paper's COCO* protocol.

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

import contextlib
import dataclasses
import io
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

NUM_KEYPOINTS = 17
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# COCO's skeleton, 1-based keypoint indices as in person_keypoints_*.json.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
# Per-keypoint score arrays a PoseInstances may carry ('confidence' is the s of each [x, y, s]).
SCORE_NAMES = ("visibility", "presence", "expected_oks", "confidence")
# Optional per-keypoint arrays of a detection entry, as ProbPose writes them.
_DETECTION_SCORE_KEYS = ("visibility", "presence", "expected_oks")
SMALL_AREA = 32.0**2
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

_IMAGE_KEYS = ("id", "width", "height", "file_name")
_CATEGORY_KEYS = ("id", "name")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd")


class CocoFormatError(ValueError):
    """A COCO-format file or a results list that does not have the expected structure."""


# ----------------------------------------------------------------------------------------------
# Ground truth


def _quiet():
    """pycocotools prints progress on stdout; this silences it."""
    return contextlib.redirect_stdout(io.StringIO())


def _read_json(path: str | os.PathLike, what: str) -> Any:
    """Parses a JSON file; errors name the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}"
                                + (" (it is a directory)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: invalid JSON: {e.msg} at line {e.lineno}, column "
                              f"{e.colno} (character {e.pos})") from None
    except UnicodeDecodeError as e:
        raise CocoFormatError(f"{path}: not UTF-8 text ({e})") from None


def _check_entries(path: Path, entries: Any, section: str, required: Sequence[str]) -> set:
    """Checks that `entries` is a list of objects with `required` keys and unique ids; -> ids."""
    if not isinstance(entries, list):
        raise CocoFormatError(f"{path}: '{section}' must be a list, got {type(entries).__name__}")
    ids = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CocoFormatError(f"{path}: {section}[{i}] must be an object, "
                                  f"got {type(entry).__name__}")
        missing = [k for k in required if k not in entry]
        if missing:
            raise CocoFormatError(f"{path}: {section}[{i}] (id={entry.get('id')}) lacks key(s) "
                                  f"{missing}; each entry of '{section}' needs {list(required)}")
        if entry["id"] in ids:
            raise CocoFormatError(f"{path}: {section}[{i}] repeats id {entry['id']}")
        ids.add(entry["id"])
    return ids


def _check_segmentation(path: Path, index: int, ann: dict) -> None:
    """A polygon list or an RLE dict, as pycocotools' annToRLE accepts them."""
    seg = ann["segmentation"]
    is_polygons = isinstance(seg, list) and len(seg) > 0 and all(
        isinstance(p, list) and len(p) > 0 for p in seg)
    is_rle = isinstance(seg, dict) and "size" in seg and "counts" in seg
    if not (is_polygons or is_rle):
        raise CocoFormatError(
            f"{path}: annotations[{index}] (id={ann['id']}): 'segmentation' must be a non-empty "
            f"list of polygons or an RLE object with 'size' and 'counts', got {str(seg)[:80]}")


def _validate_ground_truth(path: Path, data: Any) -> None:
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with 'images', 'annotations' and "
                              f"'categories', got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(
                f"{path}: missing top-level key '{key}' (found {sorted(data)}); a COCO "
                "ground-truth file needs 'images', 'annotations' and 'categories'")
    image_ids = _check_entries(path, data["images"], "images", _IMAGE_KEYS)
    category_ids = _check_entries(path, data["categories"], "categories", _CATEGORY_KEYS)
    _check_entries(path, data["annotations"], "annotations", _ANNOTATION_KEYS)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id={ann['id']})"
        if ann["id"] == 0:  # COCOeval stores matches as ids with 0 meaning "unmatched"
            raise CocoFormatError(f"{where}: annotation id 0 is not allowed (pycocotools reads a "
                                  "match with id 0 as no match)")
        if ann["image_id"] not in image_ids:
            raise CocoFormatError(f"{where}: image_id {ann['image_id']} is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise CocoFormatError(f"{where}: category_id {ann['category_id']} is not in "
                                  "'categories'")
        _check_segmentation(path, i, ann)


def load_coco(path: str | os.PathLike) -> COCO:
    """Loads a COCO-format ground-truth file (COCO, OCHuman, CIHP) as a pycocotools COCO.

    The file is validated before indexing, so a malformed file stops here with an error naming the
    file and the reason rather than deep inside an evaluation.

    Raises:
      FileNotFoundError: the file does not exist.
      CocoFormatError: invalid JSON (with line / column), a missing top-level key ('images',
        'annotations', 'categories'), an entry lacking a required key, a repeated id, a dangling
        image / category reference or an unusable segmentation.
    """
    path = Path(path)
    data = _read_json(path, "COCO annotation file")
    _validate_ground_truth(path, data)
    coco = COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


def person_category_id(coco: COCO) -> int:
    """Id of the category named 'person'."""
    ids = coco.getCatIds(catNms=["person"])
    if len(ids) != 1:
        names = [c["name"] for c in coco.dataset.get("categories", [])]
        raise CocoFormatError(f"expected exactly one category named 'person', found {len(ids)} "
                              f"among categories {names}")
    return int(ids[0])


def _check_image_id(coco: COCO, image_id: int) -> int:
    if image_id not in coco.imgs:
        raise KeyError(f"image_id {image_id} is not in the ground truth "
                       f"({len(coco.imgs)} images)")
    return image_id


# ----------------------------------------------------------------------------------------------
# Pose prompts


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) [x, y, w, h] -> (..., 4) [x0, y0, x1, y1], float32."""
    boxes = np.asarray(boxes, np.float32)
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class PoseInstances:
    """The P person poses of one image: the prompts of SAM-pose2seg.

    Attributes:
      keypoints: (P, 17, 2) float32 x, y in image pixels, COCO keypoint order (`KEYPOINT_NAMES`).
      scores: name -> (P, 17) float32 per-keypoint scores, names among `SCORE_NAMES`:
        'visibility' (ProbPose's visibility, or binary v > 0 for ground truth; 0 = unusable),
        'presence' (probability that the keypoint lies in the image), 'expected_oks' (predicted
        localisation quality) and 'confidence' (the s of each [x, y, s] triplet).
      boxes: (P, 4) float32 [x0, y0, x1, y1] person boxes, or None.
      det_score: (P,) float32 instance scores (1.0 for ground truth; ones when not given).
      ann_ids: (P,) int64 ground-truth annotation ids, or None for detections.
    """

    keypoints: np.ndarray
    scores: Mapping[str, np.ndarray]
    boxes: np.ndarray | None = None
    det_score: np.ndarray | None = None
    ann_ids: np.ndarray | None = None

    def __post_init__(self):
        keypoints = np.asarray(self.keypoints, np.float32)
        if keypoints.ndim != 3 or keypoints.shape[1:] != (NUM_KEYPOINTS, 2):
            raise ValueError(f"keypoints must have shape (P, {NUM_KEYPOINTS}, 2), "
                             f"got {keypoints.shape}")
        num = keypoints.shape[0]
        scores = {}
        for name, value in self.scores.items():
            if name not in SCORE_NAMES:
                raise ValueError(f"unknown keypoint score {name!r}; expected one of {SCORE_NAMES}")
            scores[name] = _shaped(value, (num, NUM_KEYPOINTS), f"scores[{name!r}]", np.float32)
        boxes = None if self.boxes is None else _shaped(self.boxes, (num, 4), "boxes", np.float32)
        det_score = (np.ones(num, np.float32) if self.det_score is None
                     else _shaped(self.det_score, (num,), "det_score", np.float32))
        ann_ids = None if self.ann_ids is None else _shaped(self.ann_ids, (num,), "ann_ids",
                                                            np.int64)
        for field, value in (("keypoints", keypoints), ("scores", scores), ("boxes", boxes),
                             ("det_score", det_score), ("ann_ids", ann_ids)):
            object.__setattr__(self, field, value)

    def __len__(self) -> int:
        return self.keypoints.shape[0]

    @classmethod
    def empty(cls, score_names: Iterable[str] = (), with_boxes: bool = False) -> PoseInstances:
        """No person (P = 0), with the given score names (and boxes), so that shapes line up."""
        return cls(np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
                   {n: np.zeros((0, NUM_KEYPOINTS), np.float32) for n in score_names},
                   np.zeros((0, 4), np.float32) if with_boxes else None)

    def select(self, index: np.ndarray | Sequence[int]) -> PoseInstances:
        """The persons picked by integer indices or a (P,) boolean mask, in that order."""
        index = np.asarray(index)
        return PoseInstances(
            self.keypoints[index], {k: v[index] for k, v in self.scores.items()},
            None if self.boxes is None else self.boxes[index], self.det_score[index],
            None if self.ann_ids is None else self.ann_ids[index])


def _shaped(value: Any, shape: tuple[int, ...], name: str, dtype) -> np.ndarray:
    array = np.asarray(value, dtype)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def ground_truth_poses(coco: COCO, image_id: int, include_crowd: bool = False) -> PoseInstances:
    """Ground-truth person poses of one image, as prompts (the paper's Table 3 setting).

    visibility is binary: 1.0 where the annotation has v > 0 (labelled, visible or occluded),
    0.0 where v = 0 (not labelled: those keypoints, at (0, 0) in COCO, are unusable as prompts).
    Persons without any annotated keypoint (small persons in COCO; datasets without keypoints)
    are kept with all-zero visibility so that they still line up with the ground truth; boxes come
    from the annotation's bbox, det_score is 1.0 and ann_ids are the annotation ids.

    Args:
      coco: ground truth from `load_coco`.
      image_id: an image of `coco`.
      include_crowd: also return iscrowd=1 regions (off by default: they are not persons).

    Returns:
      PoseInstances with P = number of person annotations, in file order.
    """
    _check_image_id(coco, image_id)
    ann_ids = coco.getAnnIds(imgIds=[image_id], catIds=[person_category_id(coco)])
    anns = [a for a in coco.loadAnns(ann_ids) if include_crowd or not a.get("iscrowd", 0)]
    triplets = np.zeros((len(anns), NUM_KEYPOINTS, 3), np.float32)
    for i, ann in enumerate(anns):
        if ann.get("keypoints"):
            values = np.asarray(ann["keypoints"], np.float32)
            if values.shape != (3 * NUM_KEYPOINTS,):
                raise CocoFormatError(f"annotation id {ann['id']}: 'keypoints' must hold "
                                      f"{3 * NUM_KEYPOINTS} numbers, got {values.size}")
            triplets[i] = values.reshape(NUM_KEYPOINTS, 3)
    boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(len(anns), 4)
    return PoseInstances(
        keypoints=triplets[..., :2],
        scores={"visibility": (triplets[..., 2] > 0).astype(np.float32)},
        boxes=xywh_to_xyxy(boxes),
        det_score=np.ones(len(anns), np.float32),
        ann_ids=np.asarray([a["id"] for a in anns], np.int64),
    )


def _numbers(path: Path, index: int, entry: dict, key: str, length: int) -> np.ndarray:
    """entry[key] as a finite float64 array of `length`; errors name file, entry, key, lengths."""
    where = f"{path}: entry {index} (image_id={entry.get('image_id')})"
    value = entry[key]
    if not isinstance(value, list | tuple):
        raise CocoFormatError(f"{where}: '{key}' must be a list of {length} numbers, "
                              f"got {type(value).__name__}")
    if len(value) != length:
        raise CocoFormatError(f"{where}: '{key}' must hold {length} numbers, got {len(value)}")
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise CocoFormatError(f"{where}: '{key}' must hold numbers only") from None
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise CocoFormatError(f"{where}: '{key}' holds a non-finite value ({array[bad]}) at "
                              f"position {bad}")
    return array


def _parse_detection(path: Path, index: int, entry: Any, optional: Sequence[str],
                     person: int) -> tuple[int, np.ndarray, dict, np.ndarray | None, float]:
    """One keypoint result -> (image_id, (17, 2) xy, {name: (17,)}, (4,) xyxy or None, score)."""
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: entry {index} must be an object, "
                              f"got {type(entry).__name__}")
    where = f"{path}: entry {index} (image_id={entry.get('image_id')})"
    for key in ("image_id", "category_id", "keypoints", "score", *optional):
        if key not in entry:
            extra = (f" (entry 0 has it: every entry must carry the same optional fields "
                     f"{list(optional)})" if key in optional else "")
            raise CocoFormatError(f"{where}: missing key '{key}'{extra}")
    if entry["category_id"] != person:
        raise CocoFormatError(f"{where}: category_id {entry['category_id']} is not the person "
                              f"category ({person})")
    score = entry["score"]
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise CocoFormatError(f"{where}: 'score' must be a finite number, got {score!r}")
    triplets = _numbers(path, index, entry, "keypoints", 3 * NUM_KEYPOINTS).reshape(-1, 3)
    scores = {"confidence": triplets[:, 2]}
    for key in _DETECTION_SCORE_KEYS:
        if key in optional:
            scores[key] = _numbers(path, index, entry, key, NUM_KEYPOINTS)
    box = None
    if "bbox" in optional:
        box = xywh_to_xyxy(_numbers(path, index, entry, "bbox", 4))
    return entry["image_id"], triplets[:, :2], scores, box, float(score)


def load_keypoint_detections(path: str | os.PathLike, coco: COCO) -> dict[int, PoseInstances]:
    """Reads person keypoint detections in the COCO keypoint results format (ProbPose output).

    Each entry: {"image_id", "category_id", "keypoints": [x, y, s] * 17, "score"}, optionally with
    per-keypoint "visibility", "presence", "expected_oks" (17 floats each) and "bbox" ([x, y, w,
    h]) as ProbPose writes them. Which optional fields are present is read from the first entry
    and required of every entry, so that all images carry the same score names. 'confidence' is
    the s of each triplet; boxes are converted to [x0, y0, x1, y1].

    Entries whose image is not in `coco` are dropped with a warning (a detection file for all of
    val2017 may be used with a ground-truth subset); if no entry matches, that is an error.

    Args:
      path: the JSON file.
      coco: the ground truth the detections belong to (`load_coco`).

    Returns:
      image_id -> PoseInstances for every image of `coco` (P = 0 where nothing was detected), the
      persons in file order, det_score = "score", ann_ids None.

    Raises:
      FileNotFoundError, CocoFormatError: naming the file, the entry index, the key and the
        expected vs. actual length; NaN / infinite values name the image and the entry.
    """
    path = Path(path)
    entries = _read_json(path, "keypoint detection file")
    if not isinstance(entries, list):
        raise CocoFormatError(f"{path}: expected a JSON list of detections (COCO keypoint results "
                              f"format), got a JSON {type(entries).__name__}")
    person = person_category_id(coco)
    optional = [k for k in (*_DETECTION_SCORE_KEYS, "bbox")
                if entries and isinstance(entries[0], dict) and k in entries[0]]
    per_image = defaultdict(list)
    unknown = 0
    for index, entry in enumerate(entries):
        image_id, xy, scores, box, score = _parse_detection(path, index, entry, optional, person)
        if image_id not in coco.imgs:
            unknown += 1
            continue
        per_image[image_id].append((xy, scores, box, score))
    if entries and unknown == len(entries):
        raise CocoFormatError(f"{path}: none of the {len(entries)} detections refers to an image "
                              "of the ground truth; wrong split or dataset?")
    if unknown:
        warnings.warn(f"{path}: dropped {unknown} of {len(entries)} detections whose image is not "
                      "in the ground truth", stacklevel=2)
    score_names = ("confidence", *[k for k in _DETECTION_SCORE_KEYS if k in optional])
    return {image_id: _stack_detections(per_image.get(image_id, []), score_names,
                                        "bbox" in optional)
            for image_id in coco.getImgIds()}


def _stack_detections(items: list, score_names: Sequence[str], with_boxes: bool) -> PoseInstances:
    if not items:
        return PoseInstances.empty(score_names, with_boxes)
    return PoseInstances(
        keypoints=np.stack([xy for xy, _, _, _ in items]),
        scores={n: np.stack([s[n] for _, s, _, _ in items]) for n in score_names},
        boxes=np.stack([b for _, _, b, _ in items]) if with_boxes else None,
        det_score=np.asarray([score for _, _, _, score in items]),
    )


# ----------------------------------------------------------------------------------------------
# Results and evaluation


def encode_results(image_id: int, masks: np.ndarray, scores: np.ndarray,
                   category_id: int = 1) -> list[dict]:
    """Predicted masks of one image -> COCO segmentation results (compressed RLE, JSON-ready).

    Args:
      image_id: the image the masks belong to.
      masks: (P, H, W) bool, one mask per predicted person.
      scores: (P,) finite instance scores (AP ranks predictions by them).
      category_id: the person category id of the ground truth.

    Returns:
      P dicts {"image_id", "category_id", "segmentation": {"size": [H, W], "counts": str},
      "score"}; encoded with pycocotools.mask.encode on a Fortran-ordered uint8 (H, W, P) array.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores, np.float64)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (P, H, W), got {masks.shape}")
    if masks.dtype != np.bool_:
        raise ValueError(f"masks must be boolean (threshold the logits first), got dtype "
                         f"{masks.dtype}")
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must have shape ({masks.shape[0]},) to match masks "
                         f"{masks.shape}, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"image {image_id}: scores must be finite, got {scores}")
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"image_id": int(image_id), "category_id": int(category_id),
             "segmentation": {"size": [int(s) for s in rle["size"]],
                              "counts": rle["counts"].decode("ascii")},
             "score": float(score)}
            for rle, score in zip(rles, scores)]


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
    with _quiet():
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
        for ann, area, box in zip(anns, mask_utils.area(rles), mask_utils.toBbox(rles)):
            ann["area"], ann["bbox"] = float(area), [float(v) for v in box]
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"],
                  "annotations": anns}
    with _quiet():
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
        image_ids = sorted({_check_image_id(coco_gt, i) for i in image_ids})
        if not image_ids:
            raise ValueError("image_ids is empty: nothing to evaluate")
    gt = _person_ground_truth(coco_gt, person, coco_star)
    dt = _results_coco(gt, results, person)
    evaluator = COCOeval(gt, dt, iouType="segm")
    evaluator.params.imgIds = image_ids
    evaluator.params.catIds = [person]
    with _quiet():
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}
    title = (f"{'COCO* ' if coco_star else ''}segm AP (person), {len(image_ids)} images, "
             f"{len(results)} results")
    metrics["table"] = format_metrics(metrics, title)
    return metrics
