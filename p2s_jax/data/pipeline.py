"""The training data a `DataConfig` names: prepared tfds records (or generated ones), the
augmentations, this host's slice of every global batch. The seed, the global batch and the
image size come as arguments: this room reads no training config.

Preparation happens once: on a multi-host run process 0 builds the records that are missing
while the other processes wait at a barrier, then every process reads them (`p2s prepare
train-data` does the same as a step of its own, before the run). Every path goes through
`etils.epath`, so a `gs://` data_dir works where the GCS libraries are installed.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from pathlib import Path

import jax
from etils import epath
from jax.experimental import multihost_utils

from p2s_jax.utils.errors import InputError, MissingFileError
from p2s_jax.data.augment import NO_AUGMENT, AugmentConfig
from p2s_jax.data.config import DataConfig
from p2s_jax.data.builder import (BUILDER_CONFIGS, PersonSegmentationConfig, is_prepared,
                                  load_source, prepare, prepared_source, replace_prepared,
                                  source_differences, source_fingerprint)
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


def _prepared(data_dir, config: PersonSegmentationConfig, manual_dir, names: dict | None = None,
              make_raw=None, progress: bool = True):
    """The records of `config`, prepared first when they are not there, or prepared again
    when the files or settings they were made from changed (`source_differences`, each change
    said); on process 0 only (`once_on_process_zero`). Records whose annotation file is not
    under `manual_dir` are used as they are (a host that has the records only).

    names: what to call each source part in messages (`source_differences`). make_raw: makes
    the raw files first when they are missing (generated data). progress: tfds' bars."""
    data_dir, name = os.fspath(data_dir), config.name

    def prepare_or_check():
        if make_raw is not None:
            make_raw()
        if not is_prepared(data_dir, name):
            prepare(manual_dir, data_dir, config, progress)
            return
        if not config.annotations:  # prepared under a name of one's own: as it is
            return
        if not (epath.Path(manual_dir) / config.annotations).exists():
            print(f"training data: records '{name}' under {data_dir} (their annotation file "
                  f"{epath.Path(manual_dir) / config.annotations} is not here to compare "
                  "with)", flush=True)
            return
        current = source_fingerprint(manual_dir, config)
        changed = source_differences(prepared_source(data_dir, name), current, names)
        if changed:
            print(f"training data: the records '{name}' under {data_dir} were made from other "
                  f"data ({'; '.join(changed)}): preparing them again", flush=True)
            replace_prepared(manual_dir, data_dir, dataclasses.replace(config, source=current),
                             progress)

    if not is_prepared(data_dir, name) and not manual_dir:
        raise MissingFileError(
            f"dataset '{name}' is not prepared under {data_dir!r} and no data.manual_dir "
            f"is given to prepare it from (see docs/data.md)")
    if manual_dir:
        once_on_process_zero(prepare_or_check)
    return load_source(data_dir, name)


def synthetic_source(root, num_images: int, seed: int, progress: bool = True):
    """Generated COCO-format persons on scikit-image photos, prepared once under `root`."""
    root = Path(root)
    raw = root / "raw"

    def generate():
        if not (raw / "annotations.json").is_file():
            make_synthetic_split(raw, num_images, seed)

    return _prepared(root / "tfds", synthetic_config(f"synthetic_{num_images}_{seed}"),
                     os.fspath(raw), make_raw=generate, progress=progress)


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


# What the parts of a user's data are called in messages (`source_differences`).
CUSTOM_NAMES = {"annotations": "data.annotations", "detections": "data.keypoints",
                "images": "data.images", "statuses": "data.statuses", "read_schema": "data.schema"}


def _custom_config(data: DataConfig) -> PersonSegmentationConfig:
    return PersonSegmentationConfig(
        name=data.custom_name, annotations=data.annotations, images=data.images,
        detections=data.keypoints or None, statuses=tuple(data.statuses),
        read_schema=data.schema)


def check_data_paths(data: DataConfig) -> None:
    """Every path `data` will read, checked before anything is written: a dataset not prepared
    under data_dir needs its raw files under manual_dir."""
    kind = data.source()
    if kind == "synthetic":
        return
    if not data.data_dir:
        raise InputError("set data.data_dir (the tfds data folder), or data.synthetic_images")
    if kind == "annotations":
        manual = epath.Path(data.manual_dir or "/")
        if is_prepared(data.data_dir, data.custom_name) and not (
                manual / data.annotations).exists():
            return  # the records alone (`_prepared` says so)
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


def training_source(data: DataConfig, seed: int, workdir=None, progress: bool = True):
    """The records `data` names, prepared (or generated, under ``<workdir>/synthetic`` with
    `seed`) once, on process 0 of a multi-host job; says what they are. progress: tfds' bars
    while records are written."""
    kind = data.source()
    check_data_paths(data)
    if kind == "synthetic":
        if workdir is None:
            raise InputError("data.synthetic_images generates data into the run's workdir: "
                             "give --workdir")
        source = synthetic_source(Path(workdir) / "synthetic", data.synthetic_images, seed,
                                  progress)
        what = f"{data.synthetic_images} generated images in {Path(workdir) / 'synthetic'}"
    elif kind == "annotations":
        source = _prepared(data.data_dir, _custom_config(data), data.manual_dir or "/",
                           CUSTOM_NAMES, progress=progress)
        what = (f"'{data.custom_name}' from data.annotations {data.annotations} (statuses "
                f"{', '.join(data.statuses)})")
    else:
        known = {c.name: c for c in BUILDER_CONFIGS}
        sources = [_prepared(data.data_dir, known.get(name) or _named(name), data.manual_dir,
                             progress=progress) for name in data.datasets]
        source = sources[0] if len(sources) == 1 else ConcatSource(sources)
        what = f"data.datasets {', '.join(data.datasets)}"
    if jax.process_index() == 0:
        print(f"training data: {len(source)} records, {what}", flush=True)
    return source


def _named(name: str) -> PersonSegmentationConfig:
    """A dataset prepared under a name of one's own (`check_data_paths` has checked that it is
    there); it cannot be prepared again, so it is used as it is."""
    return PersonSegmentationConfig(name=name)


def training_loader(source, data: DataConfig, *, global_batch_size: int, image_size: int,
                    seed: int) -> TrainLoader:
    """This process's `TrainLoader` over `source` (`training_source`), made as `data` says."""
    schemas = getattr(source, "schemas", [getattr(source, "schema", "coco17")])
    return TrainLoader(source, num_keypoints=max(get_schema(s).num_keypoints for s in schemas),
                       global_batch_size=global_batch_size, image_size=image_size,
                       objects_per_image=data.objects_per_image, seed=seed,
                       augment_config=AugmentConfig() if data.augment else NO_AUGMENT,
                       host_index=jax.process_index(), host_count=jax.process_count(),
                       num_workers=data.num_workers, prefetch=data.prefetch,
                       workers=data.loader)
