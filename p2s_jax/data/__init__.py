"""Training data: a tfds builder of person records, augmentations and the batch loader.

- `p2s_jax.data.builder`: `prepare` (COCO-format files -> array_record, no TensorFlow) and
  `load_source` (the records through tfds' `as_data_source`).
- `p2s_jax.data.augment`: flip, affine, resize and colour steps on image, masks and keypoints.
- `p2s_jax.data.loader`: `TrainLoader`, deterministic per-step batches with host sharding,
  thread prefetching and exact resume.

See docs/data.md.
"""

from p2s_jax.data.augment import NO_AUGMENT, AugmentConfig
from p2s_jax.data.builder import (PersonSegmentation, PersonSegmentationConfig, load_source,
                                  prepare)
from p2s_jax.data.loader import DataError, TrainLoader

__all__ = ["NO_AUGMENT", "AugmentConfig", "PersonSegmentation",
           "PersonSegmentationConfig", "load_source", "prepare", "DataError", "TrainLoader"]
