#!/usr/bin/env bash
# Wheels that scripts/device_check.py needs and the GPU machine lacks (it has python3 3.12 with
# jax, flax, optax, orbax, torch and scikit-image, and no package index), for cp312 manylinux
# x86-64, into an ignored folder that travels with the working tree:
#
#   bash scripts/device_wheels.sh            # once, here -> .device_wheels/ (about 15 MB)
#   # there: pip install --no-index --no-deps .device_wheels/*.whl && pip install --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
out=.device_wheels
mkdir -p "$out"
binary=(pycocotools tensorflow-datasets array_record hydra-core omegaconf iopath portalocker
        etils dm-tree simple-parsing tensorflow-metadata termcolor toml wrapt immutabledict
        docstring-parser typing-inspect mypy-extensions)
pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --implementation cp -d "$out" "${binary[@]}"
# Pure-Python packages published as source only: built here into universal wheels.
pip wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3 promise
SAM2_BUILD_CUDA=0 pip wheel -q --no-deps --no-build-isolation -w "$out" sam2==1.1.0
ls -1 "$out"
du -sh "$out"
