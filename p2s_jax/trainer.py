"""Data-parallel fine-tuning of SAM 2.1 with the correction loop (paper Sec. 3.2, 4.1).

One training step (``make_train_step``), per device, inside ``jax.shard_map`` over a 1-D
``Mesh`` of every device (axis ``"data"``):

1. the frozen image encoder runs forward only (``stop_gradient``; ``freeze_image_encoder=False``
   moves it inside the gradient with its own lr and layer decay);
2. ``no_mem_embed``, the decoder's high-res convs, the prompt encoder and the mask decoder run the
   correction loop (:func:`p2s_jax.correction.correction_loop`) on every image of the device's
   batch (``vmap``), the official losses summed over steps, divided by the number of objects
   averaged over devices (the official ``all_reduce(num_objects) / world_size``);
3. gradients are averaged over devices (``lax.pmean``, as DDP), clipped, and applied by the
   optimiser of :mod:`p2s_jax.optim` (float32 master weights; the model computes in
   ``compute_dtype``);
4. a non-finite loss or gradient leaves the parameters and optimiser state unchanged (nothing
   non-finite is ever applied or saved) and the host stops the run naming the step, the batch
   and the last good checkpoint.

The host loop (``train``) reads deterministic batches (the batch of step s is a function of the
seed and s), checkpoints params, optimiser state, step and PRNG key with an Orbax
``CheckpointManager`` (atomic: an interrupted save is never restored), resumes exactly, and
writes metrics to JSONL and TensorBoard.  Multi-host: ``jax.distributed.initialize()`` before
``train``; each process reads its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from p2s_jax import losses
from p2s_jax.correction import LoopTargets, correction_loop
from p2s_jax.optim import lr_schedule, make_optimizer, param_rules
from p2s_jax.predictor import imagenet_normalize
from p2s_jax.sam2 import SAM2Image
from p2s_jax.train_config import TrainConfig, load_config, to_dict

AXIS = "data"
BATCH_KEYS = ("image", "masks", "keypoints", "visibility", "valid")


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient stopped the run (nothing non-finite was applied or saved)."""


class WorkdirError(RuntimeError):
    """The work directory does not fit the request (e.g. checkpoints there but no --resume)."""


# ------------------------------------------------------------------------------ model and state

def trainable_filter(config: TrainConfig):
    """Which variables the optimiser updates: every Param but the frozen image encoder's."""
    if config.freeze_image_encoder:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("image_encoder")))
    return nnx.Param


def compute_dtype(config: TrainConfig):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.compute_dtype]
    except KeyError:
        raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                         f"{config.compute_dtype!r}") from None


def build_training_model(config: TrainConfig) -> SAM2Image:
    """The model to fine-tune: ``init_checkpoint`` loaded strictly, or a seeded random init."""
    from p2s_jax.configs import get_config
    from p2s_jax.sam2 import build_model

    dtype = compute_dtype(config)
    if config.init_checkpoint:
        from weights_conversion import load_model

        return load_model(config.init_checkpoint, config.model, config.image_size, dtype)
    return build_model(get_config(config.model, config.image_size), seed=config.seed, dtype=dtype)


def normalize_images(images: jax.Array) -> jax.Array:
    """(..., S, S, 3) uint8 -> ImageNet-normalised float32 (the official ToTensor + Normalize)."""
    return imagenet_normalize(images.astype(jnp.float32) / 255.0)


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> dict:
    """The checkpointed training state (a plain dict pytree)."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed))}


# ------------------------------------------------------------------------------ the step

def _loss_fn(params, rest, graphdef, fpn, images, batch, keys, num_objects, config: TrainConfig):
    model = nnx.merge(graphdef, params, rest)
    if fpn is None:  # encoder trained: its forward inside the gradient
        fpn = model.image_encoder(images).backbone_fpn
    features = model.image_features(fpn)  # leading B
    targets = LoopTargets(batch["masks"], batch["keypoints"], batch["visibility"], batch["valid"])

    def one_image(f, t, k):
        return correction_loop(model, f, t, jax.random.wrap_key_data(k), config.correction,
                               config.loss, num_objects)

    if keys.shape[0] == 1:  # one image per device (CPU): vmap over a batch of 1 costs 10-20 %
        out = jax.tree.map(lambda x: x[None], one_image(
            *jax.tree.map(lambda x: x[0], (features, targets, keys))))
    else:
        out = jax.vmap(one_image)(features, targets, keys)
    terms = {k: jnp.sum(v) for k, v in out.loss_terms.items()}
    loss = losses.reduce_loss(terms, config.loss)
    ious = out.first.kept_iou_with_gt[:, None]  # (B, 1, P)
    if out.rest is not None:
        ious = jnp.concatenate([ious, out.rest.kept_iou_with_gt], axis=1)  # (B, T, P)
    present = batch["valid"] & jnp.any(batch["masks"], axis=(-2, -1))  # (B, P)
    iou_sum = jnp.sum(ious * present[:, None, :], axis=(0, 2))  # (T,)
    return loss, (terms, iou_sum, jnp.sum(present))


def _device_step(state, rest, batch, keys, *, graphdef, tx, config: TrainConfig):
    """One data-parallel step on this device's shard (call inside shard_map)."""
    images = normalize_images(batch["image"])
    fpn = None
    if config.freeze_image_encoder:
        encoder = nnx.merge(graphdef, state["params"], rest).image_encoder
        fpn = jax.lax.stop_gradient(encoder(images).backbone_fpn)
    local_objects = jnp.sum(batch["valid"].astype(jnp.float32))
    num_objects = jnp.maximum(jax.lax.psum(local_objects, AXIS) / jax.lax.axis_size(AXIS), 1.0)
    # Differentiate a device-varying copy of the (replicated) parameters: the gradient of an
    # invariant shard_map input would come back already summed over devices; this way each
    # device has its own gradient and the all-reduce is the explicit mean, as DDP's.
    params = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), state["params"])
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
    (loss, (terms, iou_sum, present)), grads = grad_fn(
        params, rest, graphdef, fpn, images, batch, keys, num_objects, config)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    terms = jax.lax.pmean(terms, AXIS)
    iou_sum, present = jax.lax.psum(iou_sum, AXIS), jax.lax.psum(present, AXIS)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = {"params": jax.tree.map(keep, params, state["params"]),
                 "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
                 "step": state["step"] + 1, "rng": state["rng"]}
    metrics = {**terms, losses.CORE_LOSS_KEY: loss, "grad_norm": grad_norm, "finite": finite,
               "iou_per_step": iou_sum / jnp.maximum(present, 1),
               "lr": lr_schedule(config.optim, config.total_steps)(state["step"])}
    return new_state, metrics


def make_train_step(graphdef, tx, config: TrainConfig, mesh: Mesh):
    """``step(state, rest, batch) -> (state, metrics)``, jitted, data parallel over ``mesh``.

    ``batch`` arrays are sharded along their leading (global batch) axis; ``state`` and ``rest``
    (the frozen variables) are replicated.  The PRNG key of sample i of step s is
    ``split(fold_in(key, s), global_batch)[i]``: independent of the number of devices.
    """
    device_step = functools.partial(_device_step, graphdef=graphdef, tx=tx, config=config)
    sharded = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                            out_specs=(P(), P()))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, rest, batch):
        global_batch = batch["image"].shape[0]
        base = jax.random.wrap_key_data(state["rng"])
        keys = jax.random.key_data(jax.random.split(jax.random.fold_in(base, state["step"]),
                                                    global_batch))
        return sharded(state, rest, batch, keys)

    return step


# ------------------------------------------------------------------------------ checkpoints

def checkpoint_manager(workdir: Path, config: TrainConfig):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options)


def save_checkpoint(manager, state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(manager, state: dict, step: Optional[int] = None) -> tuple[dict, dict]:
    """(state, meta) of ``step`` (default: the latest), restored onto ``state``'s shardings."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


# ------------------------------------------------------------------------------ host loop

@dataclasses.dataclass
class TrainResult:
    state: dict
    steps_run: int
    last_metrics: dict


def _global_batch(mesh: Mesh, local: dict) -> dict:
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in BATCH_KEYS}


def _scalar_metrics(metrics: dict, seconds: float, images: int) -> dict:
    out = {k: float(v) for k, v in metrics.items() if k not in ("iou_per_step", "finite")}
    for t, value in enumerate(np.asarray(metrics["iou_per_step"])):
        out[f"iou_after_point_{t + 1}"] = float(value)
    out["images_per_second"] = images / max(seconds, 1e-9)
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
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(to_dict(config), indent=2))
        tmp.replace(config_path)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(config: TrainConfig, workdir, *, resume: bool = False, loader=None,
          progress: bool = True, max_steps: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) training in ``workdir``; returns the final state.

    ``loader``: an object with ``iterate(start_step)`` yielding ``(step, batch)`` and
    ``num_records`` (default: built from ``config.data``, see :mod:`p2s_jax.data`).
    ``max_steps``: stop after this many steps in this call (the schedule still spans
    ``total_steps``), e.g. to simulate an interruption.
    """
    from p2s_jax.metrics import MetricsWriter

    workdir = Path(workdir)
    mesh = Mesh(np.array(jax.devices()), (AXIS,))
    if config.global_batch_size % mesh.size:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not a multiple of "
                         f"the {mesh.size} devices")
    if loader is None:
        from p2s_jax.data.pipeline import loader_from_config

        loader = loader_from_config(config, workdir)
    if not config.total_steps:
        steps = (config.epochs * config.dataset_multiplier * loader.num_records
                 // config.global_batch_size)
        config = dataclasses.replace(config, total_steps=max(int(steps), 1))
    _prepare_workdir(workdir, config, resume)

    model = build_training_model(config)
    graphdef, params, rest = nnx.split(model, trainable_filter(config), ...)
    lr_scales, decay_mask = param_rules(model, params, config.optim)
    tx = make_optimizer(config.optim, config.total_steps, lr_scales, decay_mask)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(init_state(params, tx, config.seed), replicated)
    rest = jax.device_put(rest, replicated)
    del model, params

    manager = checkpoint_manager(workdir, config)
    start = 0
    if resume and manager.latest_step() is not None:
        state, meta = restore_checkpoint(manager, state)
        start = int(meta["step"])
    step_fn = make_train_step(graphdef, tx, config, mesh)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    end = config.total_steps if max_steps is None else min(config.total_steps, start + max_steps)

    bar = None
    if progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.total_steps, initial=start, unit="step", dynamic_ncols=True)
    last: dict = {}
    pending = None  # metrics of the previous step, read after the next one is dispatched
    tick = time.perf_counter()

    def finish(item) -> None:
        nonlocal last, tick
        step, metrics, record_index = item
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        if not bool(metrics["finite"]):
            manager.wait_until_finished()
            good = manager.latest_step()
            where = (f"{workdir / 'checkpoints' / str(good)}" if good is not None else "none")
            raise NonFiniteError(
                f"non-finite loss or gradient at step {step} (core_loss="
                f"{float(metrics[losses.CORE_LOSS_KEY])}, grad_norm={float(metrics['grad_norm'])})"
                f"; batch record ids {record_index.tolist()}; the update was not applied; last "
                f"good checkpoint: {where}")
        last = _scalar_metrics(metrics, now - tick, config.global_batch_size)
        tick = now
        if (step + 1) % config.log_every == 0 or step + 1 == end:
            writer.write(step + 1, last)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{last[losses.CORE_LOSS_KEY]:.4f}",
                            img_s=f"{last['images_per_second']:.2f}")

    try:
        for step, batch in loader.iterate(start):
            if step >= end:
                break
            state, metrics = step_fn(state, rest, _global_batch(mesh, batch))
            if pending is not None:
                finish(pending)
            pending = (step, metrics, np.asarray(batch["record_index"]))
            done = step + 1
            if done % config.checkpoint_every == 0 or done == end:
                finish(pending)
                pending = None
                save_checkpoint(manager, state, {
                    "step": done, "data_position": done * config.global_batch_size,
                    "config": to_dict(config)})
        if pending is not None:
            finish(pending)
        manager.wait_until_finished()
    finally:
        writer.close()
        if bar is not None:
            bar.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return TrainResult(state, end - start, last)


def export_torch(workdir, out_path, step: Optional[int] = None) -> Path:
    """The fine-tuned model of ``workdir`` (latest checkpoint, or ``step``) as an official
    ``{"model": state_dict}`` file; video-memory tensors are carried over from a ``.pt``
    ``init_checkpoint`` so the official video code loads it too."""
    from weights_conversion.convert import load_torch_state_dict, save_torch_checkpoint

    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise WorkdirError(f"{workdir} has no config.json: not a training work directory")
    config = load_config(str(config_path))
    model = build_training_model(dataclasses.replace(config, compute_dtype="float32"))
    graphdef, params, rest = nnx.split(model, trainable_filter(config), ...)
    tx = make_optimizer(config.optim, config.total_steps, *param_rules(model, params, config.optim))
    manager = checkpoint_manager(workdir, config)
    if manager.latest_step() is None:
        raise WorkdirError(f"{workdir / 'checkpoints'} holds no checkpoint")
    state, _ = restore_checkpoint(manager, init_state(params, tx, config.seed), step)
    trained = nnx.merge(graphdef, state["params"], rest)
    base = None
    if config.init_checkpoint.endswith((".pt", ".pth")):
        base = load_torch_state_dict(config.init_checkpoint)
    save_torch_checkpoint(trained, out_path, base_state_dict=base)
    return Path(out_path)

