"""End-to-end evaluation speed: p2s_jax's batched, data-parallel evaluator vs the official
per-person loop, same random weights, same prompts, same machine, one run each.

The dataset is generated (`p2s_jax.data.synthetic`: real scikit-image photos at 480 x 640, about
8 drawn persons each, ProbPose-like detections). Both sides do the whole job per image: read
the file, preprocess, encode, decode every person, and encode the masks as COCO RLE.

- ours: `p2s_jax.evaluation.runner.run_dataset` on all devices, compiled beforehand on a one-step
  warm-up (printed separately; the small prompt / mask-merging steps of other people counts
  still compile during the timed run, a second or two each on a CPU);
- official: `SAM2ImagePredictor.set_image` once per image, then `predict` once per person with
  the prompts our run chose (BBox-Mask-Pose's loop), `multimask_output=False`.

Prints images/s of both and the ratio (official time / ours); with a GPU also the projected
time for the 2693 person images of COCO val2017. Then the host's share, measured alone in
milliseconds per image: decoding the photo, RLE-encoding its masks, writing the results JSON and
COCOeval; their sum bounds the images/s one host thread can feed, whatever the device.

    python scripts/benchmark_eval.py                      # 64 images, t at 1024
    python scripts/benchmark_eval.py --num-images 8 --batch-size 1
    python scripts/benchmark_eval.py --model b+ --batch-size 8   # on a GPU

`--host-only` measures the host's path alone: the same `run_dataset` (photos decoded onto the
canvas, batches put on the devices, masks read back and RLE-encoded, results built), with the
device programs replaced by precomputed outputs of the right shapes (person-shaped ellipses as
masks, packed as the decoder packs them), at 1 and 2 host workers, threads and processes. Each row: images/s and the main
process's own CPU milliseconds per image (`time.process_time`: every thread of this process,
none of the worker processes); a warm-up run first starts everything. The outputs of every row
are checked equal.

    python scripts/benchmark_eval.py --host-only --num-images 96 --json host.json
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

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from support import reference  # noqa: E402  (official model builder, torchvision stubs)
from p2s_jax.utils import allocator  # noqa: E402

COCO_VAL_PERSON_IMAGES = 2693


def make_dataset(root: Path, num_images: int, people: int, height: int, width: int):
    from p2s_jax.data.coco import load_coco, load_keypoint_detections
    from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

    spread = max(1, people // 4)
    annotations, images = make_coco_dataset(root, num_images, (people - spread, people + spread),
                                            seed=0, image_size=(height, width))
    detections = make_keypoint_detections(annotations, seed=1, noise_px=3.0,
                                          out_path=root / "detections.json")
    coco = load_coco(annotations)
    return coco, images, load_keypoint_detections(detections, coco)


def run_ours(model, coco, images, poses, config):
    """-> (EvalOutput of the timed run, warm-up seconds)."""
    import jax

    from p2s_jax.evaluation import runner as evaluation
    first = sorted(poses, key=lambda i: (-len(poses[i]), i))
    warm = set(first[:config.for_backend().images_per_device * jax.device_count()])
    start = time.perf_counter()
    evaluation.run_dataset(model, coco, images, {i: p for i, p in poses.items() if i in warm},
                         config, progress=False)
    warmup = time.perf_counter() - start
    return evaluation.run_dataset(model, coco, images, poses, config, progress=True), warmup


def run_official(official, coco, images, prompts, device: str) -> tuple[float, int]:
    """The BBox-Mask-Pose loop on the same prompts; -> (seconds, masks)."""
    torch = reference.import_torch()
    from p2s_jax.data.coco import encode_results
    from p2s_jax.utils.images import load_image

    predictor = reference.official_predictor(official)
    count = 0
    start = time.perf_counter()
    for image_id, prompt in sorted(prompts.items()):
        image = load_image(Path(images) / coco.imgs[image_id]["file_name"])
        predictor.set_image(image)
        masks, scores = [], []
        for coords, labels in zip(prompt.coords[prompt.has_prompt],
                                  prompt.labels[prompt.has_prompt]):
            used = labels != -1
            mask, iou, _ = predictor.predict(point_coords=coords[used], point_labels=labels[used],
                                             multimask_output=False)
            masks.append(mask[0] > 0)
            scores.append(float(iou[0]))
        if device == "cuda":
            torch.cuda.synchronize()
        if masks:
            count += len(encode_results(image_id, np.stack(masks), np.asarray(scores)))
    return time.perf_counter() - start, count


def host_costs(coco, images, results) -> dict:
    """Milliseconds per image of each host step of an evaluation, measured one after another."""
    import json

    from pycocotools import mask as mask_utils

    from p2s_jax.data.coco import encode_results
    from p2s_jax.evaluation.metrics import evaluate_segm
    from p2s_jax.utils.images import load_image

    image_ids = sorted({r["image_id"] for r in results})
    by_image = {i: [r for r in results if r["image_id"] == i] for i in image_ids}
    masks = {i: mask_utils.decode([r["segmentation"] for r in rs]).transpose(2, 0, 1).astype(bool)
             for i, rs in by_image.items()}
    timings = {}
    start = time.perf_counter()
    for i in image_ids:
        load_image(Path(images) / coco.imgs[i]["file_name"])
    timings["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in image_ids:
        encode_results(i, masks[i], np.ones(len(masks[i])))
    timings["RLE"] = time.perf_counter() - start
    start = time.perf_counter()
    json.dumps(results)
    timings["JSON"] = time.perf_counter() - start
    start = time.perf_counter()
    evaluate_segm(coco, results)
    timings["COCOeval"] = time.perf_counter() - start
    return {k: 1000 * v / len(image_ids) for k, v in timings.items()}


class PrecomputedSteps:
    """A `run_dataset` device step that returns fixed outputs of the batch's shapes: masks with
    one ellipse per person, made once per shape and kept on the devices."""

    def __init__(self, mesh, seed: int = 0):
        self.mesh, self.rng, self.cache = mesh, np.random.default_rng(seed), {}

    def _outputs(self, rows: int, people: int, canvas: tuple[int, int]):
        from p2s_jax.parallel import host_to_global

        height, width = canvas
        ys, xs = np.mgrid[:height, :width]
        masks = np.zeros((rows, people, height, width), bool)
        for r in range(rows):
            for p in range(people):
                cy, cx = self.rng.uniform(0.2, 0.8) * height, self.rng.uniform(0.1, 0.9) * width
                ry, rx = self.rng.uniform(0.15, 0.35) * height, self.rng.uniform(0.04, 0.1) * width
                masks[r, p] = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        small = (self.rng.uniform(0.5, 1, (rows, people)).astype(np.float32),
                 self.rng.normal(2, 1, (rows, people)).astype(np.float32),
                 self.rng.uniform(0, 200, (rows, people, 3, 2)).astype(np.float32),
                 np.ones((rows, people, 3), np.int32))
        return [host_to_global(self.mesh, a) for a in (np.packbits(masks, axis=-1), *small)]

    def __call__(self, batch):
        from p2s_jax.parallel import host_to_global

        for array in (batch.images, batch.keypoints, batch.scores, batch.image_hw):
            host_to_global(self.mesh, array)  # what feeding the devices costs the host
        rows, people = batch.keypoints.shape[:2]
        key = (rows, people, batch.images.shape[1:3])
        if key not in self.cache:
            self.cache[key] = self._outputs(rows, people, batch.images.shape[1:3])
        masks, iou, score, coords, labels = self.cache[key]
        has_prompt = host_to_global(self.mesh, np.arange(people)[None, :] < batch.num_people[:, None])
        return masks, iou, score, coords, labels, has_prompt


def replicated_dataset(root: Path, photos: int, copies: int, people: int, height: int,
                       width: int):
    """`make_dataset` of `photos` generated photos, each listed `copies` times under new image
    ids (the same file, its persons and poses again): a long run without drawing every photo."""
    import json

    from p2s_jax.data.coco import load_coco, load_keypoint_detections

    make_dataset(root, photos, people, height, width)
    data = json.loads((root / "annotations.json").read_text())
    detections = json.loads((root / "detections.json").read_text())
    step = max(i["id"] for i in data["images"]) + 1
    first = max(a["id"] for a in data["annotations"]) + 1
    images, annotations, poses = [], [], []
    for copy in range(copies):
        images += [{**i, "id": i["id"] + copy * step} for i in data["images"]]
        annotations += [{**a, "id": a["id"] + copy * first, "image_id": a["image_id"] + copy * step}
                        for a in data["annotations"]]
        poses += [{**d, "image_id": d["image_id"] + copy * step} for d in detections]
    (root / "replicated.json").write_text(json.dumps({**data, "images": images,
                                                      "annotations": annotations}))
    (root / "replicated_detections.json").write_text(json.dumps(poses))
    coco = load_coco(root / "replicated.json")
    return coco, root / "images", load_keypoint_detections(root / "replicated_detections.json",
                                                          coco)


def host_only(args) -> list[dict]:
    """The rows of `--host-only` (module docstring)."""
    import types

    import jax

    from p2s_jax.evaluation.config import EvalConfig
    from p2s_jax.evaluation.runner import run_dataset
    from p2s_jax.model.configs import get_config
    from p2s_jax.parallel import make_mesh

    height, width = (int(v) for v in args.photo_size.lower().split("x"))
    model = types.SimpleNamespace(config=get_config(args.model, args.image_size))
    mesh = make_mesh()
    steps = PrecomputedSteps(mesh)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as root:
        coco, images, poses = replicated_dataset(Path(root), args.num_images, args.copies,
                                                 args.people, height, width)
        for kind in ("threads", "processes"):
            for workers in (1, 2):
                config = EvalConfig(images_per_device=args.batch_size, num_workers=workers,
                                    host_workers=kind)
                run = lambda: run_dataset(model, coco, images, poses, config, mesh=mesh,  # noqa
                                          progress=False, run_step=steps)
                run()  # warm-up: every shape's outputs made, the workers' code loaded
                wall, cpu = time.perf_counter(), time.process_time()
                output = run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if first is None:
                    first = output.results
                assert output.results == first, f"{kind} x {workers}: other results"
                count = output.report.num_images
                rows.append({"host_workers": kind, "workers": workers, "images": count,
                             "images_per_step": args.batch_size * jax.device_count(),
                             "images_per_s": count / wall,
                             "main_process_cpu_ms_per_image": 1000 * cpu / count})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--people", type=int, default=8, help="about this many per image")
    parser.add_argument("--model", default="t", help="t, s, b+ or l (random official weights)")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--photo-size", default="480x640", help="HxW of the generated photos")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="images per device per step (0: the backend's default)")
    parser.add_argument("--people-chunk", type=int, default=0,
                        help="people decoded together (0: the backend's default)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="our compute dtype (the official side: bf16 autocast on a GPU)")
    parser.add_argument("--attention", default="auto",
                        help="our attention implementation (SAM2Config.attention)")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--malloc", default="kept", choices=allocator.MODES,
                        help="glibc malloc of both sides (p2s_jax.utils.allocator; `p2s` uses kept)")
    parser.add_argument("--host-only", action="store_true",
                        help="the host's path alone, device outputs precomputed (see above)")
    parser.add_argument("--json", default=None, help="with --host-only: write the rows here")
    parser.add_argument("--copies", type=int, default=16,
                        help="with --host-only: each generated photo listed this many times "
                             "(a long run from --num-images photos; default 16)")
    parser.add_argument("--host-devices", type=int, default=8,
                        help="with --host-only: CPU devices standing in for a host's chips, "
                             "each given --batch-size images a step (default 8, as a v5e-8 or "
                             "8 x H100 host; --batch-size 0 is then 8, the accelerators' default)")
    args = parser.parse_args()
    allocator.set_mode(args.malloc)
    if args.host_only:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                                   f"_device_count={args.host_devices}")
        args.batch_size = args.batch_size or 8
        rows = host_only(args)
        print("| host workers | workers | images/s | main process CPU ms / image |")
        print("| --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['host_workers']} | {row['workers']} | {row['images_per_s']:.1f} | "
                  f"{row['main_process_cpu_ms_per_image']:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                           f"cores", "photo_size": args.photo_size, "people": args.people,
                "rows": rows}, indent=2))
        return

    torch = reference.import_torch()
    import jax

    from p2s_jax.evaluation.config import EvalConfig
    from p2s_jax.model.configs import compute_dtype, get_config
    from p2s_jax.model.sam2 import abstract_model
    from weights_conversion.convert import from_state_dict

    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    name = get_config(args.model).name
    height, width = (int(v) for v in args.photo_size.lower().split("x"))
    print(f"# host {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax "
          f"{jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; torch "
          f"{torch.__version__} on {device}; {name} at {args.image_size}; {args.num_images} "
          f"images of {height}x{width}, about {args.people} people each")

    official = reference.official_model(name, args.image_size).to(device)
    model = abstract_model(get_config(name, args.image_size, args.attention),
                           compute_dtype(args.dtype))
    from_state_dict(model, reference.official_state_dict(official))
    config = EvalConfig(images_per_device=args.batch_size, people_per_chunk=args.people_chunk)
    with tempfile.TemporaryDirectory() as root:
        coco, images, poses = make_dataset(Path(root), args.num_images, args.people, height,
                                           width)
        output, warmup = run_ours(model, coco, images, poses, config)
        report = output.report
        ours_rate = report.images_per_second
        print(f"ours:     {report.num_images} images, {report.num_results} masks in "
              f"{report.seconds:.1f} s = {ours_rate:.2f} images/s ({args.dtype}; warm-up incl. "
              f"compilation {warmup:.1f} s)")
        if on_gpu:
            print(f"          projected COCO val2017 ({COCO_VAL_PERSON_IMAGES} person images): "
                  f"{COCO_VAL_PERSON_IMAGES / ours_rate:.0f} s")
        costs = host_costs(coco, images, output.results)
        print("host ms per image: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items())
              + f"; one host thread feeds at most {1000 / sum(costs.values()):.0f} images/s")
        if args.skip_official:
            return
        seconds, masks = run_official(official, coco, images, output.prompts, device)
        official_rate = report.num_images / seconds
        print(f"official: {report.num_images} images, {masks} masks in {seconds:.1f} s = "
              f"{official_rate:.2f} images/s (set_image + predict per person)")
        print(f"ratio (official time / ours): {ours_rate / official_rate:.2f}x")


if __name__ == "__main__":
    main()
