"""Inference: preprocessing, the batched predictor, pose prompting, one-photo segmentation."""
