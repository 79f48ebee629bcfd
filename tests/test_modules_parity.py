"""Model parts one by one against the official modules (t, random weights, float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support.shared import model_pair, rel_err

SIZE = 256  # the parts do not depend on the resolution; the end-to-end test runs 1024


@pytest.fixture(scope="module")
def pair():
    return model_pair("sam2.1_hiera_t", SIZE)


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("attention", ["cpu_chunked", "einsum"])
def test_trunk_blocks(pair, torch_module, attention):
    """Every Hiera block (windowed, q-pooling, global) on its real input, with qkv on the real
    tokens (CPU) and on the padded windows (accelerators: `einsum`, `xla`, `cudnn`)."""
    from p2s_jax.model.sam2 import with_attention

    torch = torch_module
    official, ours = pair
    ours = with_attention(ours, attention)
    trunk_t, trunk_j = official.image_encoder.trunk, ours.image_encoder.trunk
    image = np.random.default_rng(0).standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)
    x_t = trunk_t.patch_embed(torch.from_numpy(nchw(image)))
    x_t = x_t + trunk_t._get_pos_embed(x_t.shape[1:3])
    x_j = trunk_j.patch_embed(jnp.asarray(image))
    x_j = x_j + trunk_j.position_embedding(x_j.shape[1:3])
    assert rel_err(x_j, x_t.numpy()) <= 1e-5
    kinds, padded = set(), False
    for block_t, block_j in zip(trunk_t.blocks, trunk_j.blocks):
        kinds.add((block_j.window_size > 0, block_j.q_stride is not None))
        padded |= block_j.window_size > 0 and x_t.shape[1] % block_j.window_size > 0
        out_j = block_j(jnp.asarray(x_t.numpy()))  # each block on the official input
        x_t = block_t(x_t)
        assert rel_err(out_j, x_t.numpy()) <= 1e-4
    assert kinds == {(True, False), (True, True), (False, False)}
    assert padded  # windows that do not divide the map (14 on 16 x 16)


def test_bicubic_position_embedding_is_torch_bicubic(pair, torch_module):
    """The resized background embedding differs from jax.image.resize's Keys(-0.5) cubic."""
    official, ours = pair
    trunk_t, trunk_j = official.image_encoder.trunk, ours.image_encoder.trunk
    ref = trunk_t._get_pos_embed((64, 64)).numpy()
    # 4 x 4 taps with torch-identical weights (resample matrices): a 16-term float32 sum per
    # output, so a relative error of a few eps whatever the summation order; 1e-6 is 8 eps.
    assert rel_err(trunk_j.position_embedding((64, 64)), ref) <= 1e-6
    naive = jax.image.resize(trunk_j.pos_embed[...], (1, 64, 64, trunk_j.pos_embed.shape[-1]),
                             "cubic") + jnp.tile(trunk_j.pos_embed_window[...], (1, 8, 8, 1))
    assert rel_err(naive, ref) > 1e-3


def test_image_encoder_and_neck(pair, torch_module):
    torch = torch_module
    official, ours = pair
    image = np.random.default_rng(1).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    ref = official.image_encoder(torch.from_numpy(nchw(image)))
    out = ours.image_encoder(jnp.asarray(image))
    assert len(out.backbone_fpn) == len(ref["backbone_fpn"]) == 3
    for level_j, level_t in zip(out.backbone_fpn, ref["backbone_fpn"]):
        assert rel_err(level_j, nhwc(level_t)) <= 1e-4
    for pos_j, pos_t in zip(out.vision_pos_enc, ref["vision_pos_enc"]):
        assert np.abs(np.asarray(pos_j) - nhwc(pos_t)).max() <= 1e-5
    features = ours.encode_image(jnp.asarray(image))
    backbone = official.forward_image(torch.from_numpy(nchw(image)))
    assert rel_err(features.feat_s0, nhwc(backbone["backbone_fpn"][0])) <= 1e-4
    assert rel_err(features.feat_s1, nhwc(backbone["backbone_fpn"][1])) <= 1e-4
    embed = backbone["backbone_fpn"][2] + official.no_mem_embed[0, 0][None, :, None, None]
    assert rel_err(features.image_embed, nhwc(embed)) <= 1e-4


def _prompts(rng, n, k):
    coords = rng.uniform(0, SIZE, (n, k, 2)).astype(np.float32)
    labels = rng.choice([0, 1, 2, 3], (n, k)).astype(np.int32)
    return coords, labels


def test_prompt_encoder(pair, torch_module):
    torch = torch_module
    official, ours = pair
    pe_t, pe_j = official.sam_prompt_encoder, ours.sam_prompt_encoder
    rng = np.random.default_rng(2)
    coords, labels = _prompts(rng, 3, 5)
    masks = rng.standard_normal((3, 1, SIZE // 4, SIZE // 4)).astype(np.float32)
    sparse_t, dense_t = pe_t((torch.from_numpy(coords), torch.from_numpy(labels)), None,
                             torch.from_numpy(masks))
    sparse_j, key_mask = pe_j.embed_points(jnp.asarray(coords), jnp.asarray(labels))
    assert rel_err(sparse_j, sparse_t.numpy()) <= 1e-5
    assert np.asarray(key_mask).all()
    dense_j = pe_j.embed_masks(jnp.asarray(masks.transpose(0, 2, 3, 1)), None, (3,))
    assert rel_err(dense_j, nhwc(dense_t)) <= 1e-5
    _, no_mask_t = pe_t((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    assert rel_err(pe_j.embed_masks(None, None, (3,)), nhwc(no_mask_t)) <= 1e-7  # a copy: exact
    assert rel_err(pe_j.dense_pe()[None], nhwc(pe_t.get_dense_pe())) <= 1e-5


def test_prompt_encoder_padding_mask(pair):
    _, ours = pair
    labels = jnp.array([[1, -1, 0, -1], [-1, -1, -1, -1]])
    _, key_mask = ours.sam_prompt_encoder.embed_points(jnp.zeros((2, 4, 2)), labels)
    np.testing.assert_array_equal(key_mask, [[1, 0, 1, 0, 1], [0, 0, 0, 0, 0]])


@pytest.mark.parametrize("multimask, attention", [(False, "cpu_chunked"), (True, "cpu_chunked"),
                                                   (True, "einsum")])
def test_mask_decoder(pair, torch_module, multimask, attention):
    """The decoder alone, from the same embeddings, including the stability fallback; its
    upscaling space-to-depth over both deconvs (CPU) and over the last (accelerators)."""
    from p2s_jax.model.sam2 import with_attention

    torch = torch_module
    official, ours = pair
    ours = with_attention(ours, attention)
    rng = np.random.default_rng(3)
    h = SIZE // 16
    embed = rng.standard_normal((1, h, h, 256)).astype(np.float32)
    s0 = rng.standard_normal((1, 4 * h, 4 * h, 32)).astype(np.float32)
    s1 = rng.standard_normal((1, 2 * h, 2 * h, 64)).astype(np.float32)
    coords, labels = _prompts(rng, 4, 3)
    sparse_t, dense_t = official.sam_prompt_encoder(
        (torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    masks_t, iou_t, _, score_t = official.sam_mask_decoder(
        torch.from_numpy(nchw(embed)), official.sam_prompt_encoder.get_dense_pe(), sparse_t,
        dense_t, multimask_output=multimask, repeat_image=True,
        high_res_features=[torch.from_numpy(nchw(s0)), torch.from_numpy(nchw(s1))])
    from p2s_jax.model.sam2 import ImageFeatures

    feats = ImageFeatures(jnp.asarray(embed[0]), jnp.asarray(s0[0]), jnp.asarray(s1[0]))
    out = ours.decode(feats, jnp.asarray(coords), jnp.asarray(labels), multimask_output=multimask)
    assert np.abs(np.asarray(out.low_res_logits) - masks_t.numpy()).max() <= 1e-3
    assert np.abs(np.asarray(out.iou) - iou_t.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.object_score_logits) - score_t[:, 0].numpy()).max() <= 1e-4


def test_forward_sam_heads_object_score_gate(pair, torch_module):
    """`_forward_sam_heads` (the training path): logits are -1024 where the object score <= 0."""
    torch = torch_module
    official, ours = pair
    rng = np.random.default_rng(4)
    image = rng.standard_normal((1, SIZE, SIZE, 3)).astype(np.float32)
    backbone = official.forward_image(torch.from_numpy(nchw(image)))
    _, vision_feats, _, sizes = official._prepare_backbone_features(backbone)
    feats_t = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(vision_feats, sizes)]
    embed_t = feats_t[-1] + official.no_mem_embed[0, 0][None, :, None, None]
    coords, labels = _prompts(rng, 1, 2)
    labels[:] = 1
    mask_in = torch.from_numpy(rng.standard_normal((1, 1, SIZE, SIZE)).astype(np.float32))
    # the official call resizes a full-size mask input with antialiasing; we pass it resized
    low_t, _, iou_t, _, _, _, score_t = official._forward_sam_heads(
        embed_t, {"point_coords": torch.from_numpy(coords), "point_labels": torch.from_numpy(labels)},
        mask_inputs=mask_in, high_res_features=feats_t[:-1], multimask_output=True)
    import torch.nn.functional as F

    mask_low = F.interpolate(mask_in, size=(SIZE // 4, SIZE // 4), mode="bilinear",
                             align_corners=False, antialias=True)
    features = jax.tree.map(lambda x: x[0], ours.encode_image(jnp.asarray(image)))
    # the official training path pads an absent prompt with one -1 point; here points exist
    out = ours.decode(features, jnp.asarray(coords), jnp.asarray(labels),
                      jnp.asarray(nhwc(mask_low)), jnp.ones((1,), bool), multimask_output=True,
                      object_score_gate=True)
    assert np.abs(np.asarray(out.low_res_logits) - low_t.numpy()).max() <= 1e-3
    assert np.abs(np.asarray(out.iou) - iou_t.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.object_score_logits) - score_t[:, 0].numpy()).max() <= 1e-4
    gated = ours.decode(features, jnp.asarray(coords), jnp.asarray(labels),
                        object_score_gate=True)
    if float(gated.object_score_logits[0]) <= 0:
        assert np.all(np.asarray(gated.low_res_logits) == -1024.0)
