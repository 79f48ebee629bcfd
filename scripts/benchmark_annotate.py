"""Annotation speed: `p2s annotate` (data-parallel, batched) against the official per-person
loop on the same prompts, same random weights, same machine, one run each.

The dataset is generated (`p2s_jax.data.synthetic`: real scikit-image photos at 480 x 640 with
about 8 drawn persons each) with its masks removed: a keypoint-only COCO file, the input
`p2s annotate` is for. Both sides do the whole job per image: read the file, preprocess,
encode, decode every person and RLE-encode the masks.

- ours: `p2s_jax.evaluation.annotate.annotate` (shards, statuses, the merged output file),
  after a warm-up run on the first images (printed separately);
- official: `SAM2ImagePredictor.set_image` once per image, then `predict` once per person with
  the prompts our run chose (`benchmark_eval.run_official`).

    python scripts/benchmark_annotate.py                       # 32 images, t at 1024
    python scripts/benchmark_annotate.py --model b+ --num-images 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(__file__))
from benchmark_eval import make_dataset, run_official  # noqa: E402


def keypoint_only(coco, root: Path) -> Path:
    """The generated ground truth without masks: what a pose dataset provides."""
    data = json.loads(json.dumps(coco.dataset))
    for ann in data["annotations"]:
        for key in ("segmentation", "area", "bbox"):
            ann.pop(key, None)
    path = root / "keypoints_only.json"
    path.write_text(json.dumps(data))
    return path


def prompts_of(annotated: dict):
    """image_id -> ImagePrompts of the annotated persons (for the official loop)."""
    from p2s_jax.evaluation.annotate import prompt_arrays
    from p2s_jax.evaluation.host import ImagePrompts

    people = {}
    for ann in annotated["annotations"]:
        people.setdefault(ann["image_id"], []).append(ann)
    prompts = {}
    for image_id, anns in people.items():
        coords, labels = prompt_arrays(anns)
        prompts[image_id] = ImagePrompts(coords, labels, (labels == 1).any(axis=1))
    return prompts


def run(model_name: str, image_size: int, num_images: int, people: int, batch_size: int,
        with_official: bool = True, dtype: str = "float32") -> dict:
    import jax

    from support import reference
    from p2s_jax.evaluation.annotate import AnnotateConfig, AnnotationInput, annotate
    from p2s_jax.evaluation.config import EvalConfig
    from p2s_jax.model.configs import compute_dtype, get_config
    from weights_conversion.convert import from_state_dict
    from p2s_jax.model.sam2 import abstract_model

    name = get_config(model_name).name
    official = reference.official_model(name, image_size)
    model = abstract_model(get_config(name, image_size), compute_dtype(dtype))
    from_state_dict(model, reference.official_state_dict(official))
    config = AnnotateConfig(EvalConfig(images_per_device=batch_size), shard_images=10**6)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        coco, images, _ = make_dataset(root, num_images, people, 480, 640)
        source = AnnotationInput(keypoint_only(coco, root), config=config)
        start = time.perf_counter()
        annotate(model, source, images, root / "warm" / "out.json", config, progress=False)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        summary = annotate(model, source, images, root / "timed" / "out.json", config,
                           progress=False)
        ours = time.perf_counter() - start
        annotated = json.loads((root / "timed" / "out.json").read_text())
        result = {"model": name, "image_size": image_size, "dtype": dtype, "images": num_images,
                  "persons": summary["persons"], "status": summary["status"],
                  "ours_s": ours, "ours_images_per_s": num_images / ours, "warmup_s": warmup,
                  "devices": jax.device_count(), "backend": jax.default_backend()}
        if with_official:
            device = "cuda" if jax.default_backend() == "gpu" else "cpu"
            seconds, masks = run_official(official.to(device), coco, images,
                                          prompts_of(annotated), device)
            result.update(official_s=seconds, official_images_per_s=num_images / seconds,
                          official_masks=masks, ratio_official_over_ours=seconds / ours)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="t")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--num-images", type=int, default=32)
    parser.add_argument("--people", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-official", action="store_true")
    args = parser.parse_args()
    result = run(args.model, args.image_size, args.num_images, args.people, args.batch_size,
                 not args.no_official, args.dtype)
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
