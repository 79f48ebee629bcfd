"""The optimiser against the official rules and torch.optim.AdamW."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


from support.shared import model_pair
from p2s_jax.train.optim import OptimConfig, lr_schedule, make_optimizer, param_rules
from p2s_jax.train.config import tiny
from p2s_jax.train.state import trainable_filter
from p2s_jax.model.param_names import torch_key


def _flat_by_torch_name(tree) -> dict:
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))
        out[torch_key(keys)] = value
    return out


@pytest.fixture(scope="module")
def rules():
    official, ours = model_pair("sam2.1_hiera_t", 256)
    config = tiny(freeze_image_encoder=False)
    _, params, _ = nnx.split(ours, trainable_filter(config), ...)
    scales, decay = param_rules(ours, params, OptimConfig())
    return official, _flat_by_torch_name(scales), _flat_by_torch_name(decay)


# The authors' training yaml (BBoxMaskPose `sam2.1_hiera_b+_COCO+CIHP_finetune_sam-pose2seg.yaml`,
# `trainer.optim`): lr and weight-decay options and the layer-decay modifier, as written there,
# with fvcore's schedulers replaced by their value at step 0
# (`support.authors.ConstantScheduler`).
CONSTANT = "support.authors.ConstantScheduler"
AUTHORS_OPTIONS = {
    "lr": [{"scheduler": {"_target_": CONSTANT, "value": 5e-6}},
           {"scheduler": {"_target_": CONSTANT, "value": 3e-6},
            "param_names": ["image_encoder.*"]}],
    "weight_decay": [{"scheduler": {"_target_": CONSTANT, "value": 0.1}},
                     {"scheduler": {"_target_": CONSTANT, "value": 0.0},
                      "param_names": ["*bias*"], "module_cls_names": ["torch.nn.LayerNorm"]}],
}
AUTHORS_MODIFIERS = [{"_target_": "training.optimizer.layer_decay_param_modifier",
                      "_partial_": True, "layer_decay_value": 0.9,
                      "apply_to": "image_encoder.trunk",
                      "overrides": [{"pattern": "*pos_embed*", "value": 1.0}]}]


def test_param_groups_match_the_official_optimizer(rules, torch_module):
    """The official `construct_optimizer` on the authors' options builds the param groups; each
    parameter's weight decay (0 only for biases and true nn.LayerNorm weights: LayerNorm2d and
    embeddings decay) and lr scale must be ours."""
    from omegaconf import OmegaConf
    from training.optimizer import construct_optimizer

    official, scales, decay = rules
    optimizer = construct_optimizer(
        official, OmegaConf.create({"_target_": "torch.optim.AdamW"}),
        OmegaConf.create(AUTHORS_OPTIONS), [OmegaConf.create(m) for m in AUTHORS_MODIFIERS],
        param_allowlist=set(decay), validate_param_groups=False)
    name_of = {id(p): n for n, p in official.named_parameters()}
    seen = set()
    for group in optimizer.optimizer.param_groups:
        for param in group["params"]:
            name = name_of[id(param)]
            seen.add(name)
            assert decay[name] == (group["weight_decay"] == 0.1), name
            assert scales[name] == pytest.approx(group["lr"] / 5e-6, rel=1e-6), name
    assert seen == set(decay) and len(seen) > 300
    # the distinctions the issue names
    assert decay["sam_mask_decoder.output_upscaling.1.weight"]  # LayerNorm2d
    assert not decay["sam_mask_decoder.transformer.norm_final_attn.weight"]  # nn.LayerNorm
    assert decay["sam_prompt_encoder.not_a_point_embed.weight"]  # an embedding
    assert not decay["image_encoder.trunk.blocks.0.attn.qkv.bias"]
    # layer decay reaches the first block and the patch embedding, deepest first
    assert scales["image_encoder.trunk.patch_embed.proj.weight"] < scales[
        "image_encoder.trunk.blocks.0.attn.qkv.weight"] < scales[
        "image_encoder.trunk.blocks.11.attn.qkv.weight"]


def test_schedule_is_fvcore_cosine():
    config = OptimConfig()
    schedule = lr_schedule(config, 100)
    for step in (0, 1, 37, 50, 99, 100):
        where = step / 100
        end = config.base_lr * config.end_lr_factor
        expected = end + 0.5 * (config.base_lr - end) * (1 + math.cos(math.pi * where))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_steps_match_torch_adamw(torch_module):
    """Three steps: global-norm clip, AdamW with per-group lr and decay, cosine lr."""
    torch = torch_module
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 3), "b": (5,), "c": (2, 2)}
    scale = {"a": 1.0, "b": 0.6, "c": 0.9 ** 3}
    decay = {"a": True, "b": False, "c": True}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(3)]
    config = OptimConfig(base_lr=1e-2, clip_norm=0.5)
    total = 3

    tx = make_optimizer(config, total, scale, decay)
    ours = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(ours)
    for g in grads:
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)

    with torch.enable_grad():
        tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
        groups = [{"params": [tensors[k]], "lr": config.base_lr * scale[k],
                   "weight_decay": config.weight_decay if decay[k] else 0.0, "scale": scale[k]}
                  for k in shapes]
        opt = torch.optim.AdamW(groups, betas=(config.b1, config.b2), eps=config.eps)
        schedule = lr_schedule(config, total)
        for step, g in enumerate(grads):
            for k, t in tensors.items():
                t.grad = torch.from_numpy(g[k].copy())
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), config.clip_norm)
            for group in opt.param_groups:
                group["lr"] = float(schedule(step)) * group["scale"]
            opt.step()
    for k in shapes:
        # A few elementwise float32 ops per step on each side (Adam moments, sqrt, division,
        # clip factor from a global norm summed in another order): 16 eps relative, and 1e-7
        # absolute for weights that cross zero.
        np.testing.assert_allclose(np.asarray(ours[k]), tensors[k].detach().numpy(),
                                   rtol=2e-6, atol=1e-7, err_msg=k)
        assert not np.allclose(np.asarray(ours[k]), params[k])  # it moved


def test_frozen_encoder_is_not_trained():
    _, ours = model_pair("sam2.1_hiera_t", 256)
    _, params, rest = nnx.split(ours, trainable_filter(tiny()), ...)
    names = set(_flat_by_torch_name(params))
    assert not any(n.startswith("image_encoder.") for n in names)
    assert {"no_mem_embed", "sam_mask_decoder.conv_s0.weight",
            "sam_prompt_encoder.point_embeddings.0.weight"} <= names
    assert "image_encoder.trunk.pos_embed" in _flat_by_torch_name(rest)

