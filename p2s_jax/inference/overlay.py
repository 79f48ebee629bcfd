"""Pictures of results for a person to look at: masks, skeletons and prompt points on the photo."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from p2s_jax.keypoints import COCO17

# One colour per person (RGB), cycled.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def draw_overlay(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray,
                 scores: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                 threshold: float, skeleton=COCO17.skeleton):
    """The photo with every person's mask, skeleton and prompt points (a PIL RGB image).

    image (H, W, 3) uint8; masks (P, H, W) bool; keypoints (P, J, 2) (NaN = absent);
    scores (P, J); coords (P, K, 2) and labels (P, K) the prompts (1 positive: white-ringed
    dot, 0 negative: red cross, 2 / 3 box corners: rectangle, -1 unused); skeleton: 0-based
    limb pairs of the pose's schema.
    """
    height, width = image.shape[:2]
    canvas = image.astype(np.float32)
    for i, mask in enumerate(masks):
        colour = np.asarray(PALETTE[i % len(PALETTE)], np.float32)
        canvas[mask] = 0.5 * canvas[mask] + 0.5 * colour
    overlay = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    unit = max(2, round(min(height, width) / 150))
    for i in range(len(keypoints)):
        colour = PALETTE[i % len(PALETTE)]
        inside = _inside(keypoints[i], height, width)
        visible = inside & (scores[i] >= threshold)
        for a, b in skeleton:
            if visible[a] and visible[b]:
                draw.line([tuple(keypoints[i, a]), tuple(keypoints[i, b])], fill=colour,
                          width=unit)
        for j in np.flatnonzero(inside):
            x, y = keypoints[i, j]
            r = unit
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour if visible[j] else None,
                         outline=colour)
        _draw_prompt(draw, coords[i], labels[i], colour, unit)
    return overlay


def _inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    x, y = points[:, 0], points[:, 1]
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x < width) & (y < height)


def _draw_prompt(draw, coords: np.ndarray, labels: np.ndarray, colour, unit: int) -> None:
    corners = coords[(labels == 2) | (labels == 3)]
    if len(corners) == 2:
        draw.rectangle([tuple(corners.min(0)), tuple(corners.max(0))], outline=colour,
                       width=max(1, unit // 2))
    for (x, y), label in zip(coords, labels):
        r = 2.5 * unit
        if label == 1:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=(255, 255, 255),
                         width=max(1, unit // 2 + 1))
        elif label == 0:
            draw.line([x - r, y - r, x + r, y + r], fill=(255, 0, 0), width=unit)
            draw.line([x - r, y + r, x + r, y - r], fill=(255, 0, 0), width=unit)
