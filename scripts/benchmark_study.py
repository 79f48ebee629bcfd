"""What a sampler study of S samplers costs against S separate runs (`p2s curve`, one sampler
each): both measured side by side in one process, after a warm-up run that compiles every
program, on generated persons.

    python scripts/benchmark_study.py                         # t at 512, 3 samplers, 8 images
    python scripts/benchmark_study.py --model b+ --image-size 1024 --images 32   # on a GPU

Prints one line per configuration and, with --json FILE, writes them as rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from support.shared import coco_dataset  # noqa: E402

from p2s_jax.data.coco import load_coco  # noqa: E402
from p2s_jax.model.configs import get_config  # noqa: E402
from p2s_jax.model.sam2 import build_model  # noqa: E402
from p2s_jax.train import study  # noqa: E402


def _run(model, coco, annotations, images, samplers, points, root) -> float:
    config = study.StudyConfig(tuple(samplers), num_points=points, seeds=1, max_people=4)
    start = time.perf_counter()
    study.study([study.Checkpoint("m", "m", lambda: model)], coco, annotations, images,
                Path(root), config, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="t")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--samplers", nargs="+",
                        default=["center", "pose_mask_refine", "mask_refine"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        annotations, images, _ = coco_dataset(root / "data", args.images, seed=3)
        coco = load_coco(annotations)
        model = build_model(get_config(args.model, args.image_size), seed=0)
        _run(model, coco, annotations, images, args.samplers, args.points, root / "warm")
        together = _run(model, coco, annotations, images, args.samplers, args.points,
                        root / "together")
        apart = sum(_run(model, coco, annotations, images, [s], args.points, root / s)
                    for s in args.samplers)
    row = {"model": args.model, "image_size": args.image_size, "images": args.images,
           "points": args.points, "samplers": len(args.samplers), "study_s": round(together, 2),
           "separate_runs_s": round(apart, 2), "ratio": round(together / apart, 3)}
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": [row]}, indent=2))


if __name__ == "__main__":
    main()
