"""The authors' optimiser as optax: AdamW, cosine to lr / 10, global-norm clip, per-parameter
learning-rate scale and weight-decay mask, decided on the official parameter names.

Official reference (``sam2.1_hiera_b+_MOSE_finetune.yaml`` and the SAM-pose2seg config built on it,
``training/optimizer.py``):

* ``torch.optim.AdamW`` (betas 0.9 / 0.999, eps 1e-8), lr ``base_lr`` 5e-6 with an fvcore cosine
  from ``base_lr`` to ``base_lr / 10`` over the whole run; ``image_encoder.*`` at ``vision_lr``
  3e-6 with the same cosine shape (unused while the encoder is frozen);
* weight decay 0.1, none for parameters whose name matches ``*bias*`` or that belong to a
  ``torch.nn.LayerNorm`` (so ``LayerNorm2d`` weights *are* decayed, as in the official code);
* layer-wise lr decay 0.9 on ``image_encoder.trunk`` (``layer_decay_param_modifier`` with Hiera's
  ``get_layer_id``): block i gets ``0.9 ** (L - i)`` with L blocks, ``patch_embed``
  ``0.9 ** (L + 1)``, ``*pos_embed*`` 1.0;
* ``GradientClipper(max_norm=0.1)``: global L2 norm over all trained parameters.

The lr scale and the decay mask are pytrees matching the trained parameters, computed once on
the host from the torch names (``p2s_jax.model.param_names.torch_key``), so every rule reads as in
the official code.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from p2s_jax.model.param_names import modules_by_path, torch_key


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW as the official fine-tuning yaml sets it up.

    Attributes:
      base_lr: peak learning rate of everything but the image encoder.
      vision_lr: peak learning rate of the image encoder (when it is trained).
      end_lr_factor: cosine schedule from lr to lr * end_lr_factor.
      weight_decay: AdamW decay of every parameter but biases and LayerNorms (official groups).
      layer_decay: the encoder's per-block lr factor (deeper blocks learn faster).
      clip_norm: global gradient-norm clip.
      b1, b2, eps: Adam moments and epsilon.
    """

    base_lr: float = 5e-6
    vision_lr: float = 3e-6
    end_lr_factor: float = 0.1
    weight_decay: float = 0.1
    layer_decay: float = 0.9
    clip_norm: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def _path_keys(path) -> tuple:
    """A State path (DictKey(...), ..., GetAttrKey('value')) -> the module path tuple."""
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def lr_scale_of(name: str, config: OptimConfig, num_blocks: int) -> float:
    """The official per-parameter lr multiplier (relative to ``base_lr``) of torch key ``name``."""
    if not name.startswith("image_encoder."):
        return 1.0
    scale = config.vision_lr / config.base_lr
    if not name.startswith("image_encoder.trunk"):
        return scale
    if fnmatch.fnmatchcase(name, "*pos_embed*"):
        return scale  # override value 1.0
    num_layers = num_blocks + 1
    if "rel_pos" in name:
        layer_id = num_blocks + 1
    elif "patch_embed" in name:
        layer_id = 0
    elif "blocks" in name:
        layer_id = int(name.split("blocks")[1].split(".")[1]) + 1
    else:
        layer_id = num_blocks + 1
    return scale * config.layer_decay ** (num_layers - layer_id)


def param_rules(model: nnx.Module, params: nnx.State, config: OptimConfig) -> tuple[Any, Any]:
    """(lr scale tree of floats, weight-decay mask tree of bools) matching ``params``."""
    modules = modules_by_path(model)
    num_blocks = len(model.image_encoder.trunk.blocks)

    def decay(path, _):
        keys = _path_keys(path)
        name = torch_key(keys)
        is_layer_norm = isinstance(modules.get(keys[:-1]), nnx.LayerNorm)
        return not (fnmatch.fnmatchcase(name, "*bias*") or is_layer_norm)

    def scale(path, _):
        return lr_scale_of(torch_key(_path_keys(path)), config, num_blocks)

    return (jax.tree_util.tree_map_with_path(scale, params),
            jax.tree_util.tree_map_with_path(decay, params))


def lr_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """fvcore ``CosineParamScheduler(base_lr, base_lr * end_lr_factor)`` over ``total_steps``."""
    return optax.cosine_decay_schedule(config.base_lr, max(total_steps, 1),
                                       alpha=config.end_lr_factor)


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by its constant in ``scales`` (a tree like the parameters)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def make_optimizer(config: OptimConfig, total_steps: int, lr_scales, decay_mask
                   ) -> optax.GradientTransformation:
    """clip -> Adam -> decoupled weight decay -> -lr(step) -> per-parameter lr scale."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(config, total_steps)),
        scale_by_tree(lr_scales),
    )
