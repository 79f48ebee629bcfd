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

from collections.abc import Mapping
from typing import Any

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


# `p2s` option (argparse dest) -> the setting it gives; `--box` is read on its own (a box mode
# and, for `gt` / `inflated-gt`, the box source).
FLAGS = {"selection": "selection", "num_points": "num_points",
         "threshold": "visibility_threshold", "no_prompt": "no_prompt",
         "outside_keypoints": "outside_keypoints", "spread_percentile": "spread_percentile",
         "negatives": "negatives", "num_negatives": "num_negatives",
         "box_inflation": "box_inflation", "max_hole_area": "max_hole_area",
         "max_sprinkle_area": "max_sprinkle_area", "score_type": "keypoint_score",
         "confidence_score": "confidence_score", "exclusive": "exclusive",
         "result_score": "result_score", "crop_to_box": "crop_to_box",
         "batch_size": "images_per_device", "people_chunk": "people_per_chunk",
         "workers": "num_workers"}


def settings_of_flags(values: Mapping[str, Any], ground_truth: bool,
                      with_ground_truth: bool = False) -> EvalConfig:
    """The settings a `p2s` command line gives: its `--preset` (None: "default") with every
    inference flag that was given (not None; `--spread-percentile none` turns the rule off)
    replaced in one step (`settings`). `with_ground_truth`: the command has the ground truth
    that `--box gt` / `inflated-gt` take their boxes from (`p2s evaluate`)."""
    given = {setting: values[flag] for flag, setting in FLAGS.items()
             if values.get(flag) is not None}
    if given.get("spread_percentile") == "none":
        given["spread_percentile"] = None
    box = values.get("box")
    if box is not None:
        mode, _, gt_box = box.partition("-") if box != "gt" else ("given", "", "gt")
        if gt_box and not with_ground_truth:
            raise InputError(f"--box {box} needs the ground truth: use it with p2s evaluate")
        given.update(box=mode, box_source="gt" if gt_box else "detection")
    return settings(values.get("preset"), ground_truth, **given)
