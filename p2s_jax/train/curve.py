"""Mean IoU after each point of the correction loop, for a fixed model on a dataset (Fig. 2).

The loop is the training one (`correction.correction_loop`, the same compiled decode steps),
run forward only in evaluation mode: the `center` sampler by default (the official
`pt_sampling_for_eval`, deterministic: the point deepest inside the larger error region), or
any registered sampler with a fixed key. Each image is resized to the model's square input as
in training (`data.augment.resize`); its persons' ground-truth masks come from pycocotools and
their ground-truth keypoints go to pose samplers. Point t's value is the mean, over the persons
with a non-empty mask, of the IoU between the kept mask after t + 1 points and the ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from p2s_jax.data import coco as coco_lib
from p2s_jax.data.augment import resize
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import all_gather_json
from p2s_jax.train.correction import CorrectionConfig, LoopTargets, correction_loop
from p2s_jax.train.step import normalize_images
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.images import load_image, save_image


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """Attributes:
      correction: the loop (points, sampler; `center` for the official evaluation mode).
      max_people: persons per image (the first ones in file order; padded to this count).
      max_images: images used (the first ones by id with a person); 0: all.
      seed: the key of samplers that draw at random.
    """

    correction: CorrectionConfig = CorrectionConfig(sampler="center")
    max_people: int = 8
    max_images: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.max_people < 1 or self.max_images < 0:
            raise InputError(f"max_people must be >= 1 and max_images >= 0, got "
                             f"{self.max_people} and {self.max_images}")


class Curve(NamedTuple):
    mean_iou: np.ndarray  # (T,) after points 1 .. T
    num_persons: int
    num_images: int


def image_targets(coco: COCO, image_id: int, images_dir, size: int, max_people: int
                  ) -> tuple[np.ndarray, LoopTargets]:
    """One image at the model's input size: (S, S, 3) uint8 and its persons' `LoopTargets`
    (numpy, `max_people` slots)."""
    gt = coco_lib.ground_truth_poses(coco, image_id)
    anns = coco.loadAnns(gt.ann_ids[:max_people].tolist())
    image = load_image(Path(images_dir) / coco.imgs[image_id]["file_name"])
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    visibility = gt.scores["visibility"][:len(anns)]
    image, masks, keypoints = resize(image, masks, gt.keypoints[:len(anns)], size)
    slots = max_people - len(anns)
    return image, LoopTargets(
        masks=np.pad(masks, ((0, slots), (0, 0), (0, 0))),
        keypoints=np.pad(keypoints.astype(np.float32), ((0, slots), (0, 0), (0, 0))),
        visibility=np.pad(visibility, ((0, slots), (0, 0))),
        valid=np.arange(max_people) < len(anns))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _image_ious(graphdef, correction: CorrectionConfig, state, image, targets, key):
    """(S, S, 3) uint8 -> (T, P) IoU of the kept mask with the ground truth after each point."""
    model = nnx.merge(graphdef, state)
    pixels = normalize_images(image[None])
    features = jax.tree.map(lambda x: x[0], model.encode_image(pixels))
    out = correction_loop(model, features, targets, key, correction)
    ious = out.first.kept_iou_with_gt[None]
    if out.rest is not None:
        ious = jnp.concatenate([ious, out.rest.kept_iou_with_gt], axis=0)
    return ious


def curve_image_ids(coco: COCO, config: CurveConfig) -> list[int]:
    """The images a curve runs on: those with a person, by id (the first `max_images`)."""
    image_ids = [i for i in sorted(coco.getImgIds()) if len(coco_lib.ground_truth_poses(coco, i))]
    if config.max_images:
        image_ids = image_ids[:config.max_images]
    if not image_ids:
        raise InputError("the annotation file has no image with a person")
    return image_ids


def correction_curve(model: SAM2Image, coco: COCO, images_dir,
                     config: CurveConfig = CurveConfig(), *, progress: bool = False) -> Curve:
    """The Fig. 2 curve of `model` on the persons of `coco` (see the module docstring). With
    several processes each takes every process_count-th image and the sums are gathered, so
    the curve is the same on any number of processes. `progress`: a tqdm bar (process 0)."""
    graphdef, state = nnx.split(model)
    image_ids = curve_image_ids(coco, config)
    total = np.zeros(config.correction.num_points)
    persons = 0
    mine = list(enumerate(image_ids))[jax.process_index()::jax.process_count()]
    for index, image_id in tqdm(mine, unit="img", desc="curve", dynamic_ncols=True,
                                disable=not progress or jax.process_index() != 0):
        image, targets = image_targets(coco, image_id, images_dir, model.config.image_size,
                                       config.max_people)
        key = jax.random.fold_in(jax.random.key(config.seed), index)
        ious = np.asarray(_image_ious(graphdef, config.correction, state, image,
                                      jax.tree.map(jnp.asarray, targets), key))
        present = targets.valid & targets.masks.any(axis=(1, 2))
        total += ious[:, present].sum(axis=1)
        persons += int(present.sum())
    gathered = all_gather_json({"total": total.tolist(), "persons": persons})
    total = np.sum([g["total"] for g in gathered], axis=0)
    persons = sum(g["persons"] for g in gathered)
    return Curve(total / max(persons, 1), persons, len(image_ids))


def write_curve_png(path, curve: Curve, title: str = "mean IoU after each point") -> Path:
    """The curve as a line chart (PNG, written atomically)."""
    width, height, margin = 640, 400, 60
    values = np.asarray(curve.mean_iou, np.float64)
    low = max(0.0, np.floor(values.min() * 10 - 0.5) / 10)
    high = min(1.0, np.ceil(values.max() * 10 + 0.5) / 10)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = margin, 40, width - 20, height - margin

    def position(i, v):
        x = left + (right - left) * (i / max(len(values) - 1, 1))
        return x, bottom - (bottom - top) * (v - low) / max(high - low, 1e-9)

    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    for tick in np.linspace(low, high, 6):
        _, y = position(0, tick)
        draw.line([(left - 5, y), (left, y)], fill="black")
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for i in range(len(values)):
        x, _ = position(i, low)
        draw.text((x - 4, bottom + 8), str(i + 1), fill="black")
    points = [position(i, v) for i, v in enumerate(values)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=3)
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(31, 119, 180))
    draw.text((left, 12), f"{title} ({curve.num_persons} persons, {curve.num_images} images)",
              fill="black")
    draw.text(((left + right) // 2 - 20, height - 24), "points", fill="black")
    return save_image(path, canvas)
