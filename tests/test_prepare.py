"""Evaluation sets: the CIHP converter on a generated CIHP-layout folder (pycocotools as the
reference for masks, areas and boxes) and the `p2s prepare` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from p2s_jax import cli
from p2s_jax.data.coco import load_coco
from p2s_jax.data.prepare import cihp_annotations
from p2s_jax.evaluation.metrics import evaluate_segm
from p2s_jax.utils.errors import InputError, MissingFileError


def cihp_folder(root, palette: bool = False):
    """Images/ and Human_ids/ of 3 photos: 2, 0 and 3 persons (ellipses, one touching the
    border, one split in two by another person). -> {name: (H, W) instance map}."""
    rng = np.random.default_rng(0)
    (root / "Images").mkdir(parents=True)
    (root / "Human_ids").mkdir()
    maps = {}
    for name, (height, width), people in (("0001", (60, 80), 2), ("0002", (50, 50), 0),
                                           ("0003", (70, 90), 3)):
        ids = np.zeros((height, width), np.uint8)
        yy, xx = np.mgrid[:height, :width]
        for number in range(1, people + 1):
            cy, cx = rng.uniform([0, 0], [height, width])
            ry, rx = rng.uniform(8, 20, 2)
            ids[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = number
        if name == "0003":
            ids[:, 40:44] = 3  # a vertical bar: person 3 crosses the others
        maps[name] = ids
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(
            root / "Images" / f"{name}.jpg")
        image = Image.fromarray(ids)
        if palette:
            image = image.convert("P")
        image.save(root / "Human_ids" / f"{name}.png")
    return maps


@pytest.mark.parametrize("palette", [False, True])
def test_cihp_instances_match_pycocotools(tmp_path, palette):
    maps = cihp_folder(tmp_path / "Validation", palette)
    data = cihp_annotations(tmp_path / "Validation")
    assert [im["file_name"] for im in data["images"]] == ["0001.jpg", "0002.jpg", "0003.jpg"]
    by_name = {im["id"]: im["file_name"][:-4] for im in data["images"]}
    assert len(data["annotations"]) == sum(len(np.unique(m)) - 1 for m in maps.values())
    for ann in data["annotations"]:
        ids = maps[by_name[ann["image_id"]]]
        expected = ids == ann["cihp_human_id"]
        mask = mask_utils.decode(ann["segmentation"]).astype(bool)
        np.testing.assert_array_equal(mask, expected)
        reference = mask_utils.encode(np.asfortranarray(expected.astype(np.uint8)))
        assert ann["area"] == float(mask_utils.area(reference)) == expected.sum()
        np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(reference))
        assert ann["iscrowd"] == 0 and ann["category_id"] == 1


def test_prepare_cihp_command_and_ground_truth_ap(tmp_path, capsys):
    cihp_folder(tmp_path / "Validation")
    out = tmp_path / "cihp_val.json"
    assert cli.main(["prepare", "cihp", str(tmp_path / "Validation"), str(out)]) == 0
    assert "3 images, 5 annotations" in capsys.readouterr().out
    coco = load_coco(out)  # our validated loader accepts it
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 1.0,
                "segmentation": a["segmentation"]} for a in coco.anns.values()]
    assert evaluate_segm(coco, results)["AP"] == 1.0


def test_cihp_errors_name_the_file(tmp_path):
    with pytest.raises(MissingFileError, match="Human_ids"):
        (tmp_path / "Images").mkdir()
        cihp_annotations(tmp_path)
    cihp_folder(tmp_path / "split")
    (tmp_path / "split" / "Human_ids" / "0002.png").unlink()
    with pytest.raises(MissingFileError, match="0002.png is missing"):
        cihp_annotations(tmp_path / "split")
    Image.new("RGB", (50, 50)).save(tmp_path / "split" / "Human_ids" / "0002.png")
    with pytest.raises(InputError, match="0002.png: a Human_ids map must be a single-channel"):
        cihp_annotations(tmp_path / "split")


def test_prepare_coco_persons_command(tmp_path, capsys):
    source = tmp_path / "gt.json"
    anns = [{"id": i + 1, "image_id": image, "category_id": 1, "iscrowd": crowd,
             "num_keypoints": kp, "area": area, "bbox": [0, 0, 10, 10],
             "segmentation": [[0, 0, 10, 0, 10, 10]]}
            for i, (image, crowd, kp, area) in enumerate(
                [(1, 0, 5, 2000.0), (1, 0, 0, 3000.0), (1, 1, 0, 500.0), (2, 0, 0, 900.0),
                 (3, 0, 3, 500.0)])]
    source.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 20, "width": 20}
                   for i in (1, 2, 3)],
        "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    out = tmp_path / "persons.json"
    assert cli.main(["prepare", "coco-persons", str(source), str(out)]) == 0
    subset = json.loads(out.read_text())
    assert [a["id"] for a in subset["annotations"]] == [1, 3, 5]  # crowd regions stay
    assert [im["id"] for im in subset["images"]] == [1, 3]
    assert cli.main(["prepare", "coco-persons", str(source), str(out), "--min-area",
                     "1024"]) == 2  # the output exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["prepare", "coco-persons", str(source), str(out), "--min-area",
                     "1024", "--overwrite"]) == 0
    assert [a["id"] for a in json.loads(out.read_text())["annotations"]] == [1, 3]
    capsys.readouterr()
    del anns[0]["num_keypoints"]
    source.write_text(json.dumps({"images": [], "annotations": anns, "categories": []}))
    assert cli.main(["prepare", "coco-persons", str(source), str(out), "--overwrite"]) == 2
    assert "annotation 0 (id 1) has no 'num_keypoints'" in capsys.readouterr().err
