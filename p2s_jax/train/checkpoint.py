"""Training checkpoints (Orbax) and export of a fine-tuned model as an official `.pt` file.

A checkpoint holds the whole training state (params, optimiser state, step, PRNG key) and a JSON
`meta` (step, the loader's position, config, and the held-out metrics when the step was
evaluated). Orbax's `CheckpointManager` writes it asynchronously and atomically: a save lives in
a temporary folder until its commit renames it, so a save cut short (SIGKILL, power loss) is
never restored; the run resumes from the last committed step. `<workdir>/checkpoints` keeps
the latest `keep_checkpoints`; `<workdir>/best` keeps the one with the best held-out AP
(Orbax's `best_fn`). A checkpoint that cannot be restored is named in one line with the step
before it, and `restore_checkpoint(step=...)` / `p2s train --resume --resume-step` continues from
there, moving the later checkpoints aside (`<workdir>/checkpoints.unused/`), never deleting them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
import warnings
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from p2s_jax.train.config import TrainConfig, load_config
from p2s_jax.train.state import abstract_state, build_training_model, trainable_filter
from p2s_jax.utils.errors import Error
from p2s_jax.utils.text import plural
from weights_conversion.convert import save_torch_checkpoint, video_memory_tensors

BEST_METRIC = "AP"  # the held-out metric `<workdir>/best` keeps the maximum of


class WorkdirError(Error, RuntimeError):
    """The work directory does not fit the request (e.g. checkpoints there but no --resume)."""


def checkpoint_dir(workdir) -> epath.Path:
    return epath.Path(workdir) / "checkpoints"


def checkpoint_manager(workdir, config: TrainConfig) -> ocp.CheckpointManager:
    """The latest `keep_checkpoints` checkpoints, saved asynchronously."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir).absolute(), options=options)


def best_manager(workdir) -> ocp.CheckpointManager:
    """The checkpoint with the best held-out AP (`best_fn`): one is kept, the best seen."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=True,
        best_fn=lambda metrics: metrics[BEST_METRIC], best_mode="max",
        keep_checkpoints_without_metrics=False)
    return ocp.CheckpointManager((epath.Path(workdir) / "best").absolute(), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: dict, meta: dict,
                    metrics: Optional[dict] = None, force: bool = False) -> None:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
                 metrics=metrics, force=force)


def restore_checkpoint(manager: ocp.CheckpointManager, state: dict,
                       step: Optional[int] = None) -> tuple[dict, dict]:
    """(state, meta) of ``step`` (default: the latest), restored onto ``state``'s shardings.

    Raises:
      WorkdirError: no such checkpoint (naming the steps there), or one that cannot be restored
        (naming it, the step before it, and how to continue from that one).
    """
    steps = sorted(manager.all_steps())
    step = (steps[-1] if steps else None) if step is None else step
    where = epath.Path(manager.directory)
    if step is None or step not in steps:
        raise WorkdirError(f"{where} holds no checkpoint of step {step}; saved steps: "
                           f"{steps or 'none'}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        with _quiet_stragglers():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax raises many types for a damaged checkpoint
        earlier = [s for s in steps if s < step]
        hint = (f"; the checkpoint before it is step {earlier[-1]}: continue from it with "
                f"--resume --resume-step {earlier[-1]}" if earlier else
                "; no earlier checkpoint is left")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = reason.split(" See full TensorStore details")[0]
        raise WorkdirError(f"checkpoint {where / str(step)} cannot be restored "
                           f"({type(err).__name__}: {reason[:200]}){hint}") from None
    return restored["state"], restored["meta"]


_STRAGGLER_NOISE = ("Event loop is closed", "Encountered error while reading array index")


@contextlib.contextmanager
def _quiet_stragglers(wait_s: float = 0.5):
    """When a restore fails, orbax's event loop is closed while the checkpoint's other reads
    are still in flight: their callbacks raise 'Event loop is closed', asyncio logs their
    unretrieved errors and their coroutines complain when collected, a screenful of tracebacks
    after the one line that says what is wrong. After a failure the reads are given `wait_s`
    to end, and from then on those (and only those) messages are dropped."""
    logger, hook = logging.getLogger("asyncio"), sys.unraisablehook

    def drop_stragglers(unraisable):
        if not any(text in str(unraisable.exc_value) for text in _STRAGGLER_NOISE):
            hook(unraisable)

    def unretrieved(record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in record.getMessage()

    logger.addFilter(unretrieved)
    sys.unraisablehook = drop_stragglers
    try:
        yield
    except BaseException:
        warnings.filterwarnings("ignore", category=RuntimeWarning,
                                message="coroutine .* was never awaited")
        time.sleep(wait_s)
        gc.collect()
        raise  # the filters stay: the stragglers' tasks and coroutines are collected later
    sys.unraisablehook = hook
    logger.removeFilter(unretrieved)


def set_aside_after(workdir, step: int) -> list[int]:
    """Moves the checkpoints after `step` to `<workdir>/checkpoints.unused/` (a run resumed
    from `step` writes those steps anew); -> the steps moved. Nothing is deleted."""
    source, unused = checkpoint_dir(workdir), epath.Path(workdir) / "checkpoints.unused"
    moved = []
    for path in sorted(source.iterdir(), key=lambda p: p.name) if source.exists() else []:
        if path.name.isdigit() and int(path.name) > step:
            unused.mkdir(parents=True, exist_ok=True)
            target = unused / path.name
            suffix = 1
            while target.exists():
                target, suffix = unused / f"{path.name}.{suffix}", suffix + 1
            path.rename(target)
            moved.append(int(path.name))
    return moved


class Exported(NamedTuple):
    """What `export_torch` wrote."""

    path: epath.Path  # the .pt file
    video_tensors: int  # video-memory tensors carried from the base
    step: int  # the checkpoint's step
    heldout: dict  # its held-out metrics ({} where the step was not evaluated)

    def summary(self) -> str:
        """The line `p2s export` ends with: what was written, from which step."""
        what = (f"official SAM 2.1 state_dict, {plural(self.video_tensors, 'video-memory tensor')}"
                " carried" if self.video_tensors else "image-path tensors only")
        scored = (f"; held-out AP {100 * self.heldout['eval/AP']:.1f}"
                  if "eval/AP" in self.heldout else "")
        return f"wrote {self.path} (step {self.step}{scored}; {what} under 'model')"


def export_torch(workdir, out_path, step: Optional[int] = None, base=None,
                 image_only: bool = False, best: bool = False) -> Exported:
    """The fine-tuned model of ``workdir`` (latest checkpoint, ``step``, or with ``best`` the
    checkpoint of the best held-out AP) as an official ``{"model": state_dict}`` file that the
    official strict loader (`build_sam2`, BBoxMaskPose's `prepare_model`) takes: the
    video-memory tensors, which fine-tuning on images does not change, come from ``base`` (the
    original `.pt`), else from the run's ``init_checkpoint`` (a `.pt`, or a folder `p2s
    convert` wrote). When none is known this raises, unless ``image_only`` asks for the
    image-path tensors alone. Returns what was written (`Exported`)."""
    workdir = epath.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise WorkdirError(f"{workdir} has no config.json: not a training work directory")
    config = load_config(str(config_path))
    video = None
    source = base or config.init_checkpoint
    if source:
        video = video_memory_tensors(source)
    if not video and not image_only and base:
        raise WorkdirError(
            f"--base {base} holds no video-memory tensors (a checkpoint of p2s init, or a "
            "folder converted without them); the official loader refuses a file without them: "
            "pass the SAM 2.1 .pt the run was fine-tuned from, or --image-only for the "
            "image-path tensors alone")
    if not video and not image_only:
        raise WorkdirError(
            f"no video-memory tensors are known for {workdir}'s model (init_checkpoint "
            f"{config.init_checkpoint or 'none: random weights'}); the official loader refuses "
            "a file without them: pass --base ORIGINAL.pt (the SAM 2.1 checkpoint the run was "
            "fine-tuned from), or --image-only for the image-path tensors alone")
    if best:
        if not (workdir / "best").is_dir():
            raise WorkdirError(f"{workdir} has no best checkpoint: the run evaluated nothing "
                               "(eval.every = 0)")
        manager = best_manager(workdir)
        step = manager.best_step()
    else:
        manager = checkpoint_manager(workdir, config)
    if manager.latest_step() is None:
        raise WorkdirError(f"{manager.directory} holds no checkpoint")
    config = dataclasses.replace(config, compute_dtype="float32")
    # the frozen weights are not in a checkpoint: the run's own (init_checkpoint or its seeded
    # random init); the trained ones are restored onto the state's abstract shapes
    graphdef, _, frozen = nnx.split(build_training_model(config), trainable_filter(config), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_state(config).state)
    state, meta = restore_checkpoint(manager, target, step)
    trained = nnx.merge(graphdef, state["params"], frozen)
    save_torch_checkpoint(trained, out_path, base_state_dict=video)
    return Exported(epath.Path(out_path), len(video or {}), int(meta["step"]),
                    dict(meta.get("eval") or {}))
