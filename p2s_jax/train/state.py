"""The training state, made in one place.

A run, `p2s export`, `p2s aot`, the training benchmark and the tests all make it here: the model
split into what the optimiser trains (every `nnx.Param` but the frozen image encoder's) and what
stays as it is, the optimiser (`train.optim`), and the checkpointed state (a plain dict pytree:
params, optimiser state, step, PRNG key data). `new_state` makes it with values (a run; the
model from `init_checkpoint` or a seeded random init); `abstract_state` makes only its shapes
and dtypes through `jax.eval_shape` (compiling ahead of time, a restore target), without
reading or drawing a single weight. `batch_shapes` is the global batch a step reads, for any
keypoint schema.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from p2s_jax.data.loader import sample_layout
from p2s_jax.model.configs import compute_dtype, get_config
from p2s_jax.model.sam2 import SAM2Image, abstract_model, build_model
from p2s_jax.train.config import TrainConfig
from p2s_jax.train.optim import make_optimizer, param_rules
from weights_conversion import load_model

STEP_INPUTS = ("image", "masks", "keypoints", "visibility", "valid")  # the batch keys a step reads


class TrainState(NamedTuple):
    """What a training run holds: the model's structure, the optimiser, the checkpointed state
    and the variables the optimiser leaves alone."""

    graphdef: nnx.GraphDef  # the model's structure (`nnx.merge(graphdef, params, frozen)`)
    tx: optax.GradientTransformation
    state: dict  # params, opt_state, step (int32 scalar), rng (key data): what is checkpointed
    frozen: nnx.State  # the frozen image encoder's weights and every non-Param variable


def trainable_filter(config: TrainConfig):
    """Which variables the optimiser updates: every Param but the frozen image encoder's."""
    if config.freeze_image_encoder:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("image_encoder")))
    return nnx.Param


def build_training_model(config: TrainConfig) -> SAM2Image:
    """The model to fine-tune: ``init_checkpoint`` loaded strictly, or a seeded random init."""
    dtype = compute_dtype(config.compute_dtype)
    if config.init_checkpoint:
        return load_model(config.init_checkpoint, config.model, config.image_size, dtype,
                          config.attention)
    return build_model(get_config(config.model, config.image_size, config.attention),
                       seed=config.seed, dtype=dtype)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict:
    """The checkpointed training state of fresh `params` (a plain dict pytree)."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


def _split(model: SAM2Image, config: TrainConfig):
    graphdef, params, frozen = nnx.split(model, trainable_filter(config), ...)
    tx = make_optimizer(config.optim, config.total_steps,
                        *param_rules(model, params, config.optim))
    return graphdef, params, frozen, tx


def new_state(config: TrainConfig, model: SAM2Image | None = None) -> TrainState:
    """The state a run starts from: `model` (default: `build_training_model(config)`) split,
    the optimiser of `config.optim` over `config.total_steps`, step 0, the key of `seed`."""
    model = build_training_model(config) if model is None else model
    graphdef, params, frozen, tx = _split(model, config)
    return TrainState(graphdef, tx, init_state(params, tx, config.seed), frozen)


def abstract_state(config: TrainConfig) -> TrainState:
    """`new_state`'s shapes and dtypes (`jax.ShapeDtypeStruct` leaves), from the config alone."""
    model = abstract_model(get_config(config.model, config.image_size, config.attention),
                           compute_dtype(config.compute_dtype))
    graphdef, params, frozen, tx = _split(model, config)
    state = jax.eval_shape(lambda p: init_state(p, tx, config.seed), params)
    return TrainState(graphdef, tx, state, frozen)


def batch_shapes(config: TrainConfig, num_keypoints: int) -> dict[str, Any]:
    """The global batch a step reads (`STEP_INPUTS`), keypoints of a schema of
    `num_keypoints`: key -> `jax.ShapeDtypeStruct` (leading axis `global_batch_size`)."""
    layout = sample_layout(config.image_size, config.data.objects_per_image, num_keypoints)
    return {k: jax.ShapeDtypeStruct((config.global_batch_size, *layout[k][0]), layout[k][1])
            for k in STEP_INPUTS}
