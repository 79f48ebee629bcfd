"""Where a training run's data comes from, and how its batches are made (`DataConfig`).

`TrainConfig.data` is one; the data room reads nothing else of a training config (the seed,
batch and image size reach it as arguments, `data.pipeline`).
"""

from __future__ import annotations

import dataclasses

from p2s_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from (see docs/data.md).

    Attributes:
      data_dir: tensorflow-datasets ``data_dir`` holding the prepared records.
      manual_dir: the raw COCO-format files (annotations, images, detections) that a dataset
        not yet under ``data_dir`` is prepared from.
      datasets: prepared builder configs, concatenated (paper: COCO train2017 + CIHP train, both
        with ProbPose keypoints); each is prepared once from ``manual_dir`` if it is not there.
      annotations, images, keypoints: instead of ``datasets``, your own COCO-format files
        (``keypoints`` = ProbPose detections, "" = ground-truth poses), relative to
        ``manual_dir``, prepared as config ``custom_name``.
      custom_name: the builder config name of those files.
      statuses: of an annotated file (`p2s annotate`), the `p2s.status` values trained on.
      synthetic_images: > 0 generates that many COCO-format images on scikit-image photos into
        ``<workdir>/synthetic`` and trains on them (tests, smoke runs). A run trains on one
        source: ``annotations`` (your files), else generated images, else ``datasets``
        (`DataConfig.source`); overrides that name ``annotations`` or ``datasets`` turn a
        preset's generated images off (`load_config`).
      objects_per_image: persons per training image (official: 1; more are drawn at random).
      schema: the keypoint schema the annotation file's keypoints are read in, by position,
        when their names fit no registered one ("" = from the names).
      augment: the official augmentations (flip, affine, colour jitter, grayscale).
      loader: who makes the samples: "threads" (a thread pool in the training process) or
        "processes" (grain worker processes, for hosts whose sample work is GIL-bound; the
        batches are the same).
      num_workers: sample threads or processes.
      prefetch: batches prepared ahead of the device.
    """

    data_dir: str = ""
    manual_dir: str = ""
    datasets: tuple = ("coco_train2017", "cihp_train")
    annotations: str = ""
    images: str = ""
    keypoints: str = ""
    custom_name: str = "custom"
    statuses: tuple = ("ok",)
    synthetic_images: int = 0
    objects_per_image: int = 1
    schema: str = ""
    augment: bool = True
    loader: str = "threads"
    num_workers: int = 4
    prefetch: int = 2

    def source(self) -> str:
        """What the run trains on: "annotations", "synthetic" or "datasets".

        Raises:
          InputError: both ``annotations`` and ``synthetic_images`` name training data.
        """
        if self.annotations and self.synthetic_images > 0:
            raise InputError(f"data.annotations={self.annotations} and data.synthetic_images="
                             f"{self.synthetic_images} both name training data: set "
                             "data.synthetic_images=0 to train on your file, or drop "
                             "data.annotations")
        if self.annotations:
            return "annotations"
        return "synthetic" if self.synthetic_images > 0 else "datasets"

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise InputError(f"data.loader must be one of {LOADERS}, got {self.loader!r}")
        if self.num_workers < 0 or self.prefetch < 0:
            raise InputError(f"data.num_workers and data.prefetch must be >= 0, got "
                             f"{self.num_workers} and {self.prefetch}")


LOADERS = ("threads", "processes")
