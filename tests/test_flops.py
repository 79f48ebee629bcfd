"""The architecture's FLOPs (`p2s_jax.model.flops`, what MFU divides) against torch's
`FlopCounterMode` on the official model: the image encoder (its linear and convolution layers,
and with the math attention kernel its attention products too), the decoder's high-resolution
convs, and the prompt encoder + mask decoder for point and mask prompts. At 448 px no Hiera
window is padded, so the real-token count equals torch's; at 256 px the official code pads
stage 3 and 4 windows, which `padded=True` counts as it computes it."""

from __future__ import annotations

import numpy as np
import pytest

from support import reference
from p2s_jax.model import flops
from p2s_jax.model.configs import get_config

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")
NAME = "sam2.1_hiera_t"


def _count(fn, math_attention: bool, module=None) -> float:
    """torch's FLOP count of `fn()`; `module`'s parameters are frozen meanwhile (the counter's
    module tracker wants no gradient graph)."""
    reference.import_torch()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    params = list(module.parameters()) if module is not None else []
    wanted = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            if math_attention:  # the math kernel's batched products are counted; CPU flash not
                with sdpa_kernel(SDPBackend.MATH):
                    fn()
            else:
                fn()
    finally:
        for p, flag in zip(params, wanted):
            p.requires_grad_(flag)
    return float(counter.get_total_flops())


@pytest.mark.parametrize("size, padded", [(448, False), (256, True)])
def test_encoder_flops_equal_torchs_count(size, padded):
    torch = reference.import_torch()
    official = reference.official_model(NAME, size)
    config = get_config(NAME, size)
    image = torch.zeros(1, 3, size, size)
    parts = flops.encoder_flop_parts(config, padded=padded)
    assert _count(lambda: official.image_encoder(image), False) == parts["products"]
    assert _count(lambda: official.image_encoder(image), True) == (parts["products"]
                                                                   + parts["attention"])
    fpn = official.image_encoder(image)["backbone_fpn"]
    decoder = official.sam_mask_decoder
    assert _count(lambda: (decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])), False) \
        == flops.image_feature_flops(config)
    if not padded:  # nothing is padded at 448: the real-token count is torch's
        assert flops.encoder_flops(config) == parts["products"] + parts["attention"]
    else:
        assert flops.encoder_flops(config) < parts["products"] + parts["attention"]


@pytest.mark.parametrize("clicks, mask_input", [(1, False), (3, True)])
def test_decoder_flops_equal_torchs_count(clicks, mask_input):
    torch = reference.import_torch()
    size = 256
    official = reference.official_model(NAME, size)
    config = get_config(NAME, size)
    side = config.embedding_size
    rng = np.random.default_rng(0)
    points = (torch.from_numpy(rng.uniform(0, size, (1, clicks, 2)).astype(np.float32)),
              torch.ones(1, clicks, dtype=torch.int32))
    mask = torch.zeros(1, 1, 4 * side, 4 * side) if mask_input else None

    def run():
        sparse, dense = official.sam_prompt_encoder(points=points, boxes=None, masks=mask)
        official.sam_mask_decoder(
            image_embeddings=torch.zeros(1, 256, side, side),
            image_pe=official.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=True, repeat_image=False,
            high_res_features=[torch.zeros(1, 32, 4 * side, 4 * side),
                               torch.zeros(1, 64, 2 * side, 2 * side)])

    # the official prompt encoder adds one padding point when there is no box
    assert _count(run, True, official) == flops.decoder_flops(config, clicks + 1, mask_input)


def test_the_b_plus_encoder_at_1024():
    """The issue's figure: torch counts 527.7 GFLOP in the b+ encoder's linear and conv layers
    at 1024 (windows padded as the official code pads them); attention and the real-token
    count come on top and below."""
    config = get_config("sam2.1_hiera_b+", 1024)
    assert flops.encoder_flop_parts(config, padded=True)["products"] / 1e9 == pytest.approx(
        527.72, abs=0.01)
    real = flops.encoder_flop_parts(config)
    assert real["products"] < 527.72e9 and real["attention"] > 0.1e12
    train = flops.train_flops_per_image(config, num_points=8, objects=1)
    assert flops.encoder_flops(config) < train < flops.encoder_flops(config) + 3 * 8 * 4e9
