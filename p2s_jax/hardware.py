"""Accelerator chips: dense bf16 peak and memory, by the names JAX reports (`device_kind`).

The peaks are the vendors' dense (no sparsity) bf16 matrix throughput per chip: TPU v4 275,
v5e 197, v5p 459, v6e (Trillium) 918 TFLOP/s (Cloud TPU documentation); H100 SXM and H200 989
TFLOP/s (NVIDIA's datasheets; the H100 PCIe is 756). Utilisation divides achieved FLOP/s by
these: model FLOPs (`p2s_jax.model.flops`, the architecture's own) give MFU, XLA's count of the
compiled program gives hardware-FLOPs utilisation (HFU).
"""

from __future__ import annotations

from typing import NamedTuple

GIB = 1 << 30


class Chip(NamedTuple):
    peak_bf16: float  # FLOP/s per chip, dense bf16
    hbm: int  # bytes per chip


CHIPS = {"v4": Chip(275e12, 32 * GIB), "v5e": Chip(197e12, 16 * GIB),
         "v5p": Chip(459e12, 95 * GIB), "v6e": Chip(918e12, 32 * GIB),
         "h100": Chip(989e12, 80 * GIB), "h100-pcie": Chip(756e12, 80 * GIB),
         "h200": Chip(989e12, 141 * GIB)}

# Substrings of `jax.Device.device_kind` -> chip, checked in order (the first match wins).
_KINDS = (("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v5p", "v5p"), ("tpu v5", "v5p"),
          ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"), ("tpu v4", "v4"), ("h100 pcie", "h100-pcie"),
          ("h100", "h100"), ("h200", "h200"))


def chip_of(device_kind: str) -> str | None:
    """The `CHIPS` key of a device kind ('TPU v5 lite' -> 'v5e', 'NVIDIA H100 80GB HBM3' ->
    'h100'); None for a chip without a known peak (CPUs, other GPUs)."""
    kind = device_kind.lower()
    return next((chip for needle, chip in _KINDS if needle in kind), None)


def xla_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled program ('flops', 'bytes accessed', on TPU
    'optimal_seconds'; per device), {} where the backend gives none. Some JAX versions and
    backends return it as a one-element list."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of one chip of this kind, or None when unknown."""
    chip = chip_of(device_kind)
    return None if chip is None else CHIPS[chip].peak_bf16
