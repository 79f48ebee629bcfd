"""p2s_jax: SAM-pose2seg (pose-guided SAM 2.1 human segmentation) in JAX / Flax NNX."""

from p2s_jax.configs import SAM2Config, get_config
from p2s_jax.predictor import Prediction, Predictor
from p2s_jax.sam2 import Decoded, ImageFeatures, SAM2Image, abstract_model, build_model

__all__ = ["SAM2Config", "get_config", "Prediction", "Predictor", "Decoded", "ImageFeatures",
           "SAM2Image", "abstract_model", "build_model"]
__version__ = "0.1.0"
