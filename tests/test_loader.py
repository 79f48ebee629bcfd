"""p2s_jax.data.loader: deterministic batches, workers (threads and processes), hosts, epochs,
padding, resumption and errors."""

from __future__ import annotations

import io
import time

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from support.datasets import SIZE

import p2s_jax.data.loader as loader_module
from p2s_jax.data import augment as aug
from p2s_jax.data.loader import (
    DataError,
    TrainLoader,
    batch_positions,
    decode_masks,
    make_sample,
    position_records,
    sample_layout,
)

# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Using custom data configuration")


# ----------------------------------------------------------------------------------------------
# Loader


def _loader(source, **overrides) -> TrainLoader:
    kwargs = dict(global_batch_size=4, image_size=32, objects_per_image=2, seed=0,
                  augment_config=aug.AugmentConfig(), num_workers=0)
    kwargs.update(overrides)
    return TrainLoader(source, **kwargs)


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_layout(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, objects_per_image=3) as loader:
        batch = loader.batch(0)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert shapes == {
        "image": ((4, 32, 32, 3), np.uint8), "masks": ((4, 3, 32, 32), np.bool_),
        "keypoints": ((4, 3, 17, 2), np.float32), "visibility": ((4, 3, 17), np.float32),
        "valid": ((4, 3), np.bool_), "image_id": ((4,), np.int64),
        "record_index": ((4,), np.int64)}
    layout = sample_layout(32, 3, 17)  # what train.state.batch_shapes builds on
    assert list(layout) == list(batch) and shapes == {
        k: ((4, *shape), dtype) for k, (shape, dtype) in layout.items()}
    for i, index in enumerate(batch["record_index"]):
        assert batch["image_id"][i] == source[int(index)]["image_id"]


def test_same_seed_same_batch_and_workers_do_not_matter(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, num_workers=2, prefetch=1) as threaded:
        threaded_batches = [b for _, b in threaded.iterate(0, 3)]
    plain = _loader(source)
    for step, batch in enumerate(threaded_batches):
        _assert_batches_equal(batch, plain.batch(step))
    other = _loader(source, seed=1).batch(0)
    assert not np.array_equal(other["image"], threaded_batches[0]["image"])


def test_worker_processes_make_the_same_batches(synthetic):
    """grain worker processes (1 and 2, each making every n-th sample of the host's stream)
    give the batches of the calling thread, also when started mid-run; a failing sample is a
    DataError naming the record, raised in the training process."""
    source = synthetic["sources"]["synth_det"]
    plain = _loader(source)
    for workers in (1, 2):
        with _loader(source, num_workers=workers, prefetch=2, workers="processes") as loader:
            batches = list(loader.iterate(2, 3))
        assert [s for s, _ in batches] == [2, 3, 4]
        for step, batch in batches:
            _assert_batches_equal(batch, plain.batch(step))
    step = next(s for s in range(10) if 2 in plain.records(s)[1])
    with _loader(_Broken(source, 2), num_workers=2, workers="processes") as loader:
        with pytest.raises(DataError, match=rf"step {step}: record 2 .*cannot decode"):
            for _ in loader.iterate(0, step + 1):
                pass


def test_batches_kept_past_the_ring_stay_whole_and_nothing_is_left(synthetic, monkeypatch):
    """Batches from worker processes come in a ring of shared memory that is reused once a
    batch is let go: a caller that keeps every batch (more than the ring holds) still has each
    one as made, and closing the loader leaves none of its rings' files behind (those of
    tests running beside it are theirs)."""
    source = synthetic["sources"]["synth_det"]
    plain = _loader(source)
    rings = []

    class Recorded(loader_module.BatchRing):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rings.append(Path(self.data.spec.path))
            rings.append(Path(self.free_for.spec.path))

    monkeypatch.setattr(loader_module, "BatchRing", Recorded)
    with _loader(source, num_workers=2, prefetch=1, workers="processes") as loader:
        kept = list(loader.iterate(0, 24))
        dropped = [(step, {k: v.copy() for k, v in batch.items()})
                   for step, batch in loader.iterate(0, 24)]
    assert [s for s, _ in kept] == list(range(24))
    for (step, batch), (_, copy) in zip(kept, dropped):
        _assert_batches_equal(batch, plain.batch(step))
        _assert_batches_equal(copy, plain.batch(step))
    del kept
    assert len(rings) == 4  # two iterations, a data file and a free-slot file each
    left = [p for ring in rings for p in [ring, *ring.parent.glob(ring.name + ".step*")]
            if p.exists()]
    assert left == []


def test_resume_equals_uninterrupted_run(synthetic):
    source = synthetic["sources"]["synth_det"]
    with _loader(source, num_workers=2, prefetch=2) as loader:
        full = list(loader.iterate(0, 5))
        state = loader.state_dict(next_step=3)
    with _loader(source, num_workers=2, prefetch=3) as resumed:
        start = resumed.resume_step(state)
        tail = list(resumed.iterate(start, 2))
    assert [s for s, _ in full] == [0, 1, 2, 3, 4] and [s for s, _ in tail] == [3, 4]
    for (_, a), (_, b) in zip(full[3:], tail):
        _assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        _loader(source, seed=7).resume_step(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        _loader(source, global_batch_size=2).resume_step(state)


def test_hosts_split_the_global_batch(synthetic):
    source = synthetic["sources"]["synth_det"]
    single = _loader(source)
    hosts = [_loader(source, host_index=h, host_count=2) for h in (0, 1)]
    for step in range(3):
        parts = [h.batch(step) for h in hosts]
        assert all(len(p["image"]) == 2 for p in parts)
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        _assert_batches_equal(joined, single.batch(step))
        positions = [set(batch_positions(step, 4, h, 2)) for h in (0, 1)]
        assert not positions[0] & positions[1]
    with pytest.raises(ValueError, match="divisible"):
        _loader(source, global_batch_size=5, host_count=2)


def test_epochs_visit_every_record_once(synthetic):
    source = synthetic["sources"]["synth_det"]
    n = len(source)
    loader = _loader(source, global_batch_size=3)
    stream = np.concatenate([loader.records(step)[1] for step in range(3 * n)])  # 3 * 3n >= 4n
    epochs = stream[:4 * n].reshape(4, n)
    for row in epochs:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    assert len({tuple(row) for row in epochs}) > 1  # reshuffled per epoch
    direct = position_records(0, np.arange(4 * n), n)[1]
    np.testing.assert_array_equal(direct, epochs.ravel())


def test_padding_and_person_consistency(synthetic):
    """Without augmentation each slot is one record person: its mask with its keypoints."""
    source = synthetic["sources"]["synth_det"]
    loader = _loader(source, objects_per_image=5, augment_config=aug.NO_AUGMENT, image_size=64)
    seen_counts = set()
    for step in range(3):
        batch = loader.batch(step)
        for i, index in enumerate(batch["record_index"]):
            record = source[int(index)]
            count = len(record["rle"])
            seen_counts.add(count)
            masks = decode_masks(list(record["rle"]), *SIZE)
            _, resized, keypoints = aug.resize(np.zeros((*SIZE, 3), np.uint8), masks,
                                               record["keypoints"], 64)
            np.testing.assert_array_equal(batch["valid"][i], np.arange(5) < count)
            assert not batch["masks"][i, count:].any()
            assert not batch["visibility"][i, count:].any()
            assert not batch["keypoints"][i, count:].any()
            persons = set()
            for slot in range(count):
                (match,) = [k for k in range(count)
                            if np.array_equal(resized[k], batch["masks"][i, slot])]
                persons.add(match)
                np.testing.assert_allclose(batch["keypoints"][i, slot], keypoints[match])
                expected = aug.clear_outside(keypoints[match:match + 1],
                                             record["visibility"][match:match + 1], 64, 64)[1]
                np.testing.assert_array_equal(batch["visibility"][i, slot], expected[0])
            assert persons == set(range(count))
    assert len(seen_counts) > 1


def test_more_people_than_slots_draws_different_people(synthetic):
    source = synthetic["sources"]["synth_det"]
    crowded = next(i for i in range(len(source)) if len(source[i]["rle"]) >= 3)
    loader = _loader(source, objects_per_image=1, augment_config=aug.NO_AUGMENT)
    drawn = set()
    for epoch in range(12):
        sample = loader.sample(0, epoch, crowded)
        assert sample["valid"].all()
        drawn.add(sample["masks"].tobytes())
    assert len(drawn) > 1


def test_person_lost_in_the_resize_is_invalid():
    height, width = 40, 56
    masks = np.zeros((2, height, width), np.uint8)
    masks[0, 10:30, 10:40] = 1
    masks[1, 0, 0] = 1  # nearest downscaling to 8 x 8 reads pixels 3, 10, ...: lost
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format="PNG")
    record = {"image": buffer.getvalue(), "image_id": 5, "height": height, "width": width,
              "rle": np.array([r["counts"] for r in rles], dtype=object),
              "keypoints": np.full((2, 17, 2), 20.0, np.float32),
              "visibility": np.ones((2, 17), np.float32)}
    sample = make_sample(record, np.random.default_rng(0), image_size=8, objects_per_image=3,
                         augment_config=aug.NO_AUGMENT)
    kept = sample["masks"].any(axis=(1, 2))
    assert kept.sum() == 1
    np.testing.assert_array_equal(sample["valid"], kept)
    np.testing.assert_array_equal(sample["visibility"].any(axis=1), kept)


class _Broken:
    """A source whose record `bad` holds bytes that are not an image."""

    def __init__(self, source, bad: int):
        self.source, self.bad = source, bad

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = dict(self.source[index])
        if index == self.bad:
            record["image"] = b"not an image"
        return record


def test_worker_errors_name_the_record(synthetic):
    source = synthetic["sources"]["synth_det"]
    plain = _loader(source)
    step = next(s for s in range(10) if 2 in plain.records(s)[1])
    image_id = int(source[2]["image_id"])
    broken = _Broken(source, 2)
    with _loader(broken, num_workers=2, prefetch=2) as loader:
        with pytest.raises(DataError, match=rf"step {step}: record 2 \(image_id {image_id}\): "
                                            r"ImageError: .*cannot decode"):
            for _ in loader.iterate(0, step + 1):
                pass


def test_leaving_early_and_close_do_not_hang(synthetic):
    loader = _loader(synthetic["sources"]["synth_det"], num_workers=2, prefetch=4)
    start = time.monotonic()
    for count, (step, _) in enumerate(loader.iterate(0)):
        assert step == count  # in order
        if count == 1:
            break
    loader.close()
    loader.close()
    assert time.monotonic() - start < 30
    _assert_batches_equal(loader.batch(1), _loader(synthetic["sources"]["synth_det"]).batch(1))
