"""Host-side resampling (`p2s_jax.model.resample`) against torch and against its own matrices."""

from __future__ import annotations

import numpy as np
import pytest

import reference
from conftest import photo

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
    from sam2.utils.transforms import SAM2Transforms

    from p2s_jax.inference.preprocess import preprocess_image

    reference.import_torch()
    image = (np.random.default_rng(2).integers(0, 256, (1100, 1501, 3), dtype=np.uint8)
             if name == "large" else photo(name))
    expected = SAM2Transforms(1024, mask_threshold=0.0)(image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(preprocess_image(image, 1024), expected, rtol=0, atol=1e-5)
