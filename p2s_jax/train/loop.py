"""The host side of training: batches in, steps dispatched, metrics, evaluations and checkpoints
out, and a clean stop when the run is told to.

`train` checks every path the config names before it writes anything, reads deterministic
batches (the batch of step s is a function of the seed and s), runs the jitted data-parallel
step of :mod:`p2s_jax.train.step` (compiled once, ahead of the first step, which also gives
XLA's FLOP count), checkpoints params, optimiser state, step, PRNG key and the loader's
position (:mod:`p2s_jax.train.checkpoint`), resumes exactly, and writes metrics to JSONL and
TensorBoard: the losses, the IoU after each correction point, the time split of the step and
the utilisation (:mod:`p2s_jax.train.timing`), the held-out metrics every `eval.every` steps
(:mod:`p2s_jax.train.evaluator`). The metrics of a step are read back after the next step has
been dispatched, so the device never waits for the host.

Stopping: on SIGTERM (a preemption or maintenance notice; on a multi-host slice every host
stops at the same step, JAX's preemption sync point) or Ctrl-C, the step in flight finishes,
the step reached is saved and committed, and `Preempted` is raised (`p2s train` prints one line
and exits with status 75); `--resume` continues bit-exactly. Multi-host:
`jax.distributed.initialize()` before `train`; each process reads its own slice of every global
batch.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Optional

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from tqdm import tqdm

from p2s_jax.hardware import peak_flops, xla_cost
from p2s_jax.model.flops import train_flops_per_image
from p2s_jax.parallel import REPLICATED, host_to_global, make_mesh
from p2s_jax.train import losses
from p2s_jax.train.checkpoint import (WorkdirError, best_manager, checkpoint_manager,
                                      restore_checkpoint, save_checkpoint, set_aside_after)
from p2s_jax.train.config import RESUME_MAY_CHANGE, TrainConfig, load_config, to_dict
from p2s_jax.train.inputs import prepare_inputs
from p2s_jax.train.metrics_writer import MetricsWriter
from p2s_jax.train.preemption import Preempted, StopWatch
from p2s_jax.train.state import STEP_INPUTS, build_training_model, new_state
from p2s_jax.train.step import make_train_step
from p2s_jax.train.timing import StepTimer
from p2s_jax.utils.errors import Error, InputError, Interrupted, interrupt_signal
from p2s_jax.utils.files import listing, what_was_left, write_json
from p2s_jax.utils.nested import flatten
from p2s_jax.utils.text import plural

DATA_BOUND_SHARE = 0.1  # a window whose device waits longer than this on its input is reported


class NonFiniteError(Error, RuntimeError):
    """A non-finite loss or gradient stopped the run (nothing non-finite was applied or saved)."""


@dataclasses.dataclass
class TrainResult:
    state: dict  # the final training state (params, opt_state, step, rng)
    steps_run: int  # steps run by this call
    last_metrics: dict  # scalar metrics of the last step
    final_step: int = 0  # the step the run is at (its last checkpoint)

    def summary(self, workdir) -> str:
        """The line `p2s train` ends with."""
        if self.steps_run == 0:
            return (f"the run in {workdir} is complete: step {self.final_step} of "
                    f"{self.final_step}; nothing to train")
        final = {k: round(v, 6) for k, v in self.last_metrics.items()}
        return (f"trained {plural(self.steps_run, 'step')} in {workdir} (now at step "
                f"{self.final_step}); last metrics: {json.dumps(final)}")


def _scalar_metrics(metrics: dict) -> dict:
    out = {k: float(v) for k, v in metrics.items() if k not in ("iou_per_step", "finite")}
    for t, value in enumerate(np.asarray(metrics["iou_per_step"])):
        out[f"iou_after_point_{t + 1}"] = float(value)
    return out


# ------------------------------------------------------------------------------ before any write


def _check_workdir(workdir: epath.Path, config: TrainConfig, resume: bool) -> None:
    """The workdir fits the request: checkpoints there need --resume, and a resumed run has the
    saved config (nothing is written here)."""
    config_path = workdir / "config.json"
    checkpoints = workdir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(p.name.isdigit()
                                                   for p in checkpoints.iterdir())
    if has_checkpoints and not resume:
        raise WorkdirError(f"{workdir} already holds checkpoints: pass --resume to continue "
                           f"that run, or choose a new --workdir")
    if resume and config_path.is_file():
        old = flatten(to_dict(load_config(str(config_path))))
        derived = {"total_steps"} if config.total_steps == 0 else set()  # from the data
        diff = sorted(k for k, v in flatten(to_dict(config)).items()
                      if old.get(k) != v and k not in derived
                      and not k.startswith(RESUME_MAY_CHANGE))
        if diff:
            raise WorkdirError(f"--resume with a config that differs from {config_path} in "
                               f"{', '.join(diff)} (a resumed run may change only "
                               f"{', '.join(RESUME_MAY_CHANGE)})")


def _write_config(workdir: epath.Path, config: TrainConfig) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", to_dict(config), indent=2)


# ------------------------------------------------------------------------------ reporting


class _Report:
    """Reads a finished step's metrics back: stops on a non-finite step, logs the losses, the
    time split and the utilisation, says when the run is data-bound, shows progress. A step is
    read back after the next one is dispatched (`defer`), or at once where the host needs it
    done (`flush`: before an evaluation or a save)."""

    def __init__(self, workdir: epath.Path, config: TrainConfig, manager, timer: StepTimer,
                 start: int, end: int, progress: bool):
        self.workdir, self.config, self.manager, self.end = workdir, config, manager, end
        self.timer = timer
        self.writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                                    resumed_from=start if start else None)
        self.bar = (tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True)
                    if progress and jax.process_index() == 0 else None)
        self.lines = not progress  # a line every log_every steps instead of the bar
        self.since_line = [0, 0.0, 0.0]  # steps, wall and loader-bound seconds since the last
        self.last: dict = {}
        self.pending = None  # (step, metrics, record ids) of the step dispatched last

    def defer(self, step: int, metrics, record_index: np.ndarray) -> None:
        """Reads back the step dispatched before `step`, and keeps `step`'s for later."""
        self.flush()
        self.pending = (step, metrics, record_index)

    def flush(self) -> None:
        """Reads back the step `defer` kept, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self(*pending)

    def __call__(self, step: int, metrics, record_index: np.ndarray) -> None:
        metrics = jax.device_get(metrics)
        if not bool(metrics["finite"]):
            self._stop(step, metrics, record_index)
        times = self.timer.times(step)
        self.last = {**_scalar_metrics(metrics), **self.timer.metrics(times)}
        done = step + 1
        self.since_line = [self.since_line[0] + 1, self.since_line[1] + times.wall,
                           self.since_line[2] + min(times.idle, times.loader + times.transfer)]
        if done % self.config.log_every == 0 or done == self.end:
            self.writer.write(done, self.last)
            if self.lines:
                self._line(done)
        if len(self.timer.window) == self.timer.window.maxlen or done == self.end:
            self._data_bound(done)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last[losses.CORE_LOSS_KEY]:.4f}",
                                 img_s=f"{self.last['images_per_second']:.2f}")

    def _line(self, done: int) -> None:
        """One line for the log: step, loss, images/s and the share of time waiting on data,
        over the steps since the last line."""
        steps, wall, waiting = self.since_line
        self.since_line = [0, 0.0, 0.0]
        speed = steps * self.config.global_batch_size / wall if wall > 0 else 0.0
        self.say(f"step {done}/{self.config.total_steps}: loss "
                 f"{self.last[losses.CORE_LOSS_KEY]:.4f}, {speed:.2f} images/s, data-bound "
                 f"{100 * waiting / wall if wall > 0 else 0.0:.0f} %")

    def _data_bound(self, done: int) -> None:
        share, steps = self.timer.data_bound_share(), len(self.timer.window)
        self.timer.window.clear()
        if share > DATA_BOUND_SHARE:
            advice = ("raise data.num_workers" if self.config.data.loader == "processes"
                      else "raise data.num_workers or set data.loader=processes")
            self.say(f"data-bound: {100 * share:.0f} % of the last {steps} steps (to step "
                     f"{done}) waiting on the loader; {advice}")

    def say(self, line: str) -> None:
        if jax.process_index() == 0:
            (self.bar.write if self.bar is not None else print)(line)

    def evaluation(self, done: int, values: dict, seconds: float) -> None:
        self.writer.write(done, {**values, "eval/seconds": seconds})
        shown = ", ".join(f"{k.removeprefix('eval/')} {'-' if v < 0 else f'{100 * v:.1f}'}"
                          for k, v in values.items() if not k.startswith("eval/iou_after"))
        self.say(f"step {done}: held-out {shown} ({seconds:.1f} s)")

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


# ------------------------------------------------------------------------------ the run


def train(config: TrainConfig, workdir, *, resume: bool = False,
          resume_step: Optional[int] = None, loader=None, progress: bool = True,
          max_steps: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) training in ``workdir``; returns the final state.

    ``resume_step``: with ``resume``, continue from that checkpoint instead of the latest (the
    later ones are moved to ``<workdir>/checkpoints.unused``). ``loader``: an object with
    ``iterate(start_step)`` yielding ``(step, batch)`` and ``num_records`` (default: built from
    ``config.data``, see :mod:`p2s_jax.data.pipeline`). ``max_steps``: stop after this many
    steps in this call (the schedule still spans ``total_steps``), e.g. to simulate an
    interruption.

    Raises:
      Preempted: the run was told to stop (SIGTERM, Ctrl-C) and saved the step it reached.
      Interrupted: it was told to stop before its first step; the message says what the run
        had written.
      NonFiniteError, WorkdirError, InputError: see their messages.
    """
    workdir = epath.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file: name a folder (it is created)")
    if resume_step is not None and not resume:
        raise InputError("--resume-step goes with --resume")
    before = listing(workdir)
    try:
        return _train(config, workdir, resume, resume_step, loader, progress, max_steps)
    except BaseException as err:
        number = interrupt_signal(err)
        if number is None or isinstance(err, Error):
            raise
        checkpoints = workdir / "checkpoints"
        saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
        raise Interrupted(f"interrupted ({signal.Signals(number).name}); "
                          f"{what_was_left(workdir, before)}"
                          + ("" if saved else "; no checkpoint"), number) from None


def _train(config: TrainConfig, workdir: epath.Path, resume: bool, resume_step: Optional[int],
           loader, progress: bool, max_steps: Optional[int]) -> TrainResult:
    mesh = make_mesh()
    if config.global_batch_size % mesh.size:
        raise InputError(f"global_batch_size {config.global_batch_size} is not a multiple of "
                         f"the {mesh.size} devices")
    _check_workdir(workdir, config, resume)
    loader, evaluator = prepare_inputs(config, workdir, loader, progress)
    if not config.total_steps:
        steps = (config.epochs * config.dataset_multiplier * loader.num_records
                 // config.global_batch_size)
        config = dataclasses.replace(config, total_steps=max(int(steps), 1))
    _write_config(workdir, config)

    model = build_training_model(config)
    model_config = model.config
    graphdef, tx, state, frozen = new_state(config, model)
    del model
    state, frozen = jax.device_put((state, frozen), NamedSharding(mesh, REPLICATED))

    manager = checkpoint_manager(workdir, config)
    start = 0
    if resume and manager.latest_step() is not None:
        if resume_step is not None:
            state, meta = restore_checkpoint(manager, state, resume_step)
            if jax.process_index() == 0:
                set_aside_after(workdir, resume_step)
            manager.reload()
        else:
            state, meta = restore_checkpoint(manager, state)
        start = int(meta["step"])
        _check_loader_position(loader, meta)
    end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)
    if start >= end:
        manager.close()
        getattr(loader, "close", lambda: None)()
        return TrainResult(state, 0, {}, start)

    best = best_manager(workdir) if evaluator is not None and config.eval.keep_best else None
    timer = StepTimer(config.global_batch_size,
                      train_flops_per_image(model_config, config.correction.num_points,
                                            config.data.objects_per_image,
                                            config.freeze_image_encoder),
                      peak_flops(jax.devices()[0].device_kind), mesh.size)
    report = _Report(workdir, config, manager, timer, start, end, progress)
    step_fn, compiled = make_train_step(graphdef, tx, config, mesh), None

    def meta_of(done: int) -> dict:
        return {"step": done, "data_position": done * config.global_batch_size,
                "data_state": _loader_state(loader, done), "config": to_dict(config)}

    profile = _Profile(config.profile_steps, workdir)
    batches = iter(loader.iterate(start))
    try:
        with StopWatch() as stop:
            for step in range(start, end):
                tick = time.perf_counter()
                loaded_step, batch = next(batches)
                if loaded_step != step:
                    raise RuntimeError(f"the loader gave step {loaded_step} for step {step}")
                loaded = time.perf_counter()
                device_batch = {k: host_to_global(mesh, batch[k]) for k in STEP_INPUTS}
                jax.block_until_ready(device_batch)
                transferred = time.perf_counter()
                if compiled is None:
                    compiled = _compile(step_fn, state, frozen, device_batch, timer)
                profile.before(step)
                dispatch = time.perf_counter()
                state, metrics = compiled(state, frozen, device_batch)
                timer.dispatched(step, loaded - tick, transferred - loaded, metrics, dispatch)
                report.defer(step, metrics, np.asarray(batch["record_index"]))
                done = step + 1
                profile.after(step, metrics)
                evaluated = None
                if evaluator is not None and (done % config.eval.every == 0
                                              or done == config.total_steps):
                    report.flush()
                    began = time.perf_counter()
                    evaluated = evaluator(nnx.merge(graphdef, state["params"], frozen), done)
                    report.evaluation(done, evaluated, time.perf_counter() - began)
                    timer.restart()
                stopping = stop.should_stop(done) and done < end
                save = done % config.checkpoint_every == 0 or done == end or stopping
                if save or evaluated:
                    report.flush()
                # one manager's asynchronous save at a time: on several hosts each save's
                # commit meets the other hosts at barriers, which two saves in flight could
                # reach in another order on each host
                if save:
                    _wait_for_saves(best)
                    save_checkpoint(manager, state, meta_of(done), force=stopping)
                if evaluated and best is not None:
                    _wait_for_saves(manager)
                    save_checkpoint(best, state, {**meta_of(done), "eval": evaluated},
                                    metrics={"AP": evaluated["eval/AP"]})
                if stopping:
                    _wait_for_saves(manager, best)
                    raise Preempted(
                        f"stopped by {stop.reason} at step {done}: checkpoint "
                        f"{workdir / 'checkpoints' / str(done)} saved; continue with: p2s "
                        f"train --workdir {workdir} --resume"
                        + (" --distributed" if jax.process_count() > 1 else ""), done)
            report.flush()
            _wait_for_saves(manager, best)
    finally:
        profile.close()
        report.close()
        timer.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return TrainResult(state, end - start, report.last, end)


def _wait_for_saves(*managers) -> None:
    """Until every save in flight is committed (None: a manager the run does not have)."""
    for manager in managers:
        if manager is not None:
            manager.wait_until_finished()


def _compile(step_fn, state, frozen, batch, timer: StepTimer):
    """The train step compiled for these arguments (the program every step runs); XLA's FLOP
    count of it (all devices) goes to the timer's HFU."""
    compiled = step_fn.lower(state, frozen, batch).compile()
    flops = xla_cost(compiled).get("flops")
    if flops:
        timer.hardware_flops_per_step = float(flops) * jax.device_count()
    return compiled


def _loader_state(loader, next_step: int) -> dict | None:
    """The loader's position for the checkpoint (None for a loader that has none to give)."""
    state_dict = getattr(loader, "state_dict", None)
    return state_dict(next_step) if state_dict is not None else None


def _check_loader_position(loader, meta: dict) -> None:
    """The checkpoint's loader position must be one this loader continues (same order)."""
    saved, resume_step = meta.get("data_state"), getattr(loader, "resume_step", None)
    if saved is None or resume_step is None:
        return
    try:
        next_step = resume_step(saved)
    except ValueError as err:
        raise WorkdirError(f"the checkpoint's data position does not fit this run: {err}") from None
    if next_step != int(meta["step"]):
        raise WorkdirError(f"the checkpoint of step {meta['step']} stores the data position of "
                           f"step {next_step}")


class _Profile:
    """A `jax.profiler` trace of the steps `profile_steps` = (first, last), written under
    `<workdir>/tensorboard` (TensorBoard's profile plugin: plugins/profile/<run>/)."""

    def __init__(self, steps: tuple, workdir: epath.Path):
        self.steps, self.workdir, self.active = tuple(steps), workdir, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(str(self.workdir / "tensorboard"))
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
