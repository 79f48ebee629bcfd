"""`p2s review FILE --images DIR --out FOLDER`: the static review page.

The folder holds `index.html`, `review.js` and `review.css` (the package's own, no download at
view time), `data.js` (the cards, as one script: a page opened from `file://` may load scripts
but not `fetch` files) and `crops/` (one JPEG per card, `crops.crop_path`). It opens in any
current browser from `file://` or from `python -m http.server`. The page shows 48 cards at a
time and loads their pictures lazily, so 100k cards open as fast as a hundred.

The folder is built in `FOLDER.partial/` and renamed into place when whole; a run stopped
midway keeps the crops made so far there, and the same command started again makes only the
missing ones (`review.json` holds what they were made from; another file or crop size starts
the folder over).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from p2s_jax.review.cards import Review, read_review
from p2s_jax.review.crops import crop_path, write_crops
from p2s_jax.utils.errors import InputError, Interrupted, interrupt_signal
from p2s_jax.utils.files import (check_folder, read_json, replace_folder, write_atomic,
                                 write_json)
from p2s_jax.utils.text import plural

ASSETS = Path(__file__).with_name("assets")
PAGE_FILES = ("index.html", "review.js", "review.css")
LABELS = {"annotate": {"iou": "predicted IoU", "score": "object score"},
          "evaluate": {"iou": "IoU with ground truth", "score": "score"}}


def page_data(review: Review, crop_size: int) -> dict:
    """What `data.js` gives the page: the cards in columns (page order), the file names and
    statuses they index, and what the decisions file must name."""
    files = sorted(set(review.files.values()))
    file_index = {name: i for i, name in enumerate(files)}
    statuses = sorted(review.statuses())
    cards = review.cards
    return {"source": review.source.name, "fingerprint": review.fingerprint,
            "mode": review.mode, "schema": review.schema.name, "labels": LABELS[review.mode],
            "crop_size": crop_size, "statuses": statuses, "files": files,
            "left_out": review.left_out,
            "cards": {"id": [c.ann_id for c in cards], "image": [c.image_id for c in cards],
                      "file": [file_index[review.files[c.image_id]] for c in cards],
                      "status": [statuses.index(c.status) for c in cards],
                      "iou": [round(c.iou, 4) for c in cards],
                      "score": [None if c.score is None else round(c.score, 3) for c in cards]}}


def _made_from(review: Review, crop_size: int) -> dict:
    return {"source": str(review.source), "fingerprint": review.fingerprint,
            "mode": review.mode, "crop_size": crop_size,
            "cards": [c.ann_id for c in review.cards]}


def _staging(out: Path, made_from: dict) -> tuple[Path, str | None]:
    """The staging folder, and a note when an earlier one was started over."""
    staging = out.with_name(out.name + ".partial")
    record = staging / "review.json"
    if staging.exists():
        if record.is_file() and read_json(record, "review record") == made_from:
            return staging, f"resuming the crops in {staging}"
        shutil.rmtree(staging)
        note = f"{staging} was made from another file or settings: started over"
    else:
        note = None
    staging.mkdir(parents=True)
    write_json(record, made_from)
    return staging, note


def write_page(review: Review, images_dir, out, *, crop_size: int = 256, workers: int = 2,
               progress: bool = True) -> list[str]:
    """Writes the review folder `out` (module docstring) -> the lines to print."""
    out = Path(out)
    staging, note = _staging(out, _made_from(review, crop_size))
    tasks: dict = {}
    for index, card in enumerate(review.cards):
        if not crop_path(staging, index).is_file():
            photo = str(Path(images_dir) / review.files[card.image_id])
            tasks.setdefault(photo, []).append((index, card))
    start = time.perf_counter()
    todo = sum(len(cards) for cards in tasks.values())
    try:
        unreadable = write_crops(sorted(tasks.items()), review.schema.skeleton,
                                 review.schema.num_keypoints, crop_size, staging, workers, todo,
                                 progress)
    except BaseException as err:
        number = interrupt_signal(err)
        if number is None:
            raise
        raise Interrupted(f"interrupted: the crops made so far are kept in {staging}; run the "
                          "same command again to go on", number) from None
    seconds = time.perf_counter() - start
    write_atomic(staging / "data.js", "window.P2S_REVIEW = "
                 + json.dumps(page_data(review, crop_size)) + ";\n")
    for name in PAGE_FILES:
        shutil.copyfile(ASSETS / name, staging / name)
    replace_folder(staging, out)
    left = ", ".join(f"{reason} {count}" for reason, count in sorted(review.left_out.items()))
    order = "IoU with the ground truth" if review.mode == "evaluate" else "predicted IoU"
    lines = ([note] if note else []) + [
        f"{plural(len(review.cards), 'card')} of {review.source.name}, worst {order} first"
        + (f" (without a card: {left})" if left else ""),
        f"crops: {todo} made in {seconds:.1f} s"
        + (f" by {plural(workers, 'worker process', 'worker processes')}" if workers else "")
        + (f" ({todo / seconds:.0f}/s)" if todo and seconds > 0 else "")]
    lines += [f"unreadable photo (its cards show no picture): {reason}" for reason in unreadable]
    return lines + [f"review page: {out / 'index.html'} (open it in a browser)"]


def default_workers() -> int:
    """Worker processes for the crops: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def review_page(reviewed, images_dir, out, annotations=None, schema=None, *, worst: int = 0,
                statuses: tuple = (), crop_size: int = 256, workers: int | None = None,
                progress: bool = True) -> list[str]:
    """`p2s review`: the cards of `reviewed` (`cards.read_review`: an annotate output, or
    evaluate results with their ground truth `annotations`), `Review.select`ed, as the page
    `out` (`write_page`; `workers` None: `default_workers`) -> the lines to print."""
    if images_dir is None:
        raise InputError("--images: the page needs the photos' folder")
    check_folder(images_dir, "--images")
    review = read_review(reviewed, annotations, schema).select(worst, statuses)
    return write_page(review, images_dir, out, crop_size=crop_size, progress=progress,
                      workers=default_workers() if workers is None else workers)
