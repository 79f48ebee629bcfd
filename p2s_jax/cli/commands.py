"""The `p2s` commands: each checks its inputs and outputs (`utils.files.check_outputs`) before
any work, then turns its parsed arguments into one call of the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from p2s_jax import aot
from p2s_jax.evaluation.annotate import (AnnotateConfig, AnnotationInput, annotate,
                                         annotation_summary_lines)
from p2s_jax.evaluation.evaluate import load_inputs, run_evaluation, summary_lines
from p2s_jax.inference.predictor import Predictor
from p2s_jax.inference.segment import read_photo_poses, segment_to_files
from p2s_jax.inference.weights import resolve_checkpoint
from p2s_jax.data import prepare
from p2s_jax.review import decisions, page
from p2s_jax.data.coco import load_coco
from p2s_jax.keypoints import get_schema
from p2s_jax.model.configs import compute_dtype
from p2s_jax.train.checkpoint import export_torch
from p2s_jax.train import compare, study, study_report
from p2s_jax.train.config import load_config, parse_overrides, run_config
from p2s_jax.train.inputs import training_records
from p2s_jax.train.loop import train
from p2s_jax.utils.fields import field_values
from p2s_jax.utils.files import check_folder, check_outputs, summary_path
from p2s_jax.utils.images import load_image
from p2s_jax.utils.text import plural
from p2s_jax.cli.arguments import PROG, inference_config
from weights_conversion import (conversion_summary, convert_checkpoint, load_model,
                                random_weights_note, write_random_checkpoint)


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _checkpoint(args: argparse.Namespace, value: str | None = None) -> Path:
    """--checkpoint (or `value`) resolved (a path, a released model by name, or the
    SAM-pose2seg release); says once when its weights are random (`p2s init`)."""
    checkpoint = resolve_checkpoint(value or args.checkpoint,
                                    not getattr(args, "no_progress", False))
    if random_weights_note(checkpoint):
        _note(random_weights_note(checkpoint))
    return checkpoint


def _model(args: argparse.Namespace, value: str | None = None):
    """(checkpoint, model) of --checkpoint (or `value`), --model, --image-size, --dtype,
    --attention."""
    checkpoint = _checkpoint(args, value)
    return checkpoint, load_model(checkpoint, args.model, args.image_size,
                                  compute_dtype(args.dtype), args.attention)


def _schema(args: argparse.Namespace):
    return get_schema(args.schema) if getattr(args, "schema", None) else None


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    check_outputs({"out_dir": out}, [args.checkpoint], overwrite=args.overwrite,
                  folders=["out_dir"])
    folder, ignored = convert_checkpoint(args.checkpoint, out, args.model, args.image_size,
                                         replace=args.overwrite)
    print(conversion_summary(args.checkpoint, folder, ignored))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, overwrite=args.overwrite)
    _note(f"drawing random weights for {args.model} (seed {args.seed}) ...")
    path = write_random_checkpoint(args.model, args.out, args.image_size, args.seed)
    print(f"wrote {path}: random weights (seed {args.seed}), official format; every command "
          "that loads it says so")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    config = inference_config(args, ground_truth=args.gt_keypoints)
    out = Path(args.out)
    summary = Path(args.summary) if args.summary else summary_path(out)
    check_outputs({"--out": out, "--summary": summary},
                  [args.annotations, args.images, args.keypoints, args.checkpoint],
                  overwrite=args.overwrite)
    inputs = load_inputs(args.annotations, args.images, config, keypoints=args.keypoints,
                         gt_keypoints=args.gt_keypoints, schema=_schema(args),
                         skip_missing_images=args.skip_missing_images)
    _note("keypoint scores: {} (visibility channel), {} (confidence)".format(
        *inputs.config.channels))
    checkpoint, model = _model(args)
    result = run_evaluation(inputs, model, checkpoint=checkpoint, dtype=args.dtype,
                            coco_star=args.coco_star, out=out, summary_path=summary,
                            progress=not args.no_progress)
    print("\n".join(summary_lines(result)))
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
    print("\n".join(segment_to_files(predictor, image, args.image, people, settings.prompt,
                                     settings.exclusive, args.out, args.masks_out)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    config = run_config(args.config, args.workdir, args.resume, parse_overrides(args.overrides),
                        tuple(args.imports))
    if config.init_checkpoint and random_weights_note(config.init_checkpoint):
        _note(f"init_checkpoint: {random_weights_note(config.init_checkpoint)}")
    result = train(config, args.workdir, resume=args.resume, resume_step=args.resume_step,
                   progress=not args.no_progress)
    if jax.process_index() == 0:
        print(result.summary(args.workdir))
    return 0


def cmd_aot(args: argparse.Namespace) -> int:
    target = aot.target_by_name(args.target, args.gpu_target)
    for line in aot.run(target, args.programs, args.model, args.image_size, args.dtype,
                        args.batch, args.train_preset, args.top):
        print(aot.format_line(line), flush=True)
    return 0


def cmd_annotate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_outputs({"--out": out, "summary": summary_path(out), "--overlays": args.overlays},
                  [args.keypoints, args.image_info, args.images, args.checkpoint],
                  overwrite=args.overwrite, folders=["--overlays"])
    config = field_values(AnnotateConfig, vars(args),
                          inference=inference_config(args, ground_truth=False),
                          ground_truth_prompt=inference_config(args, ground_truth=True).prompt)
    source = AnnotationInput(args.keypoints, args.image_info, config, _schema(args))
    check_folder(args.images, "--images")
    checkpoint, model = _model(args)
    summary = annotate(model, source, args.images, out, config, checkpoint=str(checkpoint),
                       overlays=args.overlays, progress=not args.no_progress,
                       overwrite=args.overwrite)
    print("\n".join(annotation_summary_lines(summary)))
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    files = study_report.outputs(args.out)
    checkpoints = study.checkpoints(args.checkpoint, lambda path: _model(args, path)[1], {
        k: getattr(args, k) for k in ("model", "image_size", "dtype", "attention")})
    check_outputs({k: v for k, v in files.items() if k != "runs"},
                  [args.annotations, args.images, *(c.path for c in checkpoints)],
                  overwrite=args.overwrite)
    config = field_values(study.StudyConfig, vars(args),
                          samplers=tuple(args.sampler or ("center",)))
    coco = load_coco(args.annotations, _schema(args))
    runs = study.study(checkpoints, coco, args.annotations, check_folder(args.images, "--images"),
                       files["runs"], config, overwrite=args.overwrite,
                       progress=not args.no_progress)
    print("\n".join(study_report.write_study(
        args.out, runs, config.num_points, study.THRESHOLDS,
        f"mean IoU after each point ({Path(args.annotations).name})")))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.out:
        check_outputs({"--out": args.out, "plot": Path(args.out).with_suffix(".png")},
                      args.runs, overwrite=args.overwrite)
    print("\n".join(compare.compare(args.runs, args.out)))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset == "train-data":
        config = load_config(args.config, parse_overrides(args.overrides), tuple(args.imports))
        records = training_records(config, args.workdir)
        print(f"training data ready: {plural(len(records), 'record')}")
        return 0
    source = args.source if args.dataset == "coco-persons" else args.split_dir
    check_outputs({"out": args.out}, [source], overwrite=args.overwrite)
    print(prepare.write_coco_persons(args.source, args.out, args.min_area)
          if args.dataset == "coco-persons" else prepare.convert_cihp(args.split_dir, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, [args.workdir, args.base], overwrite=args.overwrite)
    print(export_torch(args.workdir, args.out, args.step, args.base, args.image_only,
                       best=args.best).summary())
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    check_outputs({"--out": args.out}, [args.reviewed, args.apply, args.annotations,
                                        args.images], overwrite=args.overwrite,
                  folders=[] if args.apply else ["--out"])
    print("\n".join(decisions.write_curated(args.reviewed, args.apply, args.out) if args.apply
                    else page.review_page(args.reviewed, args.images, args.out,
                                          args.annotations, _schema(args), worst=args.worst,
                                          statuses=tuple(args.status), crop_size=args.crop_size,
                                          workers=args.workers, progress=not args.no_progress)))
    return 0


# Commands that say which devices they run on.
COMPUTES = ("evaluate", "segment", "train", "curve", "annotate")
# name -> function, every `cmd_<name>` of this module
COMMANDS = {name[4:]: command for name, command in dict(globals()).items()
            if name.startswith("cmd_")}
