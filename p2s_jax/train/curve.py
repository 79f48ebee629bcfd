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
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from p2s_jax.data import coco as coco_lib
from p2s_jax.data.augment import resize
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import all_gather_json
from p2s_jax.train.correction import CorrectionConfig, LoopTargets, correction_loop
from p2s_jax.train.step import normalize_images
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.images import load_image


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
                  ) -> tuple[np.ndarray, LoopTargets, np.ndarray]:
    """One image at the model's input size: (S, S, 3) uint8, its persons' `LoopTargets`
    (numpy, `max_people` slots) and their annotation ids (the first `max_people`)."""
    gt = coco_lib.ground_truth_poses(coco, image_id)
    ann_ids = gt.ann_ids[:max_people]
    anns = coco.loadAnns(ann_ids.tolist())
    image = load_image(Path(images_dir) / coco.imgs[image_id]["file_name"])
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    visibility = gt.scores["visibility"][:len(anns)]
    image, masks, keypoints = resize(image, masks, gt.keypoints[:len(anns)], size)
    slots = max_people - len(anns)
    return image, LoopTargets(
        masks=np.pad(masks, ((0, slots), (0, 0), (0, 0))),
        keypoints=np.pad(keypoints.astype(np.float32), ((0, slots), (0, 0), (0, 0))),
        visibility=np.pad(visibility, ((0, slots), (0, 0))),
        valid=np.arange(max_people) < len(anns)), ann_ids


@functools.partial(jax.jit, static_argnums=0)
def encode_image(graphdef, state, image):
    """(S, S, 3) uint8 -> the image's features (run once per image, whatever the samplers)."""
    model = nnx.merge(graphdef, state)
    return jax.tree.map(lambda x: x[0], model.encode_image(normalize_images(image[None])))


@functools.partial(jax.jit, static_argnums=(0, 1))
def loop_ious(graphdef, correction: CorrectionConfig, state, features, targets, key):
    """The correction loop on an image's features -> (T, P) IoU of the kept mask with the
    ground truth after each point."""
    model = nnx.merge(graphdef, state)
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
        image, targets, _ = image_targets(coco, image_id, images_dir, model.config.image_size,
                                          config.max_people)
        key = jax.random.fold_in(jax.random.key(config.seed), index)
        ious = np.asarray(loop_ious(graphdef, config.correction, state,
                                    encode_image(graphdef, state, image),
                                    jax.tree.map(jnp.asarray, targets), key))
        present = targets.valid & targets.masks.any(axis=(1, 2))
        total += ious[:, present].sum(axis=1)
        persons += int(present.sum())
    gathered = all_gather_json({"total": total.tolist(), "persons": persons})
    total = np.sum([g["total"] for g in gathered], axis=0)
    persons = sum(g["persons"] for g in gathered)
    return Curve(total / max(persons, 1), persons, len(image_ids))
