"""The name and layout map between the Flax model and the official state_dict.

Flax modules carry the official names, so a torch key is the Flax path joined by dots with a few
renames (the official `nn.Sequential` indices, the neck's `.conv`, the prompt encoder's buffer)
and the leaf renamed (kernel/scale/embedding -> weight). Layout changes depend on the module type.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Tuple

import numpy as np
from flax import nnx

from p2s_jax.model.layers import ConvTranspose2x2
from p2s_jax.model.param_names import modules_by_path, torch_key

# Official 1x1 convolutions that we run as Linear layers: torch weight (out, in, 1, 1).
CONV1X1_KEYS = re.compile(r"(neck\.convs\.\d+\.conv|conv_s0|conv_s1|mask_downscaling\.6)\.weight$")


class Rule:
    """How one Flax array relates to its torch tensor."""

    def __init__(self, key: str, to_flax: Callable, to_torch: Callable):
        self.key, self.to_flax, self.to_torch = key, to_flax, to_torch


def _identity(x):
    return x


def _rule_for(module, leaf: str, key: str) -> Rule:
    if isinstance(module, nnx.Linear) and leaf == "kernel":
        if CONV1X1_KEYS.search(key):
            return Rule(key, lambda w: w.reshape(w.shape[0], -1).T,
                        lambda k: k.T.reshape(k.shape[1], k.shape[0], 1, 1))
        return Rule(key, lambda w: w.T, lambda k: k.T)
    if isinstance(module, nnx.Conv) and leaf == "kernel":
        return Rule(key, lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
    if isinstance(module, ConvTranspose2x2) and leaf == "kernel":
        return Rule(key, lambda w: w.transpose(0, 2, 3, 1), lambda k: k.transpose(0, 3, 1, 2))
    if leaf in ("pos_embed", "pos_embed_window"):
        return Rule(key, lambda w: w.transpose(0, 2, 3, 1), lambda k: k.transpose(0, 3, 1, 2))
    return Rule(key, _identity, _identity)


def iter_rules(model: nnx.Module) -> Iterator[Tuple[Tuple, nnx.Variable, Rule]]:
    """(flax path, variable, rule) for every array of the model, in a fixed order."""
    modules = modules_by_path(model)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            path = tuple(path)
            key = torch_key(path)
            yield path, node, _rule_for(modules[path[:-1]], str(path[-1]), key)


def torch_shape_of(rule: Rule, flax_shape) -> Tuple[int, ...]:
    return tuple(rule.to_torch(np.empty(flax_shape, np.float32)).shape)
