"""Deterministic, host-sharded, prefetched training batches from the prepared person records.

Order. Epoch e visits the N records in the permutation `epoch_permutation(seed, e, N)`; the
epochs are concatenated into one stream of positions k = e * N + i, and global batch s holds
positions [s * GB, (s + 1) * GB) (a batch may straddle two epochs; nothing is dropped). Host h
of H takes the contiguous slice [h * GB / H, (h + 1) * GB / H) of it. Each sample draws its
randomness (which persons, augmentation) from `sample_rng(seed, epoch, record_index)` only.

So the batch of step s is a pure function of (seed, s, the records, the config): resuming is
starting `iterate(start_step)` at the saved step, independent of the number of workers, of
prefetching, and of the host count (the global batch does not depend on it). `state_dict` /
`resume_step` store and check that position in a checkpoint.

Batch (B = global_batch_size / host_count, S = image_size, P = objects_per_image, J = the
largest schema's keypoints; `sample_layout` is the same table in code):

  image         (B, S, S, 3)     uint8 RGB (ImageNet normalisation is done on device)
  masks         (B, P, S, S)     bool
  keypoints     (B, P, J, 2)     float32 x, y in model pixels (integer = pixel centre)
  visibility    (B, P, J)        float32, 0 = unavailable (also outside the image)
  valid         (B, P)           bool: a person with a non-empty mask; False for padding
  image_id      (B,)             int64
  record_index  (B,)             int64, index into the source

Persons: an image with more than P persons gives P of them drawn without replacement, one with
fewer gives all of them (in random order) followed by padding slots (valid False, empty mask,
visibility 0). A person whose mask is empty after augmentation (tiny, or gone with the resize) is
also marked invalid, with visibility 0.

Workers (`workers`): "threads", a thread pool of `num_workers` in this process (PIL decoding
and warping and the array_record reads release the GIL, the rest does not), keeping `prefetch`
batches in flight; or "processes", `num_workers` grain worker processes
(`grain.IterDataset.mp_prefetch`) that each make every num_workers-th batch of this host's
stream, whole (the samples and their stacking), straight into a reused ring of shared memory
(`batch_ring`), and hand back its slot in order: the training process only maps ready batches. Each sample is a pure function of
(seed, step, slot), so both give the same batches, whatever the number of workers. An error in a
sample is raised from `iterate` / `batch` as a `DataError` naming the step, the record index and
the image id.
"""

from __future__ import annotations

import collections
import functools
import itertools
from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from p2s_jax.data.augment import AugmentConfig, augment
from p2s_jax.data.batch_ring import BatchRing, batch_layout, write_batch
from p2s_jax.keypoints import NUM_KEYPOINTS, get_schema
from p2s_jax.utils.errors import Error
from p2s_jax.utils.images import ImageError, decode_image

# Distinct SeedSequence streams for the epoch order and the per-sample randomness.
_ORDER_STREAM, _SAMPLE_STREAM = 0, 1


def sample_layout(image_size: int, objects_per_image: int, num_keypoints: int = NUM_KEYPOINTS
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The arrays of one sample (a batch stacks them on a leading axis): key -> (shape,
    dtype), in the module docstring's order."""
    s, p, j = image_size, objects_per_image, num_keypoints
    return {"image": ((s, s, 3), np.dtype(np.uint8)), "masks": ((p, s, s), np.dtype(bool)),
            "keypoints": ((p, j, 2), np.dtype(np.float32)),
            "visibility": ((p, j), np.dtype(np.float32)), "valid": ((p,), np.dtype(bool)),
            "image_id": ((), np.dtype(np.int64)), "record_index": ((), np.dtype(np.int64))}


class DataError(Error, RuntimeError):
    """A training sample that could not be made (the message names step, record and image)."""


# ----------------------------------------------------------------------------------------------
# Order


@functools.lru_cache(maxsize=8)
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """(num_records,) int64 read-only: the record order of one epoch, a function of its args."""
    rng = np.random.default_rng([seed, _ORDER_STREAM, epoch])
    order = rng.permutation(num_records).astype(np.int64)
    order.flags.writeable = False
    return order


def batch_positions(step: int, global_batch_size: int, host_index: int = 0, host_count: int = 1
                    ) -> np.ndarray:
    """(GB / H,) int64 positions in the concatenated epochs read by one host at one step."""
    per_host = global_batch_size // host_count
    start = step * global_batch_size + host_index * per_host
    return np.arange(start, start + per_host, dtype=np.int64)


def position_records(seed: int, positions: np.ndarray, num_records: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Positions -> (epochs, record indices), both (len(positions),) int64."""
    epochs, offsets = np.divmod(np.asarray(positions, np.int64), num_records)
    records = np.array([epoch_permutation(seed, int(e), num_records)[o]
                        for e, o in zip(epochs, offsets)], np.int64)
    return epochs, records


def sample_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
    """The generator of one sample's random choices (persons, augmentation)."""
    return np.random.default_rng([seed, _SAMPLE_STREAM, epoch, record_index])


# ----------------------------------------------------------------------------------------------
# One sample


def decode_masks(rles: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts of (height, width) masks -> (P, height, width) bool."""
    if len(rles) == 0:
        return np.zeros((0, height, width), bool)
    objs = [{"size": [height, width], "counts": r} for r in rles]
    return np.ascontiguousarray(mask_utils.decode(objs).transpose(2, 0, 1).astype(bool))


def choose_persons(rng: np.random.Generator, num_persons: int, objects_per_image: int
                   ) -> np.ndarray:
    """min(num_persons, objects_per_image) distinct person indices in random order."""
    return rng.permutation(num_persons)[:objects_per_image].astype(np.int64)


def make_sample(record: Mapping[str, Any], rng: np.random.Generator, *, image_size: int,
                objects_per_image: int, augment_config: AugmentConfig,
                num_keypoints: int = NUM_KEYPOINTS) -> dict[str, np.ndarray]:
    """One training sample from one record (the batch layout without the batch axis).

    Args:
      record: a source record (`p2s_jax.data.builder`): image bytes, height, width, rle (N,),
        keypoints (N, J, 2), visibility (N, J), image_id, and the schema name (flip pairs).
      rng: this sample's generator (`sample_rng`): persons, then augmentation.
      image_size: S. objects_per_image: P. augment_config: the augmentation.
      num_keypoints: J' >= J, the batch's keypoint slots (padding: visibility 0).

    Returns:
      image (S, S, 3) uint8, masks (P, S, S) bool, keypoints (P, J', 2) float32, visibility
      (P, J') float32, valid (P,) bool, image_id () int64.
    """
    height, width = int(record["height"]), int(record["width"])
    name = f"image_id {int(record['image_id'])}"
    chosen = choose_persons(rng, len(record["rle"]), objects_per_image)
    image = decode_image(record["image"], name)
    if image.shape[:2] != (height, width):
        raise ImageError(f"{name}: decoded image is {image.shape[:2]} (H, W) but the record says "
                         f"({height}, {width})")
    masks = decode_masks([record["rle"][i] for i in chosen], height, width)
    keypoints = np.asarray(record["keypoints"], np.float32)[chosen]
    visibility = np.asarray(record["visibility"], np.float32)[chosen]
    flip = get_schema(record.get("schema", "coco17")).flip_permutation
    image, masks, keypoints, visibility = augment(rng, image, masks, keypoints, visibility,
                                                  augment_config, image_size, flip)
    return _pad(image, masks, keypoints, visibility, objects_per_image,
                int(record["image_id"]), num_keypoints)


def _pad(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray, visibility: np.ndarray,
         objects_per_image: int, image_id: int, num_keypoints: int = NUM_KEYPOINTS
         ) -> dict[str, np.ndarray]:
    """Pads the k <= P persons to P slots; valid = a real person with a non-empty mask."""
    count, size = len(masks), image.shape[0]
    valid = np.zeros(objects_per_image, bool)
    valid[:count] = masks.any(axis=(1, 2))
    out_masks = np.zeros((objects_per_image, size, size), bool)
    out_masks[:count] = masks
    joints = keypoints.shape[1]
    if joints > num_keypoints:
        raise ValueError(f"record has {joints} keypoints per person, the batch {num_keypoints}")
    out_keypoints = np.zeros((objects_per_image, num_keypoints, 2), np.float32)
    out_keypoints[:count, :joints] = keypoints
    out_visibility = np.zeros((objects_per_image, num_keypoints), np.float32)
    out_visibility[:count, :joints] = visibility
    out_visibility[~valid] = 0.0
    return {"image": image, "masks": out_masks, "keypoints": out_keypoints,
            "visibility": out_visibility, "valid": valid, "image_id": np.int64(image_id)}


def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-sample dicts along a new leading batch axis."""
    return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


# ----------------------------------------------------------------------------------------------
# The loader


WORKERS = ("threads", "processes")


class HostBatches:
    """This host's batches from `start_step` on, each made whole by the grain worker that takes
    it and written into the ring (`batch_ring.write_batch`). Picklable (grain sends it to its
    worker processes); the sample work is `TrainLoader.sample`'s."""

    def __init__(self, loader: "TrainLoader", start_step: int, num_steps: int, ring):
        self.source, self.seed, self.settings = loader.source, loader.seed, loader.sample_settings
        self.global_batch_size, self.batch_size = loader.global_batch_size, loader.batch_size
        self.host_index, self.host_count = loader.host_index, loader.host_count
        self.num_records = loader.num_records
        self.start_step, self.num_steps, self.ring = start_step, num_steps, ring

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, index: int) -> dict:
        step = self.start_step + index
        positions = batch_positions(step, self.global_batch_size, self.host_index,
                                    self.host_count)
        epochs, records = position_records(self.seed, positions, self.num_records)
        samples = [make_record_sample(self.source, self.seed, step, int(e), int(r),
                                      **self.settings) for e, r in zip(epochs, records)]
        return write_batch(self.ring, step, samples)


def make_record_sample(source, seed: int, step: int, epoch: int, record_index: int,
                       **settings) -> dict[str, np.ndarray]:
    """`make_sample` of record `record_index` in epoch `epoch`, with its record_index; any
    failure becomes a DataError naming the step, the record and the image id."""
    image_id = "unknown"
    try:
        record = source[int(record_index)]
        image_id = int(record["image_id"])
        sample = make_sample(record, sample_rng(seed, int(epoch), int(record_index)),
                             **settings)
    except Exception as e:
        raise DataError(f"step {step}: record {int(record_index)} (image_id {image_id}): "
                        f"{type(e).__name__}: {e}") from e
    sample["record_index"] = np.int64(record_index)
    return sample


def _grain_ready() -> None:
    """grain reads absl flags, which a program that is not an absl app never parses: mark them
    parsed (with their defaults) so that grain's worker processes can start."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"TrainLoader: {name} must be a positive integer, got {value!r}")


class TrainLoader:
    """Batches of step s for this host, as a pure function of (seed, s); see the module doc.

    Args:
      source: random-access records (`p2s_jax.data.builder.load_source`): len() and [index].
      global_batch_size: GB, images per step over all hosts (divisible by host_count).
      image_size: S, side of the square model input.
      objects_per_image: P, person slots per image.
      seed: non-negative integer; order and augmentation are functions of it.
      augment_config: `AugmentConfig` (`NO_AUGMENT` for evaluation / overfitting).
      host_index, host_count: this host and the number of hosts (jax.process_index() /
        jax.process_count()).
      num_workers: sample threads or processes; 0 makes every sample in the calling thread.
      prefetch: batches prepared ahead of the one being consumed (with num_workers > 0).
      num_keypoints: keypoint slots of a batch, the most of any source's schema (17).
      workers: "threads" or "processes" (grain; see the module docstring).
    """

    def __init__(self, source, *, global_batch_size: int, image_size: int,
                 objects_per_image: int, seed: int, augment_config: AugmentConfig,
                 host_index: int = 0, host_count: int = 1, num_workers: int = 4,
                 prefetch: int = 2, num_keypoints: int = NUM_KEYPOINTS,
                 workers: str = "threads"):
        _check_positive(global_batch_size=global_batch_size, image_size=image_size,
                        objects_per_image=objects_per_image, host_count=host_count)
        if global_batch_size % host_count:
            raise ValueError(f"TrainLoader: global_batch_size {global_batch_size} is not "
                             f"divisible by host_count {host_count}")
        if not 0 <= host_index < host_count:
            raise ValueError(f"TrainLoader: host_index {host_index} is not in [0, {host_count})")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"TrainLoader: seed must be a non-negative integer, got {seed!r}")
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"TrainLoader: num_workers ({num_workers}) and prefetch ({prefetch}) "
                             "must be >= 0")
        if len(source) == 0:
            raise ValueError("TrainLoader: the source holds no record")
        if workers not in WORKERS:
            raise ValueError(f"TrainLoader: workers must be one of {WORKERS}, got {workers!r}")
        self.source = source
        self.num_records = len(source)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // host_count
        self.image_size = int(image_size)
        self.objects_per_image = int(objects_per_image)
        self.seed = int(seed)
        self.augment_config = augment_config
        self.host_index, self.host_count = int(host_index), int(host_count)
        self.prefetch = int(prefetch)
        self.num_keypoints = int(num_keypoints)
        self.workers, self.num_workers = workers, int(num_workers)
        # what `make_sample` takes besides the record and its generator
        self.sample_settings = dict(image_size=self.image_size,
                                    objects_per_image=self.objects_per_image,
                                    augment_config=augment_config,
                                    num_keypoints=self.num_keypoints)
        self._pool = (futures.ThreadPoolExecutor(num_workers, thread_name_prefix="p2s-data")
                      if num_workers and workers == "threads" else None)
        self._grain_iterators: list = []

    # -- order ---------------------------------------------------------------------------------

    def records(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, record indices) of this host's samples at `step`, both (B,) int64."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        positions = batch_positions(step, self.global_batch_size, self.host_index,
                                    self.host_count)
        return position_records(self.seed, positions, self.num_records)

    # -- samples -------------------------------------------------------------------------------

    def sample(self, step: int, epoch: int, record_index: int) -> dict[str, np.ndarray]:
        """One sample (with its record_index); errors become a DataError naming the record."""
        return make_record_sample(self.source, self.seed, step, epoch, record_index,
                                  **self.sample_settings)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch of `step` (see the module docstring), made in the calling thread."""
        epochs, records = self.records(step)
        return collate([self.sample(step, e, r) for e, r in zip(epochs, records)])

    def _submit(self, step: int) -> list[futures.Future]:
        epochs, records = self.records(step)
        return [self._pool.submit(self.sample, step, e, r) for e, r in zip(epochs, records)]

    def iterate(self, start_step: int = 0, num_steps: int | None = None
                ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yields (step, batch) for start_step, start_step + 1, ... (num_steps of them, or forever).

        The batches equal `batch(step)`; with workers, `prefetch` batches are made ahead. Leaving
        the loop early cancels the batches not yet started.
        """
        if self.workers == "processes" and self.num_workers:
            yield from self._iterate_processes(start_step, num_steps)
            return
        steps = (itertools.count(start_step) if num_steps is None
                 else range(start_step, start_step + num_steps))
        if self._pool is None:
            for step in steps:
                yield step, self.batch(step)
            return
        pending: collections.deque = collections.deque()
        try:
            for step in steps:
                pending.append((step, self._submit(step)))
                if len(pending) > self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            for _, jobs in pending:
                for job in jobs:
                    job.cancel()

    @staticmethod
    def _collect(step: int, jobs: list[futures.Future]) -> tuple[int, dict[str, np.ndarray]]:
        return step, collate([job.result() for job in jobs])

    def _iterate_processes(self, start_step: int, num_steps: int | None
                           ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """`iterate` with whole batches made in grain worker processes, each written into a
        ring of shared memory (`batch_ring`): this process only maps them."""
        import grain

        _grain_ready()
        count = (1 << 31) - start_step if num_steps is None else num_steps
        buffered = max(1, -(-self.prefetch // self.num_workers))
        layout, slot_bytes = batch_layout(sample_layout(
            self.image_size, self.objects_per_image, self.num_keypoints), self.batch_size)
        ring = BatchRing(layout, slot_bytes, self.num_workers * (buffered + 2) + self.prefetch
                         + 2, start_step)
        handed = grain.MapDataset.source(HostBatches(self, start_step, count, ring.spec))
        # one batch at a time in each worker (grain's default would run 16 threads ahead in
        # each, past the ring's slots): the workers are the parallelism
        prefetched = handed.to_iter_dataset(grain.ReadOptions(
            num_threads=1, prefetch_buffer_size=1)).mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=buffered))
        iterator = iter(prefetched)
        self._grain_iterators.append(iterator)
        try:
            for step in range(start_step, start_step + count):
                yield step, ring.receive(next(iterator))
        finally:
            iterator.close()
            if iterator in self._grain_iterators:
                self._grain_iterators.remove(iterator)
            ring.close()

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self, next_step: int) -> dict[str, int]:
        """What a checkpoint stores to resume exactly: the next step and what fixes the order."""
        return {"next_step": int(next_step), "seed": self.seed,
                "num_records": self.num_records, "global_batch_size": self.global_batch_size}

    def resume_step(self, state: Mapping[str, int]) -> int:
        """The step to resume at from `state_dict`; refuses a state of another order.

        Raises:
          ValueError: naming the key whose saved value differs from this loader's.
        """
        current = self.state_dict(0)
        for key in ("seed", "num_records", "global_batch_size"):
            if key not in state:
                raise ValueError(f"data state lacks '{key}' (has {sorted(state)})")
            if int(state[key]) != current[key]:
                raise ValueError(f"data state: saved {key} = {state[key]} but this loader has "
                                 f"{current[key]}; the batches would not continue the run")
        return int(state["next_step"])

    # -- shutdown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the workers (pending samples are cancelled); idempotent."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for iterator in list(self._grain_iterators):
            iterator.close()
        self._grain_iterators.clear()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
