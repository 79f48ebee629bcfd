"""`p2s`: convert checkpoints, evaluate on COCO-format datasets, segment the people of a photo.

    p2s convert CKPT.pt OUT_DIR [--model NAME] [--image-size N]
    p2s evaluate --annotations GT.json --images DIR (--keypoints DETS.json | --gt-keypoints)
                 --checkpoint CKPT [--model NAME] [--selection maxvis] [--num-points 3]
                 [--score-type visibility] [--negatives ...] [--box ...] [--coco-star]
                 [--exclusive] [--result-score product] [--batch-size N] --out results.json
    p2s segment --image IMG --keypoints KPTS.json [--checkpoint CKPT] --out overlay.png
                [--masks-out masks.json] [--selection ...] [--num-points ...]

Without `--checkpoint`, `p2s segment` uses the SAM-pose2seg release: downloaded once into the
cache folder (`P2S_CACHE`, else the platform's cache dir; see `p2s_jax.download`), converted once
next to it and reused. `P2S_WEIGHTS_URL` overrides the download address (tests point it at a
local server; a mirror works too).

On Linux, `p2s` first sets glibc malloc to keep and reuse freed memory
(`p2s_jax.allocator`: XLA's large per-call buffers are then not page-faulted in anew on every
call); `P2S_MALLOC=default` leaves the allocator alone.

Input errors (a missing or malformed file, a checkpoint that does not fit) end the command with
one message naming the file and the reason, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

PROG = "p2s"
WEIGHTS_URL_ENV = "P2S_WEIGHTS_URL"
EXAMPLE_IMAGE = Path(__file__).parent / "assets" / "example.jpg"
EXAMPLE_KEYPOINTS = Path(__file__).parent / "assets" / "example_keypoints.json"

# One colour per person (RGB), cycled.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


class UsageError(ValueError):
    """A bad combination of command-line arguments or a malformed input file."""


# ------------------------------------------------------------------------------ arguments


def _percentile(value: str) -> float | None:
    if value.lower() == "none":
        return None
    return float(value)


def _add_prompt_arguments(parser: argparse.ArgumentParser, score_default: str | None) -> None:
    group = parser.add_argument_group("prompting (SAM-pose2seg, Sec. 3.3 / 4.3)")
    group.add_argument("--selection", choices=("maxvis", "maxspread"), default=None,
                       help="keypoint selection (default: maxvis for detected keypoints, "
                            "maxspread for ground-truth keypoints)")
    group.add_argument("--num-points", type=int, default=None,
                       help="positive keypoints per person (default 3)")
    group.add_argument("--score-type", default=score_default,
                       choices=("visibility", "presence", "expected_oks", "confidence"),
                       help="per-keypoint score that ranks keypoints (default: visibility; "
                            "confidence is the s of each [x, y, s])")
    group.add_argument("--threshold", type=float, default=0.5,
                       help="a keypoint is visible when its score is >= this (default 0.5)")
    group.add_argument("--spread-percentile", type=_percentile, default=80.0,
                       help="MaxSpread's percentile rule, or 'none' (default 80)")
    group.add_argument("--negatives", choices=("none", "closest_other", "least_visible_own"),
                       default="none", help="negative points (default none)")
    group.add_argument("--num-negatives", type=int, default=1)
    group.add_argument("--box", choices=("none", "given", "inflated"), default="none",
                       help="box prompt from the pose's bbox (default none)")
    group.add_argument("--box-inflation", type=float, default=2.0,
                       help="side-length factor of --box inflated (default 2.0)")
    group.add_argument("--exclusive", action="store_true",
                       help="each pixel goes to the covering mask with the highest predicted IoU")


def _add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="official .pt (SAM 2.1 or SAM-pose2seg) or a folder from p2s convert"
                        + ("" if checkpoint_required else
                           "; default: the SAM-pose2seg release, downloaded once"))
    parser.add_argument("--model", default=None,
                        help="model size (t, s, b+, l or full name); default: from the checkpoint")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size (default: the checkpoint's, 1024 for .pt files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "SAM-pose2seg in JAX: human instance masks from pose keypoints."))
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="official .pt checkpoint -> converted folder")
    convert.add_argument("checkpoint", help="official SAM 2.1 / SAM-pose2seg .pt file")
    convert.add_argument("out_dir", help="folder to write (Orbax weights + p2s_model.json)")
    convert.add_argument("--model", default=None, help="model size; default: detected")
    convert.add_argument("--image-size", type=int, default=1024)

    evaluate = commands.add_parser("evaluate", help="mask AP on a COCO-format dataset")
    evaluate.add_argument("--annotations", required=True,
                          help="COCO-format ground truth with person masks")
    evaluate.add_argument("--images", required=True, help="image folder")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--keypoints", help="keypoint detections (COCO keypoint results format)")
    source.add_argument("--gt-keypoints", action="store_true",
                        help="prompt with the ground-truth keypoints instead")
    _add_model_arguments(evaluate, checkpoint_required=True)
    _add_prompt_arguments(evaluate, score_default="visibility")
    evaluate.add_argument("--coco-star", action="store_true",
                          help="COCO*: persons that are small or without keypoints are ignored")
    evaluate.add_argument("--result-score", choices=("product", "detection", "iou"),
                          default="product",
                          help="score of each mask: detection score x predicted IoU (default), "
                               "the detection score, or the predicted IoU")
    evaluate.add_argument("--batch-size", type=int, default=2, help="images per device per step")
    evaluate.add_argument("--people-chunk", type=int, default=4,
                          help="people of an image decoded together")
    evaluate.add_argument("--workers", type=int, default=4, help="image-loading threads")
    evaluate.add_argument("--out", required=True, help="COCO segm results JSON to write")
    evaluate.add_argument("--summary", default=None,
                          help="JSON summary (default: <out stem>.summary.json beside --out)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--distributed", action="store_true",
                          help="call jax.distributed.initialize() first (multi-host: start one "
                               "process per host; every process gets the whole results)")

    segment = commands.add_parser("segment", help="masks of the people of one photo")
    segment.add_argument("--image", required=True, help="the photo")
    segment.add_argument("--keypoints", required=True,
                         help="JSON: COCO keypoint results, or a list of 17 [x, y, score] lists "
                              "per person")
    _add_model_arguments(segment, checkpoint_required=False)
    _add_prompt_arguments(segment, score_default=None)
    segment.add_argument("--out", required=True, help="overlay image to write (PNG)")
    segment.add_argument("--masks-out", default=None,
                         help="also write the masks (COCO RLE) and prompts as JSON")
    segment.add_argument("--no-progress", action="store_true")

    train = commands.add_parser("train", help="fine-tune with the correction loop")
    train.add_argument("--config", default=None,
                       help="'paper', 'tiny' or a JSON config (default on --resume: the "
                            "workdir's config.json)")
    train.add_argument("--workdir", required=True, help="checkpoints, metrics and config go here")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in --workdir")
    train.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first (multi-host)")
    train.add_argument("--import", dest="imports", action="append", default=[],
                       metavar="MODULE", help="import MODULE first, e.g. one that registers a "
                                              "sampler (repeatable)")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. optim.base_lr=1e-5 correction.sampler=mask_refine")

    export = commands.add_parser("export", help="a training workdir -> official .pt checkpoint")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="the .pt file to write")
    export.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    return parser


def prompt_config(args: argparse.Namespace, ground_truth: bool):
    """The `PromptConfig` of the command line (paper presets for what is not given)."""
    from p2s_jax.prompting import PromptConfig

    preset = PromptConfig.ground_truth() if ground_truth else PromptConfig.sam_pose2seg()
    return PromptConfig(
        selection=args.selection or preset.selection,
        num_points=args.num_points or preset.num_points,
        visibility_threshold=args.threshold,
        spread_percentile=args.spread_percentile,
        negatives=args.negatives, num_negatives=args.num_negatives,
        box=args.box, box_inflation=args.box_inflation)


# ------------------------------------------------------------------------------ convert


def cmd_convert(args: argparse.Namespace) -> int:
    from weights_conversion import convert_checkpoint

    out_dir, ignored = convert_checkpoint(args.checkpoint, args.out_dir, args.model,
                                          args.image_size)
    meta = json.loads((Path(out_dir) / "p2s_model.json").read_text())
    print(f"converted {args.checkpoint} ({meta['model']}, image size {meta['image_size']}) "
          f"to {out_dir}")
    print(f"ignored {len(ignored)} video-memory tensors (not used on images)")
    return 0


# ------------------------------------------------------------------------------ evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from p2s_jax import evaluation

    if args.distributed:
        import jax

        jax.distributed.initialize()

    config = evaluation.EvalConfig(
        prompt=prompt_config(args, ground_truth=args.gt_keypoints),
        keypoint_score=args.score_type, result_score=args.result_score,
        exclusive=args.exclusive, images_per_device=args.batch_size,
        people_per_chunk=args.people_chunk, num_workers=args.workers)
    summary = evaluation.run_evaluation(
        args.annotations, args.images, args.checkpoint, keypoints=args.keypoints,
        gt_keypoints=args.gt_keypoints, model_name=args.model, image_size=args.image_size,
        config=config, coco_star=args.coco_star, out=args.out, summary_path=args.summary,
        progress=not args.no_progress)
    report = evaluation.EvalReport(**{k: v for k, v in summary["report"].items()
                                      if k != "images_per_second"})
    print(evaluation.format_report(report))
    print(summary["table"])
    if "results_file" in summary:
        print(f"results: {summary['results_file']}\nsummary: {summary['summary_file']}")
    return 0


# ------------------------------------------------------------------------------ segment


def load_pose_file(path, score_type: str | None = None):
    """Keypoints of the people of one image -> (`coco.PoseInstances`, score name used).

    Accepted JSON: a list with one entry per person, either an object in the COCO keypoint
    results format ({"keypoints": [x, y, s] * 17, optional "score", "visibility", "presence",
    "expected_oks", "bbox" [x, y, w, h]}) or a plain list of 17 [x, y, s] triplets (or 51
    numbers). A keypoint [0, 0, 0] is COCO's "not labelled" and is treated as absent.
    score_type None: 'visibility' when every person carries it, else 'confidence' (the s).
    """
    from p2s_jax.coco import NUM_KEYPOINTS, PoseInstances, xywh_to_xyxy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keypoint file not found: {path}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: invalid JSON: {err.msg} at line {err.lineno}, column "
                         f"{err.colno}") from None
    if isinstance(entries, dict) and "keypoints" in entries:
        entries = [entries]
    if not isinstance(entries, list):
        raise UsageError(f"{path}: expected a JSON list with one entry per person, got a JSON "
                         f"{type(entries).__name__}")
    keypoints, scores, boxes, det = [], {}, [], []
    extra = ("visibility", "presence", "expected_oks")
    for index, entry in enumerate(entries):
        where = f"{path}: person {index}"
        raw = entry.get("keypoints") if isinstance(entry, dict) else entry
        if raw is None:
            raise UsageError(f"{where}: missing key 'keypoints'")
        triplets = _numbers(raw, where + " 'keypoints'", (NUM_KEYPOINTS, 3))
        absent = np.all(triplets == 0, axis=1)
        keypoints.append(np.where(absent[:, None], np.nan, triplets[:, :2]))
        scores.setdefault("confidence", []).append(triplets[:, 2])
        entry = entry if isinstance(entry, dict) else {}
        for name in extra:
            if name in entry:
                scores.setdefault(name, []).append(
                    _numbers(entry[name], f"{where} '{name}'", (NUM_KEYPOINTS,)))
        if "bbox" in entry:
            boxes.append(xywh_to_xyxy(_numbers(entry["bbox"], f"{where} 'bbox'", (4,))))
        det.append(float(_numbers(entry.get("score", 1.0), f"{where} 'score'", (1,))[0]))
    count = len(entries)
    complete = {k: np.asarray(v, np.float32) for k, v in scores.items() if len(v) == count}
    if score_type is None:
        score_type = "visibility" if "visibility" in complete else "confidence"
    if score_type not in complete:
        raise UsageError(f"{path}: --score-type {score_type} needs '{score_type}' for every "
                         f"person; available: {sorted(complete)}")
    poses = PoseInstances(
        keypoints=np.asarray(keypoints, np.float32).reshape(count, NUM_KEYPOINTS, 2),
        scores=complete,
        boxes=np.asarray(boxes, np.float32) if boxes and len(boxes) == count else None,
        det_score=np.asarray(det, np.float32))
    return poses, score_type


def _numbers(value, where: str, shape: tuple) -> np.ndarray:
    try:
        array = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise UsageError(f"{where} must hold numbers only") from None
    if array.size != math.prod(shape):
        raise UsageError(f"{where} must hold {math.prod(shape)} numbers (shape {shape}), got "
                         f"shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise UsageError(f"{where} holds a non-finite value")
    return array.reshape(shape)


def default_checkpoint(progress: bool = True) -> Path:
    """The SAM-pose2seg release, downloaded (once) and converted (once) into the cache folder.

    Download: `download.fetch` (resumable, atomic, sha256-verified) from `P2S_WEIGHTS_URL` or the
    Hugging Face release. Conversion: the strict `convert_checkpoint` into a temporary folder,
    renamed into place, so that the converted folder only ever exists complete.
    """
    from p2s_jax import download
    from weights_conversion import convert_checkpoint

    cache = download.cache_dir()
    converted = cache / Path(download.SAM_POSE2SEG_FILENAME).stem
    if (converted / "p2s_model.json").is_file():
        return converted
    url = os.environ.get(WEIGHTS_URL_ENV) or download.SAM_POSE2SEG_URL
    checkpoint = download.fetch(url, download.SAM_POSE2SEG_FILENAME, progress=progress)
    staging = cache / f"{converted.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    convert_checkpoint(checkpoint, staging)
    try:
        os.replace(staging, converted)
    except OSError:  # converted concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return converted


def cmd_segment(args: argparse.Namespace) -> int:
    from p2s_jax.evaluation import segment_people
    from p2s_jax.images import load_image
    from p2s_jax.predictor import Predictor

    image = load_image(args.image)
    poses, score_type = load_pose_file(args.keypoints, args.score_type)
    config = prompt_config(args, ground_truth=False)
    if config.box != "none" and poses.boxes is None:
        raise UsageError(f"--box {config.box} needs a 'bbox' for every person in "
                         f"{args.keypoints}")
    checkpoint = args.checkpoint or default_checkpoint(progress=not args.no_progress)
    predictor = Predictor.from_checkpoint(checkpoint, args.model, args.image_size)
    scores = poses.scores[score_type]
    result = segment_people(predictor, image, poses.keypoints, scores, config,
                            boxes=poses.boxes, exclusive=args.exclusive)
    overlay = draw_overlay(image, result.masks, poses.keypoints, scores, result.coords,
                           result.labels, config.visibility_threshold)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay.save(out)
    people = len(result.iou)
    with_mask = int(result.has_prompt.sum())
    print(f"{people} people, {with_mask} masks ({score_type} scores, {config.selection}"
          f"_{config.num_points}); overlay: {out}")
    if with_mask < people:
        print(f"{people - with_mask} people had no keypoint inside the image: no mask")
    if args.masks_out:
        _write_masks(Path(args.masks_out), args.image, result)
        print(f"masks: {args.masks_out}")
    return 0


def _write_masks(path: Path, image_path, result) -> None:
    from pycocotools import mask as mask_utils

    people = []
    for i in range(len(result.iou)):
        segmentation = None
        if result.has_prompt[i]:
            rle = mask_utils.encode(np.asfortranarray(result.masks[i].astype(np.uint8)))
            segmentation = {"size": [int(s) for s in rle["size"]],
                            "counts": rle["counts"].decode("ascii")}
        used = result.labels[i] != -1
        people.append({
            "person": i, "segmentation": segmentation,
            "predicted_iou": float(result.iou[i]) if result.has_prompt[i] else None,
            "prompt": [[float(x), float(y), int(label)] for (x, y), label
                       in zip(result.coords[i][used], result.labels[i][used])]})
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = result.masks.shape[1:]
    path.write_text(json.dumps({"image": str(image_path), "height": height, "width": width,
                                "people": people}))


def draw_overlay(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray,
                 scores: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                 threshold: float):
    """The photo with every person's mask, skeleton and prompt points (a PIL RGB image).

    image (H, W, 3) uint8; masks (P, H, W) bool; keypoints (P, 17, 2) (NaN = absent);
    scores (P, 17); coords (P, K, 2) and labels (P, K) the prompts (1 positive: white-ringed
    dot, 0 negative: red cross, 2 / 3 box corners: rectangle, -1 unused).
    """
    from PIL import Image, ImageDraw

    from p2s_jax.coco import SKELETON

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
        for a, b in SKELETON:
            a, b = a - 1, b - 1
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


# ------------------------------------------------------------------------------ train / export

def cmd_train(args: argparse.Namespace) -> int:
    import jax

    from p2s_jax.train_config import load_config, parse_overrides
    from p2s_jax.trainer import train

    if args.distributed:
        jax.distributed.initialize()
    import importlib

    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"--import {module}: {err}") from None
    config_name = args.config
    if config_name is None:
        saved = Path(args.workdir) / "config.json"
        if not (args.resume and saved.is_file()):
            raise UsageError("--config is required (except with --resume in a workdir that "
                             "has a config.json)")
        config_name = str(saved)
    config = load_config(config_name, parse_overrides(args.overrides))
    result = train(config, args.workdir, resume=args.resume, progress=not args.no_progress)
    if jax.process_index() == 0:
        final = {k: round(v, 6) for k, v in result.last_metrics.items()}
        print(f"trained {result.steps_run} steps in {args.workdir}; last metrics: "
              f"{json.dumps(final)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from p2s_jax.trainer import export_torch

    path = export_torch(args.workdir, args.out, args.step)
    print(f"wrote {path} (official SAM 2.1 state_dict under 'model')")
    return 0


# ------------------------------------------------------------------------------ main


def _expected_errors() -> tuple:
    from p2s_jax.coco import CocoFormatError
    from p2s_jax.download import DownloadError
    from p2s_jax.images import ImageError
    from weights_conversion import CheckpointError

    from p2s_jax.trainer import NonFiniteError, WorkdirError

    return (UsageError, CocoFormatError, CheckpointError, DownloadError, ImageError,
            FileNotFoundError, ValueError, NonFiniteError, WorkdirError)


COMMANDS = {"convert": cmd_convert, "evaluate": cmd_evaluate, "segment": cmd_segment,
            "train": cmd_train, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `p2s` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from p2s_jax import allocator

    allocator.keep_freed_memory_unless_disabled()  # before XLA's threads first allocate
    try:
        return COMMANDS[args.command](args)
    except _expected_errors() as err:
        print(f"{PROG} {args.command}: error: {_one_message(err)}", file=sys.stderr)
        return 2


def _one_message(err: Exception, max_details: int = 3) -> str:
    """The error on one line (a long list of details is cut), except download instructions."""
    from p2s_jax.download import DownloadError

    message = str(err).strip() or type(err).__name__
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if isinstance(err, DownloadError) or len(lines) <= 1:
        return message
    details = "; ".join(lines[1:1 + max_details])
    more = len(lines) - 1 - max_details
    return f"{lines[0]} {details}" + (f"; and {more} more" if more > 0 else "")


if __name__ == "__main__":
    sys.exit(main())
