"""Data: COCO-format person files and the training data pipeline.

- `coco`: COCO-format ground truth, keypoint files (ground truth and detections) and mask RLE.
- `matching`: detections <-> ground-truth persons (box IoU, Hungarian matching).
- `builder`: `prepare` (COCO-format files -> array_record, no TensorFlow) and `load_source`
  (the records through tfds' `as_data_source`).
- `augment`: flip, affine, resize and colour steps on image, masks and keypoints.
- `loader`: `TrainLoader`, deterministic per-step batches with host sharding, thread
  prefetching and exact resume; `pipeline` builds it from a training config.
- `synthetic`: generated COCO-format person datasets (tests, benchmarks, the `tiny` preset).

Modules are imported one by one (`from p2s_jax.data.loader import TrainLoader`), so that
reading a COCO file does not load tensorflow-datasets. See docs/data.md.
"""
