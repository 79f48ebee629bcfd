"""Line charts of values in [0, 1] (IoU, AP) as PNG files, drawn with PIL: the sampler study's
curves and `p2s compare`'s held-out AP against step."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from p2s_jax.utils.images import save_image

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


class Series(NamedTuple):
    """One line: its label, its points (x, y), and optionally a band (x, low, high) around it."""

    label: str
    points: list
    band: list | None = None


def line_chart(path: str | os.PathLike, series: list[Series], x_ticks: list[float], *,
               title: str, x_label: str, y_label: str, y_scale: float = 1.0) -> Path:
    """`series` on axes from min(x_ticks) to max(x_ticks) and from 0 to 1 (tick labels times
    `y_scale`), a legend on the right; written atomically (`images.save_image`)."""
    width, height = 760, 480
    left, top, right, bottom = 70, 50, width - 230, height - 60
    low, high = min(x_ticks), max(x_ticks)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas, "RGBA")

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (right - left) * (x - low) / max(high - low, 1e-9),
                bottom - (bottom - top) * min(max(y, 0.0), 1.0))

    for tick in np.linspace(0.0, 1.0, 6):
        _, y = xy(low, tick)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        draw.text((left - 40, y - 6), f"{y_scale * tick:g}", fill="black")
    for tick in x_ticks:
        x, _ = xy(tick, 0.0)
        draw.text((x - 6, bottom + 8), f"{tick:g}", fill="black")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        if line.band:
            draw.polygon([xy(x, up) for x, _, up in line.band]
                         + [xy(x, down) for x, down, _ in reversed(line.band)],
                         fill=(*colour, 60))
        points = [xy(x, y) for x, y in line.points]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        y = top + 18 * index
        draw.line([(right + 15, y + 6), (right + 35, y + 6)], fill=colour, width=3)
        draw.text((right + 40, y), line.label[:36], fill="black")
    draw.text((left, 15), title, fill="black")
    draw.text(((left + right) // 2 - 10, height - 30), x_label, fill="black")
    draw.text((8, top - 25), y_label, fill="black")
    return save_image(path, canvas)
