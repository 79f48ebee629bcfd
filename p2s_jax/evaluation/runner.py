"""Batched, data-parallel pose-to-mask runs over COCO-format datasets (COCO, OCHuman, CIHP):
`run_dataset`, the one loop behind `p2s evaluate`, `p2s annotate` and evaluation while training.

For every image that has people, SAM-pose2seg turns each person's pose into a prompt
(`p2s_jax.inference.prompting.select_prompts`) and decodes one mask per person; the masks go to
COCO segm results (compressed RLE).

How the work is laid out
    * The host only decodes and encodes, in workers (`evaluation.host`: worker processes by
      default, `EvalConfig.host_workers`, `num_workers` of them): they decode the photos a few
      steps ahead of the device (`prefetch_steps`) onto the run's canvas (the largest photo,
      sides rounded up to `CANVAS_MULTIPLE`) in shared memory, and RLE-encode the masks that
      come back, read in place from shared memory. The main process copies each photo into the
      step's batch, puts the batch on the devices and collects the results.
    * The images with people are sorted by their number of people (most first, then by id), so
      that images batched together need about the same padding, and cut into *chunks* of
      `images_per_device` images (`evaluation.plan`). A *step* hands one chunk to every device of
      a 1-D `jax.sharding.Mesh` with the axis 'data' (the last step is padded with empty chunks).
    * Per step, through `jax.shard_map` over 'data' (`evaluation.steps`): resize and
      normalisation (`preprocess_on_device`) and `encode_images` on the chunk's photos;
      `select_prompts` on all people of each image (people padded to a power of two, NaN
      keypoints for padding); `decode_prompts` vmapped over the images, all people of an image in
      one call (chunked inside the decoder by `people_per_chunk` on CPU); masks upsampled and
      thresholded straight onto the canvas, packed eight pixels to a byte, unpacked and cropped
      by the host workers. These are the predictor's own
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
from collections.abc import Callable, Mapping, Sequence
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
from p2s_jax.evaluation.host import Decoding, HostWorkers, ImagePrompts, Photo, photo_of
from p2s_jax.evaluation.steps import (HostBatch, decode_step, encode_step, host_batch, prefetch,
                                      prompts_step)
from p2s_jax.inference.preprocess import CANVAS_MULTIPLE
from p2s_jax.inference.postprocess import exclusive_masks
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import (REPLICATED, all_gather_json, host_to_global, local_positions,
                              local_rows, local_shape, make_mesh)


class EvalOutput(NamedTuple):
    results: list  # COCO segm results, by image id, then person order; people with a prompt only
    report: EvalReport
    prompts: dict  # image_id -> ImagePrompts (images that were run and not skipped)
    predictions: dict  # image_id -> (iou (R,), object score logits (R,)) of its R results


# ------------------------------------------------------------------------------ the run


def run_dataset(model: SAM2Image, coco: COCO, images_dir, poses: Mapping[int, Any],
                config: EvalConfig = EvalConfig(), *, mesh: Mesh | None = None,
                progress: bool = True, label: str = "evaluate",
                run_step: Callable[[HostBatch], tuple] | None = None) -> EvalOutput:
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
      run_step: a step's device work, host batch -> the device arrays (masks packed along the
        width, iou, object score, coords, labels, has_prompt) split over the mesh; None: the model's
        (`_run_step`). `scripts/benchmark_eval.py --host-only` replaces it to time the host.

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
    if run_step is None:
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, NamedSharding(mesh, REPLICATED))
        run_step = functools.partial(_run_step, graphdef, state, mesh, config=config,
                                     image_size=model.config.image_size)
    canvas = items_canvas(items) if items else (CANVAS_MULTIPLE, CANVAS_MULTIPLE)
    with_boxes = bool(items) and items[0].poses.boxes is not None

    results, skipped = [], []  # futures of ImageResult.to_json() (RLE-encoded by the workers)
    start = time.perf_counter()
    local_items = [items[i] for i in local_plan.ravel() if i >= 0]
    bar = tqdm(total=len(local_items), unit="img", desc=label, dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    people = [step_people(step, items, config.people_per_chunk) for step in plan]
    workers = HostWorkers(config.host_workers, config.num_workers, local_plan.shape[1], canvas,
                          config.prefetch_steps, local_plan.shape[1] * max(people, default=1)
                          * canvas[0] * (-(-canvas[1] // 8)))
    photos = [photo_of(item) for item in items]
    try:
        loads = prefetch(workers.decode, (([photos[i] if i >= 0 else None
                                            for i in local_step],) for local_step in local_plan),
                         config.prefetch_steps)
        in_flight = None
        for step_index, local_step in enumerate(local_plan):
            slots, images = _read_step([items[i] if i >= 0 else None for i in local_step],
                                       next(loads), workers, skipped, bar)
            batch = host_batch(slots, images, people[step_index], model.config.low_res_mask_size,
                               canvas, with_boxes, schema.num_keypoints)
            device_out = run_step(batch)
            if in_flight is not None:
                results += _collect(*in_flight, config, category_id, bar, workers)
            in_flight = ([photos[i] if item is not None else None
                          for i, item in zip(local_step, slots)], device_out)
        if in_flight is not None:
            results += _collect(*in_flight, config, category_id, bar, workers)
        outputs = [output for task in results for output in task.result()]
    finally:  # an interrupt cancels the queued photos instead of waiting for them
        workers.close(wait=False)
        bar.close()
    seconds = time.perf_counter() - start
    gathered = all_gather_json({"outputs": outputs, "skipped": skipped})
    num_images = len({item.image_id for item in items})
    return _assemble(gathered, num_images, seconds, num_devices, bool(config.crop_to_box),
                     config.exclusive)


def _read_step(slots: Sequence[Item | None], decoding: Decoding, workers: HostWorkers,
               skipped: list, bar) -> tuple[list, np.ndarray]:
    """One step's photos, in the workers' ring -> (slots, images (L, Hc, Wc, 3) uint8, the
    ring's slot, used in place until the step after next starts); an image that cannot be used
    is added to `skipped` and its slot emptied (its row is zeros)."""
    slot, reasons = decoding.result()
    kept = list(slots)
    for row, (item, reason) in enumerate(zip(slots, reasons)):
        if item is not None and reason is not None:
            skipped.append({"image_id": item.image_id, "file_name": str(item.path),
                            "reason": reason})
            bar.write(f"skipped image {item.path}: {reason}")
            kept[row] = None
    return kept, workers.photos(slot)


def _run_step(graphdef, state, mesh: Mesh, batch: HostBatch, *, config: EvalConfig,
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


def _collect(photos: Sequence[Photo | None], device_out, config: EvalConfig, category_id: int,
             bar, workers: HostWorkers) -> list[concurrent.futures.Future]:
    """Reads one step's local rows back, the masks straight into shared memory; the workers
    RLE-encode the masks of its real images (futures of lists of JSON-ready `ImageResult`s, in
    order)."""
    masks_out, *small = device_out
    masks, spec = workers.masks(local_shape(masks_out))
    local_rows(masks_out, out=masks)
    iou, object_score, coords, labels, has_prompt = (local_rows(a) for a in small)
    tasks = workers.encode(photos, spec, iou, object_score,
                           ImagePrompts(coords, labels, has_prompt), config.result_score,
                           category_id)
    bar.update(sum(photo is not None for photo in photos))
    return tasks


# ------------------------------------------------------------------------------ gathering


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
