"""The generated training data the data tests share: persons on scikit-image photos with
crowd regions and ProbPose-like detections, prepared as tfds records without TensorFlow."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys

import numpy as np

from p2s_jax.data.builder import PersonSegmentationConfig, load_source, prepare
from p2s_jax.data.coco import load_coco, person_category_id
from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

SIZE = (48, 64)  # (H, W) of the synthetic photos


class _HideTensorflow:
    """Wraps a meta-path finder so that it does not find tensorflow (other names pass through)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attribute):  # find_distributions, invalidate_caches, ...
        return getattr(self.finder, attribute)


@contextlib.contextmanager
def no_tensorflow():
    """TensorFlow is neither loaded nor findable inside, even where it is installed."""
    assert tensorflow_modules() == []
    saved = list(sys.meta_path)
    sys.meta_path[:] = [_HideTensorflow(f) for f in saved]
    try:
        yield
    finally:
        sys.meta_path[:] = saved


def tensorflow_modules() -> list[str]:
    return [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]




def person_ann_ids(coco) -> list[int]:
    """Non-crowd persons in the order make_keypoint_detections writes their detections."""
    person = person_category_id(coco)
    return [a for i in sorted(coco.getImgIds())
            for a in coco.getAnnIds(imgIds=[i], catIds=[person], iscrowd=False)]


def add_crowds(annotations, images_dir) -> dict:
    """A crowd region on image 1 and an image 99 holding only a crowd region."""
    data = json.loads(annotations.read_text())
    first = data["images"][0]
    shutil.copy(images_dir / first["file_name"], images_dir / "crowd_only.jpg")
    data["images"].append({**first, "id": 99, "file_name": "crowd_only.jpg"})
    next_id = max(a["id"] for a in data["annotations"]) + 1
    polygon = [[2.0, 2.0, 20.0, 2.0, 20.0, 20.0, 2.0, 20.0]]
    for offset, image_id in enumerate((1, 99)):
        data["annotations"].append({"id": next_id + offset, "image_id": image_id,
                                    "category_id": 1, "segmentation": polygon, "area": 324.0,
                                    "bbox": [2.0, 2.0, 18.0, 18.0], "iscrowd": 1})
    annotations.write_text(json.dumps(data))
    return {"crowd_ids": {next_id, next_id + 1}}


def synthetic_records(tmp_path_factory):
    """The files in a manual dir, the truth (detection of each person) and the prepared data."""
    root = tmp_path_factory.mktemp("manual")
    annotations, images_dir = make_coco_dataset(root, num_images=7, people_per_image=(1, 4),
                                                seed=3, image_size=SIZE)
    info = add_crowds(annotations, images_dir)
    coco = load_coco(annotations)
    raw = json.loads(make_keypoint_detections(coco, seed=4, noise_px=0.5,
                                              out_path=root / "raw.json").read_text())
    ann_ids = person_ann_ids(coco)
    assert len(raw) == len(ann_ids)
    truth = dict(zip(ann_ids, raw))
    dropped = max((a for a in ann_ids if len(coco.getAnnIds(imgIds=[coco.anns[a]["image_id"]],
                                                            iscrowd=False)) > 1))
    rng = np.random.default_rng(5)
    kept = [d for a, d in truth.items() if a != dropped]
    (root / "detections.json").write_text(json.dumps([kept[i] for i in
                                                      rng.permutation(len(kept))]))
    # Named ids take priority: their boxes are useless for IoU matching.
    with_ids = [{**d, "annotation_id": a, "bbox": [0.0, 0.0, 1.0, 1.0]}
                for a, d in truth.items() if a != dropped]
    (root / "detections_ids.json").write_text(json.dumps([with_ids[i] for i in
                                                          rng.permutation(len(with_ids))]))
    data_dir = tmp_path_factory.mktemp("tfds")
    configs = {
        "synth_det": PersonSegmentationConfig(name="synth_det", annotations="annotations.json",
                                              images="images", detections="detections.json"),
        "synth_ids": PersonSegmentationConfig(name="synth_ids", annotations="annotations.json",
                                              images="images", detections="detections_ids.json"),
        "synth_gt": PersonSegmentationConfig(name="synth_gt", annotations="annotations.json",
                                             images="images"),
    }
    with no_tensorflow():
        for config in configs.values():
            prepare(root, data_dir, config)
        sources = {name: load_source(data_dir, name) for name in configs}
        records = {name: [source[i] for i in range(len(source))]
                   for name, source in sources.items()}
    return {"root": root, "coco": coco, "truth": truth, "dropped": dropped, "data_dir": data_dir,
            "sources": sources, "records": records, "annotations": annotations,
            "images_dir": images_dir, **info}
