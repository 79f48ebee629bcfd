"""Runs training in a separate process for the trainer tests (device count, NaN, gradients).

    python tests/support/train_runner.py devices WORKDIR OUT.npz  # 2 toy steps of `tiny`, params -> npz
                                                          # (multihost.process_env: one of several)
    python tests/support/train_runner.py prepare WORKDIR          # the tiny run's data (one of several)
    python tests/support/train_runner.py gradients WORKDIR OUT.npz  # first-step gradients: 1 vs 4
                                                            # devices, bf16 compute
    python tests/support/train_runner.py overfit WORKDIR          # one fixed toy batch, 40 steps
    python tests/support/train_runner.py nan WORKDIR              # the same with a NaN at step 3

Every mode of one kind compiles the same program, so a persistent compilation cache
(JAX_COMPILATION_CACHE_DIR) shares it between the processes of a test session.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests folder: `support`

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from p2s_jax.train.samplers import pose_mask_refine, register_sampler  # noqa: E402
from p2s_jax.train.config import tiny  # noqa: E402
from p2s_jax.train.loop import NonFiniteError, train  # noqa: E402
from support import multihost  # noqa: E402
from support.toy_data import ToyLoader  # noqa: E402

NAN_MARKER = -7.0


@register_sampler("nan_on_marker")
def nan_on_marker(key, gt_mask, pred_mask, keypoints, visibility, step):
    """PoseMaskRefine, except a NaN point where visibility[0] holds NAN_MARKER: a real NaN
    produced inside the compiled step, as a broken sampler or corrupt record would."""
    point, label = pose_mask_refine(key, gt_mask, pred_mask, keypoints, visibility, step)
    return jnp.where(visibility[0] == NAN_MARKER, jnp.nan, point), label


def overfit_config(**overrides):
    return tiny(total_steps=40, **{"optim.base_lr": 1e-3, "correction.sampler": "nan_on_marker",
                                   "checkpoint_every": 1000, "eval.every": 0, **overrides})


def flat_params(state) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def main(argv) -> int:
    mode, workdir = argv[1], argv[2]
    if mode == "devices":
        multihost.initialize()  # one of several processes, when started as one
        config = tiny(**{"eval.every": 0})
        loader = ToyLoader(config.global_batch_size, config.image_size,
                           host_index=jax.process_index(), host_count=jax.process_count())
        result = train(config, workdir, loader=loader, progress=False, max_steps=2)
        from p2s_jax.train.state import new_state

        initial = {"initial" + k: v for k, v in flat_params(new_state(config).state).items()}
        np.savez(argv[3], **flat_params(result.state), **initial)
    elif mode == "gradients":  # 4 devices: the first step's gradients on 1 and on 4 devices
        from p2s_jax.parallel import host_to_global, make_mesh
        from p2s_jax.train.state import STEP_INPUTS, abstract_state, new_state
        from p2s_jax.train.step import make_gradient_step

        # two points: the first prompt and one corrected step (the sampler, the mask input)
        config = tiny(**{"eval.every": 0, "correction.num_points": 2})
        graphdef, _, state, frozen = new_state(config)
        batch = ToyLoader(config.global_batch_size, config.image_size).batch(0)
        bf16 = abstract_state(dataclasses.replace(config, compute_dtype="bfloat16")).graphdef
        out = {}
        for name, definition, devices in (("1", graphdef, 1), ("4", graphdef, 4),
                                          ("b", bf16, 1)):  # b: bf16 compute, float32 weights
            mesh = make_mesh(jax.devices()[:devices])
            loss, grads = make_gradient_step(definition, config, mesh)(
                state, frozen, {k: host_to_global(mesh, batch[k]) for k in STEP_INPUTS})
            out[f"loss_{name}"] = np.asarray(loss)
            out.update({f"{name}{k}": v for k, v in flat_params({"params": grads}).items()})
        np.savez(argv[3], **out)
    elif mode == "prepare":  # one of several processes: the tiny run's data, prepared once
        multihost.initialize()
        from p2s_jax.train.inputs import training_records

        records = len(training_records(tiny(), workdir))
        print(f"process {jax.process_index()}: {records} records", flush=True)
    elif mode in ("overfit", "nan"):
        config = overfit_config(checkpoint_every=2 if mode == "nan" else 1000)
        poison = {3: NAN_MARKER} if mode == "nan" else None
        loader = ToyLoader(config.global_batch_size, config.image_size, fixed=True,
                           poison=poison)
        try:
            result = train(config, workdir, loader=loader, progress=False)
        except NonFiniteError as err:
            print(f"NonFiniteError: {err}", file=sys.stderr, flush=True)
            return 3
        np.savez(Path(workdir) / "final.npz", **flat_params(result.state))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
