"""The picture on each card: the photo cropped around the person, the mask tinted, the skeleton
drawn and the prompt points marked (+ a ringed dot, - a red cross), made in worker processes.

In an error analysis the predicted mask is tinted and the ground-truth mask drawn as a green
outline. A crop is the box around the mask(s), the labelled keypoints inside the photo and the
prompt points, grown by `MARGIN` of its longer side on every side and made square where the photo
allows; it is scaled so that its longer side is `size` pixels, then drawn (lines stay sharp).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from p2s_jax.inference.overlay import draw_overlay
from p2s_jax.keypoints import labelled_points
from p2s_jax.review.cards import Card
from p2s_jax.utils.images import ImageError, load_image
from p2s_jax.utils.workers import worker_pool

MARGIN = 0.15
TRUTH_COLOUR = (60, 220, 60)
# Keypoints whose score is at least this are drawn as visible (v in {1, 2} always are).
VISIBLE = 0.5


def crop_path(folder: Path, index: int) -> Path:
    """Where the crop of the card at `index` (page order) lives: 1000 per subfolder."""
    return Path(folder) / "crops" / f"{index // 1000}" / f"{index}.jpg"


def _points(card: Card, num_keypoints: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keypoints (J, 2), their scores (J,), prompt (K, 3)) of a card, NaN where absent."""
    if card.keypoints:
        triplets = np.asarray(card.keypoints, np.float32).reshape(-1, 3)
        keypoints, _ = labelled_points(triplets)
        scores = np.where(triplets[:, 2] > 0, triplets[:, 2], 0).astype(np.float32)
    else:
        keypoints = np.full((num_keypoints, 2), np.nan, np.float32)
        scores = np.zeros(num_keypoints, np.float32)
    prompt = np.asarray(card.prompt or (), np.float32).reshape(-1, 3)
    return keypoints, scores, prompt


def crop_box(card: Card, masks: Sequence[np.ndarray], height: int, width: int,
             num_keypoints: int) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1) a card shows of its photo (module docstring)."""
    keypoints, _, prompt = _points(card, num_keypoints)
    points = [keypoints[np.isfinite(keypoints).all(1)], prompt[prompt[:, 2] >= 0, :2]]
    for mask in masks:
        ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        if len(xs):
            points.append(np.float32([[xs[0], ys[0]], [xs[-1] + 1, ys[-1] + 1]]))
    points = np.concatenate(points)
    points = points[(points >= 0).all(1) & (points[:, 0] <= width) & (points[:, 1] <= height)]
    if not len(points):
        return 0, 0, width, height
    low, high = points.min(0), points.max(0)
    side = max(float((high - low).max()) * (1 + 2 * MARGIN), 32.0)
    centre = (low + high) / 2
    x0, y0 = np.clip(centre - side / 2, 0, None)
    x1, y1 = min(width, x0 + side), min(height, y0 + side)
    x0, y0 = max(0.0, x1 - side), max(0.0, y1 - side)
    return int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_card(image: np.ndarray, card: Card, skeleton, num_keypoints: int,
              size: int) -> Image.Image:
    """The picture of one card: image (H, W, 3) uint8 the photo -> an RGB image whose longer
    side is `size` (module docstring)."""
    height, width = image.shape[:2]
    masks = [mask_utils.decode(r).astype(bool) for r in (card.mask, card.truth) if r]
    x0, y0, x1, y1 = crop_box(card, masks, height, width, num_keypoints)
    scale = size / max(x1 - x0, y1 - y0)
    out_hw = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
    photo = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize(out_hw, Image.BILINEAR))
    resized = [np.asarray(Image.fromarray(m[y0:y1, x0:x1]).resize(out_hw, Image.NEAREST))
               for m in masks]
    keypoints, scores, prompt = _points(card, num_keypoints)
    shift = np.float32([x0, y0])
    tinted = resized[:1] if card.mask else []
    picture = draw_overlay(photo, np.asarray(tinted, bool).reshape(-1, *photo.shape[:2]),
                           ((keypoints - shift) * scale)[None], scores[None],
                           ((prompt[:, :2] - shift) * scale)[None],
                           prompt[:, 2].astype(np.int32)[None], VISIBLE, skeleton)
    if card.truth:
        pixels = np.asarray(picture).copy()
        pixels[_outline(resized[-1])] = TRUTH_COLOUR
        picture = Image.fromarray(pixels)
    return picture


def _draw_image(path: str, cards: Sequence[tuple[int, Card]], skeleton, num_keypoints: int,
                size: int, folder: str) -> tuple[int, str | None]:
    """A worker's task: every card of one photo -> (crops written, None), or (0, the reason
    the photo could not be read)."""
    try:
        image = load_image(path)
    except ImageError as err:
        return 0, str(err)
    for index, card in cards:
        target = crop_path(Path(folder), index)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        draw_card(image, card, skeleton, num_keypoints, size).save(temporary, "JPEG",
                                                                   quality=85)
        os.replace(temporary, target)
    return len(cards), None


def write_crops(tasks: Iterable[tuple[str, list[tuple[int, Card]]]], skeleton,
                num_keypoints: int, size: int, folder: Path, workers: int, total: int,
                progress: bool = True) -> list[str]:
    """Draws the crops of `tasks` ((photo path, [(card index, card)]) per photo) into `folder`
    in `workers` processes (0: in this one) -> the photos that could not be read, with why."""
    unreadable = []
    with tqdm(total=total, desc="crops", unit="person", disable=not progress) as bar:
        if workers == 0:
            for path, cards in tasks:
                done, reason = _draw_image(path, cards, skeleton, num_keypoints, size,
                                           str(folder))
                bar.update(done or len(cards))
                unreadable += [reason] if reason else []
            return unreadable
        pool = worker_pool("processes", workers, preload=[__name__])
        try:
            futures = {pool.submit(_draw_image, path, cards, skeleton, num_keypoints, size,
                                   str(folder)): len(cards) for path, cards in tasks}
            for future in concurrent.futures.as_completed(futures):
                done, reason = future.result()
                bar.update(futures[future])
                unreadable += [reason] if reason else []
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return sorted(unreadable)
