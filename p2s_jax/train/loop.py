"""The host side of training: batches in, steps dispatched, metrics and checkpoints out.

`train` reads deterministic batches (the batch of step s is a function of the seed and s),
runs the jitted data-parallel step of :mod:`p2s_jax.train.step`, checkpoints params, optimiser
state, step and PRNG key (:mod:`p2s_jax.train.checkpoint`), resumes exactly, and writes metrics
to JSONL and TensorBoard. The metrics of a step are read back after the next step has been
dispatched, so the device never waits for the host. Multi-host: `jax.distributed.initialize()`
before `train`; each process reads its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from p2s_jax.data.pipeline import loader_from_config
from p2s_jax.parallel import REPLICATED, host_to_global, make_mesh
from p2s_jax.train import losses
from p2s_jax.train.checkpoint import (WorkdirError, checkpoint_manager, restore_checkpoint,
                                      save_checkpoint)
from p2s_jax.train.config import TrainConfig, load_config, to_dict
from p2s_jax.train.metrics_writer import MetricsWriter
from p2s_jax.train.optim import make_optimizer, param_rules
from p2s_jax.train.step import (STEP_INPUTS, build_training_model, init_state, make_train_step,
                                trainable_filter)
from p2s_jax.utils.errors import Error, InputError
from p2s_jax.utils.files import write_json


class NonFiniteError(Error, RuntimeError):
    """A non-finite loss or gradient stopped the run (nothing non-finite was applied or saved)."""


@dataclasses.dataclass
class TrainResult:
    state: dict  # the final training state (params, opt_state, step, rng)
    steps_run: int  # steps run by this call
    last_metrics: dict  # scalar metrics of the last step


def _scalar_metrics(metrics: dict, seconds: float, images: int) -> dict:
    out = {k: float(v) for k, v in metrics.items() if k not in ("iou_per_step", "finite")}
    for t, value in enumerate(np.asarray(metrics["iou_per_step"])):
        out[f"iou_after_point_{t + 1}"] = float(value)
    out["images_per_second"] = images / max(seconds, 1e-9)
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_workdir(workdir: Path, config: TrainConfig, resume: bool) -> None:
    config_path = workdir / "config.json"
    has_checkpoints = (workdir / "checkpoints").is_dir() and any(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    if has_checkpoints and not resume:
        raise WorkdirError(f"{workdir} already holds checkpoints: pass --resume to continue "
                           f"that run, or choose a new --workdir")
    if resume and config_path.is_file():
        saved = load_config(str(config_path))
        if saved != config:
            old = _flat(to_dict(saved))
            diff = sorted(k for k, v in _flat(to_dict(config)).items() if old.get(k) != v)
            raise WorkdirError(f"--resume with a config that differs from {config_path} in "
                               f"{', '.join(diff)}")
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_json(config_path, to_dict(config), indent=2)


class _StepMetrics:
    """Reads a finished step's metrics back: stops on a non-finite step, logs, shows progress."""

    def __init__(self, workdir: Path, config: TrainConfig, manager, start: int, end: int,
                 progress: bool):
        self.workdir, self.config, self.manager, self.end = workdir, config, manager, end
        self.writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
        self.bar = (tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True)
                    if progress and jax.process_index() == 0 else None)
        self.last: dict = {}
        self.tick = time.perf_counter()

    def __call__(self, step: int, metrics, record_index: np.ndarray) -> None:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        if not bool(metrics["finite"]):
            self._stop(step, metrics, record_index)
        self.last = _scalar_metrics(metrics, now - self.tick, self.config.global_batch_size)
        self.tick = now
        if (step + 1) % self.config.log_every == 0 or step + 1 == self.end:
            self.writer.write(step + 1, self.last)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last[losses.CORE_LOSS_KEY]:.4f}",
                                 img_s=f"{self.last['images_per_second']:.2f}")

    def _stop(self, step: int, metrics, record_index: np.ndarray):
        self.manager.wait_until_finished()
        good = self.manager.latest_step()
        where = f"{self.workdir / 'checkpoints' / str(good)}" if good is not None else "none"
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} (core_loss="
            f"{float(metrics[losses.CORE_LOSS_KEY])}, grad_norm={float(metrics['grad_norm'])}); "
            f"batch record ids {record_index.tolist()}; the update was not applied; last good "
            f"checkpoint: {where}")

    def close(self) -> None:
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


def train(config: TrainConfig, workdir, *, resume: bool = False, loader=None,
          progress: bool = True, max_steps: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) training in ``workdir``; returns the final state.

    ``loader``: an object with ``iterate(start_step)`` yielding ``(step, batch)`` and
    ``num_records`` (default: built from ``config.data``, see :mod:`p2s_jax.data.pipeline`).
    ``max_steps``: stop after this many steps in this call (the schedule still spans
    ``total_steps``), e.g. to simulate an interruption.
    """
    workdir = Path(workdir)
    mesh = make_mesh()
    if config.global_batch_size % mesh.size:
        raise InputError(f"global_batch_size {config.global_batch_size} is not a multiple of "
                         f"the {mesh.size} devices")
    loader = loader_from_config(config, workdir) if loader is None else loader
    if not config.total_steps:
        steps = (config.epochs * config.dataset_multiplier * loader.num_records
                 // config.global_batch_size)
        config = dataclasses.replace(config, total_steps=max(int(steps), 1))
    _prepare_workdir(workdir, config, resume)

    model = build_training_model(config)
    graphdef, params, frozen = nnx.split(model, trainable_filter(config), ...)
    tx = make_optimizer(config.optim, config.total_steps, *param_rules(model, params, config.optim))
    replicated = NamedSharding(mesh, REPLICATED)
    state = jax.device_put(init_state(params, tx, config.seed), replicated)
    frozen = jax.device_put(frozen, replicated)
    del model, params

    manager = checkpoint_manager(workdir, config)
    start = 0
    if resume and manager.latest_step() is not None:
        state, meta = restore_checkpoint(manager, state)
        start = int(meta["step"])
    step_fn = make_train_step(graphdef, tx, config, mesh)
    end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
    report = _StepMetrics(workdir, config, manager, start, end, progress)
    pending = None  # (step, metrics, record ids) of the previous step, read after the next
    try:
        for step, batch in loader.iterate(start):
            if step >= end:
                break
            state, metrics = step_fn(state, frozen,
                                     {k: host_to_global(mesh, batch[k]) for k in STEP_INPUTS})
            if pending is not None:
                report(*pending)
            pending = (step, metrics, np.asarray(batch["record_index"]))
            done = step + 1
            if done % config.checkpoint_every == 0 or done == end:
                report(*pending)
                pending = None
                save_checkpoint(manager, state, {
                    "step": done, "data_position": done * config.global_batch_size,
                    "config": to_dict(config)})
        if pending is not None:
            report(*pending)
        manager.wait_until_finished()
    finally:
        report.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return TrainResult(state, end - start, report.last)
