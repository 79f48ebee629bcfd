"""Evaluation sets in the COCO format: Pose2Seg's COCOPersons subset and CIHP's instance masks.

COCOPersons (`coco_persons`)
    Pose2Seg's COCO* protocol evaluates on a subset annotation file
    (`person_keypoints_val2017_pose2seg.json`) that keeps only the persons that carry a pose and
    a mask. It is built here from the published `person_keypoints_val2017.json`: a person stays
    when it has at least one labelled keypoint (`num_keypoints > 0`), a non-empty segmentation
    and area >= `min_area` (0 by default; 32**2 drops COCO's small persons as well); crowd
    regions stay (COCOeval ignores them); an image stays when one of its persons stays. Unlike
    our COCO* (`evaluation.metrics`, dropped persons become ignore regions), a prediction on a
    dropped person counts as a false positive here: with ground-truth poses there is none, with
    detected poses there are some, and the two definitions then differ (docs/reproduce.md).

CIHP (`convert_cihp`)
    CIHP (Crowd Instance-level Human Parsing, LIP) ships, per split folder, `Images/<name>.jpg`
    and `Human_ids/<name>.png`, an 8-bit map whose value at each pixel is the person's instance
    number (0: background). Every instance becomes one COCO person annotation: the mask as
    compressed RLE, its area and box from pycocotools, no keypoints (detected poses are
    evaluated against it, as in the paper).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from p2s_jax.data.coco import PERSON_CATEGORY, CocoFormatError, masks_to_rle
from p2s_jax.keypoints import KEYPOINT_NAMES
from p2s_jax.utils.errors import InputError, MissingFileError
from p2s_jax.utils.files import read_json, write_json
from p2s_jax.utils.text import plural



def _has_segmentation(ann: dict) -> bool:
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, list):
        return any(len(polygon) >= 6 for polygon in segmentation)
    return bool(segmentation)


def coco_persons(ground_truth: dict, min_area: float = 0.0) -> dict:
    """Pose2Seg's COCOPersons subset of a COCO person-keypoints file (see the module docstring).
    Returns a new dict; every kept entry is kept as written."""
    for key in ("images", "annotations", "categories"):
        if key not in ground_truth:
            raise CocoFormatError(f"the annotation file has no '{key}' list")
    kept = []
    for index, ann in enumerate(ground_truth["annotations"]):
        if "num_keypoints" not in ann and not ann.get("iscrowd"):
            raise CocoFormatError(f"annotation {index} (id {ann.get('id')}) has no "
                                  "'num_keypoints': COCOPersons needs a person-keypoints file")
        if ann.get("iscrowd") or (ann["num_keypoints"] > 0 and _has_segmentation(ann)
                                  and ann["area"] >= min_area):
            kept.append(ann)
    with_person = {a["image_id"] for a in kept if not a.get("iscrowd")}
    return {**ground_truth,
            "images": [im for im in ground_truth["images"] if im["id"] in with_person],
            "annotations": [a for a in kept if a["image_id"] in with_person]}


def write_coco_persons(source, out, min_area: float = 0.0) -> str:
    """`p2s prepare coco-persons`: the subset of `source` written to `out` -> what was written."""
    data = read_json(Path(source), "COCO person-keypoints file", CocoFormatError)
    return _written(out, coco_persons(data, min_area))


def _written(out, data: dict) -> str:
    path = write_json(out, data)
    return f"wrote {path}: {plural(len(data['images']), 'image')}, " \
           f"{plural(len(data['annotations']), 'annotation')}"


def _human_ids(path: Path) -> np.ndarray:
    """(H, W) int instance numbers from a CIHP `Human_ids` PNG (grayscale or palette)."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise InputError(f"{path}: a Human_ids map must be a single-channel PNG (instance "
                             f"numbers), got mode {image.mode}")
        return np.asarray(image).astype(np.int64)


def cihp_annotations(split_dir: str | os.PathLike) -> dict[str, Any]:
    """A CIHP split folder (`Images/`, `Human_ids/`) -> COCO instance annotations (dict).

    Images are numbered 1.. in file-name order; `file_name` is relative to `Images/`."""
    split_dir = Path(split_dir)
    images_dir, ids_dir = split_dir / "Images", split_dir / "Human_ids"
    for folder in (images_dir, ids_dir):
        if not folder.is_dir():
            raise MissingFileError(f"{folder} does not exist (a CIHP split folder holds Images/ "
                                   "and Human_ids/)")
    photos = sorted(p for p in images_dir.iterdir()
                    if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise MissingFileError(f"{images_dir} holds no images")
    images, annotations = [], []
    for image_id, photo in enumerate(photos, start=1):
        ids_path = ids_dir / (photo.stem + ".png")
        if not ids_path.is_file():
            raise MissingFileError(f"{ids_path} is missing (the Human_ids map of {photo.name})")
        human_ids = _human_ids(ids_path)
        with Image.open(photo) as image:
            width, height = image.size
        if human_ids.shape != (height, width):
            raise InputError(f"{ids_path}: map is {human_ids.shape[1]}x{human_ids.shape[0]} but "
                             f"{photo.name} is {width}x{height} (WxH)")
        images.append({"id": image_id, "file_name": photo.name, "height": height,
                       "width": width})
        numbers = [int(n) for n in np.unique(human_ids) if n > 0]
        if not numbers:
            continue
        masks = np.stack([human_ids == n for n in numbers])
        for number, rle in zip(numbers, masks_to_rle(masks)):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": rle, "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                "num_keypoints": 0, "keypoints": [0] * (3 * len(KEYPOINT_NAMES)),
                "cihp_human_id": number})
    return {"info": {"description": f"CIHP {split_dir.name} person instances"},
            "images": images, "annotations": annotations, "categories": [PERSON_CATEGORY]}


def convert_cihp(split_dir, out) -> str:
    """`p2s prepare cihp`: a split's person masks written to `out` -> what was written."""
    return _written(out, cihp_annotations(split_dir))
