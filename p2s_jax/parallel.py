"""Data parallelism over every device of every process: the mesh and host <-> global arrays.

The evaluator, the annotator and the trainer lay their work out the same way: a 1-D
`jax.sharding.Mesh` over all devices with the axis `DATA_AXIS`, weights replicated, batches
split along their leading axis. Each process feeds the rows of its own devices
(`host_to_global`) and reads back its own rows (`local_rows`); small JSON-ready results are
exchanged with `all_gather_json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
DATA = P(DATA_AXIS)  # split along the leading axis
REPLICATED = P()


def describe_devices() -> str:
    """One line: JAX version, backend and the devices of all processes (kind and count)."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} device(s)"
            f"{hosts}: {', '.join(kinds)}")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `DATA_AXIS` over `devices` (all devices of all processes by default)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_positions(mesh: Mesh) -> list[int]:
    """Mesh positions of this process's devices; they must be contiguous."""
    me = jax.process_index()
    positions = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == me]
    if not positions or positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"process {me} owns mesh positions {positions}; the '{DATA_AXIS}' mesh "
                         "must list each process's devices contiguously (jax.devices() order does)")
    return positions


def host_to_global(mesh: Mesh, local: np.ndarray | None) -> jax.Array | None:
    """This process's rows (L, ...) -> a global array (L * processes, ...) split over the mesh's
    data axis (None stays None)."""
    if local is None:
        return None
    local = np.asarray(local)
    local_devices = len(local_positions(mesh))
    global_shape = (local.shape[0] // local_devices * mesh.devices.size, *local.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, DATA), local, global_shape)


def local_rows(array: jax.Array, out: np.ndarray | None = None) -> np.ndarray:
    """This process's rows of an array split over the data axis (leading axis), in order;
    written into `out` when given (of `local_shape(array)`)."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards], out=out)


def local_shape(array: jax.Array) -> tuple[int, ...]:
    """The shape of `local_rows(array)`."""
    rows = sum(s.data.shape[0] for s in array.addressable_shards)
    return (rows, *array.shape[1:])


def all_gather_json(payload) -> list:
    """Every process's JSON-ready `payload`, in process order (no communication on one process)."""
    if jax.process_count() == 1:
        return [payload]
    data = np.frombuffer(json.dumps(payload).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[p, :n].tobytes()) for p, n in enumerate(sizes)]
