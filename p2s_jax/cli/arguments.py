"""The `p2s` argument tables and the inference settings they describe."""

from __future__ import annotations

import argparse
import functools

from p2s_jax import aot
from p2s_jax.evaluation.annotate import AnnotateConfig
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.presets import PRESETS, PROMPT_FLAGS, settings_of_flags
from p2s_jax.inference.weights import HUB_WEIGHTS
from p2s_jax.keypoints import available_schemas
from p2s_jax.model.configs import COMPUTE_DTYPES
from p2s_jax.model.layers import ATTENTION_IMPLEMENTATIONS
from p2s_jax.train.study import StudyConfig
from p2s_jax.utils import allocator
from p2s_jax.utils.fields import field_options

PROG = "p2s"


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "inference (SAM-pose2seg, Sec. 3.3 / 4.3); a flag given beside --preset wins")
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="the authors' settings for a model's paper rows (docs/reproduce.md)")
    for flag in PROMPT_FLAGS:
        kind = ({"type": flag.type, "choices": flag.choices} if flag.type
                else {"action": argparse.BooleanOptionalAction})
        group.add_argument(flag.option, default=None, help=flag.help, **kind)


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
    for option, kind, what in (
            ("--coordinator", str, "process 0's address HOST:PORT (or $JAX_COORDINATOR_ADDRESS)"),
            ("--num-processes", int, "how many processes"),
            ("--process-id", int, "this process's index")):
        group.add_argument(option, type=kind, default=None,
                           help=f"with --distributed: {what} (default: detected)")


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


def preparse_imports(argv: list[str]) -> list[str]:
    """The ``--import MODULE`` values of a command line, read before the parser is built (the
    modules register the samplers and schemas that its choices list)."""
    imports = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    imports.add_argument("--import", dest="imports", action="append", default=[])
    return imports.parse_known_args(argv)[0].imports


def _command(commands, name: str, about: str, *shared) -> argparse.ArgumentParser:
    """The parser of command `name` with the option groups `shared` (functions adding them),
    and `--import`, which every command honours (`preparse_imports`)."""
    parser = commands.add_parser(name, help=about)
    for add in shared:
        add(parser)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import MODULE first: one that registers a "
                        "sampler or a keypoint schema of your own (repeatable; importable from "
                        "the working folder or PYTHONPATH)")
    return parser


_with_progress = functools.partial(_add_overwrite, progress=True)
_model = functools.partial(_add_model_arguments, checkpoint_required=False)
_model_required = functools.partial(_add_model_arguments, checkpoint_required=True)
# the options of every command that segments people: evaluate, segment, annotate
_SEGMENTING = (_add_prompt_arguments, _add_schema)
# the options of every command that runs the evaluator: evaluate, annotate
_BATCHING = {"--batch-size": "images_per_device", "--workers": "num_workers"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "SAM-pose2seg in JAX: human instance masks from pose keypoints. Outputs that exist are "
        "refused unless --overwrite; no command writes over its input."))
    parser.add_argument("--malloc", choices=("auto", *allocator.MODES), default="auto",
                        help="host allocator: keep freed memory for reuse ('kept'), glibc's "
                             "default, or 'auto' (kept for evaluate and train)")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = _command(commands, "convert", "official .pt checkpoint -> converted folder",
                       _add_overwrite)
    convert.add_argument("checkpoint", help="official SAM 2.1 / SAM-pose2seg .pt file")
    convert.add_argument("out_dir", help="folder to write (Orbax weights + p2s_model.json)")
    convert.add_argument("--model", default=None, help="model size; default: detected")
    convert.add_argument("--image-size", type=int, default=1024)

    init = _command(commands, "init", "a checkpoint with seeded random weights (to try the "
                    "commands without the released weights)", _add_overwrite)
    init.add_argument("--model", required=True, help="model size (t, s, b+, l or full name)")
    init.add_argument("--out", required=True, help="the .pt file to write")
    init.add_argument("--image-size", type=int, default=1024)
    init.add_argument("--seed", type=int, default=0)

    evaluate = _command(commands, "evaluate", "mask AP on a COCO-format dataset",
                        _model_required, *_SEGMENTING, _with_progress, _add_distributed)
    evaluate.add_argument("--annotations", required=True,
                          help="COCO-format ground truth with person masks")
    evaluate.add_argument("--images", required=True, help="image folder")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--keypoints", help="keypoint detections (COCO keypoint results format)")
    source.add_argument("--gt-keypoints", action="store_true",
                        help="prompt with the ground-truth keypoints instead")
    evaluate.add_argument("--coco-star", action="store_true",
                          help="COCO*: persons that are small or without keypoints are ignored")
    evaluate.add_argument("--skip-missing-images", action="store_true", help="score the photos "
                          "that can be read (default: a missing one stops the run first)")
    for option, keywords in field_options(EvalConfig, {
            "--result-score": "result_score", "--crop-to-box": "crop_to_box",
            "--people-chunk": "people_per_chunk", **_BATCHING}, unset=True):
        evaluate.add_argument(option, **keywords)
    evaluate.add_argument("--out", required=True, help="COCO segm results JSON to write")
    evaluate.add_argument("--summary", default=None,
                          help="JSON summary (default: <out stem>.summary.json beside --out)")

    segment = _command(commands, "segment", "masks of the people of one photo", _model,
                       *_SEGMENTING, _with_progress)
    segment.add_argument("--image", required=True, help="the photo")
    segment.add_argument("--keypoints", required=True,
                         help="JSON: COCO keypoint results, or J [x, y, score] per person")
    segment.add_argument("--image-id", type=int, default=None, help="its image_id among results "
                         "of several photos (default: its file name's, e.g. 000000000785.jpg)")
    segment.add_argument("--out", required=True, help="overlay image to write (PNG)")
    segment.add_argument("--masks-out", default=None,
                         help="also write the masks (COCO RLE) and prompts as JSON")

    training = _command(commands, "train", "fine-tune with the correction loop",
                        _add_distributed)
    training.add_argument("--config", default=None, help="'paper', 'tiny' or a JSON config "
                          "(default on --resume: the workdir's config.json)")
    training.add_argument("--workdir", required=True, help="checkpoints, metrics, profiles, "
                          "config (a path, or gs://... where the GCS libraries are installed)")
    training.add_argument("--resume", action="store_true",
                          help="continue from the latest checkpoint in --workdir")
    training.add_argument("--resume-step", type=int, default=None, metavar="STEP",
                          help="with --resume: continue from this checkpoint (the last good one "
                               "when the latest cannot be restored); later ones moved aside")
    training.add_argument("--no-progress", action="store_true")
    training.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config "
                          "overrides, e.g. optim.base_lr=1e-5 correction.sampler=mask_refine")

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

    annotate_parser = _command(
        commands, "annotate", "keypoint-only persons -> instance masks (resumable, data "
        "parallel)", _model, *_SEGMENTING, _with_progress, _add_distributed)
    annotate_parser.add_argument("--keypoints", required=True,
                                 help="COCO-format persons with keypoints, or keypoint results "
                                      "(then --image-info)")
    annotate_parser.add_argument("--image-info", default=None,
                                 help="COCO-format file listing the images of keypoint results")
    annotate_parser.add_argument("--images", required=True, help="image folder")
    annotate_parser.add_argument("--out", required=True, help="the annotated file to write")
    annotate_parser.add_argument("--overlays", default=None,
                                 help="folder for a sample of drawn images")
    for option, keywords in field_options(AnnotateConfig, {
            "--min-iou": "min_iou", "--sample": "overlay_sample",
            "--shard-images": "shard_images"}) + field_options(EvalConfig, _BATCHING, unset=True):
        annotate_parser.add_argument(option, **keywords)

    curve = _command(commands, "curve", "a sampler study: the correction curve (Fig. 2), NoC "
                     "and NoF of samplers x checkpoints", functools.partial(
                         _add_model_arguments, checkpoint_required=True, repeatable=True),
                     _add_schema, _with_progress)
    curve.add_argument("--annotations", required=True, help="COCO-format ground truth")
    curve.add_argument("--images", required=True, help="image folder")
    curve.add_argument("--sampler", action="append", default=None,
                       help="a registered sampler, repeatable (default center: the official "
                            "evaluation mode, deterministic)")
    for option, keywords in field_options(StudyConfig, {
            "--points": "num_points", "--seeds": "seeds", "--max-images": "max_images",
            "--max-people": "max_people", "--shard-images": "shard_images"}):
        curve.add_argument(option, **keywords)
    curve.add_argument("--out", required=True,
                       help="the plot (PNG); PLOT.json and PLOT.md are written beside it")

    prepare = commands.add_parser("prepare", help="evaluation sets in the COCO format, and "
                                                  "training data")
    sets = prepare.add_subparsers(dest="dataset", required=True)
    persons = _command(sets, "coco-persons", "Pose2Seg's COCOPersons subset (COCO*)",
                       _add_overwrite)
    persons.add_argument("source", help="person_keypoints_val2017.json")
    persons.add_argument("out", help="the subset file to write")
    persons.add_argument("--min-area", type=float, default=0.0,
                         help="also drop persons smaller than this (1024: COCO's small ones)")
    cihp = _command(sets, "cihp", "CIHP Human_ids maps -> COCO person masks (RLE)",
                    _add_overwrite)
    cihp.add_argument("split_dir", help="a CIHP split folder holding Images/ and Human_ids/")
    cihp.add_argument("out", help="the COCO annotation file to write")
    train_data = _command(sets, "train-data", "the tfds records a training config reads, "
                          "prepared once (before a multi-host run)")
    train_data.add_argument("--config", required=True, help="'paper', 'tiny' or a JSON config")
    train_data.add_argument("--workdir", default=None, help="the run's workdir (where "
                            "generated data, data.synthetic_images, goes)")
    train_data.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                            help="config overrides, e.g. data.data_dir=/data/tfds")

    compare = _command(commands, "compare", "mask AP of evaluation summaries and training "
                       "workdirs in one table (Table 1)", _add_overwrite)
    compare.add_argument("runs", nargs="+", metavar="RUN_OR_SUMMARY",
                         help="a p2s evaluate summary (.summary.json) or a training workdir")
    compare.add_argument("--out", default=None,
                         help="also write the table (Markdown) here, and the held-out AP of "
                              "the workdirs against step as a PNG beside it")

    review = _command(commands, "review", "a review page of annotate (or evaluate) output; "
                      "--apply: its decisions -> a curated file", _add_schema, _with_progress)
    review.add_argument("reviewed", metavar="FILE", help="a p2s annotate output, or p2s "
                                                        "evaluate results with --annotations")
    review.add_argument("--images", default=None, help="image folder (for the page)")
    review.add_argument("--annotations", default=None, help="the ground truth of evaluate "
                        "results: the page is an error analysis, IoU with it worst first")
    review.add_argument("--apply", default=None, metavar="DECISIONS",
                        help="the page's decisions.json: write the curated copy to --out")
    review.add_argument("--out", required=True, help="the page's folder (with --apply: the "
                                                     "curated file)")
    review.add_argument("--worst", type=int, default=0, help="only the N worst cards (0: all)")
    review.add_argument("--status", action="append", default=[],
                        help="only the cards of this status (repeatable)")
    review.add_argument("--crop-size", type=int, default=256, help="crop side in pixels (256)")
    review.add_argument("--workers", type=int, default=None,
                        help="processes that draw the crops (default: the cores; 0: none)")

    export = _command(commands, "export", "a training workdir -> official .pt checkpoint",
                      _add_overwrite)
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True, help="the .pt file to write")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    which.add_argument("--best", action="store_true", help="the checkpoint with the best "
                       "held-out AP (evaluation while training, eval.every)")
    export.add_argument("--base", default=None,
                        help="the original .pt whose video-memory tensors the file carries "
                             "(default: the run's init_checkpoint)")
    export.add_argument("--image-only", action="store_true",
                        help="write the image-path tensors alone when no base is known (the "
                             "official strict loader refuses such a file)")
    return parser


def inference_config(args: argparse.Namespace, ground_truth: bool) -> EvalConfig:
    """The inference settings of the command line (`presets.settings_of_flags`)."""
    return settings_of_flags(vars(args), ground_truth, hasattr(args, "gt_keypoints"))
