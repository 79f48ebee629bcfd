"""The `p2s` commands: each checks its inputs and outputs (`utils.files.check_outputs`) before
any work, then turns its parsed arguments into one call of the package."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from p2s_jax import aot
from p2s_jax.evaluation.annotate import AnnotateConfig, AnnotationInput, annotate
from p2s_jax.evaluation.evaluate import load_inputs, run_evaluation
from p2s_jax.evaluation.report import EvalReport, format_report
from p2s_jax.inference.predictor import Predictor
from p2s_jax.inference.segment import (draw_segmentation, read_photo_poses, segment_photo,
                                      write_segmentation)
from p2s_jax.inference.weights import resolve_checkpoint
from p2s_jax.data import prepare
from p2s_jax.data.coco import load_coco
from p2s_jax.keypoints import get_schema
from p2s_jax.model.configs import compute_dtype
from p2s_jax.train.checkpoint import export_torch
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.curve import CurveConfig, correction_curve, write_curve_png
from p2s_jax.train.config import load_config, parse_overrides
from p2s_jax.train.inputs import training_records
from p2s_jax.train.loop import train
from p2s_jax.utils.errors import interrupt_signal
from p2s_jax.utils.files import (check_folder, check_outputs, listing, read_json, replace_folder,
                                 summary_path, what_was_left)
from p2s_jax.utils.images import load_image
from p2s_jax.cli.arguments import PROG, UsageError, inference_config
from weights_conversion import (METADATA_FILE, convert_checkpoint, load_model, random_init_info,
                                write_random_checkpoint)


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 person', '3 people'."""
    return f"{count} {noun if count == 1 else (many or noun + 's')}"


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _checkpoint(args: argparse.Namespace) -> Path:
    """--checkpoint resolved (a path, a released model by name, or the SAM-pose2seg release);
    says once when its weights are random (`p2s init`)."""
    checkpoint = resolve_checkpoint(args.checkpoint, progress=not args.no_progress
                                    if hasattr(args, "no_progress") else True)
    info = random_init_info(checkpoint)
    if info is not None:
        _note(f"note: {checkpoint} holds random weights (p2s init, {info.get('model')}, seed "
              f"{info.get('seed')}): the masks show the pipeline at work, not a trained model")
    return checkpoint


def _schema(args: argparse.Namespace):
    return get_schema(args.schema) if getattr(args, "schema", None) else None


def _check_images_folder(args: argparse.Namespace) -> None:
    check_folder(args.images, "--images")


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    check_outputs({"out_dir": out}, [args.checkpoint], overwrite=args.overwrite,
                  folders=["out_dir"])
    target = out
    if out.exists() and any(out.iterdir()):  # --overwrite: convert aside, then swap
        target = out.with_name(f".{out.name}.converting")
    _, ignored = convert_checkpoint(args.checkpoint, target, args.model, args.image_size)
    if target != out:
        replace_folder(target, out)
    meta = read_json(out / METADATA_FILE, "converted checkpoint metadata")
    print(f"converted {args.checkpoint} ({meta['model']}, image size {meta['image_size']}) "
          f"to {out}")
    print(f"ignored {plural(len(ignored), 'video-memory tensor')} (not used on images)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, overwrite=args.overwrite)
    _note(f"drawing random weights for {args.model} (seed {args.seed}) ...")
    path = write_random_checkpoint(args.model, args.out, args.image_size, args.seed)
    print(f"wrote {path}: random weights (seed {args.seed}), official format; every command "
          "that loads it says so")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = dataclasses.replace(
        inference_config(args, ground_truth=args.gt_keypoints),
        images_per_device=args.batch_size, people_per_chunk=args.people_chunk,
        num_workers=args.workers, crop_to_box=args.crop_to_box)
    out = Path(args.out)
    summary = Path(args.summary) if args.summary else summary_path(out)
    check_outputs({"--out": out, "--summary": summary},
                  [args.annotations, args.images, args.keypoints, args.checkpoint],
                  overwrite=args.overwrite)
    inputs = load_inputs(args.annotations, args.images, config, keypoints=args.keypoints,
                         gt_keypoints=args.gt_keypoints, schema=_schema(args),
                         skip_missing_images=args.skip_missing_images)
    _note(f"keypoint scores: {inputs.config.keypoint_score} (visibility channel), "
          f"{inputs.config.confidence_score or inputs.config.keypoint_score} (confidence)")
    result = run_evaluation(
        args.annotations, args.images, _checkpoint(args), keypoints=args.keypoints,
        gt_keypoints=args.gt_keypoints, model_name=args.model, image_size=args.image_size,
        config=config, coco_star=args.coco_star, out=out, summary_path=summary,
        progress=not args.no_progress, dtype=args.dtype, attention=args.attention,
        inputs=inputs)
    print(format_report(EvalReport.from_dict(result["report"])))
    for note in ("no_poses", "left_out_images"):
        if note in result:
            print(result[note])
    print(result["table"])
    if "results_file" in result:
        print(f"results: {result['results_file']}\nsummary: {result['summary_file']}")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out, "--masks-out": args.masks_out},
                  [args.image, args.keypoints, args.checkpoint], overwrite=args.overwrite)
    image = load_image(args.image)
    settings = inference_config(args, ground_truth=False)
    people = read_photo_poses(args.keypoints, args.image, settings.keypoint_score,
                              settings.confidence_score, settings.prompt.box,
                              image_id=args.image_id, schema=_schema(args))
    predictor = Predictor.from_checkpoint(_checkpoint(args), args.model, args.image_size,
                                          compute_dtype(args.dtype), attention=args.attention,
                                          postprocess=settings.postprocess)
    result = segment_photo(predictor, image, people, settings.prompt, settings.exclusive)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_segmentation(image, people, result, settings.prompt.visibility_threshold).save(out)
    total, with_mask = len(result.iou), int(result.has_prompt.sum())
    print(f"{plural(total, 'person', 'people')}, {plural(with_mask, 'mask')} "
          f"({people.channels.visibility} scores, {settings.prompt.selection}_"
          f"{settings.prompt.num_points}); overlay: {out}")
    if with_mask < total:
        print(f"{plural(total - with_mask, 'person', 'people')} had no usable keypoint: no mask")
    if args.masks_out:
        print(f"masks: {write_segmentation(args.masks_out, args.image, result)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config_name = args.config
    if config_name is None:
        saved = Path(args.workdir) / "config.json"
        if not (args.resume and saved.is_file()):
            raise UsageError("--config is required (except with --resume in a workdir that "
                             "has a config.json)")
        config_name = str(saved)
    if args.resume_step is not None and not args.resume:
        raise UsageError("--resume-step goes with --resume")
    config = load_config(config_name, parse_overrides(args.overrides), tuple(args.imports))
    if config.init_checkpoint and random_init_info(config.init_checkpoint) is not None:
        _note(f"note: init_checkpoint {config.init_checkpoint} holds random weights (p2s init)")
    before = listing(args.workdir)
    try:
        result = train(config, args.workdir, resume=args.resume, resume_step=args.resume_step,
                       progress=not args.no_progress)
    except BaseException as err:  # an interruption says what the run left (cli.main)
        if interrupt_signal(err) is not None:
            saved = Path(args.workdir) / "checkpoints"
            err.p2s_left = what_was_left(args.workdir, before) + (
                "" if saved.is_dir() and any(p.name.isdigit() for p in saved.iterdir())
                else "; no checkpoint")
        raise
    if jax.process_index() == 0:
        if result.steps_run == 0:
            print(f"the run in {args.workdir} is complete: step {result.final_step} of "
                  f"{result.final_step}; nothing to train")
        else:
            final = {k: round(v, 6) for k, v in result.last_metrics.items()}
            print(f"trained {plural(result.steps_run, 'step')} in {args.workdir} (now at step "
                  f"{result.final_step}); last metrics: {json.dumps(final)}")
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


def cmd_annotate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_outputs({"--out": out, "summary": summary_path(out), "--overlays": args.overlays},
                  [args.keypoints, args.image_info, args.images, args.checkpoint],
                  overwrite=args.overwrite, folders=["--overlays"])
    inference = dataclasses.replace(inference_config(args, ground_truth=False),
                                    images_per_device=args.batch_size,
                                    num_workers=args.workers)
    config = AnnotateConfig(inference, inference_config(args, ground_truth=True).prompt,
                            min_iou=args.min_iou, shard_images=args.shard_images,
                            overlay_sample=args.sample)
    source = AnnotationInput(args.keypoints, args.image_info, config, _schema(args))
    _check_images_folder(args)
    checkpoint = _checkpoint(args)
    model = load_model(checkpoint, args.model, args.image_size, compute_dtype(args.dtype),
                       args.attention)
    summary = annotate(model, source, args.images, out, config, checkpoint=str(checkpoint),
                       overlays=args.overlays, progress=not args.no_progress,
                       overwrite=args.overwrite)
    speed = summary["images_per_second"]
    print(f"{plural(summary['persons'], 'person', 'persons')} on "
          f"{plural(summary['images'], 'image')} ({summary['schema']}): "
          + ", ".join(f"{k} {v}" for k, v in summary["status"].items())
          + (f"; {speed:.2f} images/s" if speed else "; nothing left to run"))
    for image in summary["skipped_images"]:
        print(f"unreadable image {image['file_name']}: {image['reason']}")
    print(f"annotated: {summary['output']}")
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, [args.annotations, args.images, args.checkpoint],
                  overwrite=args.overwrite)
    config = CurveConfig(CorrectionConfig(num_points=args.points, sampler=args.sampler),
                         max_people=args.max_people, max_images=args.max_images)
    coco = load_coco(args.annotations, _schema(args))
    _check_images_folder(args)
    model = load_model(_checkpoint(args), args.model, args.image_size,
                       compute_dtype(args.dtype), args.attention)
    result = correction_curve(model, coco, args.images, config,
                              progress=not args.no_progress)
    path = write_curve_png(args.out, result, f"mean IoU after each point ({args.sampler})")
    print(f"{plural(result.num_persons, 'person', 'persons')}, "
          f"{plural(result.num_images, 'image')}; mean IoU after each point: "
          f"{' '.join(f'{v:.4f}' for v in result.mean_iou)}\nplot: {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "train-data":
        config = load_config(args.config, parse_overrides(args.overrides), tuple(args.imports))
        records = training_records(config, args.workdir)
        print(f"training data ready: {plural(len(records), 'record')}")
        return 0
    source = args.source if args.dataset == "coco-persons" else args.split_dir
    check_outputs({"out": args.out}, [source], overwrite=args.overwrite)
    if args.dataset == "coco-persons":
        path = prepare.write_coco_persons(args.source, args.out, args.min_area)
    else:
        path = prepare.convert_cihp(args.split_dir, args.out)
    data = read_json(path, "written annotations")
    print(f"wrote {path}: {plural(len(data['images']), 'image')}, "
          f"{plural(len(data['annotations']), 'annotation')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, [args.workdir, args.base], overwrite=args.overwrite)
    exported = export_torch(args.workdir, args.out, args.step, args.base, args.image_only,
                            best=args.best)
    carried = exported.video_tensors
    what = (f"official SAM 2.1 state_dict, {plural(carried, 'video-memory tensor')} carried"
            if carried else "image-path tensors only")
    heldout = exported.heldout
    scored = (f"; held-out AP {100 * heldout['eval/AP']:.1f}" if "eval/AP" in heldout else "")
    print(f"wrote {exported.path} (step {exported.step}{scored}; {what} under 'model')")
    return 0


# Commands that say which devices they run on.
COMPUTES = ("evaluate", "segment", "train", "curve", "annotate")
COMMANDS = {"convert": cmd_convert, "init": cmd_init, "evaluate": cmd_evaluate,
            "segment": cmd_segment, "train": cmd_train, "export": cmd_export, "aot": cmd_aot,
            "prepare": cmd_prepare, "curve": cmd_curve, "annotate": cmd_annotate}
