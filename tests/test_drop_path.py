"""Stochastic depth in the Hiera trunk against the official `DropPath` and Hiera constructor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import reference
from support.shared import model_pair
from p2s_jax.model.configs import get_config
from p2s_jax.model.hiera import drop_path, drop_path_rates

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")


@pytest.mark.parametrize("name", ["sam2.1_hiera_t", "sam2.1_hiera_b+"])
def test_block_rates_equal_the_official_constructor(name):
    torch = reference.import_torch()
    from sam2.modeling.backbones.hieradet import Hiera

    trunk = get_config(name, 1024).trunk
    official = Hiera(embed_dim=trunk.embed_dim, num_heads=trunk.num_heads,
                     stages=trunk.stages, global_att_blocks=trunk.global_att_blocks,
                     window_pos_embed_bkg_spatial_size=trunk.window_pos_embed_bkg_spatial_size,
                     window_spec=trunk.window_spec, drop_path_rate=0.1)
    expected = [getattr(b.drop_path, "drop_prob", 0.0) for b in official.blocks]
    assert drop_path_rates(trunk, 0.1) == expected
    assert expected[-1] == pytest.approx(0.1) and isinstance(official.blocks[0].drop_path,
                                                             torch.nn.Identity)


def test_statistics_match_the_official_drop_path():
    """Per sample: all zero or all x / keep, zeroed with probability `rate`, like DropPath."""
    torch = reference.import_torch()
    from sam2.modeling.sam2_utils import DropPath

    rate, samples = 0.3, 20000
    x = np.random.default_rng(0).normal(size=(samples, 3, 4)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), samples)
    ours = np.asarray(jax.jit(drop_path, static_argnums=(1, 3))(jnp.asarray(x), rate, keys, 0))
    torch.manual_seed(0)
    official = DropPath(rate).train()(torch.from_numpy(x)).numpy()
    sigma = np.sqrt(rate * (1 - rate) / samples)
    for out in (ours, official):
        dropped = np.all(out == 0, axis=(1, 2))
        kept = ~dropped
        np.testing.assert_allclose(out[kept], x[kept] / np.float32(1 - rate), rtol=1e-6)
        assert abs(dropped.mean() - rate) < 4.5 * sigma
    # same keys, same draws; another stream, other draws; None or rate 0: identity
    again = np.asarray(drop_path(jnp.asarray(x), rate, keys, 0))
    np.testing.assert_array_equal(again, ours)
    other = np.asarray(drop_path(jnp.asarray(x), rate, keys, 1))
    assert (np.all(other == 0, axis=(1, 2)) != np.all(ours == 0, axis=(1, 2))).any()
    assert drop_path(jnp.asarray(x), rate, None, 0) is not None
    np.testing.assert_array_equal(np.asarray(drop_path(jnp.asarray(x), rate, None, 0)), x)
    np.testing.assert_array_equal(np.asarray(drop_path(jnp.asarray(x), 0.0, keys, 0)), x)


def test_dropped_block_equals_official_train_mode_block():
    """Rate 1 drops both residual branches for every sample: the block is its shortcut, in
    ours and in the official block in train mode (a pooling block and a plain one)."""
    torch = reference.import_torch()
    from sam2.modeling.sam2_utils import DropPath

    official, ours = model_pair("sam2.1_hiera_t", 256)
    trunk_official, trunk_ours = official.image_encoder.trunk, ours.image_encoder.trunk
    rng = np.random.default_rng(1)
    for index in (0, 1, 3):  # plain, pooling (dim change), plain in stage 2
        block = trunk_official.blocks[index]
        x = rng.normal(size=(2, 16, 16, block.dim)).astype(np.float32)
        block.drop_path = DropPath(1.0)
        block.train()
        expected = block(torch.from_numpy(x)).detach().numpy()
        block.eval()
        got = trunk_ours.blocks[index](jnp.asarray(x), 1.0, jax.random.split(jax.random.key(2), 2),
                                       index)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
        block.drop_path = torch.nn.Identity()
    # and the whole trunk: keys without a rate change nothing
    images = jnp.asarray(rng.normal(size=(2, 256, 256, 3)).astype(np.float32))
    plain = trunk_ours(images)
    keyed = trunk_ours(images, 0.0, jax.random.split(jax.random.key(3), 2))
    for a, b in zip(plain, keyed):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    dropped = trunk_ours(images, 0.5, jax.random.split(jax.random.key(3), 2))
    assert not np.allclose(np.asarray(dropped[-1]), np.asarray(plain[-1]))
