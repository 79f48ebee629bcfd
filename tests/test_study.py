"""`train.study`: interactive segmentation's metrics against RITM's definition transcribed here,
and a study of several samplers against the separate single-sampler runs (the encoder once per
image), resumed from its kept shards after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.shared import coco_dataset

from p2s_jax.data.coco import load_coco
from p2s_jax.model.configs import get_config
from p2s_jax.model.sam2 import build_model
from p2s_jax.train import study as study_lib
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.curve import CurveConfig, correction_curve
from p2s_jax.train.study_report import table
from p2s_jax.utils.errors import Interrupted


def ritm_noc(all_ious, iou_thr, max_clicks):
    """RITM's `compute_noc_metric` (isegm/inference/utils.py), one threshold, as written there:
    the per-person click counts before their mean."""
    def _get_noc(iou_arr, thr):
        vals = iou_arr >= thr
        return np.argmax(vals) + 1 if np.any(vals) else max_clicks

    return np.array([_get_noc(iou_arr, iou_thr) for iou_arr in all_ious], dtype=int)


TABLES = {  # persons x K IoU after each point
    "reached at once, later, at K, never": np.array([[0.95, 0.96, 0.97, 0.98],
                                                     [0.50, 0.86, 0.91, 0.92],
                                                     [0.10, 0.20, 0.30, 0.90],
                                                     [0.70, 0.80, 0.84, 0.89]]),
    "ties at the threshold and a dip": np.array([[0.85, 0.85, 0.80, 0.90],
                                                 [0.80, 0.79, 0.85, 0.85]]),
    "one point": np.array([[0.9], [0.1]]),
}


@pytest.mark.parametrize("name", TABLES)
def test_metrics_follow_ritms_definition(name):
    iou = TABLES[name]
    persons, points = iou.shape
    metrics = study_lib.run_metrics(iou)
    np.testing.assert_allclose(metrics["miou"], [iou[:, k].mean() for k in range(points)])
    for threshold, key in ((0.80, "80"), (0.85, "85"), (0.90, "90")):
        noc = ritm_noc(iou, threshold, points)
        np.testing.assert_array_equal(study_lib.number_of_clicks(iou, threshold), noc)
        assert metrics["noc"][key] == pytest.approx(noc.mean())
        never = sum(not any(v >= threshold for v in row) for row in iou)  # the definition
        assert metrics["nof"][key] == never
        assert never <= (noc == points).sum()  # RITM's over_max also counts "reached at K"
    empty = study_lib.run_metrics(np.zeros((0, 3)))
    assert empty["miou"] == [None] * 3 and empty["nof"]["90"] == 0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    annotations, images, _ = coco_dataset(root, 3, seed=11)
    model = build_model(get_config("sam2.1_hiera_t", 128), seed=0)
    return {"root": root, "annotations": annotations, "images": images,
            "coco": load_coco(annotations), "model": model}


def _study(small, samplers, runs_dir, monkeypatch=None, seeds=2, shard_images=2):
    config = study_lib.StudyConfig(tuple(samplers), num_points=3, seeds=seeds, max_people=3,
                                   shard_images=shard_images)
    checkpoint = study_lib.Checkpoint("t", "random", lambda: small["model"])
    return study_lib.study([checkpoint], small["coco"], small["annotations"], small["images"],
                           runs_dir, config, progress=False)


def test_a_study_equals_separate_runs_and_encodes_each_image_once(small, tmp_path,
                                                                  monkeypatch):
    calls = []
    encode = study_lib.encode_image
    monkeypatch.setattr(study_lib, "encode_image", lambda *a: calls.append(1) or encode(*a))
    together = _study(small, ["center", "pose_mask_refine"], tmp_path / "both")
    assert len(calls) == 3  # 3 images, one checkpoint: once each, for 3 runs
    assert [(r["sampler"], r["seed"]) for r in together] == [
        ("center", 0), ("pose_mask_refine", 0), ("pose_mask_refine", 1)]  # center: one seed
    apart = (_study(small, ["center"], tmp_path / "center")
             + _study(small, ["pose_mask_refine"], tmp_path / "pmr"))
    for joint, alone in zip(together, apart):
        assert joint["persons"] == alone["persons"] and len(joint["persons"]) > 3
        np.testing.assert_array_equal(joint["iou"], alone["iou"])  # person by person
        assert joint["miou"] == alone["miou"] and joint["noc"] == alone["noc"]
    assert together[1]["iou"] != together[2]["iou"]  # the seeds draw differently
    # the center curve is the one evaluation while training logs (`correction_curve`)
    curve = correction_curve(small["model"], small["coco"], small["images"], CurveConfig(
        CorrectionConfig(num_points=3, sampler="center"), max_people=3))
    np.testing.assert_allclose(together[0]["miou"], curve.mean_iou, rtol=1e-6)
    assert curve.num_persons == len(together[0]["persons"])
    assert "| t | pose_mask_refine | 2 |" in table(together, 3)


def test_an_interrupted_study_keeps_its_shards_and_resumes(small, tmp_path, monkeypatch):
    whole = _study(small, ["center", "mask_refine"], tmp_path / "whole")
    shard, calls = study_lib._shard, []

    def second_is_interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return shard(*args)

    monkeypatch.setattr(study_lib, "_shard", second_is_interrupted)
    with pytest.raises(Interrupted, match=r"1 of 2 shards finished and kept in .*; run the same "
                                          "command again to resume"):
        _study(small, ["center", "mask_refine"], tmp_path / "cut")
    monkeypatch.setattr(study_lib, "_shard", shard)
    assert json.loads((tmp_path / "cut" / "t" / "000000.json").read_text())["images"]
    assert _study(small, ["center", "mask_refine"], tmp_path / "cut") == whole
    with pytest.raises(Exception, match=r"other settings .*seeds 2 -> 3.*--overwrite"):
        _study(small, ["center", "mask_refine"], tmp_path / "cut", seeds=3)
