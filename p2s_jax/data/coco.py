"""COCO-format person files: ground truth, keypoint files and mask RLE (pycocotools).

pycocotools is the reference throughout: annotations are indexed by `pycocotools.coco.COCO` and
masks are encoded with `pycocotools.mask`. This module adds input validation (errors that name
the file, the entry and the key) and one reader for every keypoint file.

Keypoint files (`load_keypoint_detections` for a dataset, `load_image_poses` for one photo)
share one parser with one rule: a keypoint triplet [0, 0, 0] is COCO's "not labelled" and the
keypoint is absent (NaN coordinates), whatever the score names; any other triplet is kept as
written. Ground-truth annotations use their visibility flag instead (v = 0: absent,
`keypoints.labelled_points`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from p2s_jax.keypoints import (COCO17, KEYPOINT_NAMES, NUM_KEYPOINTS, SKELETON, KeypointSchema,
                               schema_for_count, schema_for_names)
from p2s_jax.data.poses import SCORE_NAMES, PoseInstances, xywh_to_xyxy
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json

# Optional per-keypoint arrays of a detection entry, and the keys they may be written under:
# ours first, then ProbPose's (`keypoints_visible`, `keypoint_probs` -> "probs" in its results
# file, `keypoint_oks`) and BBoxMaskPose's (`keypoint_vis`, `keypoint_prob`).
_DETECTION_SCORE_KEYS = ("visibility", "presence", "expected_oks")
SCORE_KEY_ALIASES = {
    "visibility": ("visibility", "keypoints_visible", "keypoint_vis"),
    "presence": ("presence", "probs", "keypoint_probs", "keypoint_prob"),
    "expected_oks": ("expected_oks", "keypoint_oks"),
}


def _score_key(entry: dict, name: str) -> str | None:
    """The key under which `entry` stores the per-keypoint score `name`, or None."""
    return next((key for key in SCORE_KEY_ALIASES[name] if key in entry), None)



SMALL_AREA = 32.0**2
# The person category of files this project writes (COCO-17 names, COCO's 1-based skeleton).
PERSON_CATEGORY = {"id": 1, "name": "person", "supercategory": "person",
                   "keypoints": list(KEYPOINT_NAMES), "skeleton": [list(e) for e in SKELETON]}

_IMAGE_KEYS = ("id", "width", "height", "file_name")
_CATEGORY_KEYS = ("id", "name")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd")
_KEYPOINT_ANNOTATION_KEYS = ("id", "image_id", "category_id", "keypoints")


class CocoFormatError(InputError):
    """A COCO-format file or a results list that does not have the expected structure."""


# ----------------------------------------------------------------------------------------------
# Ground truth


def quiet():
    """pycocotools prints progress on stdout; this silences it."""
    return contextlib.redirect_stdout(io.StringIO())


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


def _validate_ground_truth(path: Path, data: Any, keypoints_only: bool = False) -> None:
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
    _check_entries(path, data["annotations"], "annotations",
                   _KEYPOINT_ANNOTATION_KEYS if keypoints_only else _ANNOTATION_KEYS)
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
        if not keypoints_only:
            _check_segmentation(path, i, ann)


def _index(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with quiet():
        coco.createIndex()
    return coco


def with_schema(data: Any, schema: KeypointSchema | None, source: str | os.PathLike) -> Any:
    """A COCO-format dict whose person category names its keypoints in `schema` (None: `data`
    itself): `--schema` reads a file whose keypoint names fit no registered schema by position.
    The file is not changed; the count must match."""
    if schema is None or not isinstance(data, dict) or not isinstance(data.get("categories"),
                                                                      list):
        return data
    categories = []
    for category in data["categories"]:
        if isinstance(category, dict) and category.get("name") == "person":
            names = category.get("keypoints") or []
            count = len(names) or _annotation_keypoint_count(data)
            if count not in (None, schema.num_keypoints):
                raise CocoFormatError(f"{source}: --schema {schema.name} has "
                                      f"{schema.num_keypoints} keypoints, the file's persons "
                                      f"{count}")
            category = {**category, "keypoints": list(schema.keypoint_names)}
        categories.append(category)
    return {**data, "categories": categories}


def _annotation_keypoint_count(data: dict) -> int | None:
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and isinstance(ann.get("keypoints"), list):
            return len(ann["keypoints"]) // 3
    return None


def load_keypoint_annotations(path: str | os.PathLike, schema: KeypointSchema | None = None
                              ) -> tuple[dict, COCO]:
    """A COCO-format person file whose annotations carry keypoints but maybe no mask (CrowdPose,
    AI Challenger, MPII, Halpe in COCO format) -> (the file's dict as read, an indexed COCO).

    Annotations need 'id', 'image_id', 'category_id' and 'keypoints'; the COCO object sees
    copies with what is missing filled in ('iscrowd' 0, 'bbox' from the labelled keypoints,
    'area' from the box, no segmentation), so that nothing of the file is changed. `schema`:
    read the keypoints by position in it (`with_schema`)."""
    path = Path(path)
    data = read_json(path, "keypoint annotation file", CocoFormatError)
    return data, load_keypoint_annotations_dict(with_schema(data, schema, path), path)


def load_keypoint_annotations_dict(data: Any, source: str | os.PathLike) -> COCO:
    """`load_keypoint_annotations` of a dict read from `source` (named in errors)."""
    _validate_ground_truth(Path(source), data, keypoints_only=True)
    filled = []
    for ann in data["annotations"]:
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "bbox" not in ann:
            triplets = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            labelled = triplets[triplets[:, 2] > 0, :2]
            low = labelled.min(0) if len(labelled) else np.zeros(2)
            high = labelled.max(0) if len(labelled) else np.zeros(2)
            ann["bbox"] = [float(low[0]), float(low[1]), float(high[0] - low[0]),
                           float(high[1] - low[1])]
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("segmentation", [])
        filled.append(ann)
    return _index({**data, "annotations": filled})


def coco_from_dict(data: Any, source: str | os.PathLike) -> COCO:
    """`load_coco` of a dict read from `source` (named in errors)."""
    _validate_ground_truth(Path(source), data)
    return _index(data)


def load_coco(path: str | os.PathLike, schema: KeypointSchema | None = None) -> COCO:
    """Loads a COCO-format ground-truth file (COCO, OCHuman, CIHP) as a pycocotools COCO.

    The file is validated before indexing, so a malformed file stops here with an error naming the
    file and the reason rather than deep inside an evaluation. `schema`: read the keypoints by
    position in it (`with_schema`), for names that fit no registered schema.

    Raises:
      FileNotFoundError: the file does not exist.
      CocoFormatError: invalid JSON (with line / column), a missing top-level key ('images',
        'annotations', 'categories'), an entry lacking a required key, a repeated id, a dangling
        image / category reference or an unusable segmentation.
    """
    path = Path(path)
    data = with_schema(read_json(path, "COCO annotation file", CocoFormatError), schema, path)
    _validate_ground_truth(path, data)
    return _index(data)


def person_category_id(coco: COCO) -> int:
    """Id of the category named 'person'."""
    ids = coco.getCatIds(catNms=["person"])
    if len(ids) != 1:
        names = [c["name"] for c in coco.dataset.get("categories", [])]
        raise CocoFormatError(f"expected exactly one category named 'person', found {len(ids)} "
                              f"among categories {names}")
    return int(ids[0])


def check_image_id(coco: COCO, image_id: int) -> int:
    if image_id not in coco.imgs:
        raise KeyError(f"image_id {image_id} is not in the ground truth "
                       f"({len(coco.imgs)} images)")
    return image_id


def keypoint_schema(coco: COCO) -> KeypointSchema:
    """The keypoint schema of a COCO-format file: its person category's `keypoints` names
    (`schema_for_names`), else the one schema with as many keypoints as its annotations carry,
    else COCO-17 (a file without any keypoints)."""
    category = coco.cats[person_category_id(coco)]
    if category.get("keypoints"):
        return schema_for_names(category["keypoints"], "categories[person].keypoints")
    lengths = {len(a["keypoints"]) for a in coco.anns.values() if a.get("keypoints")}
    if not lengths:
        return COCO17
    if len(lengths) > 1 or min(lengths) % 3:
        raise CocoFormatError(f"annotations carry keypoint lists of lengths {sorted(lengths)}; "
                              "expected 3 numbers per keypoint, the same count everywhere")
    return schema_for_count(min(lengths) // 3, "annotations' keypoints")


def annotation_schema(path: str | os.PathLike, schema: KeypointSchema | None = None
                      ) -> KeypointSchema:
    """`keypoint_schema` of a COCO-format file, without indexing it (`schema`: `with_schema`)."""
    data = with_schema(read_json(Path(path), "COCO annotation file", CocoFormatError), schema,
                       path)
    coco = COCO()
    coco.dataset = {"categories": data.get("categories", []),
                    "annotations": [a for a in data.get("annotations", [])[:1]]}
    with quiet():
        coco.createIndex()
    return keypoint_schema(coco)


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
    check_image_id(coco, image_id)
    ann_ids = coco.getAnnIds(imgIds=[image_id], catIds=[person_category_id(coco)])
    anns = [a for a in coco.loadAnns(ann_ids) if include_crowd or not a.get("iscrowd", 0)]
    joints = keypoint_schema(coco).num_keypoints
    triplets = np.zeros((len(anns), joints, 3), np.float32)
    for i, ann in enumerate(anns):
        if ann.get("keypoints"):
            values = np.asarray(ann["keypoints"], np.float32)
            if values.shape != (3 * joints,):
                got = (f"a nested list of shape {values.shape}" if values.ndim > 1
                       else f"{values.size}")
                raise CocoFormatError(f"annotation id {ann['id']}: 'keypoints' must be a flat "
                                      f"list of {3 * joints} numbers [x1, y1, v1, x2, ...] "
                                      f"(COCO's format), got {got}")
            triplets[i] = values.reshape(joints, 3)
    boxes = np.asarray([a["bbox"] for a in anns], np.float32).reshape(len(anns), 4)
    return PoseInstances(
        keypoints=triplets[..., :2],
        scores={"visibility": (triplets[..., 2] > 0).astype(np.float32)},
        boxes=xywh_to_xyxy(boxes),
        det_score=np.ones(len(anns), np.float32),
        ann_ids=np.asarray([a["id"] for a in anns], np.int64),
    )


def _numbers(where: str, value: Any, key: str, length: int) -> np.ndarray:
    """`value` (entry[key], flat or nested lists) as a finite float64 array of `length`; errors
    name the place, the key and the lengths."""
    try:
        array = np.asarray(value, np.float64).ravel()
    except (TypeError, ValueError):
        raise CocoFormatError(f"{where}: '{key}' must be a list of {length} numbers, got "
                              f"{str(value)[:60]}") from None
    if np.ndim(value) == 0:
        raise CocoFormatError(f"{where}: '{key}' must be a list of {length} numbers, "
                              f"got {type(value).__name__}")
    if array.size != length:
        raise CocoFormatError(f"{where}: '{key}' must hold {length} numbers, got {array.size}")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise CocoFormatError(f"{where}: '{key}' holds a non-finite value ({array[bad]}) at "
                              f"position {bad}")
    return array


def _flat_keypoints(where: str, value: Any) -> Any:
    """A person's 'keypoints' as a flat list: [x, y, s, ...] as it is, or a list of [x, y, s]
    triplets flattened; a triplet of another length is an error naming it."""
    if not isinstance(value, list) or not any(isinstance(v, list) for v in value):
        return value
    for index, triplet in enumerate(value):
        if not isinstance(triplet, list) or len(triplet) != 3:
            count = f" ({len(triplet)} numbers)" if isinstance(triplet, list) else ""
            raise CocoFormatError(f"{where}: keypoint {index} must be [x, y, score], got "
                                  f"{str(triplet)[:40]}{count}")
    return [v for triplet in value for v in triplet]


class _Person(NamedTuple):
    """One person of a keypoint file."""

    keypoints: np.ndarray  # (J, 2) float32, NaN where the triplet is [0, 0, 0]
    scores: dict  # name -> (J,) float32
    box: np.ndarray | None  # (4,) xyxy
    score: float  # instance score


def _parse_person(where: str, entry: Any, optional: Sequence[str],
                  default_score: float | None = None, num_keypoints: int | None = None
                  ) -> _Person:
    """One person of a keypoint file: a COCO keypoint result object ({"keypoints": [x, y, s] *
    J, "score", optional per-keypoint "visibility", "presence", "expected_oks" and "bbox"
    [x, y, w, h]}), or a bare list of J [x, y, s] triplets. `optional`: keys that must be
    present; `default_score`: the score when the entry has none (None: "score" is required);
    `num_keypoints`: J (None: 3 numbers per keypoint, as many as the entry has)."""
    if not isinstance(entry, dict):
        if not isinstance(entry, list):
            raise CocoFormatError(f"{where} must be an object or a list of keypoint triplets, "
                                  f"got {type(entry).__name__}")
        entry = {"keypoints": entry}
    required = ["keypoints", *optional] + (["score"] if default_score is None else [])
    for key in required:
        if key not in entry and not (key in SCORE_KEY_ALIASES and _score_key(entry, key)):
            extra = (f" (entry 0 has it: every entry must carry the same optional fields "
                     f"{list(optional)})" if key in optional else "")
            raise CocoFormatError(f"{where}: missing key '{key}'{extra}")
    score = entry.get("score", default_score)
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise CocoFormatError(f"{where}: 'score' must be a finite number, got {score!r}")
    keypoints = _flat_keypoints(where, entry["keypoints"])
    if num_keypoints is None:
        count = len(keypoints)
        num_keypoints = count // 3 if count and count % 3 == 0 else NUM_KEYPOINTS
    triplets = _numbers(where, keypoints, "keypoints", 3 * num_keypoints).reshape(-1, 3)
    absent = np.all(triplets == 0, axis=1)
    keypoints = np.where(absent[:, None], np.nan, triplets[:, :2]).astype(np.float32)
    scores = {"confidence": triplets[:, 2]}
    for name in _DETECTION_SCORE_KEYS:
        key = _score_key(entry, name)
        if key is not None:
            scores[name] = _numbers(where, entry[key], key, num_keypoints)
    box = None
    if "bbox" in entry:
        box = xywh_to_xyxy(_numbers(where, entry["bbox"], "bbox", 4))
    return _Person(keypoints, scores, box, float(score))


def _stack_people(people: Sequence[_Person], score_names: Sequence[str], with_boxes: bool,
                  num_keypoints: int = NUM_KEYPOINTS, where: str = "") -> PoseInstances:
    if not people:
        return PoseInstances.empty(score_names, with_boxes, num_keypoints)
    counts = [len(p.keypoints) for p in people]
    if len(set(counts)) > 1:
        first = next(i for i, count in enumerate(counts) if count != counts[0])
        raise CocoFormatError(f"{where}: persons carry different numbers of keypoints "
                              f"({counts[0]} for person 0, {counts[first]} for person {first})")
    return PoseInstances(
        keypoints=np.stack([p.keypoints for p in people]),
        scores={n: np.stack([p.scores[n] for p in people]) for n in score_names},
        boxes=np.stack([p.box for p in people]) if with_boxes else None,
        det_score=np.asarray([p.score for p in people]))


def load_keypoint_detections(path: str | os.PathLike, coco: COCO,
                             entries: Any = None) -> dict[int, PoseInstances]:
    """Reads person keypoint detections in the COCO keypoint results format (ProbPose output).

    Each entry: {"image_id", "category_id", "keypoints": [x, y, s] * J, "score"} (J: the
    ground truth's schema), optionally with per-keypoint "visibility", "presence",
    "expected_oks" (J floats each, also read under
    ProbPose's and BBoxMaskPose's names, `SCORE_KEY_ALIASES`) and "bbox" ([x, y, w, h]). Which
    optional fields are present is read from the first entry and required of every entry, so
    that all images carry the same score names. 'confidence' is the s of each triplet; boxes are
    converted to [x0, y0, x1, y1].

    Entries whose image is not in `coco` are dropped with a warning (a detection file for all of
    val2017 may be used with a ground-truth subset); if no entry matches, that is an error.

    Args:
      path: the JSON file.
      coco: the ground truth the detections belong to (`load_coco`).
      entries: the file's JSON when the caller has read it already (`path` then names it).

    Returns:
      image_id -> PoseInstances for every image of `coco` (P = 0 where nothing was detected), the
      persons in file order, det_score = "score", ann_ids None.

    Raises:
      FileNotFoundError, CocoFormatError: naming the file, the entry index, the key and the
        expected vs. actual length; NaN / infinite values name the image and the entry.
    """
    path = Path(path)
    if entries is None:
        entries = read_json(path, "keypoint detection file", CocoFormatError)
    if not isinstance(entries, list):
        raise CocoFormatError(f"{path}: expected a JSON list of detections (COCO keypoint results "
                              f"format), got a JSON {type(entries).__name__}")
    person = person_category_id(coco)
    joints = keypoint_schema(coco).num_keypoints
    first = entries[0] if entries and isinstance(entries[0], dict) else {}
    optional = [k for k in _DETECTION_SCORE_KEYS if _score_key(first, k)]
    optional += ["bbox"] if "bbox" in first else []
    per_image = defaultdict(list)
    unknown = 0
    for index, entry in enumerate(entries):
        where = f"{path}: entry {index}"
        if not isinstance(entry, dict):
            raise CocoFormatError(f"{where} must be an object, got {type(entry).__name__}")
        where += f" (image_id={entry.get('image_id')})"
        for key in ("image_id", "category_id"):
            if key not in entry:
                raise CocoFormatError(f"{where}: missing key '{key}'")
        parsed = _parse_person(where, entry, optional, num_keypoints=joints)
        if entry["category_id"] != person:
            raise CocoFormatError(f"{where}: category_id {entry['category_id']} is not the "
                                  f"person category ({person})")
        if entry["image_id"] not in coco.imgs:
            unknown += 1
            continue
        per_image[entry["image_id"]].append(parsed)
    if entries and unknown == len(entries):
        raise CocoFormatError(f"{path}: none of the {len(entries)} detections refers to an image "
                              "of the ground truth; wrong split or dataset?")
    if unknown:
        warnings.warn(f"{path}: dropped {unknown} of {len(entries)} detections whose image is not "
                      "in the ground truth", stacklevel=2)
    score_names = ("confidence", *[k for k in _DETECTION_SCORE_KEYS if k in optional])
    return {image_id: _stack_people(per_image.get(image_id, []), score_names, "bbox" in optional,
                                    joints)
            for image_id in coco.getImgIds()}


def load_image_poses(path: str | os.PathLike, *, image_id: int | None = None,
                     photo: str | os.PathLike | None = None,
                     num_keypoints: int | None = None) -> PoseInstances:
    """The people of one photo from a keypoint file, with the score channels every person
    carries (`poses.resolve_channels` picks the ones a run uses).

    Accepted JSON: a list with one entry per person (or one object), each a COCO keypoint
    result object or a plain list of J [x, y, s] triplets (or 3 J numbers); "score" defaults to
    1.0, "image_id" and "category_id" are not needed. Triplets [0, 0, 0] are absent keypoints.

    Keypoint results of several images (entries with different "image_id"s): the entries of
    `image_id`, else of the image id the photo's file name spells (COCO's 000000000785.jpg is
    785); when neither names one of them the file is refused, as is a file whose single image
    id differs from the one the photo's name spells (without `image_id`).
    `num_keypoints`: J when known (a schema was named), else read from the entries.
    """
    path = Path(path)
    entries = read_json(path, "keypoint file", CocoFormatError)
    if isinstance(entries, dict) and "keypoints" in entries:
        entries = [entries]
    if not isinstance(entries, list):
        raise CocoFormatError(f"{path}: expected a JSON list with one entry per person, got a "
                              f"JSON {type(entries).__name__}")
    entries = _photo_entries(path, entries, image_id, photo)
    people = [_parse_person(f"{path}: person {i}", entry, (), default_score=1.0,
                            num_keypoints=num_keypoints) for i, entry in enumerate(entries)]
    complete = [n for n in SCORE_NAMES if people and all(n in p.scores for p in people)]
    with_boxes = bool(people) and all(p.box is not None for p in people)
    return _stack_people(people, complete or ["confidence"], with_boxes,
                         people[0].keypoints.shape[0] if people else NUM_KEYPOINTS, str(path))


def _sorted_ids(ids) -> list:
    try:
        return sorted(ids)
    except TypeError:  # ids of several types
        return sorted(ids, key=str)


def _photo_entries(path: Path, entries: list, image_id: int | None, photo) -> list:
    """The entries of one photo (see `load_image_poses`)."""
    keyed = [isinstance(e, dict) and "image_id" in e for e in entries]
    if image_id is not None:
        if not all(keyed):
            raise CocoFormatError(f"{path}: --image-id {image_id} needs an 'image_id' in every "
                                  "entry")
        chosen = [e for e in entries if e["image_id"] == image_id]
        if not chosen:
            ids = _sorted_ids({e["image_id"] for e in entries})
            raise CocoFormatError(f"{path}: no person of image_id {image_id}; its image ids: "
                                  f"{ids[:10]}" + (" ..." if len(ids) > 10 else ""))
        return chosen
    if not any(keyed):
        return entries
    if not all(keyed):
        first = keyed.index(False)
        raise CocoFormatError(f"{path}: entry {first} has no 'image_id' but others have: "
                              "either every person names its image or none does")
    ids = _sorted_ids({e["image_id"] for e in entries})
    stem = Path(photo).stem if photo is not None else ""
    named = int(stem) if stem.isdigit() else None
    if len(ids) == 1 and (named is None or named == ids[0]):
        return entries
    if named is not None and named in ids:
        return [e for e in entries if e["image_id"] == named]
    shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
    what = (f"keypoint results of {len(ids)} images (image ids {shown})" if len(ids) > 1
            else f"the keypoints of image_id {ids[0]}")
    raise CocoFormatError(f"{path} holds {what} and the photo {Path(photo).name if photo else ''}"
                          f" names {'image_id ' + str(named) if named is not None else 'none'}"
                          ": pass --image-id to choose")


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
    return [{"image_id": int(image_id), "category_id": int(category_id), "segmentation": rle,
             "score": float(score)}
            for rle, score in zip(masks_to_rle(masks), scores)]


# pycocotools' mask.area builds a uint8 array holding the count of its input, which NumPy 2
# refuses above 255 (OverflowError): areas go in batches of this many.
_AREA_BATCH = 255


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """(N,) float64 pixel counts of compressed RLEs (`pycocotools.mask.area`, any N)."""
    rles = list(rles)
    parts = [np.asarray(mask_utils.area(rles[i:i + _AREA_BATCH]), np.float64)
             for i in range(0, len(rles), _AREA_BATCH)]
    return np.concatenate(parts) if parts else np.zeros(0)


def masks_to_rle(masks: np.ndarray) -> list[dict]:
    """(P, H, W) bool masks -> P compressed RLEs {"size": [H, W], "counts": str}, JSON-ready
    (pycocotools.mask.encode on a Fortran-ordered uint8 (H, W, P) array)."""
    masks = np.asarray(masks)
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            for rle in rles]
