"""The inference presets: one table of named settings, for detected and for ground-truth poses,
and the one entry point that every command and the Python API take them through.

A preset fixes everything between a pose and a COCO result that the paper's numbers depend on;
each setting is also a field of `EvalConfig` (or of its `PromptConfig` / `MaskPostprocess`) and
a `p2s` flag of its own. `settings(preset, ground_truth, **given)` starts from the preset's
settings for that kind of pose and replaces, in one step, the settings the user gave (a flag
given beside `--preset` wins).

"default" is the project's own: MaxVis_3 on detected poses and MaxSpread_3 on ground-truth poses
(binary visibility cannot rank, Tab. 3), keypoints outside the photo dropped, no post-processing,
masks scored by detection score x predicted IoU (`config.DEFAULT_RESULT_SCORE`).

"sam-pose2seg" is BBoxMaskPose's inference (`bboxmaskpose/configs/bmp_v2.yaml`, `_pose2seg`,
`prepare_model`), read from their code:
  * MaxVis_3 on ProbPose visibility; a person is prompted only if some keypoint has confidence
    (the s of [x, y, s]) > 0.5 and visibility > 0.5; one who is not gets the empty prompt of
    their single-image mode (`no_prompt="empty"`); no negatives, no box, no crop.
  * Keypoints outside the photo are prompted as given (`outside_keypoints="use"`): their code
    gates and ranks by the scores only, and the official predictor does not clip points.
  * `SAM2ImagePredictor(max_hole_area=10, max_sprinkle_area=50)`, `multimask_output=False`
    (the decoder's stability fallback on, as in the official predictor).
  * Exclusive masks on.
  * Ground-truth poses: MaxSpread_3 (Tab. 3: binary visibility cannot rank), same gates.
"sam2.1" is the same pipeline for the base model's rows: MaxSpread_6 (Fig. 3, Tab. 2).

The result score is not in the authors' code (it has no AP evaluation) nor in the paper. Both
paper presets score a mask with its pose's instance score ("detection"): in BBoxMaskPose the
mask is attached to the pose instance, whose score is what a COCO results file carries; with
ground-truth poses every mask scores 1.0 ("constant"), Pose2Seg's protocol (Tabs. 2-3).
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable, Mapping
from typing import Any

from p2s_jax.data.poses import SCORE_NAMES
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.utils.errors import InputError

_AUTHORS_PROMPT = dict(visibility_threshold=0.5, confidence_threshold=0.5, no_prompt="empty",
                       outside_keypoints="use")
_AUTHORS = dict(confidence_score="confidence", exclusive=True,
                postprocess=MaskPostprocess(max_hole_area=10.0, max_sprinkle_area=50.0))


def _paper(selection: str, num_points: int, ground_truth_selection: str) -> dict:
    return {
        "detected": EvalConfig(prompt=PromptConfig(selection, num_points, **_AUTHORS_PROMPT),
                               result_score="detection", **_AUTHORS),
        "ground_truth": EvalConfig(prompt=PromptConfig(ground_truth_selection, num_points,
                                                       **_AUTHORS_PROMPT),
                                   result_score="constant", **_AUTHORS)}


# name -> {"detected": settings, "ground_truth": settings}
PRESETS = {
    "default": {"detected": EvalConfig(),
                "ground_truth": EvalConfig(prompt=PromptConfig(selection="maxspread"))},
    "sam-pose2seg": _paper("maxvis", 3, "maxspread"),
    "sam2.1": _paper("maxspread", 6, "maxspread"),
}

_PROMPT_FIELDS = {f.name for f in dataclasses.fields(PromptConfig)}
_POSTPROCESS_FIELDS = {f.name for f in dataclasses.fields(MaskPostprocess)}
_EVAL_FIELDS = {f.name for f in dataclasses.fields(EvalConfig)}


def settings(preset: str | None = None, ground_truth: bool = False, **given) -> EvalConfig:
    """The settings of `preset` (None: "default") for detected or ground-truth poses, with the
    settings in `given` replaced: `EvalConfig` fields (a whole ``prompt`` or ``postprocess``
    too), and `PromptConfig` and `MaskPostprocess` fields by their own names (``num_points=4``,
    ``max_hole_area=10``), which apply last.

    Raises:
      InputError: an unknown preset or setting.
    """
    name = preset or "default"
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    unknown = sorted(set(given) - _PROMPT_FIELDS - _POSTPROCESS_FIELDS - _EVAL_FIELDS)
    if unknown:
        raise InputError(f"unknown inference settings {unknown}")
    pick = lambda fields: {k: v for k, v in given.items() if k in fields}  # noqa: E731
    base = dataclasses.replace(PRESETS[name]["ground_truth" if ground_truth else "detected"],
                               **pick(_EVAL_FIELDS))
    return dataclasses.replace(
        base, prompt=dataclasses.replace(base.prompt, **pick(_PROMPT_FIELDS)),
        postprocess=dataclasses.replace(base.postprocess, **pick(_POSTPROCESS_FIELDS)))


def _percentile(value: str) -> float | str:
    return "none" if value.lower() == "none" else float(value)


@dataclasses.dataclass(frozen=True)
class Flag:
    """A `p2s` option that gives one inference setting (its default is the preset's).

    Attributes:
      option: the option, e.g. "--num-points" (its argparse dest: "num_points").
      setting: the `settings` keyword it gives; "" for `--box`, which gives two
        (`settings_of_flags`).
      help: what it sets, with the "default" preset's value.
      choices: the values it takes, or None for any value of `type`.
      type: the value's type (str -> value), or None for a switch (`--x` / `--no-x`).
    """

    option: str
    setting: str
    help: str
    choices: tuple[str, ...] | None = None
    type: Callable[[str], Any] | None = str

    @property
    def dest(self) -> str:
        return self.option[2:].replace("-", "_")


# The prompt and mask flags of every command that segments (evaluate, segment, annotate).
PROMPT_FLAGS = (
    Flag("--selection", "selection", "keypoint selection (default: maxvis for detected "
         "keypoints, maxspread for ground-truth keypoints)", ("maxvis", "maxspread")),
    Flag("--num-points", "num_points", "positive keypoints per person (default 3)", type=int),
    Flag("--score-type", "keypoint_score", "visibility channel: ranks MaxVis, filters "
         "keypoints (default: visibility; confidence is the s of each [x, y, s])", SCORE_NAMES),
    Flag("--confidence-score", "confidence_score", "confidence channel: the prompt gate and "
         "MaxSpread's ranking (default: the --score-type channel; 'confidence' in the presets)",
         SCORE_NAMES),
    Flag("--threshold", "visibility_threshold", "a keypoint is visible when its score is >= "
         "this (default 0.5)", type=float),
    Flag("--no-prompt", "no_prompt", "a person without a gated keypoint: its best keypoint "
         "(default), the empty prompt (the authors) or no mask",
         ("best_keypoint", "empty", "skip")),
    Flag("--outside-keypoints", "outside_keypoints", "keypoints outside the photo: prompted as "
         "given (use: the authors and both presets) or never used (drop: the default without "
         "a preset, as such a point marks no pixel SAM sees)", ("use", "drop")),
    Flag("--spread-percentile", "spread_percentile", "MaxSpread's percentile rule, or 'none' "
         "(default 80)", type=_percentile),
    Flag("--negatives", "negatives", "negative points (default none)",
         ("none", "closest_other", "least_visible_own")),
    Flag("--num-negatives", "num_negatives", "negative points per person (default 1)",
         type=int),
    Flag("--box", "", "box prompt: the pose's own bbox (given), scaled about its centre "
         "(inflated), or the box of the ground-truth person matched by OKS (gt, inflated-gt; "
         "evaluate only) (default none)", ("none", "given", "inflated", "gt", "inflated-gt")),
    Flag("--box-inflation", "box_inflation", "side-length factor of --box inflated (default "
         "2.0)", type=float),
    Flag("--exclusive", "exclusive", "each pixel goes to the covering mask with the highest "
         "predicted IoU", type=None),
    Flag("--max-hole-area", "max_hole_area", "fill background regions of the low-res mask up "
         "to this area", type=float),
    Flag("--max-sprinkle-area", "max_sprinkle_area", "remove foreground regions of the "
         "low-res mask up to this area", type=float),
)

# The `EvalConfig` fields that commands take as options of the same dest (`--batch-size`:
# images_per_device), each defined by the commands that take it.
RUN_FIELDS = ("result_score", "crop_to_box", "images_per_device", "people_per_chunk",
              "num_workers")


def settings_of_flags(values: Mapping[str, Any], ground_truth: bool,
                      with_ground_truth: bool = False) -> EvalConfig:
    """The settings a `p2s` command line gives: its `--preset` (None: "default") with every
    inference flag that was given (not None; `--spread-percentile none` turns the rule off)
    replaced in one step (`settings`). `with_ground_truth`: the command has the ground truth
    that `--box gt` / `inflated-gt` take their boxes from (`p2s evaluate`)."""
    flags = {**{flag.dest: flag.setting for flag in PROMPT_FLAGS if flag.setting},
             **{name: name for name in RUN_FIELDS}}
    given = {setting: values[dest] for dest, setting in flags.items()
             if values.get(dest) is not None}
    if given.get("spread_percentile") == "none":
        given["spread_percentile"] = None
    box = values.get("box")
    if box is not None:
        mode, _, gt_box = box.partition("-") if box != "gt" else ("given", "", "gt")
        if gt_box and not with_ground_truth:
            raise InputError(f"--box {box} needs the ground truth: use it with p2s evaluate")
        given.update(box=mode, box_source="gt" if gt_box else "detection")
    return settings(values.get("preset"), ground_truth, **given)
