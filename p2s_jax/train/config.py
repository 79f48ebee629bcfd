"""Training configs: frozen dataclasses, two presets and ``key=value`` overrides.

``paper()`` is the authors' SAM-pose2seg recipe (BMP ``sam2.1_hiera_b+_COCO+CIHP_finetune_
sam-pose2seg.yaml`` on top of the official MOSE fine-tune config): SAM 2.1 b+ at 1024, frozen
image encoder, PoseMaskRefine with 1 + 7 points, global batch 8 (1 image x 1 person per GPU on 8
GPUs), 15 epochs with dataset multiplier 2, AdamW 5e-6 / wd 0.1 / clip 0.1, cosine to lr / 10,
bf16 compute.  ``tiny()`` trains a randomly initialised t model at 128 px on generated data, for
tests and smoke runs on a CPU.

Overrides use dotted paths into the dataclasses, values parsed as JSON where possible::

    p2s train --config paper --workdir runs/a optim.base_lr=1e-5 correction.sampler=mask_refine
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from p2s_jax.data.config import DataConfig
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.losses import LossConfig
from p2s_jax.train.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class HeldOutConfig:
    """Evaluation while training: mask AP and the correction curve on a held-out set, computed
    with the evaluator's jitted programs on the current parameters (docs/training.md).

    Attributes:
      every: steps between evaluations (0: off); the last step is evaluated too.
      annotations, images: COCO-format ground truth with person masks and its image folder,
        relative to ``data.manual_dir`` (or absolute).
      keypoints: a keypoint-results file (relative like the others) to prompt with, or "" for
        the ground-truth keypoints.
      preset: the inference preset ('sam-pose2seg', 'sam2.1'), or "" for the project defaults.
      max_images: evaluate on the first N images with a person (0: all).
      synthetic_images: > 0 generates a held-out split of that many images (another seed than
        the training data) under ``<workdir>/synthetic_eval`` instead (tests, smoke runs).
      curve: also log the mean IoU after each correction point (Fig. 2's curve; the `center`
        sampler, as the official evaluation mode).
      images_per_device: images per device per evaluation step (0: the backend's default).
      keep_best: keep the checkpoint of the best AP in ``<workdir>/best`` (`p2s export --best`).
      save_results: also write each evaluation's COCO segm results to
        ``<workdir>/eval/step_<N>.json`` (what `p2s evaluate --out` writes).
    """

    every: int = 0
    annotations: str = ""
    images: str = ""
    keypoints: str = ""
    preset: str = "sam-pose2seg"
    max_images: int = 0
    synthetic_images: int = 0
    curve: bool = True
    images_per_device: int = 0
    keep_best: bool = True
    save_results: bool = False

    def source(self) -> str:
        """What the held-out evaluation reads: "annotations" or "synthetic" (see
        `DataConfig.source`)."""
        if self.annotations and self.synthetic_images > 0:
            raise InputError(f"eval.annotations={self.annotations} and eval.synthetic_images="
                             f"{self.synthetic_images} both name held-out data: set "
                             "eval.synthetic_images=0 to evaluate on your file")
        return "synthetic" if self.synthetic_images > 0 else "annotations"

    def __post_init__(self):
        if self.every < 0 or self.max_images < 0 or self.synthetic_images < 0:
            raise InputError(f"eval.every, eval.max_images and eval.synthetic_images must be "
                             f">= 0, got {self.every}, {self.max_images}, "
                             f"{self.synthetic_images}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run (defaults: the SAM-pose2seg recipe, paper Sec. 4.1).

    Attributes:
      model: SAM 2.1 size ('sam2.1_hiera_b+', 'b+', 't', ...).
      image_size: model input side S (1024; a multiple of 32).
      init_checkpoint: official .pt or converted folder; "" = seeded random init (tests only).
      compute_dtype: 'bfloat16' or 'float32' (weights and optimiser state stay float32).
      attention: the model's attention implementation (`SAM2Config.attention`).
      freeze_image_encoder: the encoder runs forward only (official fine-tuning); False trains
        it with ``optim.vision_lr`` and layer decay.
      drop_path_rate: stochastic depth of the Hiera blocks during training (0.1: the authors'
        training yaml; the official trainer runs the frozen encoder in train mode too), spread
        over the blocks as linspace(0, rate, depth); 0 turns it off.
      global_batch_size: images per step over all devices (a multiple of the device count).
      total_steps: 0 = epochs * dataset_multiplier * records / global_batch_size.
      epochs: passes over the (multiplied) data when ``total_steps`` is 0.
      dataset_multiplier: the official ``multiplier`` of each dataset (2: each image twice per
        epoch).
      seed: model init, data order, augmentation and sampler keys all derive from it.
      checkpoint_every: steps between checkpoints (the last step is always saved, and the
        step reached when the run is preempted).
      keep_checkpoints: checkpoints kept (older ones are deleted).
      log_every: steps between metric records.
      profile_steps: () or (first, last): a `jax.profiler` trace of those steps (inclusive) in
        ``<workdir>/tensorboard/plugins/profile`` (TensorBoard's profile plugin).
      correction, loss, optim, data: see `CorrectionConfig`, `LossConfig`, `OptimConfig`,
        `DataConfig`.
      eval: evaluation while training, see `HeldOutConfig`.
      imports: modules imported before the config is read (a sampler or keypoint schema of
        your own, `p2s train --import`); kept in the run's config.json, so that `--resume`,
        `p2s export` and `p2s prepare train-data` import them too.
    """

    model: str = "sam2.1_hiera_b+"
    image_size: int = 1024
    init_checkpoint: str = ""
    compute_dtype: str = "bfloat16"
    attention: str = "auto"
    freeze_image_encoder: bool = True
    drop_path_rate: float = 0.1
    global_batch_size: int = 8
    total_steps: int = 0
    epochs: int = 15
    dataset_multiplier: int = 2
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 1
    profile_steps: tuple = ()
    correction: CorrectionConfig = CorrectionConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    eval: HeldOutConfig = HeldOutConfig()
    imports: tuple = ()

    def __post_init__(self):
        if self.profile_steps and (len(self.profile_steps) != 2 or not
                                   0 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise InputError(f"profile_steps must be () or [first, last] with 0 <= first <= "
                             f"last, got {list(self.profile_steps)}")


def paper(**overrides) -> TrainConfig:
    """The SAM-pose2seg recipe (paper Sec. 4.1): b+ at 1024, bf16, frozen encoder, 1 + 7 points.

        p2s train --config paper --workdir runs/p2s init_checkpoint=sam2.1_hiera_base_plus.pt \\
                  data.data_dir=/data/tfds data.manual_dir=/data/raw

    15 epochs x 2 over COCO train2017 + CIHP train with ProbPose keypoints, global batch 8; the
    exported model should reach the paper's SAM-pose2seg rows (Table 2, ProbPose detections,
    MaxVis_3: 44.6 AP on COCO val2017, 60.3 on COCO*, 34.7 on OCHuman test).
    """
    return apply_overrides(TrainConfig(), overrides)


def tiny(**overrides) -> TrainConfig:
    """A random-init t model at 128 px on 8 generated images: a third of a second per step on
    a CPU.

        p2s train --config tiny --workdir /tmp/tiny

    12 steps with a checkpoint every 4 and mask AP on 4 generated held-out images at steps 6
    and 12. A smoke test of the whole pipeline, not a useful model: the loss falls (from about
    44 to 5), but 12 steps from random weights do not segment yet (IoU and AP stay near 0; the
    overfit test in tests/test_trainer.py shows the IoU rising on a fixed batch). Needs
    scikit-image.
    """
    config = TrainConfig(
        model="sam2.1_hiera_t", image_size=128, compute_dtype="float32", global_batch_size=4,
        total_steps=12, checkpoint_every=4, optim=OptimConfig(base_lr=3e-4),
        correction=CorrectionConfig(num_points=3),
        data=DataConfig(synthetic_images=8, objects_per_image=2, num_workers=2),
        eval=HeldOutConfig(every=6, synthetic_images=4, save_results=True))
    return apply_overrides(config, overrides)


PRESETS = {"paper": paper, "tiny": tiny}


# Settings a resumed run may change: how the batches are made (not which), what is logged,
# profiled, saved and evaluated. Everything else must equal the saved config.
RESUME_MAY_CHANGE = ("data.loader", "data.num_workers", "data.prefetch", "profile_steps",
                     "log_every", "checkpoint_every", "keep_checkpoints", "eval.", "imports")

# Overrides that name a run's data, and the generated data they turn off (`load_config`).
_NAMED_DATA = {"data": (("data.annotations", "data.datasets"), "data.synthetic_images"),
               "eval": (("eval.annotations",), "eval.synthetic_images")}


def _coerce(value: Any, annotation) -> Any:
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str,
                      "tuple": tuple}.get(annotation, annotation)
    if isinstance(value, str) and annotation is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is tuple and isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    expected = annotation if isinstance(annotation, type) else None
    if expected is not None and not isinstance(value, expected):
        raise InputError(f"expected {expected.__name__}, got {value!r}")
    return value


def _replace(config, path: list[str], value: Any, full: str):
    fields = {f.name: f for f in dataclasses.fields(config)}
    name = path[0]
    if name not in fields:
        raise InputError(f"unknown config key {full!r}: {type(config).__name__} has "
                         f"{', '.join(sorted(fields))}")
    current = getattr(config, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise InputError(f"config key {full!r}: {name!r} is not a section")
        return dataclasses.replace(config, **{name: _replace(current, path[1:], value, full)})
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise InputError(f"config key {full!r} is a section: give a JSON object")
        for key, item in value.items():
            current = _replace(current, [key], item, f"{full}.{key}")
        return dataclasses.replace(config, **{name: current})
    try:
        value = _coerce(value, fields[name].type)
    except ValueError as err:
        raise InputError(f"config key {full!r}: {err}") from None
    return dataclasses.replace(config, **{name: value})


def apply_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """``{"optim.base_lr": 1e-5, ...}`` (values may be JSON strings) -> a new config."""
    for key, value in overrides.items():
        config = _replace(config, key.split("."), value, key)
    return config


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> TrainConfig:
    """Inverse of ``to_dict`` (unknown keys are an error)."""
    return apply_overrides(TrainConfig(), {k: v for k, v in data.items()})


def run_config(name_or_path: Optional[str], workdir, resume: bool = False,
               overrides: Optional[dict] = None, imports: tuple = ()) -> TrainConfig:
    """The config of `p2s train`: `load_config` of `name_or_path`, or, resuming without one,
    of the workdir's config.json."""
    if name_or_path is None:
        saved = Path(workdir) / "config.json"
        if not (resume and saved.is_file()):
            raise InputError("--config is required (except with --resume in a workdir that "
                             "has a config.json)")
        name_or_path = str(saved)
    return load_config(name_or_path, overrides, imports)


def import_modules(modules, what: str = "--import") -> None:
    """Imports each module (one that registers a sampler or a keypoint schema), from
    ``sys.path`` or, as ``python -m`` would, the working folder."""
    for module in modules:
        try:
            if importlib.util.find_spec(module.split(".")[0]) is None and "" not in sys.path:
                with _working_folder_importable():
                    importlib.import_module(module)
            else:
                importlib.import_module(module)
        except ImportError as err:
            raise InputError(f"{what} {module}: {err}") from None


@contextlib.contextmanager
def _working_folder_importable():
    sys.path.append(os.getcwd())
    try:
        yield
    finally:
        sys.path.remove(os.getcwd())


def _named_data_wins(config: TrainConfig, overrides: dict) -> TrainConfig:
    """Data named by the overrides replaces the base config's generated data: ``tiny`` with
    ``data.annotations=A.json`` trains on A.json, not on its 8 generated images."""
    for section, (naming, generated) in _NAMED_DATA.items():
        if any(overrides.get(k) not in (None, "") for k in naming) and generated not in overrides:
            config = apply_overrides(config, {generated: 0})
    return config


def load_config(name_or_path: str, overrides: Optional[dict] = None,
                imports: tuple = ()) -> TrainConfig:
    """A preset name ('paper', 'tiny') or a JSON file written by ``to_dict``, with overrides.

    ``imports`` (modules of one's own, `p2s train --import`) and those the JSON file names are
    imported first and kept in ``config.imports``. Data that the overrides name
    (``data.annotations``, ``data.datasets``, ``eval.annotations``) turns the base config's
    generated data off; a config that still names two sources is refused (`DataConfig.source`).
    """
    overrides = dict(overrides or {})
    if name_or_path in PRESETS:
        saved, make = (), PRESETS[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise InputError(f"--config {name_or_path!r} is neither a preset "
                             f"({', '.join(PRESETS)}) nor a JSON file")
        data = read_json(path, "training config")
        saved = tuple(data.get("imports", ())) if isinstance(data, dict) else ()
        make = lambda: from_dict(data)  # noqa: E731
    modules = tuple(dict.fromkeys((*saved, *imports)))
    import_modules(modules, "--import" if imports else f"{name_or_path}: imports")
    config = _named_data_wins(apply_overrides(make(), overrides), overrides)
    config = dataclasses.replace(config, imports=modules)
    config.data.source(), config.eval.source()
    return config


