"""The host's share of a dataset run, done by workers so that the main process only feeds the
device and collects: photos decoded onto the run's canvas, and each image's masks unpacked,
cropped and RLE-encoded into COCO results.

Workers (`EvalConfig.host_workers`, `utils.workers`): "processes" (the default: `num_workers`
worker processes, from a fork server that has imported this module and nothing of JAX), or
"threads" in this process. Both run the same functions on the same shared arrays
(`utils.shared`): a ring of steps' photos that the workers decode into, and per step the masks
read back from the devices, which the workers read in place. A step's rows go to the workers
in `num_workers` contiguous chunks, one task each way: nothing larger than a prompt goes
through a pipe, a few times a step, and the outputs of both kinds are the same bytes.

Everything here is numpy, PIL and pycocotools: the module imports nothing of JAX, so a worker
process starts in a fraction of a second.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from p2s_jax.data import coco as coco_lib
from p2s_jax.utils.images import ImageError, load_image, pad_to_canvas
from p2s_jax.utils.shared import SharedArray, SharedSpec, open_shared
from p2s_jax.utils.workers import worker_pool


class ImagePrompts(NamedTuple):
    """The prompts used for the P people of one image (original-image pixels)."""

    coords: np.ndarray  # (P, K, 2) float32
    labels: np.ndarray  # (P, K) int32, -1 padding
    has_prompt: np.ndarray  # (P,) bool


class ImageResult(NamedTuple):
    """One image's share of a run's output."""

    image_id: int
    results: list  # COCO segm results of its people with a prompt, in person order
    prompts: ImagePrompts
    num_people: int
    without_prompt: int
    first_person: int  # the item's first person in the photo (crops: one item per person)
    iou: list  # predicted IoU of each result
    object_score: list  # object score logit of each result

    def to_json(self) -> dict:
        """JSON-ready, as the processes of a run exchange it (`parallel.all_gather_json`)."""
        return {"image_id": self.image_id, "results": self.results,
                "coords": self.prompts.coords.tolist(), "labels": self.prompts.labels.tolist(),
                "has_prompt": self.prompts.has_prompt.tolist(), "num_people": self.num_people,
                "without_prompt": self.without_prompt, "first_person": self.first_person,
                "iou": self.iou, "object_score": self.object_score}


class Photo(NamedTuple):
    """What a worker needs of a run item (`plan.Item`) to read its photo and place its masks."""

    image_id: int
    path: str
    hw: tuple  # (H, W) of what is segmented: the photo, or its crop
    photo_hw: tuple | None  # (H, W) of the whole photo when `crop` is set
    crop: tuple | None  # (x0, y0, x1, y1) pixels of the photo, or None
    det_score: tuple  # (P,) the poses' instance scores
    first_person: int


def photo_of(item) -> Photo:
    """The `Photo` of a run item (`plan.Item`)."""
    return Photo(item.image_id, str(item.path), tuple(item.hw),
                 tuple(item.photo_hw) if item.photo_hw else None,
                 tuple(item.crop) if item.crop is not None else None,
                 tuple(np.asarray(item.poses.det_score, np.float64).tolist()), item.first_person)


def decode_photo(photo: Photo, out: np.ndarray) -> str | None:
    """Decodes `photo` onto `out` ((Hc, Wc, 3) uint8: the photo, or its crop, top-left, zeros
    elsewhere) -> None, or the reason it cannot be used (missing, unreadable, or of another size
    than its annotation; without the file name), `out` then all zeros."""
    try:
        image = load_image(photo.path)
    except ImageError as err:
        out[:] = 0
        return str(err).removeprefix(f"{photo.path}: ")
    expected = photo.photo_hw or photo.hw
    if image.shape[:2] != tuple(expected):
        out[:] = 0
        return (f"image is {image.shape[1]}x{image.shape[0]} (WxH) but the annotation file says "
                f"{expected[1]}x{expected[0]}")
    if photo.crop is not None:
        x0, y0, x1, y1 = photo.crop
        image = image[y0:y1, x0:x1]
    pad_to_canvas(image, out.shape[:2], out=out)
    return None


def decode_rows(photos: Sequence[Photo | None], ring: SharedSpec, slot: int, first_row: int
                ) -> list[str | None]:
    """A worker's task: `photos` onto rows first_row, first_row + 1, ... of step `slot` of the
    ring ((R, L, Hc, Wc, 3) uint8; a row without a photo is zeros) -> their reasons
    (`decode_photo`; None for a row without a photo)."""
    rows = open_shared(ring)[slot]
    reasons = []
    for row, photo in enumerate(photos, start=first_row):
        if photo is None:
            rows[row] = 0
            reasons.append(None)
        else:
            reasons.append(decode_photo(photo, rows[row]))
    return reasons


def result_scores(det_score: np.ndarray, iou: np.ndarray, kind: str) -> np.ndarray:
    """(P,), (P,) -> (P,) float64 COCO result scores (`EvalConfig.result_score`)."""
    det_score, iou = np.asarray(det_score, np.float64), np.asarray(iou, np.float64)
    if kind == "detection":
        return det_score
    if kind == "iou":
        return iou
    if kind == "constant":
        return np.ones_like(det_score)
    return det_score * iou


def encode_image(photo: Photo, packed: np.ndarray, iou: np.ndarray, object_score: np.ndarray,
                 prompts: ImagePrompts, result_score: str, category_id: int) -> ImageResult:
    """One image of a step: packed (P, Hc, Wc / 8) uint8 masks (bits packed along the width,
    `steps.decode_step`), iou and object scores (P,), prompts of its P slots -> its COCO
    results (the people with a prompt), masks cropped to the photo and pasted back into it when
    the item is a crop."""
    people = len(photo.det_score)
    height, width = photo.hw
    has_prompt = prompts.has_prompt[:people]
    labels = prompts.labels[:people]
    scores = result_scores(photo.det_score, iou[:people], result_score)
    kept = np.flatnonzero(has_prompt)
    masks = np.unpackbits(packed[kept, :height], axis=-1, count=width).view(bool)
    coords = prompts.coords[:people]
    if photo.crop is not None:  # paste back into the photo, prompts in photo pixels
        x0, y0, x1, y1 = photo.crop
        pasted = np.zeros((len(kept), *photo.photo_hw), bool)
        pasted[:, y0:y1, x0:x1] = masks
        masks = pasted
        coords = np.where(labels[:, :, None] >= 0, coords + np.float32([x0, y0]), coords)
    results = coco_lib.encode_results(photo.image_id, masks, scores[kept], category_id)
    return ImageResult(photo.image_id, results, ImagePrompts(coords, labels, has_prompt),
                       people, int(people - kept.size), photo.first_person,
                       iou[kept].tolist(), object_score[kept].tolist())


def encode_rows(photos: Sequence[Photo | None], masks: SharedSpec, first_row: int,
                iou: np.ndarray, object_score: np.ndarray, prompts: ImagePrompts,
                result_score: str, category_id: int) -> list[dict]:
    """A worker's task: the images of rows first_row, ... of a step (`encode_image`; masks the
    step's shared (L, P, Hc, Wc / 8) array, the others these rows') -> their JSON-ready
    `ImageResult`s, rows without a photo left out."""
    packed = open_shared(masks)
    return [encode_image(photo, packed[first_row + k], iou[k], object_score[k],
                         ImagePrompts(*(a[k] for a in prompts)), result_score,
                         category_id).to_json()
            for k, photo in enumerate(photos) if photo is not None]


def _chunks(count: int, parts: int) -> list[range]:
    """range(count) cut into at most `parts` contiguous, near-equal, non-empty ranges."""
    bounds = np.linspace(0, count, min(parts, count) + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class Decoding(NamedTuple):
    """A step's photos being decoded: its slot of the ring and the workers' tasks."""

    slot: int
    tasks: list  # futures of the reasons of a chunk of rows, in row order

    def result(self) -> tuple[int, list[str | None]]:
        """-> (slot, the reason of each row, None where the photo was decoded or absent)."""
        return self.slot, [reason for task in self.tasks for reason in task.result()]

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class HostWorkers:
    """The workers of one run and the shared arrays they work on (module docstring).

    Args:
      kind: "threads" or "processes".
      num_workers: how many.
      rows: L, the images of a step on this process.
      canvas: (Hc, Wc), the run's canvas.
      depth: steps decoded ahead of the one the run waits for (the ring holds depth + 2).
      mask_bytes: the largest step's packed masks (each buffer is made this large, so that
        every step reuses one).
      max_buffers: steps whose masks may wait for the workers (a further step waits for the
        oldest of them).
    """

    def __init__(self, kind: str, num_workers: int, rows: int, canvas: tuple[int, int],
                 depth: int, mask_bytes: int = 0, max_buffers: int = 4):
        self.executor = worker_pool(kind, num_workers, preload=[__name__])
        self.chunks = _chunks(rows, num_workers)
        self.ring = SharedArray((depth + 2, rows, *canvas, 3), np.uint8)
        # [shared buffer, the tasks encoding the step it holds], least recently filled first
        self._buffers: list[list] = []
        self.max_buffers, self.mask_bytes = max_buffers, mask_bytes
        self._started = 0

    def decode(self, photos: Sequence[Photo | None]) -> Decoding:
        """Starts decoding a step's photos (None: an empty row) into the next slot of the ring.
        Slots are taken in turn; a slot is reused depth + 2 steps later, so a step's photos
        may be used in place (put on the devices) until the step after next is started."""
        slot = self._started % self.ring.spec.shape[0]
        self._started += 1
        return Decoding(slot, [self.executor.submit(decode_rows, list(photos[c.start:c.stop]),
                                                    self.ring.spec, slot, c.start)
                               for c in self.chunks])

    def photos(self, slot: int) -> np.ndarray:
        """The decoded photos of ring slot `slot` ((L, Hc, Wc, 3) uint8, a view)."""
        return self.ring.array[slot]

    def masks(self, shape: tuple[int, ...]) -> tuple[np.ndarray, SharedSpec]:
        """A uint8 array of `shape` in shared memory for a step's packed masks, and its spec: a
        buffer whose images are all encoded (its pages already mapped), or a new one; with
        `max_buffers` steps waiting, it first waits for the oldest."""
        size = int(np.prod(shape))
        if len(self._buffers) >= self.max_buffers:
            concurrent.futures.wait(self._buffers[0][1])
        done = [entry for entry in self._buffers if all(task.done() for task in entry[1])]
        entry = next((e for e in done if e[0].spec.shape[0] >= size), None)
        if entry is None and done and len(self._buffers) >= self.max_buffers:
            self._buffers.remove(done[0])  # too small: replaced by a larger one
            done[0][0].close()
        if entry is None:
            entry = [SharedArray((max(size, self.mask_bytes),), np.uint8), []]
        else:
            self._buffers.remove(entry)
        entry[1] = []
        self._buffers.append(entry)
        buffer = entry[0]
        return (buffer.array[:size].reshape(shape),
                SharedSpec(buffer.spec.path, tuple(shape), np.dtype(np.uint8).str))

    def encode(self, photos: Sequence[Photo | None], masks: SharedSpec, iou: np.ndarray,
               object_score: np.ndarray, prompts: ImagePrompts, result_score: str,
               category_id: int) -> list[concurrent.futures.Future]:
        """Starts encoding a step's images (the rows of `masks`, the array `masks()` gave last;
        iou, object scores and prompts of every row) -> futures of the JSON-ready
        `ImageResult`s of a chunk of rows each, in row order."""
        tasks = [self.executor.submit(encode_rows, list(photos[c.start:c.stop]), masks, c.start,
                                      iou[c.start:c.stop], object_score[c.start:c.stop],
                                      ImagePrompts(*(a[c.start:c.stop] for a in prompts)),
                                      result_score, category_id)
                 for c in self.chunks if any(p is not None for p in photos[c.start:c.stop])]
        self._buffers[-1][1] = tasks
        return tasks

    def close(self, wait: bool = True) -> None:
        """Stops the workers (queued work cancelled) and removes the shared arrays."""
        self.executor.shutdown(wait=wait, cancel_futures=True)
        for buffer, _ in self._buffers:
            buffer.close()
        self._buffers = []
        self.ring.close()
