"""The training loader a `TrainConfig` asks for: prepared tfds records (or generated ones), the
augmentations, this host's slice of every global batch."""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import jax

from p2s_jax.utils.errors import InputError, MissingFileError
from p2s_jax.data.augment import NO_AUGMENT, AugmentConfig
from p2s_jax.data.builder import PersonSegmentationConfig, load_source, prepare
from p2s_jax.data.coco import annotation_schema
from p2s_jax.keypoints import get_schema
from p2s_jax.data.loader import TrainLoader
from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections


class ConcatSource:
    """Random access over several sources, one after the other (COCO + CIHP)."""

    def __init__(self, sources):
        self.sources = list(sources)
        self.schemas = [getattr(s, "schema", "coco17") for s in self.sources]
        self.ends = []
        total = 0
        for source in self.sources:
            total += len(source)
            self.ends.append(total)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        which = bisect.bisect_right(self.ends, index)
        start = self.ends[which - 1] if which else 0
        return self.sources[which][index - start]


def _prepared(data_dir: str, name: str, manual_dir: str, make_config=None):
    """The records of `name`, prepared first (from `make_config()`, or the predefined config
    of that name) when they are not there yet."""
    try:
        return load_source(data_dir, name)
    except FileNotFoundError:
        if not manual_dir:
            raise MissingFileError(
                f"dataset '{name}' is not prepared under {data_dir!r} and no data.manual_dir "
                f"is given to prepare it from (see docs/data.md)") from None
        prepare(manual_dir, data_dir, make_config() if make_config else name)
        return load_source(data_dir, name)


def synthetic_source(workdir: Path, num_images: int, seed: int):
    """Generated COCO-format persons on scikit-image photos, prepared once under workdir."""
    root = Path(workdir) / "synthetic"
    data_dir = root / "tfds"
    name = f"synthetic_{num_images}_{seed}"
    annotations = root / "raw" / "annotations.json"
    if not annotations.is_file():
        annotations, _ = make_coco_dataset(root / "raw", num_images, (1, 3), seed,
                                           image_size=(160, 200))
        make_keypoint_detections(annotations, seed, 2.0, root / "raw" / "detections.json")
    config = PersonSegmentationConfig(name=name, annotations="annotations.json",
                                      images="images", detections="detections.json")
    return _prepared(os.fspath(data_dir), name, os.fspath(root / "raw"), lambda: config)


def source_from_config(config, workdir):
    """The records of ``config.data`` (a ``TrainConfig``)."""
    data = config.data
    if data.synthetic_images > 0:
        return synthetic_source(Path(workdir), data.synthetic_images, config.seed)
    if not data.data_dir:
        raise InputError("set data.data_dir (the tfds data folder), or data.synthetic_images")
    if data.annotations:
        manual_dir = data.manual_dir or "/"

        def custom():
            schema = annotation_schema(Path(manual_dir) / data.annotations).name
            return PersonSegmentationConfig(
                name=data.custom_name, annotations=data.annotations, images=data.images,
                detections=data.keypoints or None, statuses=tuple(data.statuses), schema=schema)

        return _prepared(data.data_dir, data.custom_name, manual_dir, custom)
    sources = [_prepared(data.data_dir, name, data.manual_dir) for name in data.datasets]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def loader_from_config(config, workdir) -> TrainLoader:
    """This process's ``TrainLoader`` for ``config`` (a ``TrainConfig``)."""
    data = config.data
    source = source_from_config(config, workdir)
    schemas = getattr(source, "schemas", [getattr(source, "schema", "coco17")])
    return TrainLoader(source, num_keypoints=max(get_schema(s).num_keypoints for s in schemas),
                       global_batch_size=config.global_batch_size,
                       image_size=config.image_size, objects_per_image=data.objects_per_image,
                       seed=config.seed, augment_config=AugmentConfig() if data.augment
                       else NO_AUGMENT, host_index=jax.process_index(),
                       host_count=jax.process_count(), num_workers=data.num_workers,
                       prefetch=data.prefetch)
