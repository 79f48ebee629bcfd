"""Evaluation while training: mask AP and the correction curve on a held-out set, on the current
parameters (`TrainConfig.eval`, a `HeldOutConfig`).

The held-out set is read and checked once (`evaluation.evaluate.load_inputs`: files, poses,
photos); each evaluation merges the training state into a model (no copy, no export, no
checkpoint round trip) and runs the evaluator's own jitted programs on it
(`evaluation.evaluate.evaluate_inputs`, data parallel over every device like training), whose
compilations jit caches after the first evaluation. The correction curve is `p2s curve`'s
(`train.curve.correction_curve`, the `center` sampler): Fig. 2 as training goes.

Logged (`eval/` + name): AP, AP50, AP75, APm, APl and iou_after_point_1 .. T; with
`eval.save_results` the masks too (`<workdir>/eval/step_<N>.json`, COCO segm results).
"""

from __future__ import annotations

from pathlib import Path

import jax
from etils import epath

from p2s_jax.data.pipeline import make_synthetic_split, once_on_process_zero
from p2s_jax.evaluation import presets
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.evaluate import evaluate_inputs, load_inputs
from p2s_jax.keypoints import get_schema
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.train.config import TrainConfig
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.curve import CurveConfig, correction_curve
from p2s_jax.utils.errors import InputError, MissingFileError
from p2s_jax.utils.files import write_json

LOGGED = ("AP", "AP50", "AP75", "APm", "APl")


def held_out_files(config: TrainConfig, workdir) -> tuple[Path, Path, Path | None]:
    """(annotations, images folder, keypoint results or None) of the held-out set; a generated
    split (`eval.synthetic_images`) is made once under `<workdir>/synthetic_eval`."""
    held = config.eval
    if held.synthetic_images:
        raw = Path(workdir) / "synthetic_eval" / "raw"
        seed = config.seed + 1  # not the training images

        def generate():
            if not (raw / "detections.json").is_file():
                make_synthetic_split(raw, held.synthetic_images, seed)

        once_on_process_zero(generate)
        return raw / "annotations.json", raw / "images", raw / "detections.json"
    if not held.annotations or not held.images:
        raise InputError("eval.every > 0 needs eval.annotations and eval.images (or "
                         "eval.synthetic_images)")
    root = epath.Path(config.data.manual_dir or "/")
    paths = [root / p if p else None for p in (held.annotations, held.images, held.keypoints)]
    for name, path in zip(("eval.annotations", "eval.images", "eval.keypoints"), paths):
        if path is not None and not path.exists():
            raise MissingFileError(f"{name}: {path} not found")
    return paths[0], paths[1], paths[2]


def held_out_settings(config: TrainConfig, ground_truth: bool) -> EvalConfig:
    """The inference settings of the held-out evaluation (its preset, or the defaults)."""
    return presets.settings(config.eval.preset or None, ground_truth,
                            images_per_device=config.eval.images_per_device)


class HeldOutEvaluator:
    """`evaluator(model)` -> the held-out metrics of `model` (see the module docstring)."""

    def __init__(self, config: TrainConfig, workdir):
        self.results_dir = (epath.Path(workdir) / "eval") if config.eval.save_results else None
        annotations, images, keypoints = held_out_files(config, workdir)
        schema = get_schema(config.data.schema) if config.data.schema else None
        self.inputs = load_inputs(annotations, images, held_out_settings(config, keypoints is None),
                                  keypoints=keypoints, gt_keypoints=keypoints is None,
                                  schema=schema, max_images=config.eval.max_images)
        self.curve = (CurveConfig(CorrectionConfig(num_points=config.correction.num_points,
                                                   sampler="center"),
                                  max_images=config.eval.max_images)
                      if config.eval.curve else None)

    def __call__(self, model: SAM2Image, step: int) -> dict[str, float]:
        metrics, output, _ = evaluate_inputs(model, self.inputs, progress=False,
                                             label="held-out")
        if self.results_dir is not None and jax.process_index() == 0:
            write_json(self.results_dir / f"step_{step}.json", output.results)
        out = {f"eval/{name}": float(metrics[name]) for name in LOGGED}
        if self.curve is not None:
            curve = correction_curve(model, self.inputs.coco, self.inputs.images_dir, self.curve)
            out.update({f"eval/iou_after_point_{t + 1}": float(v)
                        for t, v in enumerate(curve.mean_iou)})
        return out
