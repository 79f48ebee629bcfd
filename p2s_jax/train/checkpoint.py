"""Training checkpoints (Orbax) and export of a fine-tuned model as an official `.pt` file.

A checkpoint holds the whole training state (params, optimiser state, step, PRNG key) and a JSON
`meta` (step, data position, config). Orbax's `CheckpointManager` writes it atomically: an
interrupted save is never restored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp
from flax import nnx

from p2s_jax.train.config import TrainConfig, load_config
from p2s_jax.train.optim import make_optimizer, param_rules
from p2s_jax.train.step import build_training_model, init_state, trainable_filter
from p2s_jax.utils.errors import Error
from weights_conversion.convert import save_torch_checkpoint, video_memory_tensors


class WorkdirError(Error, RuntimeError):
    """The work directory does not fit the request (e.g. checkpoints there but no --resume)."""


def checkpoint_manager(workdir: Path, config: TrainConfig):
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options)


def save_checkpoint(manager, state: dict, meta: dict) -> None:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(manager, state: dict, step: Optional[int] = None) -> tuple[dict, dict]:
    """(state, meta) of ``step`` (default: the latest), restored onto ``state``'s shardings."""
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def export_torch(workdir, out_path, step: Optional[int] = None, base=None,
                 image_only: bool = False) -> tuple[Path, int]:
    """The fine-tuned model of ``workdir`` (latest checkpoint, or ``step``) as an official
    ``{"model": state_dict}`` file that the official strict loader (`build_sam2`,
    BBoxMaskPose's `prepare_model`) takes: the video-memory tensors, which fine-tuning on
    images does not change, come from ``base`` (the original `.pt`), else from the run's
    ``init_checkpoint`` (a `.pt`, or a folder `p2s convert` wrote). When none is known this
    raises, unless ``image_only`` asks for the image-path tensors alone. Returns the path and
    the number of video-memory tensors carried."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise WorkdirError(f"{workdir} has no config.json: not a training work directory")
    config = load_config(str(config_path))
    video = None
    source = base or config.init_checkpoint
    if source:
        video = video_memory_tensors(source)
    if not video and not image_only:
        raise WorkdirError(
            f"no video-memory tensors are known for {workdir}'s model (init_checkpoint "
            f"{config.init_checkpoint or 'none: random weights'}); the official loader refuses "
            "a file without them: pass --base ORIGINAL.pt (the SAM 2.1 checkpoint the run was "
            "fine-tuned from), or --image-only for the image-path tensors alone")
    model = build_training_model(dataclasses.replace(config, compute_dtype="float32"))
    graphdef, params, frozen = nnx.split(model, trainable_filter(config), ...)
    tx = make_optimizer(config.optim, config.total_steps, *param_rules(model, params, config.optim))
    manager = checkpoint_manager(workdir, config)
    if manager.latest_step() is None:
        raise WorkdirError(f"{workdir / 'checkpoints'} holds no checkpoint")
    state, _ = restore_checkpoint(manager, init_state(params, tx, config.seed), step)
    trained = nnx.merge(graphdef, state["params"], frozen)
    save_torch_checkpoint(trained, out_path, base_state_dict=video)
    return Path(out_path), len(video or {})

