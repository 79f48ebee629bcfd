"""p2s_jax.data.builder: the tfds records (no TensorFlow) against pycocotools and the files they
were made from, and the errors that name a file, image or entry."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from support.datasets import tensorflow_modules

from p2s_jax.data.builder import PersonSegmentationConfig, load_source, prepare
from p2s_jax.data.coco import CocoFormatError
from p2s_jax.data.loader import decode_masks
from p2s_jax.utils.images import decode_image, load_image

# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Using custom data configuration")


# ----------------------------------------------------------------------------------------------
# Builder


def test_prepared_without_tensorflow(synthetic):
    assert tensorflow_modules() == []
    files = list((synthetic["data_dir"] / "p2s_person_segmentation" / "synth_det").rglob("*"))
    assert any(".array_record" in f.name for f in files), files


def test_records_hold_every_person_image_once(synthetic):
    coco = synthetic["coco"]
    person_images = {a["image_id"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
    for records in synthetic["records"].values():
        image_ids = [int(r["image_id"]) for r in records]
        assert sorted(image_ids) == sorted(person_images)  # once each; image 99 (crowd) skipped
        stored = {int(a) for r in records for a in r["annotation_id"]}
        assert stored == {a["id"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
        assert not stored & synthetic["crowd_ids"]


def test_records_match_ground_truth_pixels(synthetic):
    coco = synthetic["coco"]
    for record in synthetic["records"]["synth_det"]:
        info = coco.imgs[int(record["image_id"])]
        assert (int(record["height"]), int(record["width"])) == (info["height"], info["width"])
        assert record["file_name"].decode() == info["file_name"]
        pixels = decode_image(record["image"])
        np.testing.assert_array_equal(pixels,
                                      load_image(synthetic["images_dir"] / info["file_name"]))
        masks = decode_masks(list(record["rle"]), info["height"], info["width"])
        for mask, ann_id, box, area in zip(masks, record["annotation_id"], record["bbox"],
                                           record["area"]):
            ann = coco.anns[int(ann_id)]
            np.testing.assert_array_equal(mask, coco.annToMask(ann).astype(bool))
            np.testing.assert_allclose(box, ann["bbox"], rtol=1e-6)
            assert area == pytest.approx(ann["area"], rel=1e-6)


@pytest.mark.parametrize("name", ["synth_det", "synth_ids"])
def test_records_carry_the_matched_detection(synthetic, name):
    """Shuffled detections, IoU-matched or by named id, land on their own person."""
    checked = 0
    for record in synthetic["records"][name]:
        for ann_id, keypoints, visibility, score in zip(
                record["annotation_id"], record["keypoints"], record["visibility"],
                record["score"]):
            if int(ann_id) == synthetic["dropped"]:  # no detection: prompt falls back to mask
                assert not visibility.any() and score == 0
                continue
            det = synthetic["truth"][int(ann_id)]
            triplets = np.asarray(det["keypoints"], np.float32).reshape(17, 3)
            np.testing.assert_array_equal(keypoints, triplets[:, :2])
            np.testing.assert_array_equal(visibility, np.float32(det["visibility"]))
            assert score == np.float32(det["score"])
            checked += 1
    assert checked == len(synthetic["truth"]) - 1


def test_records_with_ground_truth_keypoints(synthetic):
    coco = synthetic["coco"]
    for record in synthetic["records"]["synth_gt"]:
        for ann_id, keypoints, visibility in zip(record["annotation_id"], record["keypoints"],
                                                 record["visibility"]):
            triplets = np.asarray(coco.anns[int(ann_id)]["keypoints"], np.float32).reshape(17, 3)
            np.testing.assert_array_equal(keypoints, triplets[:, :2])
            np.testing.assert_array_equal(visibility, (triplets[:, 2] > 0).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Errors of the builder


def _copy_manual(synthetic, tmp_path):
    root = tmp_path / "manual"
    shutil.copytree(synthetic["root"], root)
    return root


def test_missing_image_is_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    name = synthetic["coco"].imgs[3]["file_name"]
    (root / "images" / name).unlink()
    config = PersonSegmentationConfig(name="missing", annotations="annotations.json",
                                      images="images")
    with pytest.raises(FileNotFoundError, match=rf"1 image file\(s\) .* missing .*{name}"):
        prepare(root, tmp_path / "tfds", config)


def test_malformed_annotations_are_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    data = json.loads((root / "annotations.json").read_text())
    del data["annotations"][2]["segmentation"]
    (root / "annotations.json").write_text(json.dumps(data))
    config = PersonSegmentationConfig(name="malformed", annotations="annotations.json",
                                      images="images")
    with pytest.raises(CocoFormatError, match=r"annotations\.json: annotations\[2\].*"
                                              r"'segmentation'"):
        prepare(root, tmp_path / "tfds", config)


def test_wrong_image_size_and_foreign_id_are_named(synthetic, tmp_path):
    root = _copy_manual(synthetic, tmp_path)
    data = json.loads((root / "annotations.json").read_text())
    kinds = {}  # image index -> whether all its persons are polygons
    for ann in (a for a in data["annotations"] if not a["iscrowd"]):
        index = next(i for i, im in enumerate(data["images"]) if im["id"] == ann["image_id"])
        kinds[index] = kinds.get(index, True) and isinstance(ann["segmentation"], list)
    polygons_only = next(i for i, only in kinds.items() if only)
    with_rle = next(i for i, only in kinds.items() if not only)
    for index, pattern in (
            (polygons_only, r"{name}: image is 64 x 48 .* says 65 x 48"),
            (with_rle, r"annotations_wrong_size\.json: image_id {id}: annotation id \d+: mask "
                       r"size \[48, 64\] differs from its image's \(height, width\) \[48, 65\]")):
        wrong = json.loads(json.dumps(data))
        wrong["images"][index]["width"] += 1
        (root / "annotations_wrong_size.json").write_text(json.dumps(wrong))
        config = PersonSegmentationConfig(name=f"size{index}",
                                          annotations="annotations_wrong_size.json",
                                          images="images")
        image = data["images"][index]
        with pytest.raises(CocoFormatError, match=pattern.format(name=image["file_name"],
                                                                 id=image["id"])):
            prepare(root, tmp_path / "tfds", config)
    detections = json.loads((root / "detections_ids.json").read_text())
    detections[0]["annotation_id"] = next(iter(synthetic["crowd_ids"]))
    (root / "detections_bad.json").write_text(json.dumps(detections))
    config = PersonSegmentationConfig(name="foreign", annotations="annotations.json",
                                      images="images", detections="detections_bad.json")
    with pytest.raises(CocoFormatError, match=r"detections_bad\.json: image_id \d+: detection "
                                              r"\d+ names annotation id"):
        prepare(root, tmp_path / "tfds", config)


def test_keypoint_names_of_no_schema_are_read_by_position(synthetic, tmp_path):
    """data.schema: a file whose keypoint names fit no schema is refused naming the option,
    and read by position in the schema named (the same records as with COCO's names)."""
    from p2s_jax.data.builder import generate_examples
    from p2s_jax.utils.errors import InputError

    data = json.loads(synthetic["annotations"].read_text())
    data["categories"][0]["keypoints"] = [f"k{i}" for i in range(17)]
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps(data))
    images = synthetic["images_dir"]
    with pytest.raises(InputError, match="data.schema in a training config"):
        next(generate_examples(custom, images))
    ours = list(generate_examples(custom, images, read_schema="coco17"))
    plain = list(generate_examples(synthetic["annotations"], images))
    assert [i for i, _ in ours] == [i for i, _ in plain] and len(ours) >= 5
    for (_, a), (_, b) in zip(ours, plain):
        for key in ("keypoints", "visibility", "rle"):
            np.testing.assert_array_equal(a[key], b[key])


def test_load_source_of_unprepared_config(synthetic):
    with pytest.raises(FileNotFoundError, match=r"no prepared dataset 'nope'.*synth_det"):
        load_source(synthetic["data_dir"], "nope")
