"""What a dataset run will do, decided on the host before any device work: each image's poses
as arrays (`poses.pose_arrays`), the items to run (an image, or with `crop_to_box` one person's
crop), the steps that hand chunks of items to the devices (`plan_steps`), the canvas, and the image
files checked up front (`check_image_files`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from p2s_jax.data import coco as coco_lib
from p2s_jax.data.matching import ground_truth_boxes
from p2s_jax.data.poses import PoseArrays, PoseInstances, pose_arrays
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.inference.preprocess import bucket, canvas_hw
from p2s_jax.keypoints import labelled_points
from p2s_jax.utils.errors import InputError

def ground_truth_prompt_poses(coco: COCO) -> dict[int, PoseInstances]:
    """Ground-truth poses of every image (`coco.ground_truth_poses`), with the unlabelled
    keypoints (v = 0, stored at (0, 0)) set to NaN so that no prompt rule can ever use them."""
    poses = {}
    for image_id in sorted(coco.getImgIds()):
        gt = coco_lib.ground_truth_poses(coco, image_id)
        triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], axis=-1)
        keypoints, _ = labelled_points(triplets)
        scores = {"visibility": gt.scores["visibility"], "confidence": gt.scores["visibility"]}
        poses[image_id] = PoseInstances(keypoints, scores, gt.boxes, gt.det_score,
                                                 gt.ann_ids)
    return poses


def with_ground_truth_boxes(coco: COCO, poses: Mapping[int, PoseInstances]
                            ) -> dict[int, PoseInstances]:
    """The poses with every box replaced by its OKS-matched ground-truth person's box
    (`matching.ground_truth_boxes`); unmatched poses keep their own box (or keypoint extent)."""
    out = {}
    for image_id, pose in poses.items():
        gt = coco_lib.ground_truth_poses(coco, image_id)
        triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], axis=-1)
        areas = np.asarray([coco.anns[int(i)]["area"] for i in gt.ann_ids], np.float64)
        boxes, _ = ground_truth_boxes(gt, triplets, areas, pose)
        out[image_id] = dataclasses.replace(pose, boxes=boxes)
    return out


class Item(NamedTuple):
    """One image to run (or, with `crop_to_box`, one person's crop of it)."""

    image_id: int
    path: Path
    hw: tuple  # (H, W) of what runs: the photo (as the annotation file says) or the crop
    poses: PoseArrays
    crop: tuple | None = None  # (x0, y0, x1, y1) of the crop in the photo
    photo_hw: tuple | None = None  # (H, W) of the photo when cropping
    first_person: int = 0  # index of the item's first person in the photo


def crop_window(box, factor: float, photo_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """box (4,) xyxy -> (x0, y0, x1, y1) ints: scaled by `factor` about its centre, rounded and
    clipped to the photo (the authors' `_pose2seg` crop), at least one pixel each way."""
    box = np.asarray(box, np.float64)
    centre, size = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) * factor
    window = np.round(np.concatenate([centre - size / 2, centre + size / 2])).astype(int)
    height, width = photo_hw
    x0, y0 = np.clip(window[:2], 0, [width - 1, height - 1])
    x1, y1 = np.clip(window[2:], [x0 + 1, y0 + 1], [width, height])
    return int(x0), int(y0), int(x1), int(y1)


def crop_items(item: Item, factor: float) -> list[Item]:
    """One item per person of `item`, on its crop, keypoints and box moved into the crop."""
    if item.poses.boxes is None:
        raise InputError(f"image {item.image_id}: crop_to_box needs person boxes (a detection "
                         "file with 'bbox', ground-truth poses, or box_source 'gt')")
    crops = []
    for person in range(len(item.poses.det_score)):
        x0, y0, x1, y1 = crop_window(item.poses.boxes[person], factor, item.hw)
        shift = np.float32([x0, y0])
        poses = PoseArrays(item.poses.keypoints[person:person + 1] - shift,
                       item.poses.scores[person:person + 1],
                       item.poses.confidence[person:person + 1],
                       item.poses.boxes[person:person + 1] - np.tile(shift, 2),
                       item.poses.det_score[person:person + 1])
        crops.append(item._replace(hw=(y1 - y0, x1 - x0), poses=poses, crop=(x0, y0, x1, y1),
                                   photo_hw=item.hw, first_person=person))
    return crops


def run_items(coco: COCO, images_dir, poses: Mapping[int, PoseInstances],
           config: EvalConfig) -> list[Item]:
    """The images with at least one person, most people first (then by id)."""
    images_dir = Path(images_dir)
    items = []
    for image_id in sorted(coco.getImgIds()):
        pose = poses.get(image_id)
        if pose is None or len(pose) == 0:
            continue
        info = coco.imgs[image_id]
        arrays = pose_arrays(pose, config.channels, config.prompt.box, f"image {image_id}")
        item = Item(image_id, images_dir / info["file_name"],
                    (int(info["height"]), int(info["width"])), arrays)
        items += crop_items(item, config.crop_to_box) if config.crop_to_box else [item]
    items.sort(key=lambda item: (-len(item.poses.det_score), item.image_id))
    return items


def plan_steps(num_items: int, images_per_device: int, num_devices: int) -> np.ndarray:
    """(steps, num_devices, images_per_device) int item indices, -1 for padding.

    Chunk c holds items [c B, (c + 1) B); step s gives chunk s D + d to device d. A chunk's
    content depends on B only, never on D: the root of the device-count invariance.
    """
    chunk = images_per_device
    num_chunks = -(-num_items // chunk)
    num_steps = -(-num_chunks // num_devices)
    index = np.arange(num_steps * num_devices * chunk)
    return np.where(index < num_items, index, -1).reshape(num_steps, num_devices, chunk)


def step_people(step: np.ndarray, items: Sequence[Item], people_per_chunk: int) -> int:
    """People slots P per image in a step: the most people, rounded up to a power of two (of
    whole chunks when chunks are smaller than that), so that a run compiles the decoder for a
    handful of P only."""
    most = max((len(items[i].poses.det_score) for i in step.ravel() if i >= 0), default=1)
    if bucket(most) <= people_per_chunk:
        return bucket(most)
    return people_per_chunk * bucket(-(-most // people_per_chunk))


def decoder_chunk(num_people: int, people_per_chunk: int) -> int | None:
    """The decoder's chunk for P people slots: None (one pass) when they fit in one chunk."""
    return None if num_people <= people_per_chunk else people_per_chunk


def items_canvas(items: Sequence[Item]) -> tuple[int, int]:
    """(H, W) covering every image of the run, in `CANVAS_MULTIPLE`s: photos are padded onto it
    for the device's resize, and masks are upsampled onto it and cropped."""
    return canvas_hw((max(item.hw[0] for item in items), max(item.hw[1] for item in items)))


def image_file_problem(path: Path, hw: tuple[int, int]) -> str | None:
    """Why the photo at `path` cannot be run (missing, not an image, another size than the
    annotation's (H, W)), from its header only; None when it can."""
    if not path.is_file():
        return "image file not found" if not path.exists() else "not a regular file"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        return f"not a readable image ({err})"
    if (height, width) != tuple(hw):
        return (f"image is {width}x{height} (WxH) but the annotation file says "
                f"{hw[1]}x{hw[0]}")
    return None


def check_image_files(items: Sequence[Item]) -> list[dict]:
    """The photos of `items` that cannot be run, checked before any work (headers only):
    [{"image_id", "file_name", "reason"}] by image id, each photo once."""
    problems, seen = [], set()
    for item in sorted(items, key=lambda i: i.image_id):
        if item.image_id in seen:
            continue
        seen.add(item.image_id)
        reason = image_file_problem(item.path, item.photo_hw or item.hw)
        if reason is not None:
            problems.append({"image_id": item.image_id, "file_name": str(item.path),
                             "reason": reason})
    return problems


def missing_images_error(problems: Sequence[dict], images_dir) -> InputError:
    """The refusal of a run whose photos are not all there (`check_image_files`)."""
    shown = "; ".join(f"{p['file_name']} ({p['reason']})" for p in problems[:5])
    more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
    return InputError(f"{len(problems)} image(s) of the ground truth cannot be read under "
                      f"{images_dir}: {shown}{more}; their persons would count as missed and "
                      "lower AP: fix --images, or pass --skip-missing-images to score only the "
                      "images present")
