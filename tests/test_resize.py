"""Host-side resampling (`p2s_jax.model.resample`) against torch and against its own matrices."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from support import reference
from support.shared import photo

SHAPES = [((480, 640), (1024, 1024)), ((1100, 1501), (1024, 1024)), ((33, 50), (7, 161))]


@pytest.mark.parametrize("method", ["bilinear_aa", "bilinear", "bicubic"])
@pytest.mark.parametrize("in_hw,out_hw", SHAPES)
def test_taps_equal_the_matrix_product(method, in_hw, out_hw):
    from p2s_jax.inference.preprocess import resize_image_numpy
    from p2s_jax.model.resample import resize_matrices

    image = np.random.default_rng(0).random((*in_hw, 3), dtype=np.float32)
    wy, wx = resize_matrices(out_hw, in_hw, method)
    rows = np.tensordot(wy.astype(np.float64), image, axes=(1, 0))  # (oh, w, c)
    dense = np.tensordot(rows, wx.astype(np.float64), axes=(1, 1)).transpose(0, 2, 1)
    out = resize_image_numpy(image, out_hw, method)
    assert out.shape == (*out_hw, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, dense, rtol=0, atol=2e-6)


@pytest.mark.parametrize("method,mode,antialias", [("bilinear_aa", "bilinear", True),
                                                   ("bilinear", "bilinear", False),
                                                   ("bicubic", "bicubic", False)])
@pytest.mark.parametrize("in_hw,out_hw", SHAPES)
def test_matches_torch_interpolate(method, mode, antialias, in_hw, out_hw):
    from p2s_jax.inference.preprocess import resize_image_numpy

    torch = reference.import_torch()
    image = np.random.default_rng(1).random((*in_hw, 3), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None], size=out_hw, mode=mode,
        align_corners=False, antialias=antialias)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(resize_image_numpy(image, out_hw, method), expected, rtol=0,
                               atol=2e-6)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "large"])
def test_preprocess_matches_the_official_transforms(name):
    reference.import_torch()  # stubs torchvision's registrations before sam2 imports it
    from sam2.utils.transforms import SAM2Transforms

    from p2s_jax.inference.preprocess import preprocess_image

    image = (np.random.default_rng(2).integers(0, 256, (1100, 1501, 3), dtype=np.uint8)
             if name == "large" else photo(name))
    expected = SAM2Transforms(1024, mask_threshold=0.0)(image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(preprocess_image(image, 1024), expected, rtol=0, atol=1e-5)
    # the same on the device, from the photo padded onto a larger canvas
    from p2s_jax.inference.preprocess import canvas_hw, preprocess_on_device
    from p2s_jax.utils.images import pad_to_canvas

    canvas = canvas_hw(image.shape[:2])
    pixels = jax.jit(preprocess_on_device, static_argnums=2)(
        pad_to_canvas(image, canvas)[None], np.array([image.shape[:2]], np.int32), 1024)
    np.testing.assert_allclose(np.asarray(pixels[0]), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("out_size, in_size", [(1024, 640), (1024, 427), (1024, 1501),
                                               (1024, 1024), (256, 1024), (7, 13)])
def test_device_resize_weights_equal_the_host_ones(out_size, in_size):
    """The antialiased resize weights built on the device from a traced size equal the host's
    torch-exact ones within 4 float32 eps, and are zero over the canvas padding. Budget: XLA may
    fuse 1 - |t * invscale| into one multiply-add, skipping the product's rounding (<= eps / 2 of a
    weight <= 1, also where the host rounds a tap to exactly 0), and the normalising sum runs in
    another order (a few eps relative)."""
    from p2s_jax.inference.preprocess import antialias_resize_matrix
    from p2s_jax.model.resample import bilinear_aa_matrix

    build = jax.jit(antialias_resize_matrix, static_argnums=(0, 2))
    device = np.asarray(build(out_size, np.int32(in_size), in_size + 45))
    host = bilinear_aa_matrix(out_size, in_size)
    assert np.all(device[:, in_size:] == 0)
    np.testing.assert_allclose(device[:, :in_size], host, rtol=0, atol=4 * np.finfo(np.float32).eps)
