"""What a review page shows: one card per person, worst first.

Two kinds of file are reviewed:
  * a `p2s annotate` output: a card per person the annotator gave a mask (every status but
    `no_prompt` and `missing_image`), ranked by the predicted IoU (`p2s.predicted_iou`), with
    the object score, the keypoints and the prompt points;
  * `p2s evaluate` results with their ground truth (an error analysis): a card per
    ground-truth person (not crowd), ranked by the IoU of its mask with the result matched to
    it. Results and persons of an image are matched one to one by decreasing mask IoU (the
    pair with the highest IoU first, ties by result order then annotation id); a person no
    result overlaps is `missed` (IoU 0), the others `matched`. Results matched to no person
    are counted (`Review.left_out`), not shown.
Ties in the ranking go by annotation id, so the order is the same on every run.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from p2s_jax.data import coco as coco_lib
from p2s_jax.keypoints import KeypointSchema
from p2s_jax.utils.download import sha256_file
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json

# Annotate statuses without a mask to look at.
WITHOUT_MASK = ("no_prompt", "missing_image")
EVALUATE_STATUSES = ("matched", "missed")


@dataclasses.dataclass(frozen=True)
class Card:
    """One person on the page.

    Attributes:
      ann_id: the person's annotation id (the key of its decision).
      image_id: the photo's image id.
      status: `p2s.status` of an annotate output; `matched` / `missed` in an error analysis.
      iou: predicted IoU (annotate), or the IoU of the matched result with the ground truth.
      score: the object score logit (annotate), or the matched result's score (None: missed).
      mask: the predicted mask, compressed RLE (None: missed).
      truth: the ground-truth mask, compressed RLE (error analysis only).
      keypoints: the person's J x 3 keypoints, flat (None: none).
      prompt: the prompt points, K x 3 flat [x, y, label] (annotate only).
    """

    ann_id: int
    image_id: int
    status: str
    iou: float
    score: float | None
    mask: dict | None
    truth: dict | None = None
    keypoints: tuple | None = None
    prompt: tuple | None = None


@dataclasses.dataclass(frozen=True)
class Review:
    """A reviewed file read and ranked.

    Attributes:
      mode: "annotate" or "evaluate" (an error analysis).
      source: the reviewed file.
      fingerprint: "sha256:<hex>" of its bytes (decisions are tied to it).
      schema: the keypoint schema (the skeleton drawn).
      files: image id -> file name, of the images with a card.
      cards: the cards, worst first.
      left_out: persons (or results) without a card, counted by reason.
    """

    mode: str
    source: Path
    fingerprint: str
    schema: KeypointSchema
    files: dict
    cards: tuple
    left_out: dict

    def select(self, worst: int = 0, statuses: tuple = ()) -> "Review":
        """Only the cards of `statuses` (empty: all), then the `worst` first ones (0: all)."""
        unknown = sorted(set(statuses) - self.statuses())
        if unknown:
            raise InputError(f"--status {', '.join(unknown)}: no card of {self.source} has it; "
                             f"its statuses: {sorted(self.statuses())}")
        cards = [c for c in self.cards if not statuses or c.status in statuses]
        cards = cards[:worst] if worst > 0 else cards
        left = Counter(self.left_out)
        left.update({"not selected": len(self.cards) - len(cards)} if len(cards) < len(
            self.cards) else {})
        return dataclasses.replace(self, cards=tuple(cards), left_out=dict(left),
                                   files={c.image_id: self.files[c.image_id] for c in cards})

    def statuses(self) -> set:
        return {c.status for c in self.cards}


def fingerprint(path) -> str:
    """What a review page and its decisions carry of the reviewed file: "sha256:<hex of its
    bytes>"."""
    return "sha256:" + sha256_file(path)


def _ranked(cards: list[Card]) -> tuple:
    return tuple(sorted(cards, key=lambda c: (c.iou, c.ann_id)))


def _flat(value) -> tuple | None:
    return None if value is None else tuple(float(v) for v in np.ravel(value))


def read_annotated(path: Path, data: dict, schema: KeypointSchema | None) -> Review:
    """The cards of a `p2s annotate` output (`data`, read from `path`)."""
    coco = coco_lib.load_keypoint_annotations_dict(coco_lib.with_schema(data, schema, path),
                                                   path)
    cards, left = [], Counter()
    for index, ann in enumerate(data["annotations"]):
        p2s = ann.get("p2s")
        if not isinstance(p2s, dict):
            left["not annotated"] += 1
            continue
        if p2s.get("status") in WITHOUT_MASK or not isinstance(ann.get("segmentation"), dict):
            left[p2s.get("status", "no mask")] += 1
            continue
        if not isinstance(p2s.get("predicted_iou"), (int, float)):
            raise InputError(f"{path}: annotations[{index}] (id {ann['id']}): p2s.predicted_iou "
                             f"is {p2s.get('predicted_iou')!r}, not a number")
        cards.append(Card(ann["id"], ann["image_id"], str(p2s["status"]),
                          float(p2s["predicted_iou"]), float(p2s.get("object_score", 0.0)),
                          ann["segmentation"], None, _flat(ann.get("keypoints")),
                          _flat(p2s.get("prompt"))))
    return Review("annotate", path, fingerprint(path), coco_lib.keypoint_schema(coco),
                  {c.image_id: coco.imgs[c.image_id]["file_name"] for c in cards},
                  _ranked(cards), dict(left))


def _check_results(path: Path, results, coco) -> None:
    if not isinstance(results, list):
        raise InputError(f"{path}: evaluate results are a JSON list, got {type(results).__name__}")
    for index, result in enumerate(results):
        missing = [k for k in ("image_id", "segmentation", "score")
                   if not isinstance(result, dict) or k not in result]
        if missing:
            raise InputError(f"{path}: results[{index}] lacks {missing}")
        if result["image_id"] not in coco.imgs:
            raise InputError(f"{path}: results[{index}]: image_id {result['image_id']} is not "
                             "an image of the ground truth (--annotations)")


def match(results: list[dict], truths: list[dict]) -> list[tuple[int | None, float]]:
    """One to one by decreasing mask IoU: for each ground-truth person, (index of its result or
    None, IoU). results and truths hold compressed RLE `segmentation`s of one image."""
    if not results or not truths:
        return [(None, 0.0)] * len(truths)
    iou = np.asarray(mask_utils.iou([r["segmentation"] for r in results],
                                    [t["segmentation"] for t in truths], [0] * len(truths)))
    order = sorted(((-iou[r, t], r, t) for r in range(len(results)) for t in range(len(truths))
                    if iou[r, t] > 0))
    pairs: list = [(None, 0.0)] * len(truths)
    used_results, used_truths = set(), set()
    for negative, r, t in order:
        if r not in used_results and t not in used_truths:
            pairs[t] = (r, float(-negative))
            used_results.add(r)
            used_truths.add(t)
    return pairs


def read_evaluation(path: Path, results, annotations, schema: KeypointSchema | None) -> Review:
    """The cards of `p2s evaluate` results (`results`, read from `path`) against their ground
    truth (the COCO file `annotations`)."""
    coco = coco_lib.load_coco(annotations, schema)
    _check_results(path, results, coco)
    by_image: dict = {}
    for result in results:
        by_image.setdefault(result["image_id"], []).append(result)
    cards, left = [], Counter()
    for image_id in sorted(coco.imgs):
        truths = [dict(a, segmentation=coco.annToRLE(a)) for a in coco.loadAnns(
            coco.getAnnIds(imgIds=[image_id], iscrowd=False))]
        found = by_image.get(image_id, [])
        pairs = match(found, truths)
        for truth, (r, iou) in zip(truths, pairs):
            result = found[r] if r is not None else None
            cards.append(Card(truth["id"], image_id, "matched" if result else "missed", iou,
                              float(result["score"]) if result else None,
                              result["segmentation"] if result else None,
                              truth["segmentation"], _flat(truth.get("keypoints"))))
        left["results matching no person"] += len(found) - sum(r is not None for r, _ in pairs)
    left = Counter({k: v for k, v in left.items() if v})
    return Review("evaluate", path, fingerprint(path), coco_lib.keypoint_schema(coco),
                  {c.image_id: coco.imgs[c.image_id]["file_name"] for c in cards},
                  _ranked(cards), dict(left))


def read_review(path: str | os.PathLike, annotations: str | os.PathLike | None = None,
                schema: KeypointSchema | None = None) -> Review:
    """The cards of `path`: a `p2s annotate` output, or `p2s evaluate` results when
    `annotations` (their ground truth) is given.

    Raises:
      InputError: a file of another kind, or a malformed one (naming the file and entry).
    """
    path = Path(path)
    data = read_json(path, "reviewed file")
    if annotations is not None:
        return read_evaluation(path, data, annotations, schema)
    if isinstance(data, list):
        raise InputError(f"{path} is a results list (p2s evaluate): name its ground truth with "
                         "--annotations GT.json for an error analysis")
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list) and any(
            isinstance(a, dict) and "p2s" in a for a in data["annotations"])):
        raise InputError(f"{path}: no annotation carries a 'p2s' record; review takes a p2s "
                         "annotate output (or p2s evaluate results with --annotations)")
    return read_annotated(path, data, schema)
