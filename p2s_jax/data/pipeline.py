"""The training loader a `TrainConfig` asks for: prepared tfds records (or generated ones), the
augmentations, this host's slice of every global batch.

Preparation happens once: on a multi-host run process 0 builds the records that are missing
while the other processes wait at a barrier, then every process reads them (`p2s prepare
train-data` does the same as a step of its own, before the run). Every path goes through
`etils.epath`, so a `gs://` data_dir works where the GCS libraries are installed.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils

from p2s_jax.utils.errors import InputError, MissingFileError
from p2s_jax.data.augment import NO_AUGMENT, AugmentConfig
from p2s_jax.data.builder import (BUILDER_CONFIGS, PersonSegmentationConfig, is_prepared,
                                  load_source, prepare)
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


def once_on_process_zero(prepare_fn) -> None:
    """Runs `prepare_fn` on process 0 only; every process waits until it is done."""
    if jax.process_index() == 0:
        prepare_fn()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("p2s_jax: training data prepared")


def _prepared(data_dir: str, name: str, manual_dir: str, make_config=None):
    """The records of `name`, prepared first when they are not there yet (on process 0,
    `once_on_process_zero`; from `make_config()`, or the predefined config of that name)."""
    if not is_prepared(data_dir, name):
        if not manual_dir:
            raise MissingFileError(
                f"dataset '{name}' is not prepared under {data_dir!r} and no data.manual_dir "
                f"is given to prepare it from (see docs/data.md)")
        once_on_process_zero(lambda: is_prepared(data_dir, name) or prepare(
            manual_dir, data_dir, make_config() if make_config else name))
    return load_source(data_dir, name)


def synthetic_source(root, num_images: int, seed: int):
    """Generated COCO-format persons on scikit-image photos, prepared once under `root`."""
    root = Path(root)
    data_dir = root / "tfds"
    name = f"synthetic_{num_images}_{seed}"
    raw = root / "raw"

    def generate():
        if not (raw / "annotations.json").is_file():
            make_synthetic_split(raw, num_images, seed)
        prepare(os.fspath(raw), os.fspath(data_dir), synthetic_config(name))

    if not is_prepared(os.fspath(data_dir), name):
        once_on_process_zero(generate)
    return load_source(os.fspath(data_dir), name)


def make_synthetic_split(raw, num_images: int, seed: int) -> tuple[Path, Path, Path]:
    """Generated images with 1-3 persons and ProbPose-like detections in `raw`: (annotations,
    images folder, detections)."""
    annotations, images = make_coco_dataset(Path(raw), num_images, (1, 3), seed,
                                            image_size=(160, 200))
    detections = make_keypoint_detections(annotations, seed, 2.0, Path(raw) / "detections.json")
    return annotations, images, detections


def synthetic_config(name: str) -> PersonSegmentationConfig:
    return PersonSegmentationConfig(name=name, annotations="annotations.json", images="images",
                                    detections="detections.json")


def _custom_config(data) -> PersonSegmentationConfig:
    manual_dir = data.manual_dir or "/"
    schema = get_schema(data.schema) if data.schema else None
    return PersonSegmentationConfig(
        name=data.custom_name, annotations=data.annotations, images=data.images,
        detections=data.keypoints or None, statuses=tuple(data.statuses),
        schema=annotation_schema(Path(manual_dir) / data.annotations, schema).name,
        read_schema=data.schema)


def check_data_paths(config) -> None:
    """Every path `config.data` (a `TrainConfig`'s) will read, checked before anything is
    written: a dataset not prepared under data_dir needs its raw files under manual_dir."""
    data = config.data
    if data.synthetic_images > 0:
        return
    if not data.data_dir:
        raise InputError("set data.data_dir (the tfds data folder), or data.synthetic_images")
    if data.annotations:
        if is_prepared(data.data_dir, data.custom_name):
            return
        manual = epath.Path(data.manual_dir or "/")
        needed = {"data.annotations": data.annotations, "data.images": data.images,
                  "data.keypoints": data.keypoints}
    else:
        known = {c.name: c for c in BUILDER_CONFIGS}
        unknown = [n for n in data.datasets if n not in known
                   and not is_prepared(data.data_dir, n)]
        if unknown:
            raise InputError(f"data.datasets names {unknown}: neither prepared under "
                             f"{data.data_dir} nor predefined ({sorted(known)})")
        missing = [n for n in data.datasets if not is_prepared(data.data_dir, n)]
        if not missing:
            return
        if not data.manual_dir:
            raise MissingFileError(f"datasets {missing} are not prepared under "
                                   f"{data.data_dir!r} and no data.manual_dir is given to "
                                   "prepare them from (see docs/data.md)")
        manual = epath.Path(data.manual_dir)
        needed = {f"{n} {what}": getattr(known[n], what) for n in missing
                  for what in ("annotations", "images", "detections")}
    for what, relative in needed.items():
        if relative and not (manual / relative).exists():
            raise MissingFileError(f"{what}: {manual / relative} not found (data.manual_dir "
                                   f"{manual})")


def source_from_config(config, workdir):
    """The records of ``config.data`` (a ``TrainConfig``)."""
    data = config.data
    if data.synthetic_images > 0:
        return synthetic_source(Path(workdir) / "synthetic", data.synthetic_images, config.seed)
    check_data_paths(config)
    if data.annotations:
        return _prepared(data.data_dir, data.custom_name, data.manual_dir or "/",
                         lambda: _custom_config(data))
    sources = [_prepared(data.data_dir, name, data.manual_dir) for name in data.datasets]
    return sources[0] if len(sources) == 1 else ConcatSource(sources)


def prepare_training_data(config, workdir=None) -> int:
    """`p2s prepare train-data`: the records `config` trains on, prepared once (process 0 of a
    multi-host job) -> their number."""
    if config.data.synthetic_images > 0 and workdir is None:
        raise InputError("data.synthetic_images generates data into the run's workdir: give "
                         "--workdir")
    return len(source_from_config(config, workdir))


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
                       prefetch=data.prefetch, workers=data.loader)
