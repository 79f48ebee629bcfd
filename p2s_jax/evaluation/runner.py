"""Batched, data-parallel pose-to-mask runs over COCO-format datasets (COCO, OCHuman, CIHP):
`run_dataset`, the one loop behind `p2s evaluate`, `p2s annotate` and evaluation while training.

For every image that has people, SAM-pose2seg turns each person's pose into a prompt
(`p2s_jax.inference.prompting.select_prompts`) and decodes one mask per person; the masks go to
COCO segm results (compressed RLE).

How the work is laid out
    * The host only decodes: threads (`concurrent.futures`, `EvalConfig.num_workers`) read and
      decode the photos a few steps ahead of the device (`prefetch_steps`) onto the run's canvas
      (the largest photo, sides rounded up to `CANVAS_MULTIPLE`), and RLE-encode the masks that
      come back.
    * The images with people are sorted by their number of people (most first, then by id), so
      that images batched together need about the same padding, and cut into *chunks* of
      `images_per_device` images (`evaluation.plan`). A *step* hands one chunk to every device of
      a 1-D `jax.sharding.Mesh` with the axis 'data' (the last step is padded with empty chunks).
    * Per step, through `jax.shard_map` over 'data' (`evaluation.steps`): resize and
      normalisation (`preprocess_on_device`) and `encode_images` on the chunk's photos;
      `select_prompts` on all people of each image (people padded to a power of two, NaN
      keypoints for padding); `decode_prompts` vmapped over the images, all people of an image in
      one call (chunked inside the decoder by `people_per_chunk` on CPU); masks upsampled and
      thresholded straight onto the canvas, cropped on the host. These are the predictor's own
      jitted functions (`p2s_jax.inference.predictor`).
    * Defaults follow the backend (`config.backend_defaults`): on CPU 2 images per device and
      people in chunks of 4, on accelerators 8 images per device and every person at once.
    * Multi-host: every process builds the same plan, feeds the chunks of its own devices
      (`jax.make_array_from_process_local_data`), reads back its own shards, and the per-process
      results are all-gathered at the end.

Determinism: a chunk's images, and every array shape a device computes on, depend on
`images_per_device` and `people_per_chunk` but not on the number of devices or processes, so
the results are identical on one device and on many (tested with 1 and 4 host devices).

People and images that produce no mask
    * A person without any usable keypoint gets no prompt and no mask (unless the prompt config
      asks for the empty prompt); such people are counted in `EvalReport.people_without_prompt`.
    * An image that is missing, unreadable, or whose pixel size differs from its annotation is
      reported by name, skipped, and listed in the report (`p2s evaluate` checks the files
      before it starts and refuses to score a dataset with missing photos).
    * A malformed annotation or keypoint file stops the run at once (`p2s_jax.data.coco` raises).

Ctrl-C (or SIGTERM) stops the run at once: the photos queued for decoding are cancelled.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from p2s_jax.data import coco as coco_lib
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.plan import (Item, decoder_chunk, items_canvas, plan_steps,
                                     run_items, step_people,
                                     with_ground_truth_boxes)
from p2s_jax.evaluation.report import EvalReport
from p2s_jax.evaluation.steps import (HostBatch, decode_step, encode_step, host_batch,
                                      load_item_image, prefetch, prompts_step)
from p2s_jax.inference.preprocess import CANVAS_MULTIPLE
from p2s_jax.inference.postprocess import exclusive_masks
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import (REPLICATED, all_gather_json, host_to_global, local_positions,
                              local_rows, make_mesh)


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


# ------------------------------------------------------------------------------ the run


def run_dataset(model: SAM2Image, coco: COCO, images_dir, poses: Mapping[int, Any],
                config: EvalConfig = EvalConfig(), *, mesh: Mesh | None = None,
                progress: bool = True, label: str = "evaluate") -> EvalOutput:
    """Masks for every person of every image of `coco` that has poses.

    Args:
      model: a loaded `SAM2Image` (`weights_conversion.load_model`).
      coco: the ground truth (`coco.load_coco`); its images' file names and sizes are used.
      images_dir: folder the images' `file_name`s are relative to.
      poses: image_id -> `poses.PoseInstances` (`coco.load_keypoint_detections`, or
        `ground_truth_prompt_poses`); images without an entry or without people are not run.
      config: prompts, scores and batching.
      mesh: a 1-D mesh with axis 'data' (`make_mesh()`, all devices, by default).
      progress: show a tqdm bar (images/s and ETA), labelled `label`.

    Returns:
      `EvalOutput`: COCO segm results of all processes, the report, and the prompts used.
    """
    mesh = make_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    config = config.for_backend(mesh.devices.flat[0].platform).resolve_channels(poses, "poses")
    schema = coco_lib.keypoint_schema(coco)
    config = dataclasses.replace(config, prompt=dataclasses.replace(config.prompt,
                                                                    face=schema.face))
    if config.box_source == "gt":
        poses = with_ground_truth_boxes(coco, poses)
    items = run_items(coco, images_dir, poses, config)
    # a chunk larger than the run's images would only pad (and allocate) empty slots
    config = dataclasses.replace(config, images_per_device=min(config.images_per_device,
                                                               max(len(items), 1)))
    category_id = coco_lib.person_category_id(coco)
    plan = plan_steps(len(items), config.images_per_device, num_devices)
    positions = local_positions(mesh)
    local_plan = plan[:, positions[0]:positions[-1] + 1]
    local_plan = local_plan.reshape(len(plan), int(np.prod(local_plan.shape[1:])))  # (steps, L)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, REPLICATED))
    canvas = items_canvas(items) if items else (CANVAS_MULTIPLE, CANVAS_MULTIPLE)
    with_boxes = bool(items) and items[0].poses.boxes is not None

    results, skipped = [], []  # futures of _ImageResult (RLE encoding in the threads)
    start = time.perf_counter()
    local_items = [items[i] for i in local_plan.ravel() if i >= 0]
    bar = tqdm(total=len(local_items), unit="img", desc=label, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    pool = concurrent.futures.ThreadPoolExecutor(config.num_workers)
    try:
        loads = prefetch(pool, functools.partial(load_item_image, canvas=canvas),
                         ((item,) for item in local_items),
                         config.prefetch_steps * local_plan.shape[1])
        in_flight = None
        for step_index, local_step in enumerate(local_plan):
            slots, images = _read_step(
                [items[i] if i >= 0 else None for i in local_step], loads, skipped, bar)
            num_people = step_people(plan[step_index], items, config.people_per_chunk)
            batch = host_batch(slots, images, num_people, model.config.low_res_mask_size,
                               canvas, with_boxes, schema.num_keypoints)
            device_out = _run_step(graphdef, state, mesh, batch, config,
                                   model.config.image_size)
            if in_flight is not None:
                results += _collect(*in_flight, config, category_id, bar, pool)
            in_flight = (slots, device_out)
        if in_flight is not None:
            results += _collect(*in_flight, config, category_id, bar, pool)
        outputs = [future.result() for future in results]
    finally:  # an interrupt cancels the queued photos instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    seconds = time.perf_counter() - start
    gathered = all_gather_json({"outputs": [_output_to_json(o) for o in outputs],
                                "skipped": skipped})
    num_images = len({item.image_id for item in items})
    return _assemble(gathered, num_images, seconds, num_devices, bool(config.crop_to_box),
                     config.exclusive)


def _read_step(slots: Sequence[Item | None], loads: Iterator[concurrent.futures.Future],
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


def _run_step(graphdef, state, mesh: Mesh, batch: HostBatch, config: EvalConfig,
              image_size: int):
    """Dispatches one step (asynchronously); -> device arrays (masks, iou, coords, labels, has)."""
    features = encode_step(graphdef, mesh, image_size, state, host_to_global(mesh, batch.images),
                            host_to_global(mesh, batch.image_hw))
    model_coords, coords, labels, has_prompt = prompts_step(
        mesh, config.prompt, image_size, *(host_to_global(mesh, a) for a in (
            batch.keypoints, batch.scores, batch.confidence, batch.boxes, batch.image_hw,
            batch.num_people)))
    chunk = decoder_chunk(batch.keypoints.shape[1], config.people_per_chunk)
    masks, iou, object_score = decode_step(
        graphdef, mesh, chunk, config.exclusive, config.postprocess, state, features,
        model_coords, labels, has_prompt, host_to_global(mesh, batch.up_y),
        host_to_global(mesh, batch.up_x))
    return masks, iou, object_score, coords, labels, has_prompt


def _collect(slots: Sequence[Item | None], device_out, config: EvalConfig, category_id: int,
             bar, pool: concurrent.futures.Executor) -> list[concurrent.futures.Future]:
    """Reads one step's local rows back; the masks of its real images are RLE-encoded in the
    thread pool (futures of `_ImageResult`, in order)."""
    masks, iou, object_score, coords, labels, has_prompt = (local_rows(a) for a in device_out)
    results = [pool.submit(_image_result, item, masks[row], iou[row], object_score[row],
                           coords[row], labels[row], has_prompt[row], config, category_id)
               for row, item in enumerate(slots) if item is not None]
    bar.update(sum(item is not None for item in slots))
    return results


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


def _image_result(item: Item, masks: np.ndarray, iou: np.ndarray, object_score: np.ndarray,
                  coords: np.ndarray, labels: np.ndarray, has_prompt: np.ndarray,
                  config: EvalConfig, category_id: int) -> _ImageResult:
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
