"""The data and models the tests share: the workplace's real COCO sample, scikit-image photos,
generated COCO-format persons, and the official model beside ours with the same random weights."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from support import reference


def _shared_data() -> Path:
    """The workplace's read-only data (`shared/data`: real COCO photos, XLA's GPU description):
    $P2S_SHARED_DATA; else `shared/data` beside this checkout; else beside the checkout this one
    was cloned from (a clone of a local checkout made elsewhere, e.g. in a temporary folder)."""
    if os.environ.get("P2S_SHARED_DATA"):
        return Path(os.environ["P2S_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[2]
    beside = repo.parent / "shared" / "data"
    if beside.is_dir():
        return beside
    try:
        origin = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        origin = ""
    if origin and Path(origin).is_dir():
        cloned_from = Path(origin).resolve().parent / "shared" / "data"
        if cloned_from.is_dir():
            return cloned_from
    return beside


SHARED_DATA = _shared_data()
# The real COCO val2017 sample (photos and their published annotations), read-only.
REAL_COCO = SHARED_DATA / "real" / "coco"
# The marks of a test module that runs the official reference on the real sample.
NEEDS_REAL_COCO_AND_REFERENCE = [
    pytest.mark.skipif(not reference.reference_available(),
                       reason="needs torch, sam2 and hydra (the dev extra)"),
    pytest.mark.skipif(not (REAL_COCO / "test_coco.json").is_file(),
                       reason=f"the real COCO sample is not at {REAL_COCO}"),
]


@functools.lru_cache(maxsize=None)
def model_pair(name: str, image_size: int = 1024):
    """(official SAM2Base, our SAM2Image) with the same random weights."""
    from p2s_jax.model.configs import get_config
    from p2s_jax.model.sam2 import abstract_model
    from weights_conversion.convert import from_state_dict

    official = reference.official_model(name, image_size)
    ours = abstract_model(get_config(name, image_size))
    from_state_dict(ours, reference.official_state_dict(official))
    return official, ours


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image, as H x W x 3 uint8."""
    from skimage import data

    if name == "random":
        return np.random.default_rng(7).integers(0, 256, (333, 500, 3), dtype=np.uint8)
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def coco_dataset(root, num_images: int, seed: int):
    """Generated COCO-format persons (2-3 per 200x260 photo) and ProbPose-like detections:
    (annotations path, images dir, detections path)."""
    from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

    annotations, images = make_coco_dataset(root, num_images, (2, 3), seed=seed,
                                            image_size=(200, 260))
    detections = make_keypoint_detections(annotations, seed=seed + 1, noise_px=2.0,
                                          out_path=root / "detections.json")
    return annotations, images, detections


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))
