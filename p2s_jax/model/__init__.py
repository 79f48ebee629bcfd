"""SAM 2.1's image path in Flax NNX: Hiera trunk, FPN neck, prompt encoder, mask decoder.

This room imports nothing else of p2s_jax: it is the model alone, every size
(`configs.get_config`), built with `sam2.build_model` or `sam2.abstract_model`.
"""

from p2s_jax.model.configs import SAM2Config, get_config
from p2s_jax.model.sam2 import Decoded, ImageFeatures, SAM2Image, abstract_model, build_model

__all__ = ["SAM2Config", "get_config", "Decoded", "ImageFeatures", "SAM2Image",
           "abstract_model", "build_model"]
