"""The `p2s` argument tables and the inference settings they describe."""

from __future__ import annotations

import argparse

from p2s_jax import aot
from p2s_jax.evaluation.config import RESULT_SCORES, EvalConfig
from p2s_jax.evaluation.presets import PRESETS, settings_of_flags
from p2s_jax.inference.weights import HUB_WEIGHTS
from p2s_jax.data.poses import SCORE_NAMES
from p2s_jax.keypoints import available_schemas
from p2s_jax.model.configs import COMPUTE_DTYPES
from p2s_jax.model.layers import ATTENTION_IMPLEMENTATIONS
from p2s_jax.utils import allocator

PROG = "p2s"


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "inference (SAM-pose2seg, Sec. 3.3 / 4.3); a flag given beside --preset wins")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="the authors' settings for a model's paper rows (docs/reproduce.md)")
    group.add_argument("--selection", choices=("maxvis", "maxspread"), default=None,
                       help="keypoint selection (default: maxvis for detected keypoints, "
                            "maxspread for ground-truth keypoints)")
    group.add_argument("--num-points", type=int, default=None,
                       help="positive keypoints per person (default 3)")
    group.add_argument("--score-type", default=None, choices=SCORE_NAMES,
                       help="visibility channel: ranks MaxVis, filters keypoints (default: "
                            "visibility; confidence is the s of each [x, y, s])")
    group.add_argument("--confidence-score", default=None, choices=SCORE_NAMES,
                       help="confidence channel: the prompt gate and MaxSpread's ranking "
                            "(default: the --score-type channel; 'confidence' in the presets)")
    group.add_argument("--threshold", type=float, default=None,
                       help="a keypoint is visible when its score is >= this (default 0.5)")
    group.add_argument("--no-prompt", choices=("best_keypoint", "empty", "skip"), default=None,
                       help="a person without a gated keypoint: its best keypoint (default), "
                            "the empty prompt (the authors) or no mask")
    group.add_argument("--outside-keypoints", choices=("use", "drop"), default=None,
                       help="keypoints outside the photo: prompted as given (use: the authors "
                            "and both presets) or never used (drop: the default without a "
                            "preset, as such a point marks no pixel SAM sees)")
    group.add_argument("--spread-percentile", default=None,
                       type=lambda v: "none" if v.lower() == "none" else float(v),
                       help="MaxSpread's percentile rule, or 'none' (default 80)")
    group.add_argument("--negatives", choices=("none", "closest_other", "least_visible_own"),
                       default=None, help="negative points (default none)")
    group.add_argument("--num-negatives", type=int, default=None,
                       help="negative points per person (default 1)")
    group.add_argument("--box", choices=("none", "given", "inflated", "gt", "inflated-gt"),
                       default=None,
                       help="box prompt: the pose's own bbox (given), scaled about its centre "
                            "(inflated), or the box of the ground-truth person matched by OKS "
                            "(gt, inflated-gt; evaluate only) (default none)")
    group.add_argument("--box-inflation", type=float, default=None,
                       help="side-length factor of --box inflated (default 2.0)")
    group.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                       help="each pixel goes to the covering mask with the highest predicted IoU")
    group.add_argument("--max-hole-area", type=float, default=None,
                       help="fill background regions of the low-res mask up to this area")
    group.add_argument("--max-sprinkle-area", type=float, default=None,
                       help="remove foreground regions of the low-res mask up to this area")


def _add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool,
                         repeatable: bool = False) -> None:
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        action="append" if repeatable else "store",
                        help="official .pt (SAM 2.1 or SAM-pose2seg), a folder from p2s convert, "
                             f"or a released model by name ({', '.join(HUB_WEIGHTS)}), "
                             "downloaded once from the Hugging Face Hub"
                        + ("" if checkpoint_required else
                           "; default: the SAM-pose2seg release")
                        + ("; repeatable, as PATH or LABEL=PATH" if repeatable else ""))
    parser.add_argument("--model", default=None,
                        help="model size (t, s, b+, l or full name); default: from the checkpoint")
    parser.add_argument("--image-size", type=int, default=None,
                        help="model input size (default: the checkpoint's, 1024 for .pt files)")
    parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                        help="compute dtype (weights stay float32; default float32)")
    parser.add_argument("--attention", choices=ATTENTION_IMPLEMENTATIONS, default="auto",
                        help="attention implementation (default auto: chunked on CPU, head-major "
                             "einsum on TPU, cuDNN flash on GPU where it applies)")


def _add_distributed(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several hosts (one process per host, the same command)")
    group.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() first: the cluster is detected "
                            "(Cloud TPU, SLURM, Open MPI, Kubernetes) unless the flags below "
                            "name it")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="with --distributed: process 0's address (default: detected, or "
                            "$JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="with --distributed: how many processes (default: detected)")
    group.add_argument("--process-id", type=int, default=None,
                       help="with --distributed: this process's index (default: detected)")


def _add_overwrite(parser: argparse.ArgumentParser, progress: bool = False) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs that exist already (without it, an existing "
                             "output is refused before any work; an input is never written)")
    if progress:
        parser.add_argument("--no-progress", action="store_true",
                            help="no progress bars (a log file's output)")


def _add_schema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--schema", choices=available_schemas(), default=None,
                        help="read the keypoints by position in this schema (for files whose "
                             "keypoint names fit no known schema; default: from the names, or "
                             "the one schema with as many keypoints)")


def _add_import(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import MODULE first: one that registers a "
                                               "sampler or a keypoint schema of your own "
                                               "(repeatable; importable from the working "
                                               "folder or PYTHONPATH)")


def preparse_imports(argv: list[str]) -> list[str]:
    """The ``--import MODULE`` values of a command line, read before the parser is built (the
    modules register the samplers and schemas that its choices list)."""
    imports = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    imports.add_argument("--import", dest="imports", action="append", default=[])
    return imports.parse_known_args(argv)[0].imports


def _batch_size(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: the backend's default), got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "SAM-pose2seg in JAX: human instance masks from pose keypoints. Outputs that exist are "
        "refused unless --overwrite; no command writes over its input."))
    parser.add_argument("--malloc", choices=("auto", *allocator.MODES), default="auto",
                        help="host allocator: keep freed memory for reuse ('kept'), glibc's "
                             "default, or 'auto' (kept for evaluate and train)")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="official .pt checkpoint -> converted folder")
    convert.add_argument("checkpoint", help="official SAM 2.1 / SAM-pose2seg .pt file")
    convert.add_argument("out_dir", help="folder to write (Orbax weights + p2s_model.json)")
    convert.add_argument("--model", default=None, help="model size; default: detected")
    convert.add_argument("--image-size", type=int, default=1024)
    _add_overwrite(convert)

    init = commands.add_parser("init", help="a checkpoint with seeded random weights (to try "
                                            "the commands without the released weights)")
    init.add_argument("--model", required=True, help="model size (t, s, b+, l or full name)")
    init.add_argument("--out", required=True, help="the .pt file to write")
    init.add_argument("--image-size", type=int, default=1024)
    init.add_argument("--seed", type=int, default=0)
    _add_overwrite(init)

    evaluate = commands.add_parser("evaluate", help="mask AP on a COCO-format dataset")
    evaluate.add_argument("--annotations", required=True,
                          help="COCO-format ground truth with person masks")
    evaluate.add_argument("--images", required=True, help="image folder")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--keypoints", help="keypoint detections (COCO keypoint results format)")
    source.add_argument("--gt-keypoints", action="store_true",
                        help="prompt with the ground-truth keypoints instead")
    _add_model_arguments(evaluate, checkpoint_required=True)
    _add_prompt_arguments(evaluate)
    _add_schema(evaluate)
    _add_import(evaluate)
    evaluate.add_argument("--coco-star", action="store_true",
                          help="COCO*: persons that are small or without keypoints are ignored")
    evaluate.add_argument("--result-score", choices=RESULT_SCORES, default=None,
                          help="score of each mask: detection score x predicted IoU (default), "
                               "the detection score, or the predicted IoU")
    evaluate.add_argument("--crop-to-box", type=float, default=0.0, metavar="FACTOR",
                          help="segment each person on its own crop: its box scaled by FACTOR "
                               "(1.5 in Tab. 7), masks pasted back (default 0: off)")
    evaluate.add_argument("--skip-missing-images", action="store_true",
                          help="score only the images whose photo can be read (default: a "
                               "missing or unreadable photo stops the run before it starts)")
    evaluate.add_argument("--batch-size", type=_batch_size, default=0,
                          help="images per device per step (0, the default: 2 on CPU, 8 on "
                               "accelerators; at most the images there are)")
    evaluate.add_argument("--people-chunk", type=_batch_size, default=0,
                          help="people decoded together (0, the default: 4 on CPU, all on "
                               "accelerators)")
    evaluate.add_argument("--workers", type=int, default=4, help="image-loading threads")
    evaluate.add_argument("--out", required=True, help="COCO segm results JSON to write")
    evaluate.add_argument("--summary", default=None,
                          help="JSON summary (default: <out stem>.summary.json beside --out)")
    _add_overwrite(evaluate, progress=True)
    _add_distributed(evaluate)

    segment = commands.add_parser("segment", help="masks of the people of one photo")
    segment.add_argument("--image", required=True, help="the photo")
    segment.add_argument("--keypoints", required=True,
                         help="JSON: COCO keypoint results, or a list of J [x, y, score] lists "
                              "per person")
    segment.add_argument("--image-id", type=int, default=None,
                         help="the photo's image_id in keypoint results of several images "
                              "(default: the id its file name spells, e.g. 000000000785.jpg)")
    _add_model_arguments(segment, checkpoint_required=False)
    _add_prompt_arguments(segment)
    _add_schema(segment)
    _add_import(segment)
    segment.add_argument("--out", required=True, help="overlay image to write (PNG)")
    segment.add_argument("--masks-out", default=None,
                         help="also write the masks (COCO RLE) and prompts as JSON")
    _add_overwrite(segment, progress=True)

    training = commands.add_parser("train", help="fine-tune with the correction loop")
    training.add_argument("--config", default=None,
                          help="'paper', 'tiny' or a JSON config (default on --resume: the "
                               "workdir's config.json)")
    training.add_argument("--workdir", required=True,
                          help="checkpoints, metrics, profiles and config (a local path, or "
                               "gs://... where the GCS libraries are installed)")
    training.add_argument("--resume", action="store_true",
                          help="continue from the latest checkpoint in --workdir")
    training.add_argument("--resume-step", type=int, default=None, metavar="STEP",
                          help="with --resume: continue from this checkpoint (e.g. the last "
                               "good one when the latest cannot be restored); later ones are "
                               "moved aside, not deleted")
    _add_distributed(training)
    _add_import(training)
    training.add_argument("--no-progress", action="store_true")
    training.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                          help="config overrides, e.g. optim.base_lr=1e-5 "
                               "correction.sampler=mask_refine")

    aot_parser = commands.add_parser("aot", help="compile for a TPU slice or GPUs, here")
    aot_parser.add_argument("--target", required=True,
                            help="a TPU topology (v5e:2x2, v5p:4x4x4, ...) or h100 / h100x8")
    aot_parser.add_argument("--gpu-target", default=None,
                            help="XLA's GPU description (.txtpb), for --target h100[xN]")
    aot_parser.add_argument("--programs", nargs="+", default=[p for p in aot.PROGRAMS
                                                              if p != "predictor"],
                            choices=list(aot.PROGRAMS))
    aot_parser.add_argument("--model", default="b+")
    aot_parser.add_argument("--image-size", type=int, default=1024)
    aot_parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="bfloat16")
    aot_parser.add_argument("--batch", type=int, nargs="+", default=[1, 8],
                            help="images per chip (one compilation each)")
    aot_parser.add_argument("--train-preset", default="paper", choices=("paper", "tiny"))
    aot_parser.add_argument("--top", type=int, default=0,
                            help="TPU: also list the N instructions XLA's cost model prices "
                                 "highest in each program")

    annotate_parser = commands.add_parser(
        "annotate", help="keypoint-only persons -> instance masks (resumable, data parallel)")
    annotate_parser.add_argument("--keypoints", required=True,
                                 help="COCO-format persons with keypoints, or keypoint results "
                                      "(then --image-info)")
    annotate_parser.add_argument("--image-info", default=None,
                                 help="COCO-format file listing the images of keypoint results")
    annotate_parser.add_argument("--images", required=True, help="image folder")
    annotate_parser.add_argument("--out", required=True, help="the annotated file to write")
    _add_model_arguments(annotate_parser, checkpoint_required=False)
    _add_prompt_arguments(annotate_parser)
    _add_schema(annotate_parser)
    annotate_parser.add_argument("--min-iou", type=float, default=0.0,
                                 help="predicted IoU below this: status low_iou (default 0)")
    annotate_parser.add_argument("--overlays", default=None,
                                 help="folder for a sample of drawn images")
    annotate_parser.add_argument("--sample", type=int, default=50,
                                 help="images drawn into --overlays (default 50)")
    annotate_parser.add_argument("--shard-images", type=int, default=256,
                                 help="images per resumable shard (default 256)")
    annotate_parser.add_argument("--batch-size", type=_batch_size, default=0,
                                 help="images per device per step (0, the default: 2 on CPU, 8 "
                                      "on accelerators; at most the images of a shard)")
    annotate_parser.add_argument("--workers", type=int, default=4)
    _add_overwrite(annotate_parser, progress=True)
    _add_distributed(annotate_parser)
    _add_import(annotate_parser)

    curve = commands.add_parser("curve", help="a sampler study: the correction curve (Fig. 2), "
                                              "NoC and NoF of samplers x checkpoints")
    curve.add_argument("--annotations", required=True, help="COCO-format ground truth")
    curve.add_argument("--images", required=True, help="image folder")
    _add_model_arguments(curve, checkpoint_required=True, repeatable=True)
    _add_schema(curve)
    _add_import(curve)
    curve.add_argument("--points", type=int, default=8, help="K: 1 + correction points (8)")
    curve.add_argument("--sampler", action="append", default=None,
                       help="a registered sampler, repeatable (default center: the official "
                            "evaluation mode, deterministic)")
    curve.add_argument("--seeds", type=int, default=1,
                       help="seeds 0 .. N-1 for the samplers that draw at random (default 1)")
    curve.add_argument("--max-images", type=int, default=0, help="0: every image")
    curve.add_argument("--max-people", type=int, default=8, help="persons per image")
    curve.add_argument("--shard-images", type=int, default=16,
                       help="images per kept shard: a killed study resumes from them (16)")
    curve.add_argument("--out", required=True,
                       help="the plot (PNG); PLOT.json and PLOT.md are written beside it")
    _add_overwrite(curve, progress=True)

    prepare = commands.add_parser("prepare", help="evaluation sets in the COCO format, and "
                                                  "training data")
    sets = prepare.add_subparsers(dest="dataset", required=True)
    persons = sets.add_parser("coco-persons", help="Pose2Seg's COCOPersons subset (COCO*)")
    persons.add_argument("source", help="person_keypoints_val2017.json")
    persons.add_argument("out", help="the subset file to write")
    persons.add_argument("--min-area", type=float, default=0.0,
                         help="also drop persons smaller than this (1024: COCO's small ones)")
    _add_overwrite(persons)
    cihp = sets.add_parser("cihp", help="CIHP Human_ids maps -> COCO person masks (RLE)")
    cihp.add_argument("split_dir", help="a CIHP split folder holding Images/ and Human_ids/")
    cihp.add_argument("out", help="the COCO annotation file to write")
    _add_overwrite(cihp)
    train_data = sets.add_parser("train-data", help="the tfds records a training config reads, "
                                                    "prepared once (before a multi-host run)")
    train_data.add_argument("--config", required=True, help="'paper', 'tiny' or a JSON config")
    train_data.add_argument("--workdir", default=None,
                            help="the run's workdir (generated data of data.synthetic_images "
                                 "goes there)")
    _add_import(train_data)
    train_data.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="config overrides, e.g. data.data_dir=/data/tfds")

    compare = commands.add_parser("compare", help="mask AP of evaluation summaries and training "
                                                  "workdirs in one table (Table 1)")
    compare.add_argument("runs", nargs="+", metavar="RUN_OR_SUMMARY",
                         help="a p2s evaluate summary (.summary.json) or a training workdir")
    compare.add_argument("--out", default=None,
                         help="also write the table (Markdown) here, and the held-out AP of "
                              "the workdirs against step as a PNG beside it")
    _add_overwrite(compare)

    export = commands.add_parser("export", help="a training workdir -> official .pt checkpoint")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="the .pt file to write")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    which.add_argument("--best", action="store_true",
                       help="the checkpoint with the best held-out AP (evaluation while "
                            "training, eval.every)")
    export.add_argument("--base", default=None,
                        help="the original .pt whose video-memory tensors the file carries "
                             "(default: the run's init_checkpoint)")
    export.add_argument("--image-only", action="store_true",
                        help="write the image-path tensors alone when no base is known (the "
                             "official strict loader refuses such a file)")
    _add_import(export)
    _add_overwrite(export)
    return parser


def inference_config(args: argparse.Namespace, ground_truth: bool) -> EvalConfig:
    """The inference settings of the command line (`presets.settings_of_flags`)."""
    return settings_of_flags(vars(args), ground_truth, hasattr(args, "gt_keypoints"))
