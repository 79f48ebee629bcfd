"""Deterministic toy training batches (ellipse "people" on noise) for trainer tests: the batch of
step s is a function of (seed, s) only, like the real loader's, without any image decoding."""

from __future__ import annotations

import numpy as np

from p2s_jax.data.synthetic import ellipse_batch


class ToyLoader:
    """``iterate(start)`` -> (step, batch) in the trainer's batch format; ``fixed``: every step
    gets the batch of step 0 (overfitting); ``poison``: {step: marker} sets visibility[..., 0] to
    the marker in that step's batch."""

    def __init__(self, global_batch_size: int, image_size: int, objects_per_image: int = 2,
                 seed: int = 0, fixed: bool = False, poison: dict | None = None,
                 host_index: int = 0, host_count: int = 1):
        self.global_batch_size, self.size = global_batch_size, image_size
        self.objects, self.seed, self.fixed = objects_per_image, seed, fixed
        self.poison = poison or {}
        self.host_index, self.host_count = host_index, host_count
        self.num_records = 16

    def global_batch(self, step: int) -> dict:
        rng = np.random.default_rng([self.seed, 0 if self.fixed else step])
        b = self.global_batch_size
        out = ellipse_batch(rng, b, self.size, self.objects)
        if step in self.poison:
            out["visibility"][..., 0] = self.poison[step]
        return {**out, "image_id": np.arange(b) + 1000 * step,
                "record_index": (np.arange(b) + step * b) % self.num_records}

    def batch(self, step: int) -> dict:
        per_host = self.global_batch_size // self.host_count
        lo = self.host_index * per_host
        return {k: v[lo:lo + per_host] for k, v in self.global_batch(step).items()}

    def iterate(self, start: int = 0):
        step = start
        while True:
            yield step, self.batch(step)
            step += 1
