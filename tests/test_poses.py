"""`data.poses`: pose instances, the one rule that picks a run's score channels, and the checks
of the arrays a run feeds the device."""

from __future__ import annotations

import numpy as np
import pytest

from p2s_jax.data.poses import (PoseInstances, ScoreChannels, check_pose_arrays, pose_arrays,
                                resolve_channels)
from p2s_jax.utils.errors import InputError


def _poses(names, people=2, joints=17, boxes=False):
    return PoseInstances(np.zeros((people, joints, 2)),
                         {n: np.full((people, joints), 0.5) for n in names},
                         boxes=np.zeros((people, 4)) if boxes else None)


def test_pose_instances_validation():
    with pytest.raises(ValueError, match=r"keypoints must have shape \(P, J, 2\)"):
        PoseInstances(np.zeros((2, 16, 3)), {})
    assert PoseInstances(np.zeros((2, 14, 2)), {"visibility": np.ones((2, 14))}).keypoints.shape \
        == (2, 14, 2)  # any schema
    with pytest.raises(ValueError, match=r"scores\['visibility'\] must have shape \(2, 17\)"):
        PoseInstances(np.zeros((2, 17, 2)), {"visibility": np.zeros((2, 16))})
    with pytest.raises(ValueError, match="unknown keypoint score 'vis'"):
        PoseInstances(np.zeros((2, 17, 2)), {"vis": np.zeros((2, 17))})
    with pytest.raises(ValueError, match=r"boxes must have shape \(2, 4\)"):
        PoseInstances(np.zeros((2, 17, 2)), {}, boxes=np.zeros((2, 5)))
    poses = PoseInstances(np.arange(3 * 17 * 2).reshape(3, 17, 2), {"presence": np.ones((3, 17))},
                          det_score=[0.1, 0.9, 0.5])
    picked = poses.select(poses.det_score > 0.3)
    assert len(picked) == 2 and picked.keypoints[0, 0, 0] == 34
    np.testing.assert_array_equal(PoseInstances(np.zeros((1, 17, 2)), {}).det_score, [1.0])


@pytest.mark.parametrize("carried, visibility, confidence, expected", [
    (("visibility", "confidence"), None, None, ("visibility", "visibility")),  # ProbPose, GT
    (("confidence",), None, None, ("confidence", "confidence")),  # plain keypoint results
    (("visibility", "confidence"), None, "confidence", ("visibility", "confidence")),  # preset
    (("presence", "confidence", "visibility"), "presence", None, ("presence", "presence")),
])
def test_one_rule_picks_the_channels(carried, visibility, confidence, expected):
    """Against the rule written out: visibility where carried, else confidence; the confidence
    channel defaults to the visibility channel; named channels are kept."""
    many = {1: _poses(carried), 2: _poses(carried, people=0)}
    assert resolve_channels(many.values(), visibility, confidence) == ScoreChannels(*expected)
    assert resolve_channels(_poses(carried), visibility, confidence) == ScoreChannels(*expected)


def test_a_channel_the_poses_lack_names_the_file_and_the_option():
    with pytest.raises(InputError, match=r"r\.json: the poses carry no 'presence' keypoint scores "
                                         r"\(they have \['confidence'\]\); choose another "
                                         "--score-type"):
        resolve_channels(_poses(["confidence"]), "presence", source="r.json")
    with pytest.raises(InputError, match="choose another --confidence-score"):
        resolve_channels(_poses(["visibility"]), None, "confidence", source="r.json")


def test_pose_arrays_pick_the_channels_and_need_boxes_for_box_prompts():
    poses = PoseInstances(np.zeros((2, 17, 2)), {"visibility": np.full((2, 17), 0.25),
                                                 "confidence": np.full((2, 17), 0.75)})
    arrays = pose_arrays(poses, ScoreChannels("visibility", "confidence"))
    assert (arrays.scores == 0.25).all() and (arrays.confidence == 0.75).all()
    with pytest.raises(InputError, match=r"image 3: box prompts \('given'\) need person boxes"):
        pose_arrays(poses, ScoreChannels("visibility", "visibility"), "given", "image 3")
    assert pose_arrays(_poses(["confidence"], boxes=True), ScoreChannels(
        "confidence", "confidence"), "given").boxes.shape == (2, 4)


def test_check_pose_arrays():
    keypoints = np.full((3, 17, 2), np.nan, np.float32)
    scores = np.zeros((3, 17), np.float32)
    check_pose_arrays(keypoints, scores, "image 7")  # NaN coordinates are fine
    scores[2, 4] = np.nan
    with pytest.raises(ValueError, match=r"image 42: person index 2"):
        check_pose_arrays(keypoints, scores, "image 42")
    check_pose_arrays(keypoints[:, :14], np.zeros((3, 14)), "image 5")  # another schema
    with pytest.raises(ValueError, match=r"image 5:.*\(3, 16, 3\)"):
        check_pose_arrays(np.zeros((3, 16, 3)), scores[:, :16], "image 5")
    with pytest.raises(ValueError, match=r"image 5:.*\(3, 16\).*\(3, 17, 2\)"):
        check_pose_arrays(keypoints, scores[:, :16], "image 5")
    with pytest.raises(ValueError, match=r"boxes.*\(3, 4\)"):
        check_pose_arrays(keypoints, np.zeros_like(scores), "image 5", boxes=np.zeros((2, 4)))
