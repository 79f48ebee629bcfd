"""p2s_jax: SAM-pose2seg (pose-guided SAM 2.1 human segmentation) in JAX / Flax NNX.

The package is laid out by role; imports point one way (`docs/architecture.md`):

    model/        SAM 2.1 image model in Flax NNX (imports nothing else of p2s_jax)
    keypoints     keypoint names, skeleton, flip pairs, face group
    parallel      the device mesh and host <-> global arrays
    utils/        files, images, download, allocator, error types
    data/         COCO-format I/O, poses, the tfds training source, augmentation, loaders
    inference/    preprocessing, the batched predictor, pose prompting, one-photo segmentation
    evaluation/   settings and presets, the dataset runner, COCOeval metrics, reports
    train/        config, samplers, losses, correction loop, optimiser, step, loop, checkpoints
    cli           the `p2s` command

The public API below is imported on first use, so that `import p2s_jax.model` loads the model
alone.
"""

import importlib

__version__ = "0.1.0"

# name -> module that defines it
_PUBLIC = {
    "SAM2Config": "p2s_jax.model.configs",
    "get_config": "p2s_jax.model.configs",
    "SAM2Image": "p2s_jax.model.sam2",
    "ImageFeatures": "p2s_jax.model.sam2",
    "Decoded": "p2s_jax.model.sam2",
    "abstract_model": "p2s_jax.model.sam2",
    "build_model": "p2s_jax.model.sam2",
    "load_model": "weights_conversion.convert",
    "Predictor": "p2s_jax.inference.predictor",
    "Prediction": "p2s_jax.inference.predictor",
    "PromptConfig": "p2s_jax.inference.prompting",
    "select_prompts": "p2s_jax.inference.prompting",
    "segment_people": "p2s_jax.inference.segment",
    "EvalConfig": "p2s_jax.evaluation.config",
    "run_dataset": "p2s_jax.evaluation.runner",
    "run_evaluation": "p2s_jax.evaluation.evaluate",
    "TrainConfig": "p2s_jax.train.config",
    "train": "p2s_jax.train.loop",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'p2s_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
