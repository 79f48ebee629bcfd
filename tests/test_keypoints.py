"""Keypoint schemas: names as published files write them, flips, and prompting on every schema
against the NumPy reference of tests/support/prompts.py."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from p2s_jax.data.augment import hflip
from p2s_jax.inference.prompting import PromptConfig, select_prompts
from p2s_jax.keypoints import (COCO17, CROWDPOSE14, KeypointSchema, available_schemas,
                               get_schema, normalize_name, register_schema, schema_for_count,
                               schema_for_names)
from p2s_jax.utils.errors import InputError
from support.prompts import reference_prompts

SCHEMAS = [get_schema(n) for n in ("coco17", "crowdpose14", "aic14", "mpii16", "halpe26")]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.name)
def test_flip_pairs_map_left_to_right_and_back(schema):
    perm = np.asarray(schema.flip_permutation)
    np.testing.assert_array_equal(perm[perm], np.arange(schema.num_keypoints))  # an involution
    names = schema.keypoint_names
    for j, k in enumerate(perm):
        if names[j].startswith("left_"):
            assert names[k] == "right_" + names[j][len("left_"):]
        elif names[j].startswith("right_"):
            assert names[k] == "left_" + names[j][len("right_"):]
        else:
            assert k == j  # nose, head, neck, pelvis ... stay
    assert len(schema.flip_pairs) == sum(n.startswith("left_") for n in names) > 0
    assert all(0 <= a < schema.num_keypoints and 0 <= b < schema.num_keypoints
               for a, b in schema.skeleton)


def test_names_as_published_files_write_them():
    # CrowdPose's file, AI Challenger's in mmpose's COCO format, a title-cased COCO
    crowdpose = ["left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
                 "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
                 "left_ankle", "right_ankle", "head", "neck"]
    assert schema_for_names(crowdpose) is CROWDPOSE14
    assert schema_for_names([n.replace("_", " ").title() for n in COCO17.keypoint_names]) \
        is COCO17
    assert schema_for_names(["r ankle", "R-Knee", "r_hip", "l_hip", "l knee", "L_Ankle",
                             "pelvis", "thorax", "upper neck", "head top", "r wrist",
                             "r elbow", "r shoulder", "l shoulder", "l elbow", "l wrist"]).name \
        == "mpii16"
    assert normalize_name("Right  Shoulder") == "right_shoulder"
    with pytest.raises(InputError, match=r"fit no known schema \(closest: crowdpose14, which "
                                         r"has no \['top_of_head'\]\)"):
        schema_for_names(crowdpose[:12] + ["top of head", "neck"])
    with pytest.raises(InputError, match="fit several schemas"):
        schema_for_count(14)
    assert schema_for_count(26).name == "halpe26"


def test_register_a_schema(monkeypatch):
    from p2s_jax import keypoints

    monkeypatch.setattr(keypoints, "_SCHEMAS", dict(keypoints._SCHEMAS))
    mine = register_schema(KeypointSchema("hands2", ("left_hand", "right_hand"), ((0, 1),)))
    assert schema_for_names(["Left Hand", "Right Hand"]) is mine and "hands2" in available_schemas()
    assert mine.flip_permutation == (1, 0) and mine.face == ()
    with pytest.raises(InputError, match="already registered"):
        register_schema(mine)
    with pytest.raises(InputError, match="'left_foot' has no mirrored keypoint"):
        KeypointSchema("bad", ("left_foot", "nose"), ())


def test_flipped_crowdpose_person_keeps_its_body_parts():
    """A CrowdPose-14 person flipped: each slot still names the body part under it."""
    rng = np.random.default_rng(0)
    height, width = 40, 60
    image = rng.integers(0, 255, (height, width, 3), np.uint8)
    masks = np.zeros((1, height, width), bool)
    keypoints = rng.uniform([0, 0], [width - 1, height - 1], (1, 14, 2))
    visibility = rng.uniform(0.1, 1.0, (1, 14))
    _, _, flipped, flipped_vis = hflip(image, masks, keypoints, visibility,
                                       CROWDPOSE14.flip_permutation)
    names = CROWDPOSE14.keypoint_names
    for j, name in enumerate(names):
        mirrored = name.replace("left_", "#").replace("right_", "left_").replace("#", "right_")
        source = names.index(mirrored)  # the flipped pose's 'left_wrist' was the 'right_wrist'
        np.testing.assert_allclose(flipped[0, j], [width - 1 - keypoints[0, source, 0],
                                                   keypoints[0, source, 1]])
        assert flipped_vis[0, j] == visibility[0, source]
    with pytest.raises(ValueError, match="flip permutation of 17 keypoints for poses of 14"):
        hflip(image, masks, keypoints, visibility)


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.name)
@pytest.mark.parametrize("selection", ["maxvis", "maxspread"])
def test_prompting_on_every_schema_matches_the_reference(schema, selection):
    """The face rule follows the schema's face group (none without eyes)."""
    rng = np.random.default_rng(len(schema.keypoint_names))
    cfg = PromptConfig(selection=selection, num_points=4, face=schema.face)
    select = jax.jit(select_prompts, static_argnames="config")
    joints, height, width = schema.num_keypoints, 120, 160
    for _ in range(6):
        keypoints = rng.uniform([-10, -10], [width + 10, height + 10], (5, joints, 2))
        keypoints[rng.random((5, joints)) < 0.05] = np.nan
        scores = rng.uniform(0, 1, (5, joints)) ** rng.uniform(0.3, 3, (5, 1))
        keypoints, scores = keypoints.astype(np.float32), scores.astype(np.float32)
        prompts = select(keypoints, scores, (height, width), cfg)
        expected = reference_prompts(keypoints, scores, (height, width), cfg)
        for p, (coords, labels) in enumerate(expected):
            k = len(labels)
            np.testing.assert_array_equal(np.asarray(prompts.labels[p, :k]), labels)
            np.testing.assert_allclose(np.asarray(prompts.coords[p, :k]), coords, atol=1e-4)
    with pytest.raises(InputError, match="do not fit poses of"):
        select(np.zeros((1, joints, 2)), np.zeros((1, joints)), (10, 10),
               dataclasses.replace(cfg, num_points=joints + 1))
