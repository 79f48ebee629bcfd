"""Batched, data-parallel pose-to-mask evaluation on COCO-format datasets (COCO, OCHuman, CIHP).

For every image that has people, SAM-pose2seg turns each person's pose into a prompt
(`p2s_jax.inference.prompting.select_prompts`) and decodes one mask per person; the masks go to
COCO segm results (compressed RLE) and to pycocotools' mask AP
(`p2s_jax.evaluation.metrics.evaluate_segm`).

How the work is laid out
    * The host only decodes: threads (`concurrent.futures`, `EvalConfig.num_workers`) read and
      decode the photos a few steps ahead of the device (`prefetch_steps`) onto the run's canvas
      (the largest photo, sides rounded up to `CANVAS_MULTIPLE`), and RLE-encode the masks that
      come back.
    * The images with people are sorted by their number of people (most first, then by id), so
      that images batched together need about the same padding, and cut into *chunks* of
      `images_per_device` images. A *step* hands one chunk to every device of a 1-D
      `jax.sharding.Mesh` with the axis 'data' (the last step is padded with empty chunks).
    * Per step, through `jax.shard_map` over 'data' (each device works on its own chunk):
      resize and normalisation (`preprocess_on_device`) and `encode_images` on the chunk's
      photos; `select_prompts` on all people of each image (people padded to a power of two,
      NaN keypoints for padding); `decode_prompts` vmapped over the images, all people of an
      image in one call (chunked inside the decoder by `people_per_chunk` on CPU); masks
      upsampled and thresholded straight onto the canvas, cropped on the host. These are the
      predictor's own jitted functions (`p2s_jax.inference.predictor`).
    * Defaults follow the backend (`backend_defaults`): on CPU 2 images per device and people
      in chunks of 4, on accelerators 8 images per device and every person at once.
    * Multi-host: every process builds the same plan, feeds the chunks of its own devices
      (`jax.make_array_from_process_local_data`), reads back its own shards, and the per-process
      results are all-gathered at the end.

Determinism: a chunk's images, and every array shape a device computes on, depend on
`images_per_device` and `people_per_chunk` but not on the number of devices or processes, so
the results are identical on one device and on many (tested with 1 and 4 host devices).

People and images that produce no mask
    * A person without any usable keypoint (none inside the image) gets no prompt and no mask;
      such people are counted in `EvalReport.people_without_prompt`.
    * An image that is missing, unreadable, or whose pixel size differs from its annotation is
      reported by name, skipped (its people count as missed by COCOeval), and listed at the end.
    * A malformed annotation or keypoint file stops the run at once (`p2s_jax.data.coco` raises).

Result score (`EvalConfig.result_score`): COCOeval ranks all masks of the dataset by their
score. "detection" uses the pose detector's instance score, "iou" SAM's predicted mask IoU,
"constant" 1.0 for every mask (Pose2Seg's protocol), and "product" (the default) the product of
the first two. The default is the product because the two carry
complementary information: the detection score says whether the person exists at all (it
demotes false-positive detections, which SAM still segments confidently) and the predicted IoU
says how good the mask is (it demotes failed masks of real people); multiplying them is the
mask-scoring rule of Mask Scoring R-CNN. With ground-truth poses the detection score is 1.0 and
the product is the predicted IoU.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from p2s_jax.data import coco as coco_lib
from p2s_jax.data.matching import ground_truth_boxes
from p2s_jax.evaluation.metrics import evaluate_segm
from p2s_jax.evaluation.report import EvalReport
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.inference.predictor import decode_prompts, encode_images
from p2s_jax.inference.presets import get_preset
from p2s_jax.inference.preprocess import (CANVAS_MULTIPLE, bucket, canvas_hw, pad_to_canvas,
                                          preprocess_on_device, upsample_matrix)
from p2s_jax.inference.prompting import (PromptConfig, exclusive_masks, select_prompts,
                                         validate_pose_inputs)
from p2s_jax.keypoints import labelled_points
from p2s_jax.model.configs import compute_dtype
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import (DATA, REPLICATED, all_gather_json, host_to_global, local_positions,
                              local_rows, make_mesh)
from p2s_jax.utils.errors import MissingFileError
from p2s_jax.utils.files import write_json
from p2s_jax.utils.images import ImageError, load_image
from p2s_jax.utils.errors import InputError
from weights_conversion import load_model

RESULT_SCORES = ("product", "detection", "iou", "constant")
DEFAULT_RESULT_SCORE = "product"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the evaluation's results and its speed.

    Attributes:
      prompt: how a pose becomes a prompt (`PromptConfig.sam_pose2seg()`: MaxVis_3).
      keypoint_score: the per-keypoint visibility channel (ranks MaxVis, filters candidates),
        one of `coco.SCORE_NAMES` ('visibility' by default: ProbPose's visibility, or binary
        for ground-truth poses).
      confidence_score: the per-keypoint confidence channel (the prompt gate and MaxSpread's
        ranking, `prompting.select_prompts`); None: the same as `keypoint_score`.
      result_score: 'product' (default, see the module docstring), 'detection', 'iou' or
        'constant'.
      exclusive: each pixel keeps only the covering mask with the highest predicted IoU.
      postprocess: hole filling / sprinkle removal on the low-res logits (off by default;
        `MaskPostprocess.authors()` in the SAM-pose2seg preset).
      box_source: where box prompts come from: 'detection' (the pose's own box) or 'gt' (the
        box of the ground-truth person the pose matches by OKS, `matching.ground_truth_boxes`;
        Tab. 4's "GT" rows).
      crop_to_box: 0 (off), or each person is segmented on its own crop of the photo: its box
        (`box_source`) scaled by this factor about its centre (1.5 in Tab. 7), rounded and
        clipped to the photo, as the authors' `crop` mode; the mask is pasted back, and
        exclusive masks are applied across the persons of the photo afterwards.
      images_per_device: images encoded together on one device (the chunk size); 0: the
        backend's default (`backend_defaults`: 2 on CPU, 8 on accelerators).
      people_per_chunk: people of an image decoded together inside the decoder (a `lax.map`
        over chunks); 0: the backend's default (4 on CPU, where a chunk's activations stay in
        cache; all people of an image at once on accelerators).
      num_workers: host threads that read and preprocess images.
      prefetch_steps: steps of images prepared ahead of the device.
    """

    prompt: PromptConfig = PromptConfig.sam_pose2seg()
    keypoint_score: str = "visibility"
    confidence_score: str | None = None
    result_score: str = DEFAULT_RESULT_SCORE
    exclusive: bool = False
    postprocess: MaskPostprocess = MaskPostprocess()
    box_source: str = "detection"
    crop_to_box: float = 0.0
    images_per_device: int = 0
    people_per_chunk: int = 0
    num_workers: int = 4
    prefetch_steps: int = 2

    def __post_init__(self):
        for name in ("keypoint_score", "confidence_score"):
            value = getattr(self, name)
            if value not in coco_lib.SCORE_NAMES and not (name == "confidence_score"
                                                          and value is None):
                raise InputError(f"{name} must be one of {coco_lib.SCORE_NAMES}, got {value!r}")
        if self.box_source not in ("detection", "gt"):
            raise InputError(f"box_source must be 'detection' or 'gt', got {self.box_source!r}")
        if self.crop_to_box < 0:
            raise InputError(f"crop_to_box must be >= 0 (0: off), got {self.crop_to_box}")
        if self.result_score not in RESULT_SCORES:
            raise InputError(f"result_score must be one of {RESULT_SCORES}, "
                             f"got {self.result_score!r}")
        for name in ("images_per_device", "people_per_chunk"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0 (0: the backend's default), got "
                                 f"{getattr(self, name)}")
        for name in ("num_workers", "prefetch_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_preset(cls, name: str, ground_truth: bool = False, **overrides) -> "EvalConfig":
        """The settings of `presets.PRESETS[name]` (e.g. 'sam-pose2seg'), for detected or
        ground-truth poses; `overrides` replace single fields."""
        preset = get_preset(name)
        settings = dict(
            prompt=preset.ground_truth_prompt if ground_truth else preset.prompt,
            keypoint_score=preset.keypoint_score, confidence_score=preset.confidence_score,
            result_score="constant" if ground_truth else preset.result_score,
            exclusive=preset.exclusive, postprocess=preset.postprocess)
        return cls(**{**settings, **overrides})

    def for_backend(self, backend: str | None = None) -> "EvalConfig":
        """This config with the backend's defaults filled in (`backend_defaults`)."""
        images, people = backend_defaults(backend)
        return dataclasses.replace(self, images_per_device=self.images_per_device or images,
                                   people_per_chunk=self.people_per_chunk or people)


def backend_defaults(backend: str | None = None) -> tuple[int, int]:
    """(images per device, people per decoder chunk) for `backend` (default: JAX's). On CPU,
    small chunks keep activations in cache; accelerators want everything in one call (a chunk
    of 1024 people is more than any image holds, so it is one pass)."""
    backend = jax.default_backend() if backend is None else backend
    return (2, 4) if backend == "cpu" else (8, ALL_PEOPLE)


ALL_PEOPLE = 1024  # people_per_chunk that decodes every person of an image in one pass


class ImagePrompts(NamedTuple):
    """The prompts used for the P people of one image (original-image pixels)."""

    coords: np.ndarray  # (P, K, 2) float32
    labels: np.ndarray  # (P, K) int32, -1 padding
    has_prompt: np.ndarray  # (P,) bool


class EvalOutput(NamedTuple):
    results: list  # COCO segm results, by image id, then person order; people with a prompt only
    report: EvalReport
    prompts: dict  # image_id -> ImagePrompts (images that were run and not skipped)
    predictions: dict  # image_id -> (iou (R,), object score logits (R,)) of its R results


# ------------------------------------------------------------------------------ poses per image


class _Poses(NamedTuple):
    """One image's people as arrays for the device."""

    keypoints: np.ndarray  # (P, 17, 2) float32, NaN = absent
    scores: np.ndarray  # (P, 17) float32 visibility channel
    confidence: np.ndarray  # (P, 17) float32 confidence channel
    boxes: np.ndarray | None  # (P, 4) float32 xyxy
    det_score: np.ndarray  # (P,) float32


def ground_truth_prompt_poses(coco: COCO) -> dict[int, coco_lib.PoseInstances]:
    """Ground-truth poses of every image (`coco.ground_truth_poses`), with the unlabelled
    keypoints (v = 0, stored at (0, 0)) set to NaN so that no prompt rule can ever use them."""
    poses = {}
    for image_id in sorted(coco.getImgIds()):
        gt = coco_lib.ground_truth_poses(coco, image_id)
        triplets = np.concatenate([gt.keypoints, gt.scores["visibility"][..., None]], axis=-1)
        keypoints, _ = labelled_points(triplets)
        scores = {"visibility": gt.scores["visibility"], "confidence": gt.scores["visibility"]}
        poses[image_id] = coco_lib.PoseInstances(keypoints, scores, gt.boxes, gt.det_score,
                                                 gt.ann_ids)
    return poses


def with_ground_truth_boxes(coco: COCO, poses: Mapping[int, coco_lib.PoseInstances]
                            ) -> dict[int, coco_lib.PoseInstances]:
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


def _pose_arrays(image_id: int, poses: coco_lib.PoseInstances, config: EvalConfig) -> _Poses:
    confidence_name = config.confidence_score or config.keypoint_score
    for name in (config.keypoint_score, confidence_name):
        if name not in poses.scores:
            raise InputError(f"image {image_id}: the poses carry no {name!r} keypoint scores "
                             f"(they have {sorted(poses.scores)}); choose another score type "
                             "(e.g. --score-type confidence for plain COCO keypoint results)")
    scores = poses.scores[config.keypoint_score]
    needs_boxes = config.prompt.box != "none"
    if needs_boxes and poses.boxes is None:
        raise InputError(f"image {image_id}: box prompts ({config.prompt.box!r}) need person "
                         "boxes, but the poses have none (a detection file needs 'bbox')")
    confidence = poses.scores[confidence_name]
    validate_pose_inputs(poses.keypoints, scores, image_id, poses.boxes)
    validate_pose_inputs(poses.keypoints, confidence, image_id)
    return _Poses(poses.keypoints, scores, confidence, poses.boxes, poses.det_score)


# ------------------------------------------------------------------------------ the plan


class _Item(NamedTuple):
    """One image to run (or, with `crop_to_box`, one person's crop of it)."""

    image_id: int
    path: Path
    hw: tuple  # (H, W) of what runs: the photo (as the annotation file says) or the crop
    poses: _Poses
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


def _crop_items(item: _Item, factor: float) -> list[_Item]:
    """One item per person of `item`, on its crop, keypoints and box moved into the crop."""
    if item.poses.boxes is None:
        raise InputError(f"image {item.image_id}: crop_to_box needs person boxes (a detection "
                         "file with 'bbox', ground-truth poses, or box_source 'gt')")
    crops = []
    for person in range(len(item.poses.det_score)):
        x0, y0, x1, y1 = crop_window(item.poses.boxes[person], factor, item.hw)
        shift = np.float32([x0, y0])
        poses = _Poses(item.poses.keypoints[person:person + 1] - shift,
                       item.poses.scores[person:person + 1],
                       item.poses.confidence[person:person + 1],
                       item.poses.boxes[person:person + 1] - np.tile(shift, 2),
                       item.poses.det_score[person:person + 1])
        crops.append(item._replace(hw=(y1 - y0, x1 - x0), poses=poses, crop=(x0, y0, x1, y1),
                                   photo_hw=item.hw, first_person=person))
    return crops


def _items(coco: COCO, images_dir, poses: Mapping[int, coco_lib.PoseInstances],
           config: EvalConfig) -> list[_Item]:
    """The images with at least one person, most people first (then by id)."""
    images_dir = Path(images_dir)
    items = []
    for image_id in sorted(coco.getImgIds()):
        pose = poses.get(image_id)
        if pose is None or len(pose) == 0:
            continue
        info = coco.imgs[image_id]
        item = _Item(image_id, images_dir / info["file_name"],
                     (int(info["height"]), int(info["width"])),
                     _pose_arrays(image_id, pose, config))
        items += _crop_items(item, config.crop_to_box) if config.crop_to_box else [item]
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


def _step_people(step: np.ndarray, items: Sequence[_Item], people_per_chunk: int) -> int:
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


def _canvas_hw(items: Sequence[_Item]) -> tuple[int, int]:
    """(H, W) covering every image of the run, in `CANVAS_MULTIPLE`s: photos are padded onto it
    for the device's resize, and masks are upsampled onto it and cropped."""
    return canvas_hw((max(item.hw[0] for item in items), max(item.hw[1] for item in items)))


# ------------------------------------------------------------------------------ device steps


def _prompts_shard(keypoints, scores, confidence, boxes, image_hw, num_people, *,
                   prompt: PromptConfig, image_size: int):
    """keypoints (B, P, 17, 2), scores / confidence (B, P, 17), boxes (B, P, 4) or None,
    image_hw (B, 2), num_people (B,) real people per image (the rest is padding) -> model coords
    (B, P, K, 2), pixel coords (B, P, K, 2), labels (B, P, K), has_prompt (B, P)."""
    prompts = jax.vmap(lambda k, s, c, hw, b: select_prompts(k, s, hw, prompt, b, c))(
        keypoints, scores, confidence, image_hw, boxes)
    real = jnp.arange(keypoints.shape[1])[None, :] < num_people[:, None]
    prompts = prompts._replace(has_prompt=prompts.has_prompt & real,
                               labels=jnp.where(real[..., None], prompts.labels, -1))
    width_height = image_hw[:, ::-1].astype(jnp.float32)[:, None, None, :]
    # as `predictor.to_model_coords`: x / W, y / H, then * S, in float32.
    model_coords = prompts.coords / width_height * jnp.float32(image_size)
    return model_coords, prompts.coords, prompts.labels, prompts.has_prompt


def _decode_shard(graphdef, state, features, coords, labels, has_prompt, up_y, up_x, *,
                  people_per_chunk: int | None, exclusive: bool, postprocess: MaskPostprocess):
    """features (B, ...), coords (B, P, K, 2), labels (B, P, K), has_prompt (B, P),
    up_y (B, Hc, low), up_x (B, Wc, low) -> masks (B, P, Hc, Wc) bool, iou (B, P), object
    score logits (B, P).

    The P people of an image are decoded `people_per_chunk` at a time inside the decoder
    (`SAM2Image.decode`; None: all at once); people without a prompt get empty masks; with `exclusive`, every
    pixel goes to one mask (`exclusive_masks`)."""

    def one_image(image_features, image_coords, image_labels, image_up_y, image_up_x):
        out, masks = decode_prompts(graphdef, state, image_features, image_coords, image_labels,
                                    None, None, image_up_y, image_up_x, multimask_output=False,
                                    people_per_chunk=people_per_chunk, postprocess=postprocess)
        return masks[:, 0], out.iou[:, 0], out.object_score_logits

    masks, iou, object_score = jax.vmap(one_image)(features, coords, labels, up_y, up_x)
    masks = masks & has_prompt[:, :, None, None]
    if exclusive:
        masks = jax.vmap(exclusive_masks)(masks, jnp.where(has_prompt, iou, 0.0))
    return masks, iou, object_score.reshape(iou.shape)


# The three steps as jitted `shard_map`s over 'data': weights replicated, everything else split
# by image. Module-level and static in (graphdef, mesh, settings), so that jit's own cache
# reuses their compilations across runs.


def _encode_shard(graphdef, state, images, image_hw, *, image_size: int):
    """images (B, Hc, Wc, 3) uint8 on the canvas, image_hw (B, 2) -> ImageFeatures (B, ...):
    resize and normalisation on the device, then the encoder."""
    return encode_images(graphdef, state, preprocess_on_device(images, image_hw, image_size))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def encode_step(graphdef, mesh: Mesh, image_size: int, state, images, image_hw):
    fn = functools.partial(_encode_shard, graphdef, image_size=image_size)
    return jax.shard_map(fn, mesh=mesh, in_specs=(REPLICATED, DATA, DATA), out_specs=DATA)(
        state, images, image_hw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def prompts_step(mesh: Mesh, prompt: PromptConfig, image_size: int, keypoints, scores, confidence,
                 boxes, image_hw, num_people):
    fn = functools.partial(_prompts_shard, prompt=prompt, image_size=image_size)
    # check_vma=False: MaxSpread's fori_loop starts from constant carries, which shard_map's
    # varying-axis type check rejects; every value here is per device anyway.
    return jax.shard_map(fn, mesh=mesh, in_specs=DATA, out_specs=DATA, check_vma=False)(
        keypoints, scores, confidence, boxes, image_hw, num_people)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def decode_step(graphdef, mesh: Mesh, people_per_chunk: int | None, exclusive: bool,
                postprocess: MaskPostprocess, state, features, coords, labels, has_prompt, up_y,
                up_x):
    fn = functools.partial(_decode_shard, graphdef, people_per_chunk=people_per_chunk,
                           exclusive=exclusive, postprocess=postprocess)
    specs = (REPLICATED, DATA, DATA, DATA, DATA, DATA, DATA)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=DATA)(
        state, features, coords, labels, has_prompt, up_y, up_x)


# ------------------------------------------------------------------------------ host side


def _load_image(item: _Item, canvas: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    """-> ((Hc, Wc, 3) uint8 on the canvas, None), or (None, reason) for a missing / unreadable
    image. Decoding is all the host does to an image."""
    try:
        image = load_image(item.path)
    except ImageError as err:
        return None, str(err)
    expected = item.photo_hw or item.hw
    if image.shape[:2] != expected:
        return None, (f"{item.path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but the "
                      f"annotation file says {expected[1]}x{expected[0]}")
    if item.crop is not None:
        x0, y0, x1, y1 = item.crop
        image = image[y0:y1, x0:x1]
    return pad_to_canvas(image, canvas), None


def _prefetch(pool: concurrent.futures.Executor, fn, args: Iterable[tuple],
              depth: int) -> Iterator[concurrent.futures.Future]:
    """Futures of fn(*a) in order, at most `depth` submitted ahead."""
    args = iter(args)
    pending = collections.deque(pool.submit(fn, *a) for a in itertools.islice(args, depth))
    while pending:
        future = pending.popleft()
        for a in itertools.islice(args, 1):
            pending.append(pool.submit(fn, *a))
        yield future


class _HostBatch(NamedTuple):
    images: np.ndarray  # (L, Hc, Wc, 3) uint8 on the canvas
    keypoints: np.ndarray  # (L, P, 17, 2)
    scores: np.ndarray  # (L, P, 17)
    confidence: np.ndarray  # (L, P, 17)
    boxes: np.ndarray | None  # (L, P, 4)
    image_hw: np.ndarray  # (L, 2) int32
    num_people: np.ndarray  # (L,) int32 real people (the rest of P is padding)
    up_y: np.ndarray  # (L, Hc, low)
    up_x: np.ndarray  # (L, Wc, low)


def _host_batch(slots: Sequence[_Item | None], images: Sequence[np.ndarray | None],
                num_people: int, low: int, canvas: tuple[int, int],
                with_boxes: bool, joints: int) -> _HostBatch:
    """Stacks this process's slots; empty slots (padding, skipped images) have no people."""
    n = len(slots)
    batch = _HostBatch(
        images=np.zeros((n, *canvas, 3), np.uint8),
        keypoints=np.full((n, num_people, joints, 2), np.nan, np.float32),
        scores=np.zeros((n, num_people, joints), np.float32),
        confidence=np.zeros((n, num_people, joints), np.float32),
        boxes=np.zeros((n, num_people, 4), np.float32) if with_boxes else None,
        image_hw=np.ones((n, 2), np.int32),
        num_people=np.zeros(n, np.int32),
        up_y=np.zeros((n, canvas[0], low), np.float32),
        up_x=np.zeros((n, canvas[1], low), np.float32),
    )
    for row, (item, image) in enumerate(zip(slots, images)):
        if item is None or image is None:
            continue
        people = len(item.poses.det_score)
        batch.images[row] = image
        batch.keypoints[row, :people] = item.poses.keypoints
        batch.scores[row, :people] = item.poses.scores
        batch.confidence[row, :people] = item.poses.confidence
        if with_boxes:
            batch.boxes[row, :people] = item.poses.boxes
        batch.image_hw[row] = item.hw
        batch.num_people[row] = people
        batch.up_y[row] = upsample_matrix(item.hw[0], low, canvas[0])
        batch.up_x[row] = upsample_matrix(item.hw[1], low, canvas[1])
    return batch


def _result_scores(det_score: np.ndarray, iou: np.ndarray, kind: str) -> np.ndarray:
    """(P,), (P,) -> (P,) float64 COCO result scores."""
    det_score, iou = np.asarray(det_score, np.float64), np.asarray(iou, np.float64)
    if kind == "detection":
        return det_score
    if kind == "iou":
        return iou
    if kind == "constant":
        return np.ones_like(det_score)
    return det_score * iou


class _ImageResult(NamedTuple):
    image_id: int
    results: list
    prompts: ImagePrompts
    num_people: int
    without_prompt: int
    first_person: int  # the item's first person in the photo (crops: one item per person)
    iou: list  # predicted IoU of each result
    object_score: list  # object score logit of each result

def _image_result(item: _Item, masks: np.ndarray, iou: np.ndarray, object_score: np.ndarray,
                  coords: np.ndarray,
                  labels: np.ndarray, has_prompt: np.ndarray, config: EvalConfig,
                  category_id: int) -> _ImageResult:
    """One image's device rows (P slots) -> its COCO results (people with a prompt only)."""
    people = len(item.poses.det_score)
    height, width = item.hw
    has_prompt = has_prompt[:people]
    scores = _result_scores(item.poses.det_score, iou[:people], config.result_score)
    kept = np.flatnonzero(has_prompt)
    masks, coords = masks[kept, :height, :width], coords[:people]
    if item.crop is not None:  # paste back into the photo, prompts in photo pixels
        x0, y0, x1, y1 = item.crop
        photo = np.zeros((len(kept), *item.photo_hw), bool)
        photo[:, y0:y1, x0:x1] = masks
        masks = photo
        coords = np.where(labels[:people, :, None] >= 0, coords + np.float32([x0, y0]), coords)
    results = coco_lib.encode_results(item.image_id, masks, scores[kept], category_id)
    prompts = ImagePrompts(coords, labels[:people], has_prompt)
    return _ImageResult(item.image_id, results, prompts, people, int(people - kept.size),
                        item.first_person, iou[kept].tolist(), object_score[kept].tolist())


# ------------------------------------------------------------------------------ the run


def run_dataset(model: SAM2Image, coco: COCO, images_dir, poses: Mapping[int, Any],
              config: EvalConfig = EvalConfig(), *, mesh: Mesh | None = None,
              progress: bool = True) -> EvalOutput:
    """Masks for every person of every image of `coco` that has poses.

    Args:
      model: a loaded `SAM2Image` (`weights_conversion.load_model`).
      coco: the ground truth (`coco.load_coco`); its images' file names and sizes are used.
      images_dir: folder the images' `file_name`s are relative to.
      poses: image_id -> `coco.PoseInstances` (`coco.load_keypoint_detections`, or
        `ground_truth_prompt_poses`); images without an entry or without people are not run.
      config: prompts, scores and batching.
      mesh: a 1-D mesh with axis 'data' (`make_mesh()`, all devices, by default).
      progress: show a tqdm bar (images/s and ETA).

    Returns:
      `EvalOutput`: COCO segm results of all processes, the report, and the prompts used.
    """
    mesh = make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    config = config.for_backend(mesh.devices.flat[0].platform)
    schema = coco_lib.keypoint_schema(coco)
    config = dataclasses.replace(config, prompt=dataclasses.replace(config.prompt,
                                                                    face=schema.face))
    if config.box_source == "gt":
        poses = with_ground_truth_boxes(coco, poses)
    items = _items(coco, images_dir, poses, config)
    category_id = coco_lib.person_category_id(coco)
    plan = plan_steps(len(items), config.images_per_device, num_devices)
    positions = local_positions(mesh)
    local_plan = plan[:, positions[0]:positions[-1] + 1].reshape(len(plan), -1)  # (steps, L)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, REPLICATED))
    canvas = _canvas_hw(items) if items else (CANVAS_MULTIPLE, CANVAS_MULTIPLE)
    with_boxes = bool(items) and items[0].poses.boxes is not None

    results, skipped = [], []  # futures of _ImageResult (RLE encoding in the threads)
    start = time.perf_counter()
    local_items = [items[i] for i in local_plan.ravel() if i >= 0]
    bar = tqdm(total=len(local_items), unit="img", desc="evaluate", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    with concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:
        loads = _prefetch(pool, functools.partial(_load_image, canvas=canvas),
                          ((item,) for item in local_items),
                          config.prefetch_steps * local_plan.shape[1])
        in_flight = None
        for step_index, local_step in enumerate(local_plan):
            slots, images = _read_step(
                [items[i] if i >= 0 else None for i in local_step], loads, skipped, bar)
            num_people = _step_people(plan[step_index], items, config.people_per_chunk)
            batch = _host_batch(slots, images, num_people, model.config.low_res_mask_size,
                                canvas, with_boxes, schema.num_keypoints)
            device_out = _run_step(graphdef, state, mesh, batch, config,
                                   model.config.image_size)
            if in_flight is not None:
                results += _collect(*in_flight, config, category_id, bar, pool)
            in_flight = (slots, device_out)
        if in_flight is not None:
            results += _collect(*in_flight, config, category_id, bar, pool)
        outputs = [future.result() for future in results]
    bar.close()
    seconds = time.perf_counter() - start
    gathered = all_gather_json({"outputs": [_output_to_json(o) for o in outputs],
                                "skipped": skipped})
    num_images = len({item.image_id for item in items})
    return _assemble(gathered, num_images, seconds, num_devices, bool(config.crop_to_box),
                     config.exclusive)


def _read_step(slots: Sequence[_Item | None], loads: Iterator[concurrent.futures.Future],
               skipped: list, bar) -> tuple[list, list]:
    """The decoded images of one step's slots, from the prefetch queue -> (slots, images);
    an image that cannot be used is added to `skipped` and its slot emptied."""
    pixels = []
    for item in slots:
        if item is None:
            pixels.append(None)
            continue
        image, reason = next(loads).result()
        if reason is not None:
            skipped.append({"image_id": item.image_id, "file_name": str(item.path),
                            "reason": reason})
            bar.write(f"skipped image {item.path}: {reason}")
        pixels.append(image)
    return [s if p is not None else None for s, p in zip(slots, pixels)], pixels


def _run_step(graphdef, state, mesh: Mesh, batch: _HostBatch, config: EvalConfig,
              image_size: int):
    """Dispatches one step (asynchronously); -> device arrays (masks, iou, coords, labels, has)."""
    features = encode_step(graphdef, mesh, image_size, state, host_to_global(mesh, batch.images),
                            host_to_global(mesh, batch.image_hw))
    model_coords, coords, labels, has_prompt = prompts_step(
        mesh, config.prompt, image_size, *(host_to_global(mesh, a) for a in (
            batch.keypoints, batch.scores, batch.confidence, batch.boxes, batch.image_hw,
            batch.num_people)))
    chunk = decoder_chunk(batch.keypoints.shape[1], config.people_per_chunk)
    masks, iou, object_score = decode_step(graphdef, mesh, chunk, config.exclusive,
                                           config.postprocess, state,
                              features, model_coords, labels, has_prompt,
                              host_to_global(mesh, batch.up_y), host_to_global(mesh, batch.up_x))
    return masks, iou, object_score, coords, labels, has_prompt


def _collect(slots: Sequence[_Item | None], device_out, config: EvalConfig, category_id: int,
             bar, pool: concurrent.futures.Executor) -> list[concurrent.futures.Future]:
    """Reads one step's local rows back; the masks of its real images are RLE-encoded in the
    thread pool (futures of `_ImageResult`, in order)."""
    masks, iou, object_score, coords, labels, has_prompt = (local_rows(a) for a in device_out)
    results = [pool.submit(_image_result, item, masks[row], iou[row], object_score[row],
                           coords[row], labels[row], has_prompt[row], config, category_id)
               for row, item in enumerate(slots) if item is not None]
    bar.update(sum(item is not None for item in slots))
    return results


# ------------------------------------------------------------------------------ gathering


def _output_to_json(output: _ImageResult) -> dict:
    return {"image_id": output.image_id, "results": output.results,
            "coords": output.prompts.coords.tolist(), "labels": output.prompts.labels.tolist(),
            "has_prompt": output.prompts.has_prompt.tolist(), "num_people": output.num_people,
            "without_prompt": output.without_prompt, "first_person": output.first_person,
            "iou": output.iou, "object_score": output.object_score}


def _merge_crops(outputs: Sequence[dict], exclusive: bool) -> list[dict]:
    """The per-person outputs of cropped photos -> one output per photo, in person order; with
    `exclusive`, each pixel then goes to the covering mask with the highest predicted IoU."""
    merged = []
    for _, group in itertools.groupby(outputs, key=lambda o: o["image_id"]):
        group = sorted(group, key=lambda o: o["first_person"])
        out = dict(group[0])
        for key in ("results", "coords", "labels", "has_prompt", "iou", "object_score"):
            out[key] = [v for o in group for v in o[key]]
        for key in ("num_people", "without_prompt"):
            out[key] = sum(o[key] for o in group)
        if exclusive and len(out["results"]) > 1:
            masks = np.stack([mask_utils.decode(r["segmentation"]) for r in out["results"]])
            masks = np.asarray(exclusive_masks(masks.astype(bool), np.asarray(out["iou"])))
            for result, rle in zip(out["results"], coco_lib.masks_to_rle(masks)):
                result["segmentation"] = rle
        merged.append(out)
    return merged


def _assemble(payloads: Sequence[dict], num_images: int, seconds: float,
              num_devices: int, crops: bool = False, exclusive: bool = False) -> EvalOutput:
    outputs = sorted((o for p in payloads for o in p["outputs"]),
                     key=lambda o: (o["image_id"], o["first_person"]))
    skipped = sorted((s for p in payloads for s in p["skipped"]),
                     key=lambda s: s["image_id"])
    skipped_ids = {s["image_id"] for s in skipped}
    outputs = [o for o in outputs if o["image_id"] not in skipped_ids]
    if crops:
        outputs = _merge_crops(outputs, exclusive)
        skipped = list({s["image_id"]: s for s in skipped}.values())
    results = [r for o in outputs for r in o["results"]]
    prompts = {o["image_id"]: ImagePrompts(np.asarray(o["coords"], np.float32).reshape(
        len(o["has_prompt"]), -1, 2), np.asarray(o["labels"], np.int32).reshape(
        len(o["has_prompt"]), -1), np.asarray(o["has_prompt"], bool)) for o in outputs}
    report = EvalReport(
        num_images=num_images,
        num_people=sum(o["num_people"] for o in outputs),
        num_results=len(results),
        people_without_prompt=sum(o["without_prompt"] for o in outputs),
        skipped_images=skipped, seconds=seconds, num_devices=num_devices,
        num_processes=jax.process_count())
    predictions = {o["image_id"]: (np.asarray(o["iou"], np.float32),
                                   np.asarray(o["object_score"], np.float32)) for o in outputs}
    return EvalOutput(results, report, prompts, predictions)


# ------------------------------------------------------------------------------ files in, files out


def run_evaluation(annotations, images_dir, checkpoint, *, keypoints=None,
                   gt_keypoints: bool = False, model_name: str | None = None,
                   image_size: int = 1024, config: EvalConfig = EvalConfig(),
                   coco_star: bool = False, out=None, summary_path=None,
                   progress: bool = True, mesh: Mesh | None = None,
                   model: SAM2Image | None = None, dtype: str = "float32",
                   attention: str = "auto") -> dict:
    """`p2s evaluate`: files in, COCO segm results + AP table + JSON summary out.

    Args:
      annotations: COCO-format ground truth with person masks.
      images_dir: the images' folder.
      checkpoint: official `.pt` or converted folder (ignored when `model` is given).
      keypoints: keypoint detections (COCO keypoint results); or `gt_keypoints=True`.
      model_name, image_size: the model (`model_name` None: read from the checkpoint).
      dtype, attention: the compute dtype ('float32' or 'bfloat16') and attention
        implementation (`SAM2Config.attention`) of the loaded model.
      config: see `EvalConfig`.
      coco_star: the paper's COCO* protocol (`coco.evaluate_segm`).
      out: where to write the results JSON (None: not written); the summary goes to
        `summary_path`, by default next to it as `<out stem>.summary.json`.
      model: an already loaded model (tests, notebooks).

    Returns:
      The summary dict (settings, metrics incl. "table", report).
    """
    if (keypoints is None) == (not gt_keypoints):
        raise InputError("give exactly one of keypoints (a detection file) and gt_keypoints")
    coco = coco_lib.load_coco(annotations)
    if not Path(images_dir).is_dir():
        raise MissingFileError(f"image folder not found: {images_dir}")
    poses = (ground_truth_prompt_poses(coco) if gt_keypoints
             else coco_lib.load_keypoint_detections(keypoints, coco))
    checkpoint_loaded = model is None
    if checkpoint_loaded:
        model = load_model(checkpoint, model_name, image_size, compute_dtype(dtype), attention)
    output = run_dataset(model, coco, images_dir, poses, config, mesh=mesh, progress=progress)
    metrics = evaluate_segm(coco, output.results, coco_star=coco_star)
    summary = {
        "settings": {
            "annotations": str(annotations), "images": str(images_dir),
            "keypoints": "ground truth" if gt_keypoints else str(keypoints),
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "model": model.config.name, "image_size": model.config.image_size,
            "attention": model.config.attention, "dtype": dtype if checkpoint_loaded else None,
            "coco_star": coco_star, **config.for_backend().to_dict(),
        },
        "metrics": {k: v for k, v in metrics.items() if k != "table"},
        "table": metrics["table"],
        "report": output.report.to_dict(),
        "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                "devices": output.report.num_devices, "processes": jax.process_count()},
    }
    if out is not None and jax.process_index() == 0:
        out = Path(out)
        write_json(out, output.results)
        summary_path = (out.with_name(out.stem + ".summary.json") if summary_path is None
                        else Path(summary_path))
        summary["results_file"] = str(out)
        write_json(summary_path, summary, indent=2)
        summary["summary_file"] = str(summary_path)
    return summary
