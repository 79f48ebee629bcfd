"""Fixtures and the test session's environment (helpers the tests import are in `support/`)."""

from __future__ import annotations

import os
import tempfile

import pytest

from support import reference  # noqa: E402  (stubs torchvision before anything imports it)
from support.datasets import synthetic_records  # noqa: E402

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


@pytest.fixture(scope="session")
def torch_module():
    return reference.import_torch()


def pytest_configure(config):
    """The reference is part of the test environment: without it the parity tests would skip
    and the suite could pass without comparing anything, so refuse to run instead."""
    if not reference.reference_available() and os.environ.get("P2S_ALLOW_NO_REFERENCE") != "1":
        raise pytest.UsageError("the official reference (torch, sam2 1.1.0, hydra) is not installed: "
                                "install the dev extra as the README says")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """Generated persons prepared as records of three configs (`support.datasets`)."""
    return synthetic_records(tmp_path_factory)
