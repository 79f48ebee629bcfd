"""The official PyTorch SAM 2.1 as a test reference (random weights, CPU, float32).

The torchvision wheel that sits beside the CPU build of torch on our machines fails to import
(`operator torchvision::nms does not exist`) because two of its submodules register kernels for
ops the CPU torch build does not have.  Those submodules are stubbed here, before the first import
of torchvision, and nowhere else: this workaround belongs to the tests' reference only.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

import numpy as np


def _stub_torchvision_registrations() -> None:
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)


def reference_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "sam2", "hydra"))


def import_torch():
    _stub_torchvision_registrations()
    import torch

    torch.set_grad_enabled(False)
    return torch


@functools.lru_cache(maxsize=None)
def official_model(model_name: str = "sam2.1_hiera_t", image_size: int = 1024, seed: int = 0,
                   apply_postprocessing: bool = True, train: bool = False):
    """Builds the official SAM2Base (``train``: SAM2Train) from its packaged yaml with seeded
    random weights (the same weights for both classes).

    Every parameter and buffer is re-drawn (the official init leaves many at exactly zero or one,
    which would hide mapping mistakes): weights ~ N(0, 0.02 .. 0.2), norms ~ 1 + N(0, 0.1).
    """
    torch = import_torch()
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides = [f"++model.image_size={image_size}"]
    if train:  # the official training model, as the SAM 2.1 training configs build it
        overrides += ["++model._target_=training.model.sam2.SAM2Train",
                      "++model.num_correction_pt_per_frame=7",
                      "++model.prob_to_sample_from_gt_for_train=0.1",
                      "++model.freeze_image_encoder=true"]
    if apply_postprocessing:
        overrides += [
            "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
            "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
            "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        ]
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    cfg = compose(config_name=f"configs/sam2.1/{model_name}.yaml", overrides=overrides)
    OmegaConf.resolve(cfg)
    torch.manual_seed(seed)
    model = instantiate(cfg.model, _recursive_=True)
    randomize_(model, seed)
    model.eval()
    return model


def randomize_(model, seed: int) -> None:
    torch = import_torch()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("positional_encoding_gaussian_matrix"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
            elif "norm" in name and name.endswith("weight") and tensor.ndim == 1:
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("bias"):
                tensor.copy_(0.02 * torch.randn(tensor.shape, generator=gen))
            else:
                fan_in = int(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else tensor.shape[0]
                std = min(0.2, 1.0 / max(fan_in, 1) ** 0.5)
                tensor.copy_(std * torch.randn(tensor.shape, generator=gen))


def official_state_dict(model) -> dict:
    """numpy copy of the official state_dict, as a checkpoint file would hold it."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def official_predictor(model):
    import_torch()
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    size = model.image_size  # the predictor's feature sizes are written for 1024: any size
    predictor._bb_feat_sizes = [(size // 4 // s, size // 4 // s) for s in (1, 2, 4)]
    return predictor
