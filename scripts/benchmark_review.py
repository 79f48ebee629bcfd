"""The review page at scale: a generated annotate output of 100k persons on the real COCO photos.

The file: `--persons` persons on `--persons / 3` image entries that cycle through the four real
photos of `shared/data/real/coco`, each person carrying the published mask of a person of its
photo, its keypoints, a 3-point prompt and a seeded random predicted IoU (a generated file, for
speed only). Measured, on this machine, in one run:

- reading and ranking it (`cards.read_review`);
- the crops of the `--crops` worst cards at 1 and 2 worker processes (crops/s; the 100k crops of
  a whole page take persons / rate);
- the page of all persons in headless Chromium (the system's `chromium`, driven by Selenium):
  the time until the first cards are shown (`P2S_READY_MS`, from navigation start: reading
  `data.js`, ranking, the first 48 cards), a page turn with its 48 crops decoded, a jump to the
  last page, a status filter over every card, and `data.js`'s size.

    python scripts/benchmark_review.py                  # 100k persons, 2000 crops
    python scripts/benchmark_review.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support.browser import chromium, wait_for  # noqa: E402
from support.shared import REAL_COCO  # noqa: E402

from p2s_jax.data.coco import load_coco  # noqa: E402
from p2s_jax.review import cards as cards_lib  # noqa: E402
from p2s_jax.review.page import ASSETS, PAGE_FILES, page_data, write_page  # noqa: E402


def make_file(root: Path, persons: int, seed: int = 0) -> Path:
    """The generated annotate output (module docstring)."""
    coco = load_coco(REAL_COCO / "test_coco.json")
    rng = np.random.default_rng(seed)
    photos = []
    for image_id in sorted(coco.imgs):
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
                if a.get("num_keypoints", 0) > 0]
        rles = [coco.annToRLE(a) for a in anns]
        photos.append((coco.imgs[image_id], anns, [{"size": r["size"], "counts":
                                                     r["counts"].decode()} for r in rles]))
    images, annotations = [], []
    for index in range(persons):
        image_index = index // 3
        info, anns, rles = photos[image_index % len(photos)]
        if index % 3 == 0:
            images.append({**info, "id": image_index + 1})
        ann = anns[index % len(anns)]
        points = np.asarray(ann["keypoints"], np.float32).reshape(-1, 3)
        prompt = [[float(x), float(y), 1] for x, y, v in points[points[:, 2] > 0][:3]]
        iou = float(rng.random())
        annotations.append({"id": index + 1, "image_id": image_index + 1, "category_id": 1,
                            "iscrowd": 0, "keypoints": ann["keypoints"],
                            "num_keypoints": ann["num_keypoints"],
                            "segmentation": rles[index % len(rles)], "area": ann["area"],
                            "bbox": ann["bbox"],
                            "p2s": {"status": "ok" if iou >= 0.3 else "low_iou",
                                    "predicted_iou": round(iou, 5),
                                    "object_score": round(float(rng.normal(2, 1)), 3),
                                    "prompt": prompt}})
    path = root / "generated_annotated.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": coco.dataset["categories"]}))
    return path


def crop_rates(review, root: Path, count: int) -> tuple[dict, Path]:
    """crops/s of the `count` worst cards at 1 and 2 worker processes -> (rates, a folder)."""
    worst = review.select(worst=count)
    rates = {}
    for workers in (1, 2):
        out = root / f"crops_{workers}"
        start = time.perf_counter()
        write_page(worst, REAL_COCO, out, workers=workers, progress=False)
        rates[workers] = count / (time.perf_counter() - start)
    return rates, out


def browser_times(review, crops_from: Path, root: Path) -> dict:
    """The page of every card in headless Chromium (module docstring) -> times in ms."""
    page = root / "page"
    page.mkdir()
    (page / "data.js").write_text("window.P2S_REVIEW = " + json.dumps(page_data(review, 256))
                                  + ";\n")
    for name in PAGE_FILES:
        shutil.copyfile(ASSETS / name, page / name)
    shutil.copytree(crops_from / "crops", page / "crops")
    # every crop in the window decoded (the others load lazily when scrolled to)
    loaded = ("return [...document.images].filter(i => i.getBoundingClientRect().top < "
              "innerHeight).every(i => i.complete && i.naturalWidth) ? performance.now() : null")
    with chromium(root) as driver:
        driver.get(page.joinpath("index.html").as_uri())
        ready = wait_for(driver, "return window.P2S_READY_MS")
        shown = wait_for(driver, loaded)
        body = driver.find_element("tag name", "body")
        start = driver.execute_script("return performance.now()")
        body.send_keys("n")
        turned = wait_for(driver, loaded) - start
        start = driver.execute_script("return performance.now()")
        for _ in range(3):
            body.send_keys("p")
        back = wait_for(driver, loaded) - start
        start = driver.execute_script("return performance.now()")
        select = driver.find_element("id", "status")
        select.send_keys("low_iou")
        filtered = driver.execute_script("return performance.now()") - start
        count = len(driver.find_elements("css selector", ".card"))
    return {"first_cards_ms": ready, "first_crops_ms": shown, "page_turn_ms": turned,
            "page_back_ms": back, "status_filter_ms": filtered, "cards_in_dom": count,
            "data_js_mb": (page / "data.js").stat().st_size / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--crops", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = make_file(root, args.persons)
        start = time.perf_counter()
        review = cards_lib.read_review(path)
        read_s = time.perf_counter() - start
        rates, crops = crop_rates(review, root, args.crops)
        browser = browser_times(review, crops, root)
    row = {"persons": args.persons, "read_s": read_s,
           "crops_per_s_1_worker": rates[1], "crops_per_s_2_workers": rates[2],
           "crops_2_workers_over_1": rates[2] / rates[1],
           "crops_all_2_workers_min": args.persons / rates[2] / 60, **browser,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    for key, value in row.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
