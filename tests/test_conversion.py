"""Checkpoint conversion: strict, reversible, and every size maps completely."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import reference
from support.shared import model_pair, rel_err
from p2s_jax.model.configs import CONFIGS, get_config
from p2s_jax.model.sam2 import abstract_model, with_attention
from weights_conversion import (CheckpointError, VIDEO_MEMORY_PREFIXES, convert_checkpoint,
                                detect_model_name, from_state_dict, load_model, load_torch_state_dict,
                                save_orbax, save_torch_checkpoint, to_state_dict)

# Image-path parameter counts of the official models (state_dict tensors and elements).
EXPECTED = {"sam2.1_hiera_t": (311, 31_440_977), "sam2.1_hiera_b+": (455, 73_328_657)}


def _save_pt(state_dict, path, torch):
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}}, path)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.endswith("_l") else n
                                  for n in sorted(CONFIGS)])
def test_every_official_tensor_is_used_once(name):
    """Coverage for t, s, b+, l: each image-path key of the official model fills exactly one Flax
    array with its exact shape; only the video-memory keys are left over."""
    official = reference.official_model(name, 256)
    state = reference.official_state_dict(official)
    model = abstract_model(get_config(name, 256))
    leftover = from_state_dict(model, state)
    assert leftover and all(k.startswith(VIDEO_MEMORY_PREFIXES) for k in leftover)
    back = to_state_dict(model)
    assert set(back) | set(leftover) == set(state) and not set(back) & set(leftover)
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    if name in EXPECTED:
        assert (len(back), sum(v.size for v in back.values())) == EXPECTED[name]
    assert detect_model_name(state) == name


@pytest.mark.parametrize("name, attention", [("sam2.1_hiera_s", "cpu_chunked"),
                                             pytest.param("sam2.1_hiera_l", "cpu_chunked",
                                                          marks=pytest.mark.slow),
                                             ("sam2.1_hiera_s", "xla")])
def test_reduced_resolution_parity(name, attention, torch_module):
    """s and l at 256 px: encoder features and decoder outputs equal the official model's, with
    the CPU attention and with the library attention that accelerators run."""
    torch = torch_module
    official, ours = model_pair(name, 256)
    ours = with_attention(ours, attention)
    image = np.random.default_rng(0).standard_normal((1, 256, 256, 3)).astype(np.float32)
    backbone = official.forward_image(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    features = jax.jit(lambda x: ours.encode_image(x))(jnp.asarray(image))
    embed = backbone["backbone_fpn"][2] + official.no_mem_embed[0, 0][None, :, None, None]
    assert rel_err(features.image_embed, embed.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert rel_err(features.feat_s0, backbone["backbone_fpn"][0].permute(0, 2, 3, 1).numpy()) <= 1e-4
    coords = torch.tensor([[[60.0, 80.0], [150.0, 100.0]]])
    labels = torch.tensor([[1, 0]], dtype=torch.int32)
    sparse, dense = official.sam_prompt_encoder((coords, labels), None, None)
    masks_t, iou_t, _, _ = official.sam_mask_decoder(
        embed, official.sam_prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True,
        repeat_image=False, high_res_features=backbone["backbone_fpn"][:2])
    out = ours.decode(jax.tree.map(lambda x: x[0], features), jnp.asarray(coords.numpy()),
                      jnp.asarray(labels.numpy()), multimask_output=True)
    assert np.abs(np.asarray(out.low_res_logits) - masks_t.numpy()).max() <= 1e-3
    assert np.abs(np.asarray(out.iou) - iou_t.numpy()).max() <= 1e-4


def test_flax_to_official_round_trip(torch_module, tmp_path):
    """A Flax model (as if fine-tuned here) exported to the official format loads in the official
    code and gives the same outputs; reading the export back gives the same arrays."""
    torch = torch_module
    ours = abstract_model(get_config("t", 256))  # weights unlike any cached official model's
    from_state_dict(ours, reference.official_state_dict(
        reference.official_model.__wrapped__("sam2.1_hiera_t", 256, seed=5)))
    base = reference.official_state_dict(reference.official_model("sam2.1_hiera_t", 256))
    path = tmp_path / "export.pt"
    save_torch_checkpoint(ours, path, base_state_dict=base)
    official = reference.official_model.__wrapped__("sam2.1_hiera_t", 256, seed=99)  # uncached
    result = official.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    image = np.random.default_rng(1).standard_normal((1, 256, 256, 3)).astype(np.float32)
    backbone = official.forward_image(torch.from_numpy(image.transpose(0, 3, 1, 2)))
    features = jax.jit(lambda x: ours.encode_image(x))(jnp.asarray(image))
    assert rel_err(features.feat_s1, backbone["backbone_fpn"][1].permute(0, 2, 3, 1).numpy()) <= 1e-4
    embed = backbone["backbone_fpn"][2] + official.no_mem_embed[0, 0][None, :, None, None]
    assert rel_err(features.image_embed, embed.permute(0, 2, 3, 1).numpy()) <= 1e-4
    reread = abstract_model(get_config("t", 256))
    from_state_dict(reread, load_torch_state_dict(path))
    expected = to_state_dict(ours)
    for key, value in to_state_dict(reread).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)


def test_orbax_round_trip_and_convert(torch_module, tmp_path):
    torch = torch_module
    official, ours = model_pair("sam2.1_hiera_t", 256)
    pt = tmp_path / "sam2.1_hiera_t.pt"
    _save_pt(reference.official_state_dict(official), pt, torch)
    out_dir, ignored = convert_checkpoint(pt, tmp_path / "converted", image_size=256)
    assert ignored and all(k.startswith(VIDEO_MEMORY_PREFIXES) for k in ignored)
    expected = to_state_dict(ours)
    for loaded in (load_model(out_dir), load_model(pt, image_size=256)):
        assert loaded.config == ours.config
        for key, value in to_state_dict(loaded).items():
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
    with pytest.raises(CheckpointError, match="exists already"):
        save_orbax(ours, out_dir)
    with pytest.raises(CheckpointError, match=r"is a sam2\.1_hiera_t checkpoint.*sam2\.1_hiera_b\+"):
        load_model(out_dir, "b+")


# ----------------------------------------------------------------------------- bad checkpoints

@pytest.fixture(scope="module")
def t_state():
    return reference.official_state_dict(reference.official_model("sam2.1_hiera_t", 256))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_torch_state_dict(tmp_path / "nope.pt")


def test_corrupt_and_truncated_files(t_state, torch_module, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pt is not a PyTorch checkpoint"):
        load_torch_state_dict(garbage)
    full = tmp_path / "full.pt"
    _save_pt({k: v for k, v in list(t_state.items())[:20]}, full, torch_module)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated or corrupt"):
        load_torch_state_dict(truncated)
    not_dict = tmp_path / "list.pt"
    torch_module.save([1, 2, 3], not_dict)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        load_torch_state_dict(not_dict)


def test_missing_key_is_named_never_filled(t_state):
    state = dict(t_state)
    del state["sam_mask_decoder.iou_token.weight"]
    model = abstract_model(get_config("t", 256))
    with pytest.raises(CheckpointError, match=r"missing key 'sam_mask_decoder\.iou_token\.weight'"):
        from_state_dict(model, state)


def test_wrong_shape_and_unexpected_key_are_named(t_state):
    state = dict(t_state)
    state["sam_prompt_encoder.no_mask_embed.weight"] = np.zeros((1, 128), np.float32)
    state["sam_mask_decoder.extra_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError) as err:
        from_state_dict(abstract_model(get_config("t", 256)), state)
    message = str(err.value)
    assert re.search(r"no_mask_embed\.weight' has shape \(1, 128\).*needs \(1, 256\)", message)
    assert "unexpected key 'sam_mask_decoder.extra_head.weight'" in message


def test_non_finite_weights_are_rejected(t_state):
    state = dict(t_state)
    state["no_mem_embed"] = np.full_like(state["no_mem_embed"], np.nan)
    with pytest.raises(CheckpointError, match="no_mem_embed' holds non-finite"):
        from_state_dict(abstract_model(get_config("t", 256)), state)


def test_wrong_model_size_in_one_line(t_state):
    with pytest.raises(CheckpointError) as err:
        from_state_dict(abstract_model(get_config("b+", 256)), t_state, source="t.pt")
    assert str(err.value) == ("t.pt is a sam2.1_hiera_t checkpoint, but the model "
                              "sam2.1_hiera_b+ was requested (pass --model sam2.1_hiera_t)")
