"""The `p2s` commands: each turns its parsed arguments into one call of the package."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import jax

from p2s_jax import aot
from p2s_jax.evaluation import runner
from p2s_jax.evaluation.annotate import AnnotateConfig, annotate
from p2s_jax.evaluation.report import EvalReport, format_report
from p2s_jax.inference.overlay import draw_overlay
from p2s_jax.inference.predictor import Predictor
from p2s_jax.inference.segment import segment_people, write_segmentation
from p2s_jax.inference.weights import released_checkpoint
from p2s_jax.data import prepare
from p2s_jax.data.coco import load_coco, load_image_poses
from p2s_jax.keypoints import get_schema, schema_for_count
from p2s_jax.model.configs import compute_dtype
from p2s_jax.train.checkpoint import export_torch
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.curve import CurveConfig, correction_curve, write_curve_png
from p2s_jax.train.config import load_config, parse_overrides
from p2s_jax.train.loop import train
from p2s_jax.utils.files import read_json
from p2s_jax.utils.images import load_image
from p2s_jax.cli.arguments import UsageError, inference_config
from weights_conversion import METADATA_FILE, convert_checkpoint, load_model


def cmd_convert(args: argparse.Namespace) -> int:
    out_dir, ignored = convert_checkpoint(args.checkpoint, args.out_dir, args.model,
                                          args.image_size)
    meta = read_json(Path(out_dir) / METADATA_FILE, "converted checkpoint metadata")
    print(f"converted {args.checkpoint} ({meta['model']}, image size {meta['image_size']}) "
          f"to {out_dir}")
    print(f"ignored {len(ignored)} video-memory tensors (not used on images)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.distributed:
        jax.distributed.initialize()
    config = dataclasses.replace(
        inference_config(args, ground_truth=args.gt_keypoints),
        images_per_device=args.batch_size, people_per_chunk=args.people_chunk,
        num_workers=args.workers, crop_to_box=args.crop_to_box)
    summary = runner.run_evaluation(
        args.annotations, args.images, args.checkpoint, keypoints=args.keypoints,
        gt_keypoints=args.gt_keypoints, model_name=args.model, image_size=args.image_size,
        config=config, coco_star=args.coco_star, out=args.out, summary_path=args.summary,
        progress=not args.no_progress, dtype=args.dtype, attention=args.attention)
    print(format_report(EvalReport.from_dict(summary["report"])))
    print(summary["table"])
    if "results_file" in summary:
        print(f"results: {summary['results_file']}\nsummary: {summary['summary_file']}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    image = load_image(args.image)
    settings = inference_config(args, ground_truth=False)
    poses, score_type = load_image_poses(args.keypoints, args.score_type)
    schema = (get_schema(args.schema) if args.schema
              else schema_for_count(poses.keypoints.shape[1], args.keypoints))
    if schema.num_keypoints != poses.keypoints.shape[1]:
        raise UsageError(f"--schema {schema.name} has {schema.num_keypoints} keypoints, "
                         f"{args.keypoints} {poses.keypoints.shape[1]}")
    config = dataclasses.replace(settings.prompt, face=schema.face)
    if config.box != "none" and poses.boxes is None:
        raise UsageError(f"--box {config.box} needs a 'bbox' for every person in "
                         f"{args.keypoints}")
    checkpoint = args.checkpoint or released_checkpoint(progress=not args.no_progress)
    predictor = Predictor.from_checkpoint(checkpoint, args.model, args.image_size,
                                          compute_dtype(args.dtype), attention=args.attention,
                                          postprocess=settings.postprocess)
    scores = poses.scores[score_type]
    confidence = poses.scores.get(settings.confidence_score or score_type)
    if confidence is None:
        raise UsageError(f"{args.keypoints}: the poses carry no {settings.confidence_score!r} "
                         f"scores (they have {sorted(poses.scores)})")
    result = segment_people(predictor, image, poses.keypoints, scores, config,
                            boxes=poses.boxes, exclusive=settings.exclusive,
                            confidence=confidence)
    overlay = draw_overlay(image, result.masks, poses.keypoints, scores, result.coords,
                           result.labels, config.visibility_threshold, schema.skeleton)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay.save(out)
    people, with_mask = len(result.iou), int(result.has_prompt.sum())
    print(f"{people} people, {with_mask} masks ({score_type} scores, {config.selection}"
          f"_{config.num_points}); overlay: {out}")
    if with_mask < people:
        print(f"{people - with_mask} people had no keypoint inside the image: no mask")
    if args.masks_out:
        print(f"masks: {write_segmentation(args.masks_out, args.image, result)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.distributed:
        jax.distributed.initialize()
    _import_modules(args.imports)
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


def cmd_aot(args: argparse.Namespace) -> int:
    if args.target.startswith("h100"):
        if not args.gpu_target:
            raise UsageError("--target h100 needs --gpu-target (XLA's H100 description)")
        count = int(args.target[len("h100x"):]) if args.target.startswith("h100x") else 1
        target = aot.gpu_target(count, args.gpu_target)
    else:
        target = aot.tpu_target(args.target)
    for line in aot.run(target, args.programs, args.model, args.image_size, args.dtype,
                        args.batch, args.train_preset, args.top):
        print(aot.format_line(line), flush=True)
    return 0


def _import_modules(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"--import {module}: {err}") from None


def cmd_annotate(args: argparse.Namespace) -> int:
    if args.distributed:
        jax.distributed.initialize()
    _import_modules(args.imports)
    inference = dataclasses.replace(inference_config(args, ground_truth=False),
                                    images_per_device=args.batch_size,
                                    num_workers=args.workers)
    config = AnnotateConfig(inference, inference_config(args, ground_truth=True).prompt,
                            min_iou=args.min_iou, shard_images=args.shard_images,
                            overlay_sample=args.sample)
    checkpoint = args.checkpoint or released_checkpoint(progress=not args.no_progress)
    model = load_model(checkpoint, args.model, args.image_size, compute_dtype(args.dtype),
                       args.attention)
    summary = annotate(model, args.keypoints, args.images, args.out, config,
                       image_info=args.image_info, checkpoint=str(checkpoint),
                       overlays=args.overlays, progress=not args.no_progress)
    speed = summary["images_per_second"]
    print(f"{summary['persons']} persons on {summary['images']} images ({summary['schema']}): "
          + ", ".join(f"{k} {v}" for k, v in summary["status"].items())
          + (f"; {speed:.2f} images/s" if speed else "; nothing left to run"))
    for image in summary["skipped_images"]:
        print(f"unreadable image {image['file_name']}: {image['reason']}")
    print(f"annotated: {summary['output']}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    config = CurveConfig(CorrectionConfig(num_points=args.points, sampler=args.sampler),
                         max_people=args.max_people, max_images=args.max_images)
    model = load_model(args.checkpoint, args.model, args.image_size,
                       compute_dtype(args.dtype), args.attention)
    result = correction_curve(model, load_coco(args.annotations), args.images, config)
    path = write_curve_png(args.out, result, f"mean IoU after each point ({args.sampler})")
    print(f"{result.num_persons} persons, {result.num_images} images; mean IoU after each "
          f"point: {' '.join(f'{v:.4f}' for v in result.mean_iou)}\nplot: {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "coco-persons":
        path = prepare.write_coco_persons(args.source, args.out, args.min_area)
    else:
        path = prepare.convert_cihp(args.split_dir, args.out)
    data = read_json(path, "written annotations")
    print(f"wrote {path}: {len(data['images'])} images, {len(data['annotations'])} annotations")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    path, carried = export_torch(args.workdir, args.out, args.step, args.base, args.image_only)
    what = (f"official SAM 2.1 state_dict, {carried} video-memory tensors carried" if carried
            else "image-path tensors only")
    print(f"wrote {path} ({what} under 'model')")
    return 0


# Commands that say which devices they run on.
COMPUTES = ("evaluate", "segment", "train", "curve", "annotate")
COMMANDS = {"convert": cmd_convert, "evaluate": cmd_evaluate, "segment": cmd_segment,
            "train": cmd_train, "export": cmd_export, "aot": cmd_aot, "prepare": cmd_prepare,
            "curve": cmd_curve, "annotate": cmd_annotate}

