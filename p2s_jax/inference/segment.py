"""The people of one photo: poses -> prompts -> masks with the interactive `Predictor`.

`read_photo_poses` reads the photo's people from a keypoint file (its own entries, its schema,
the score channels: `poses.resolve_channels`) and checks them before any model work;
`segment_photo` segments them; `segment_people` is the same on plain arrays (the Python API).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from PIL import Image

from p2s_jax.data.coco import load_image_poses, masks_to_rle
from p2s_jax.data.poses import (PoseArrays, ScoreChannels, check_pose_arrays, pose_arrays,
                                resolve_channels)
from p2s_jax.inference.overlay import draw_overlay
from p2s_jax.inference.postprocess import exclusive_masks
from p2s_jax.inference.prompting import PromptConfig, select_prompts
from p2s_jax.keypoints import KeypointSchema, schema_for_count
from p2s_jax.utils.files import write_json
from p2s_jax.utils.images import save_image
from p2s_jax.utils.text import plural


class Segmentation(NamedTuple):
    """The people of one image (`segment_people`)."""

    masks: np.ndarray  # (P, H, W) bool; empty for people without a prompt
    iou: np.ndarray  # (P,) float32 predicted IoU; 0 for people without a prompt
    coords: np.ndarray  # (P, K, 2) float32 prompt points, original-image pixels
    labels: np.ndarray  # (P, K) int32 prompt labels, -1 padding
    has_prompt: np.ndarray  # (P,) bool


_select_prompts = jax.jit(select_prompts, static_argnames="config")


def segment_people(predictor, image: np.ndarray, keypoints, scores, config: PromptConfig,
                   boxes=None, exclusive: bool = False, confidence=None) -> Segmentation:
    """Masks of the people of one photo with the interactive `Predictor` (the same jitted
    encoder / decoder as the dataset runner, one image at a time; its `postprocess` applies).

    image (H, W, 3) uint8 RGB; keypoints (P, J, 2) pixels (NaN = absent); scores (P, J)
    visibility; boxes None or (P, 4) xyxy; confidence None (= scores) or (P, J).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    check_pose_arrays(keypoints, scores, "(segment)", boxes)
    if confidence is not None:
        check_pose_arrays(keypoints, confidence, "(segment)")
        confidence = np.asarray(confidence, np.float32)
    people = np.shape(keypoints)[0]
    masks = np.zeros((people, height, width), bool)
    iou = np.zeros(people, np.float32)
    if people == 0:
        empty = np.zeros((0, config.num_slots), np.int32)
        return Segmentation(masks, iou, np.zeros((0, config.num_slots, 2), np.float32), empty,
                            np.zeros(0, bool))
    prompts = _select_prompts(np.asarray(keypoints, np.float32), np.asarray(scores, np.float32),
                              (height, width), config=config,
                              boxes=None if boxes is None else np.asarray(boxes, np.float32),
                              confidence=confidence)
    coords, labels = np.asarray(prompts.coords), np.asarray(prompts.labels)
    has_prompt = np.asarray(prompts.has_prompt)
    predictor.set_image(image)
    kept = np.flatnonzero(has_prompt)
    if kept.size:
        prediction = predictor.predict(point_coords=coords[kept], point_labels=labels[kept])
        masks[kept] = prediction.masks[:, 0]
        iou[kept] = prediction.iou[:, 0]
    if exclusive:
        masks = np.asarray(exclusive_masks(masks, iou))
    return Segmentation(masks, iou, coords, labels, has_prompt)


class PhotoPoses(NamedTuple):
    """The people of one photo, read and checked (`read_photo_poses`)."""

    arrays: PoseArrays  # the keypoints and the two score channels' arrays
    channels: ScoreChannels  # which channels those are
    schema: KeypointSchema  # the keypoints' schema (skeleton, face)


def read_photo_poses(keypoints_path, photo, visibility: str | None = None,
                     confidence: str | None = None, box: str = "none", *,
                     image_id: int | None = None, schema: KeypointSchema | None = None
                     ) -> PhotoPoses:
    """The people of `photo` in a keypoint file (`coco.load_image_poses`: the photo's own
    entries), in `schema` (default: the one schema with as many keypoints), with the score
    channels resolved and every person checked for prompts of `box` mode.

    Raises:
      InputError: naming the file: entries of other photos only, a channel the poses lack,
        box prompts without boxes, malformed keypoints.
    """
    poses = load_image_poses(keypoints_path, image_id=image_id, photo=photo,
                             num_keypoints=schema.num_keypoints if schema else None)
    schema = schema or schema_for_count(poses.keypoints.shape[1], keypoints_path)
    channels = resolve_channels(poses, visibility, confidence, keypoints_path)
    return PhotoPoses(pose_arrays(poses, channels, box, keypoints_path), channels, schema)


def segment_photo(predictor, image: np.ndarray, people: PhotoPoses, config: PromptConfig,
                  exclusive: bool = False) -> Segmentation:
    """`segment_people` on the people `read_photo_poses` read (the schema's face keypoints
    set in `config`)."""
    arrays = people.arrays
    return segment_people(predictor, image, arrays.keypoints, arrays.scores,
                          dataclasses.replace(config, face=people.schema.face),
                          boxes=arrays.boxes, exclusive=exclusive, confidence=arrays.confidence)


def draw_segmentation(image: np.ndarray, people: PhotoPoses, result: Segmentation,
                      threshold: float) -> Image.Image:
    """The photo with each person's mask, skeleton and prompt points (`overlay.draw_overlay`);
    keypoints whose visibility channel is below `threshold` are not drawn."""
    return draw_overlay(image, result.masks, people.arrays.keypoints, people.arrays.scores,
                        result.coords, result.labels, threshold, people.schema.skeleton)


def segment_to_files(predictor, image: np.ndarray, image_path, people: PhotoPoses,
                     config: PromptConfig, exclusive: bool, overlay, masks_out=None
                     ) -> list[str]:
    """`p2s segment`: `segment_photo`, the overlay (`draw_segmentation`) written to `overlay`
    and, with `masks_out`, the masks and prompts (`write_segmentation`); both atomically.
    -> the lines that say what was found and written."""
    result = segment_photo(predictor, image, people, config, exclusive)
    save_image(overlay, draw_segmentation(image, people, result, config.visibility_threshold))
    lines = _segmentation_lines(result, people, config, overlay)
    if masks_out:
        lines.append(f"masks: {write_segmentation(masks_out, image_path, result)}")
    return lines


def _segmentation_lines(result: Segmentation, people: PhotoPoses, config: PromptConfig,
                        overlay) -> list[str]:
    total, with_mask = len(result.iou), int(result.has_prompt.sum())
    lines = [f"{plural(total, 'person', 'people')}, {plural(with_mask, 'mask')} "
             f"({people.channels.visibility} scores, {config.selection}_{config.num_points}); "
             f"overlay: {overlay}"]
    if with_mask < total:
        lines.append(f"{plural(total - with_mask, 'person', 'people')} had no usable keypoint: "
                     "no mask")
    return lines


def write_segmentation(path, image_path, result: Segmentation) -> Path:
    """The people of one photo as JSON (atomic): per person the mask (COCO RLE, None without a
    prompt), the predicted IoU and the prompt points [x, y, label]."""
    rles = masks_to_rle(result.masks)
    people = []
    for i in range(len(result.iou)):
        used = result.labels[i] >= 0
        people.append({
            "person": i, "segmentation": rles[i] if result.has_prompt[i] else None,
            "predicted_iou": float(result.iou[i]) if result.has_prompt[i] else None,
            "prompt": [[float(x), float(y), int(label)] for (x, y), label
                       in zip(result.coords[i][used], result.labels[i][used])]})
    height, width = result.masks.shape[1:]
    return write_json(path, {"image": str(image_path), "height": height, "width": width,
                             "people": people})
