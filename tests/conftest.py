"""Shared fixtures: the official model with seeded random weights and its converted twin."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import reference  # noqa: E402  (stubs torchvision before anything imports it)

# `p2s` (cli.main, called in-process by the CLI tests) would switch this process's malloc to
# keep freed memory (p2s_jax.utils.allocator); the test process keeps glibc's defaults.
# tests/test_allocator.py checks the setting in processes of its own.
os.environ.setdefault("P2S_MALLOC", "default")
# The processes the tests start (p2s commands, trainers, several hosts) share one persistent
# compilation cache for the session, small programs included: a process after the first
# builds a model in seconds instead of recompiling every parameter's initialiser.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="p2s_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", None)  # this process compiles each program once


def _shared_data() -> Path:
    """The workplace's read-only data (`shared/data`: real COCO photos, XLA's GPU description):
    $P2S_SHARED_DATA; else `shared/data` beside this checkout; else beside the checkout this one
    was cloned from (a clone of a local checkout made elsewhere, e.g. in a temporary folder)."""
    if os.environ.get("P2S_SHARED_DATA"):
        return Path(os.environ["P2S_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def torch_module():
    return reference.import_torch()


def pytest_configure(config):
    """The reference is part of the test environment: without it the parity tests would skip
    and the suite could pass without comparing anything, so refuse to run instead."""
    if not reference.reference_available() and os.environ.get("P2S_ALLOW_NO_REFERENCE") != "1":
        raise pytest.UsageError("the official reference (torch, sam2 1.1.0, hydra) is not installed: "
                                "install the dev extra as the README says")
