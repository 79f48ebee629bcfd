"""`evaluation.presets`: the one table of inference presets and its entry point, against the
authors' values written out here from BBoxMaskPose's code (`bmp_v2.yaml`, `_pose2seg`,
`prepare_model`) and the paper (MaxVis_3 for SAM-pose2seg, MaxSpread_6 for SAM 2.1)."""

from __future__ import annotations

import pytest

from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.presets import PRESETS, settings
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.utils.errors import InputError

AUTHORS = dict(visibility_threshold=0.5, confidence_threshold=0.5, no_prompt="empty",
               outside_keypoints="use")


@pytest.mark.parametrize("name, detected, ground_truth", [
    ("sam-pose2seg", ("maxvis", 3), ("maxspread", 3)),
    ("sam2.1", ("maxspread", 6), ("maxspread", 6)),
])
def test_the_paper_presets_are_the_authors_settings(name, detected, ground_truth):
    for kind, (selection, points), score in ((False, detected, "detection"),
                                             (True, ground_truth, "constant")):
        got = settings(name, ground_truth=kind)
        assert got == EvalConfig(
            prompt=PromptConfig(selection=selection, num_points=points, **AUTHORS),
            confidence_score="confidence", exclusive=True, result_score=score,
            postprocess=MaskPostprocess(max_hole_area=10, max_sprinkle_area=50))


def test_the_default_preset_is_the_projects_own():
    assert settings() == settings("default") == EvalConfig()
    assert settings(ground_truth=True) == EvalConfig(prompt=PromptConfig(selection="maxspread"))
    assert set(PRESETS) == {"default", "sam-pose2seg", "sam2.1"}


def test_given_settings_replace_the_presets_in_one_step():
    got = settings("sam-pose2seg", num_points=5, max_hole_area=0, result_score="iou",
                   images_per_device=3)
    base = settings("sam-pose2seg")
    assert got.prompt == PromptConfig(selection="maxvis", num_points=5, **AUTHORS)
    assert got.postprocess == MaskPostprocess(0, base.postprocess.max_sprinkle_area)
    assert (got.result_score, got.images_per_device, got.exclusive) == ("iou", 3, True)
    with pytest.raises(InputError, match="unknown preset 'sam3'"):
        settings("sam3")
    with pytest.raises(InputError, match=r"unknown inference settings \['num_point'\]"):
        settings(num_point=4)
