"""Named inference settings: the authors' protocol for SAM-pose2seg and for base SAM 2.1.

A preset fixes everything between a pose and a COCO result that the paper's numbers depend on;
each setting is also a field of `p2s_jax.evaluation.EvalConfig` and a `p2s` flag of its own, and
a flag given beside `--preset` wins.

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
presets score a mask with its pose's instance score ("detection"): in BBoxMaskPose the mask is
attached to the pose instance, whose score is what a COCO results file carries; with ground-truth
poses every score is 1.0, Pose2Seg's protocol (Tabs. 2-3's comparison).
"""

from __future__ import annotations

import dataclasses

from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class Preset:
    """Inference settings of one model's paper rows.

    Attributes:
      prompt: prompts from detected poses.
      ground_truth_prompt: prompts from ground-truth poses.
      keypoint_score: the visibility channel (ranks MaxVis, filters candidates); None: the
        poses' 'visibility' when they carry it, else their 'confidence'.
      confidence_score: the confidence channel (the gate, MaxSpread's ranking).
      postprocess: holes / sprinkles on the low-res logits.
      exclusive: each pixel to the covering mask with the highest predicted IoU.
      result_score: the COCO result score ('detection', 'iou', 'product', 'constant').
    """

    prompt: PromptConfig
    ground_truth_prompt: PromptConfig
    keypoint_score: str | None = None
    confidence_score: str | None = "confidence"
    postprocess: MaskPostprocess = MaskPostprocess.authors()
    exclusive: bool = True
    result_score: str = "detection"


_AUTHORS_PROMPT = dict(visibility_threshold=0.5, confidence_threshold=0.5, no_prompt="empty",
                       outside_keypoints="use")

PRESETS = {
    "sam-pose2seg": Preset(
        prompt=PromptConfig(selection="maxvis", num_points=3, **_AUTHORS_PROMPT),
        ground_truth_prompt=PromptConfig(selection="maxspread", num_points=3, **_AUTHORS_PROMPT)),
    "sam2.1": Preset(
        prompt=PromptConfig(selection="maxspread", num_points=6, **_AUTHORS_PROMPT),
        ground_truth_prompt=PromptConfig(selection="maxspread", num_points=6, **_AUTHORS_PROMPT)),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
