"""Data-parallel fine-tuning of SAM 2.1 with the correction loop (paper Sec. 3.2, 4.1).

One training step (``make_train_step``), per device, inside ``jax.shard_map`` over a 1-D
``Mesh`` of every device (axis ``"data"``):

1. the frozen image encoder runs forward only (``stop_gradient``; ``freeze_image_encoder=False``
   moves it inside the gradient with its own lr and layer decay), with stochastic depth
   (``drop_path_rate``) drawn per image from the image's key, as the official trainer runs the
   whole model in train mode;
2. ``no_mem_embed``, the decoder's high-res convs, the prompt encoder and the mask decoder run the
   correction loop (:func:`p2s_jax.train.correction.correction_loop`) on every image of the device's
   batch (``vmap``), the official losses summed over steps, divided by the number of objects
   averaged over devices (the official ``all_reduce(num_objects) / world_size``);
3. gradients are averaged over devices (``lax.pmean``, as DDP), clipped, and applied by the
   optimiser of :mod:`p2s_jax.train.optim` (float32 master weights; the model computes in
   ``compute_dtype``);
4. a non-finite loss or gradient leaves the parameters and optimiser state unchanged (nothing
   non-finite is ever applied or saved) and the host stops the run naming the step, the batch
   and the last good checkpoint.

The state it updates is made by :mod:`p2s_jax.train.state`; the host loop is
:mod:`p2s_jax.train.loop`; checkpoints and export are :mod:`p2s_jax.train.checkpoint`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from p2s_jax.inference.preprocess import imagenet_normalize
from p2s_jax.parallel import DATA, DATA_AXIS, REPLICATED
from p2s_jax.train import losses
from p2s_jax.train.config import TrainConfig
from p2s_jax.train.correction import LoopTargets, correction_loop
from p2s_jax.train.optim import lr_schedule

DROP_PATH_STREAM = 0x64726F70  # folded into an image's key for its stochastic-depth draws


def drop_path_keys(keys: jax.Array) -> jax.Array:
    """(B, ...) key data of the images -> (B,) typed keys for the encoder's stochastic depth."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k),
                                                 DROP_PATH_STREAM))(keys)


def normalize_images(images: jax.Array) -> jax.Array:
    """(..., S, S, 3) uint8 -> ImageNet-normalised float32 (the official ToTensor + Normalize)."""
    return imagenet_normalize(images.astype(jnp.float32) / 255.0)


# ------------------------------------------------------------------------------ the step

def _loss_fn(params, frozen, graphdef, fpn, images, batch, keys, num_objects, config: TrainConfig):
    model = nnx.merge(graphdef, params, frozen)
    if fpn is None:  # encoder trained: its forward inside the gradient
        fpn = model.image_encoder(images, config.drop_path_rate,
                                  drop_path_keys(keys)).backbone_fpn
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


def _device_gradients(params, frozen, batch, keys, *, graphdef, config: TrainConfig):
    """This device's shard -> (loss, loss terms, IoU sums, present objects, gradients), each
    averaged (or summed, for the counts) over devices (call inside shard_map)."""
    images = normalize_images(batch["image"])
    fpn = None
    if config.freeze_image_encoder:
        encoder = nnx.merge(graphdef, params, frozen).image_encoder
        fpn = jax.lax.stop_gradient(
            encoder(images, config.drop_path_rate, drop_path_keys(keys)).backbone_fpn)
    local_objects = jnp.sum(batch["valid"].astype(jnp.float32))
    num_objects = jnp.maximum(
        jax.lax.psum(local_objects, DATA_AXIS) / jax.lax.axis_size(DATA_AXIS), 1.0)
    # Differentiate a device-varying copy of the (replicated) parameters: the gradient of an
    # invariant shard_map input would come back already summed over devices; this way each
    # device has its own gradient and the all-reduce is the explicit mean, as DDP's.
    varying = jax.tree.map(lambda x: jax.lax.pcast(x, DATA_AXIS, to="varying"), params)
    grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
    (loss, (terms, iou_sum, present)), grads = grad_fn(
        varying, frozen, graphdef, fpn, images, batch, keys, num_objects, config)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    loss = jax.lax.pmean(loss, DATA_AXIS)
    terms = jax.lax.pmean(terms, DATA_AXIS)
    iou_sum, present = jax.lax.psum(iou_sum, DATA_AXIS), jax.lax.psum(present, DATA_AXIS)
    return loss, terms, iou_sum, present, grads


def _device_step(state, frozen, batch, keys, *, graphdef, tx, config: TrainConfig):
    """One data-parallel step on this device's shard (call inside shard_map)."""
    loss, terms, iou_sum, present, grads = _device_gradients(
        state["params"], frozen, batch, keys, graphdef=graphdef, config=config)
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


def _step_keys(state, global_batch: int):
    """The PRNG key data of each image of a step: split(fold_in(key, step), global batch)."""
    base = jax.random.wrap_key_data(state["rng"])
    return jax.random.key_data(jax.random.split(jax.random.fold_in(base, state["step"]),
                                                global_batch))


def make_gradient_step(graphdef, config: TrainConfig, mesh: Mesh):
    """``gradients(state, frozen, batch) -> (core loss, gradients)``, jitted, data parallel
    over ``mesh``: what `make_train_step` hands its optimiser (the gradients averaged over
    devices, before clipping), for gradient checks and accumulation."""
    def device(params, frozen, batch, keys):
        loss, _, _, _, grads = _device_gradients(params, frozen, batch, keys,
                                                 graphdef=graphdef, config=config)
        return loss, grads

    sharded = jax.shard_map(device, mesh=mesh, in_specs=(REPLICATED, REPLICATED, DATA, DATA),
                            out_specs=(REPLICATED, REPLICATED))

    @jax.jit
    def gradients(state, frozen, batch):
        return sharded(state["params"], frozen, batch,
                       _step_keys(state, batch["image"].shape[0]))

    return gradients


def make_train_step(graphdef, tx, config: TrainConfig, mesh: Mesh):
    """``step(state, frozen, batch) -> (state, metrics)``, jitted, data parallel over ``mesh``.

    ``batch`` arrays are sharded along their leading (global batch) axis; ``state`` and
    ``frozen`` (the variables the optimiser does not update) are replicated.  The PRNG key of
    sample i of step s is ``split(fold_in(key, s), global_batch)[i]``: independent of the
    number of devices.
    """
    device_step = functools.partial(_device_step, graphdef=graphdef, tx=tx, config=config)
    sharded = jax.shard_map(device_step, mesh=mesh, in_specs=(REPLICATED, REPLICATED, DATA, DATA),
                            out_specs=(REPLICATED, REPLICATED))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, frozen, batch):
        return sharded(state, frozen, batch, _step_keys(state, batch["image"].shape[0]))

    return step
