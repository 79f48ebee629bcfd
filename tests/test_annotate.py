"""`p2s annotate` end to end on a generated keypoint-only dataset in CrowdPose-14 layout: each
person's mask against the official predictor with the same prompts, resumption after SIGKILL
(byte-identical output), 4 devices against 1, and training one `tiny` step on the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support import reference
from support.shared import model_pair
from support.skeletons import as_crowdpose
from p2s_jax import cli
from p2s_jax.evaluation.annotate import AnnotateConfig, AnnotationInput, annotate
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.keypoints import CROWDPOSE14
from p2s_jax.parallel import make_mesh
from p2s_jax.utils.images import load_image
from weights_conversion import save_orbax

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")
MODEL, SIZE = "sam2.1_hiera_t", 256
REPO = Path(__file__).resolve().parents[1]


def crowdpose_layout(root: Path, num_images: int = 6) -> tuple[Path, Path]:
    """Generated persons (scikit-image photos) as CrowdPose-14 keypoints without masks, the
    names title-cased as some published files write them. -> (keypoint file, image folder)."""
    from p2s_jax.data.synthetic import make_coco_dataset

    annotations, images = make_coco_dataset(root, num_images, (2, 3), seed=5,
                                            image_size=(200, 260))
    data = as_crowdpose(json.loads(Path(annotations).read_text()), title_case=True)
    for ann in data["annotations"]:
        for key in ("segmentation", "area", "bbox"):
            ann.pop(key)
        ann["source_note"] = f"kept {ann['id']}"  # an input field the output must keep
    path = root / "crowdpose_like.json"
    path.write_text(json.dumps(data))
    return path, Path(images)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate")
    keypoints, images = crowdpose_layout(root)
    official, ours = model_pair(MODEL, SIZE)
    folder = root / "converted"
    save_orbax(ours, folder)
    return {"root": root, "keypoints": keypoints, "images": images, "official": official,
            "ours": ours, "checkpoint": folder}


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup["root"] / "one" / "annotated.json"
    config = AnnotateConfig(EvalConfig(), PromptConfig(selection="maxspread"), shard_images=2,
                            overlay_sample=2)  # what `p2s annotate` runs without a preset
    summary = annotate(setup["ours"], AnnotationInput(setup["keypoints"], config=config),
                       setup["images"], out, config, checkpoint=str(setup["checkpoint"]),
                       overlays=out.parent / "overlays",
                       mesh=make_mesh(jax.devices()[:1]), progress=False)
    return out, summary


def test_masks_equal_the_official_predictor_with_the_same_prompts(setup, uninterrupted):
    out, summary = uninterrupted
    data = json.loads(out.read_text())
    source = json.loads(setup["keypoints"].read_text())
    assert [a["id"] for a in data["annotations"]] == [a["id"] for a in source["annotations"]]
    assert summary["schema"] == "crowdpose14" and summary["persons"] == len(data["annotations"])
    assert sum(summary["status"].values()) == summary["persons"] >= 12
    predictor = reference.official_predictor(setup["official"])
    images = {im["id"]: im for im in data["images"]}
    checked = 0
    for ann, original in zip(data["annotations"], source["annotations"]):
        assert ann["source_note"] == original["source_note"]
        assert ann["keypoints"] == original["keypoints"]  # every input field kept
        p2s = ann["p2s"]
        if p2s["status"] == "no_prompt":
            continue
        prompt = np.asarray(p2s["prompt"], np.float32)
        assert prompt.shape[1] == 3 and len(prompt) == 3  # 3 points
        # the prompts are this person's own keypoints
        triplets = np.asarray(original["keypoints"], np.float32).reshape(14, 3)
        for x, y, label in prompt:
            assert label == 1 and np.abs(triplets[:, :2] - [x, y]).sum(1).min() < 0.01
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        assert ann["area"] == mask.sum() and ann["p2s"]["predicted_iou"] > 0
        np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(ann["segmentation"]),
                                   atol=0.01)
        predictor.set_image(load_image(setup["images"] / images[ann["image_id"]]["file_name"]))
        logits, iou, _ = predictor.predict(point_coords=prompt[:, :2],
                                           point_labels=prompt[:, 2].astype(np.int32),
                                           multimask_output=False, return_logits=True)
        differ = mask != (logits[0] > 0)
        assert differ.mean() < 1e-3
        assert np.all(np.abs(logits[0][differ]) < 1e-3 * np.abs(logits[0]).max())
        assert p2s["predicted_iou"] == pytest.approx(float(iou[0]), abs=1e-4)
        checked += 1
    assert checked >= 10
    overlays = sorted((out.parent / "overlays").glob("*.png"))
    assert len(overlays) == 2 and overlays[0].stat().st_size > 1000


def _annotate_args(setup, out: Path) -> list[str]:
    return ["annotate", "--keypoints", str(setup["keypoints"]), "--images", str(setup["images"]),
            "--out", str(out), "--checkpoint", str(setup["checkpoint"]), "--shard-images", "2",
            "--overlays", str(out.parent / "overlays"), "--sample", "2", "--no-progress"]


def _on_four_devices(args) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "p2s_jax.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_a_complete_run_on_four_devices_equals_one_device(setup, uninterrupted):
    """Every shard computed on 4 devices: the output bytes equal the 1-device run's."""
    out = setup["root"] / "four" / "annotated.json"
    proc = _on_four_devices(_annotate_args(setup, out))
    log = proc.communicate(timeout=600)[0].decode()
    assert proc.returncode == 0 and "4 device(s)" in log, log[-3000:]
    assert out.read_bytes() == uninterrupted[0].read_bytes()


def test_host_work_in_threads_writes_the_same_bytes(setup, uninterrupted):
    """The host's work in threads of this process instead of worker processes (the default,
    `EvalConfig.host_workers`): the annotated file has the same bytes."""
    out = setup["root"] / "threads" / "annotated.json"
    config = AnnotateConfig(EvalConfig(host_workers="threads", num_workers=2),
                            PromptConfig(selection="maxspread"), shard_images=2)
    annotate(setup["ours"], AnnotationInput(setup["keypoints"], config=config), setup["images"],
             out, config, checkpoint=str(setup["checkpoint"]),
             mesh=make_mesh(jax.devices()[:1]), progress=False)
    assert out.read_bytes() == uninterrupted[0].read_bytes()


def test_resume_after_sigkill_on_four_devices_is_byte_identical(setup, uninterrupted):
    """A 4-device run killed with SIGKILL between shards, then resumed on 1 device: the output
    bytes equal the uninterrupted 1-device run's."""
    out = setup["root"] / "killed" / "annotated.json"
    args = _annotate_args(setup, out)
    proc = _on_four_devices(args)
    shards = out.with_name(out.name + ".shards")
    deadline = time.time() + 300
    while not (shards / "000000.json").exists() and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = proc.stdout.read().decode()
    assert "4 device(s)" in log, log
    done = sorted(p.name for p in shards.glob("0*.json"))
    assert done and len(done) < 3 and not out.exists(), (done, log)  # killed mid-run
    assert cli.main(args) == 0
    assert out.read_bytes() == uninterrupted[0].read_bytes()


def test_settings_mismatch_and_bad_input_are_named(setup, uninterrupted, tmp_path, capsys):
    """The shards of a run with other settings are named by the option that differs, and
    replaced with --overwrite."""
    import shutil

    from p2s_jax.evaluation.annotate import shard_dir

    out = tmp_path / "run" / "annotated.json"
    shutil.copytree(shard_dir(uninterrupted[0]), shard_dir(out))  # a run of --shard-images 2
    args = ["annotate", "--keypoints", str(setup["keypoints"]), "--images",
            str(setup["images"]), "--out", str(out), "--checkpoint", str(setup["checkpoint"]),
            "--shard-images", "3", "--sample", "2", "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds the shards of a run with other settings (--shard-images 2 -> 3): pass " \
           "--overwrite to replace them" in err
    shutil.copy(uninterrupted[0], out)  # and its finished output
    assert cli.main(args + ["--overwrite"]) == 0
    assert json.loads((shard_dir(out) / "settings.json").read_text())["config"][
        "shard_images"] == 3
    assert sorted(p.name for p in shard_dir(out).iterdir()) == [
        "000000.json", "000001.json", "settings.json"]  # 6 images in shards of 3
    old = json.loads(uninterrupted[0].read_text())["annotations"]
    new = json.loads(out.read_text())["annotations"]
    assert [(a["id"], a["p2s"]["status"]) for a in new] == [
        (a["id"], a["p2s"]["status"]) for a in old]
    args += ["--overwrite"]
    bad = json.loads(setup["keypoints"].read_text())
    del bad["annotations"][4]["keypoints"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    args[args.index("--keypoints") + 1], args[args.index("--out") + 1] = str(path), str(
        tmp_path / "x.json")
    assert cli.main(args) == 2
    assert "annotations[4]" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------ closing the loop


def test_annotated_file_is_training_data(setup, uninterrupted, tmp_path):
    """The annotated CrowdPose file as a training source: the kept statuses only, masks from
    `segmentation`, 14 keypoints from the same annotation, flipped with CrowdPose's pairs."""
    from p2s_jax.data.augment import AugmentConfig
    from p2s_jax.data.builder import PersonSegmentationConfig, load_source, prepare
    from p2s_jax.data.loader import TrainLoader

    out = uninterrupted[0]
    data = json.loads(out.read_text())
    statuses = ("ok", "low_iou", "empty_mask")
    kept = [a for a in data["annotations"] if a["p2s"]["status"] in statuses]
    config = PersonSegmentationConfig(name="annotated", annotations=str(out),
                                      images=str(setup["images"]), statuses=statuses,
                                      schema="crowdpose14")
    prepare("/", tmp_path / "tfds", config)
    source = load_source(tmp_path / "tfds", "annotated")
    assert source.schema == "crowdpose14"
    records = [source[i] for i in range(len(source))]
    assert sorted(int(i) for r in records for i in r["annotation_id"]) == sorted(
        a["id"] for a in kept)
    by_id = {a["id"]: a for a in kept}
    for record in records:
        for j, ann_id in enumerate(record["annotation_id"]):
            ann = by_id[int(ann_id)]
            assert record["rle"][j].decode() == ann["segmentation"]["counts"]
            triplets = np.asarray(ann["keypoints"], np.float32).reshape(14, 3)
            np.testing.assert_array_equal(record["visibility"][j], triplets[:, 2] > 0)
    still = dict(degrees=0.0, shear=0.0, jitter=(0.0, 0.0, 0.0), grayscale_p=0.0,
                 jitter_after_grayscale=(0.0, 0.0, 0.0))
    batches = []
    for flip_p in (0.0, 1.0):
        loader = TrainLoader(source, global_batch_size=2, image_size=64, objects_per_image=2,
                             seed=0, augment_config=AugmentConfig(flip_p=flip_p, **still),
                             num_workers=0, num_keypoints=17)
        batches.append(loader.batch(0))
        assert batches[-1]["keypoints"].shape == (2, 2, 17, 2)
        assert not batches[-1]["visibility"][..., 14:].any()  # 14 slots, padded to 17
    plain, flipped = batches
    perm = list(CROWDPOSE14.flip_permutation)
    np.testing.assert_array_equal(flipped["visibility"][..., :14],
                                  plain["visibility"][..., perm])
    seen = plain["visibility"][..., perm] > 0
    np.testing.assert_allclose(flipped["keypoints"][..., :14, 0][seen],
                               63 - plain["keypoints"][..., perm, 0][seen], atol=1e-3)
    np.testing.assert_array_equal(flipped["masks"], plain["masks"][..., ::-1])
    with pytest.raises(Exception, match="keypoints are crowdpose14, the builder config says "
                                        "coco17"):
        prepare("/", tmp_path / "tfds2", PersonSegmentationConfig(
            name="wrong", annotations=str(out), images=str(setup["images"]), schema="coco17"))


@pytest.mark.slow  # a tiny training step compiles for a minute
def test_annotated_file_trains_one_tiny_step(setup, uninterrupted, tmp_path, capsys):
    out = uninterrupted[0]
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "run"),
                     "--no-progress", f"data.annotations={out}",
                     f"data.images={setup['images']}", "data.manual_dir=/",
                     f"data.data_dir={tmp_path / 'tfds'}",
                     "eval.every=0", "total_steps=1", "checkpoint_every=1"]) == 0
    printed = capsys.readouterr().out  # the annotated file, not the preset's generated images
    assert f" records, 'custom' from data.annotations {out} (statuses ok)" in printed
    assert "trained 1 step in" in printed and not (tmp_path / "run" / "synthetic").exists()


def test_keypoint_results_input_and_a_missing_image(setup, tmp_path):
    """A pose estimator's output (keypoint results with scores) and the image list: every
    entry becomes an annotation (its fields kept); the persons of an image that is gone get
    `missing_image` and the run goes on."""
    import shutil

    source = json.loads(setup["keypoints"].read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"],
                "score": 0.5 + 0.01 * i} for i, a in enumerate(source["annotations"])]
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "images.json").write_text(json.dumps(
        {"images": source["images"], "categories": source["categories"]}))
    images = tmp_path / "images"
    shutil.copytree(setup["images"], images)
    gone = source["images"][1]
    (images / gone["file_name"]).unlink()
    config = AnnotateConfig(EvalConfig(keypoint_score="confidence"), shard_images=4)
    source = AnnotationInput(tmp_path / "results.json", tmp_path / "images.json", config)
    summary = annotate(setup["ours"], source, images, tmp_path / "out.json", config,
                       mesh=make_mesh(jax.devices()[:1]), progress=False)
    data = json.loads((tmp_path / "out.json").read_text())
    assert len(data["annotations"]) == len(results) == summary["persons"]
    assert [s["image_id"] for s in summary["skipped_images"]] == [gone["id"]]
    for ann, result in zip(data["annotations"], results):
        assert ann["score"] == result["score"] and ann["keypoints"] == result["keypoints"]
        missing = ann["image_id"] == gone["id"]
        assert (ann["p2s"]["status"] == "missing_image") == missing
        assert ("segmentation" in ann) == (ann["p2s"]["status"] not in ("missing_image",
                                                                         "no_prompt"))
    assert summary["status"]["missing_image"] == sum(a["image_id"] == gone["id"]
                                                     for a in results) > 0
