"""Ahead-of-time compilation for TPU slices and GPUs on a machine that has neither: `p2s aot`.

XLA compiles for a named TPU topology with `libtpu` installed (`pip install "p2s_jax[tpu]"`,
`jax.experimental.topologies.get_topology_desc(NAME, "tpu")`) and for NVIDIA GPUs from XLA's
target description with the CUDA wheels installed (`JAX_PLATFORMS=cpu`, `--gpu-target
h100_sxm.txtpb`). The programs compiled are the project's own, through the same functions the
evaluator and the trainer run:

- `encoder`: the evaluator's encode step (`evaluation.eval_steps.encode_step`: uint8 photos on a
  640 x 640 canvas, resize and normalisation on the device, the image encoder);
- `decode`: the evaluator's decode step for 32 people of 4 prompt points per photo
  (all people in one pass, as on accelerators);
- `train`: the paper preset's train step (`train.step.make_train_step`: frozen encoder, the
  8-point correction scan, backward, AdamW, gradient mean over the data axis);
- `blocks`: each Hiera block of the trunk alone on its input map (one line per block, with
  its window, widths and q-pooling): where the encoder's time goes;
- `predictor`: the interactive `Predictor`'s programs (`p2s segment`): resize, encoder and
  decoder, one line each.

`--top N` adds to each TPU line the N instructions of the compiled program that XLA's cost model
prices highest (`estimated_cycles` in the optimised HLO), with their share, shape and the JAX
operation they come from: the instrument for layout work.

Each program is compiled for the whole slice (the data axis over every chip, `--batch` images
per chip) and reported as one JSON line: memory per chip (arguments + outputs + temporaries,
against the chip's HBM), FLOPs and bytes per chip, and on TPU XLA's cost-model time
(`optimal_seconds`, an estimate) with two utilisations against the chip's bf16 peak
(`p2s_jax.hardware`): `mfu` from the architecture's own FLOPs (`model_flops_per_chip`,
`p2s_jax.model.flops`) and `hfu` from XLA's count of the compiled program (`flops_per_chip`:
padding, resizes and layout work included), and images/s for the slice;
for the train step also the projected time of the paper's 15 x 2 epochs over COCO train2017 +
CIHP train. On GPU XLA has no cost model without a GPU: the line says instead what the compiled
program holds (cuDNN flash-attention calls, while loops).

Cost-model pitfalls (measured): on v5e every `ConcatBitcast` custom call subtracts one second
from `optimal_seconds`; the count is added back (`concat_bitcast_correction`). Loop bodies
(`while`) are priced once, not per trip: the report counts the loops so that such an estimate
can be recognised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from p2s_jax.evaluation import steps as eval_steps
from p2s_jax.hardware import CHIPS, Chip, xla_cost
from p2s_jax.inference import predictor
from p2s_jax.model import flops as model_flops
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.keypoints import get_schema
from p2s_jax.model.configs import compute_dtype, get_config
from p2s_jax.model.hiera import MultiScaleBlock, block_layout
from p2s_jax.model.layers import resolve_attention
from p2s_jax.model.sam2 import abstract_model
from p2s_jax.parallel import DATA, DATA_AXIS, REPLICATED
from p2s_jax.train import config as train_config
from p2s_jax.train.state import abstract_state, batch_shapes
from p2s_jax.train.step import make_train_step
from p2s_jax.utils.errors import InputError, MissingFileError

# Images of the paper's training data: COCO train2017 images with a person (64,115) and the
# CIHP training images (28,280); the preset reads each twice per epoch for 15 epochs.
PAPER_TRAIN_IMAGES = 64_115 + 28_280
CANVAS = (640, 640)  # COCO photos are at most 640 on a side
DECODE_PEOPLE, DECODE_POINTS = 32, 4  # the decode program's prompts per photo


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the programs are compiled for: a mesh of that target's devices."""

    name: str  # "v5e:2x2", "h100x8", ...
    platform: str  # "tpu" or "cuda"
    mesh: Mesh
    chip: Chip

    @property
    def num_chips(self) -> int:
        return self.mesh.devices.size

    def attention(self, dtype: str) -> str:
        """The attention 'auto' picks on the target for compute `dtype` ('auto' itself would
        resolve for this CPU): einsum on TPU; on a GPU cuDNN in bf16, XLA's path in float32
        (cuDNN takes no float32). Every model's head dims are multiples of 8 up to 128."""
        return resolve_attention("auto", compute_dtype(dtype), 64, backend=self.platform)


def tpu_target(topology: str) -> Target:
    """A TPU slice by name, e.g. 'v5e:2x2', 'v5p:4x4x4' (needs libtpu)."""
    from jax.experimental import topologies

    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise InputError(f"unknown TPU generation in {topology!r}; known: "
                         f"{sorted(k for k in CHIPS if k != 'h100')}")
    try:
        devices = topologies.get_topology_desc(topology, "tpu").devices
    except Exception as err:  # libtpu missing or an unknown topology: say which
        raise InputError(f"cannot describe TPU topology {topology!r} ({type(err).__name__}: "
                         f"{err}); install libtpu with pip install 'p2s_jax[tpu]'") from None
    return Target(topology, "tpu", Mesh(np.asarray(devices), (DATA_AXIS,)), CHIPS[kind])


def gpu_target(count: int, target_config: str | Path) -> Target:
    """`count` H100s described by XLA's target config file (needs the CUDA wheels and
    JAX_PLATFORMS=cpu)."""
    from jax.experimental import topologies

    path = Path(target_config)
    if not path.is_file():
        raise MissingFileError(f"--gpu-target {path}: XLA GPU description not found (the H100's "
                               "is shared/data/gpu/h100_sxm.txtpb in this project's workspace)")
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                                target_config=path.read_text())
    except Exception as err:  # the CUDA plugin missing, or a description it cannot read
        raise InputError(f"cannot describe {count} H100(s) from {path} ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else err}); "
                         "compiling for a GPU needs JAX's CUDA wheels: pip install "
                         "'p2s_jax[cuda12]' and run with JAX_PLATFORMS=cpu") from None
    mesh = topologies.make_mesh(topology, (count,), (DATA_AXIS,))
    return Target(f"h100x{count}", "cuda", mesh, CHIPS["h100"])


def target_by_name(name: str, gpu_description: str | Path | None = None) -> Target:
    """`p2s aot --target`: a TPU topology ('v5e:2x2', ...), or 'h100' / 'h100xN' described
    by XLA's GPU description file `gpu_description`."""
    if not name.startswith("h100"):
        return tpu_target(name)
    if not gpu_description:
        raise InputError(f"--target {name} needs --gpu-target (XLA's H100 description)")
    return gpu_target(int(name[len("h100x"):]) if name.startswith("h100x") else 1,
                      gpu_description)


def _on(target: Target, shape, dtype, spec=DATA) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype),
                                sharding=NamedSharding(target.mesh, spec))


def _replicated(target: Target, tree):
    return jax.tree.map(lambda x: _on(target, x.shape, x.dtype, REPLICATED), tree)


def _model(target: Target, model: str, image_size: int, dtype: str):
    config = get_config(model, image_size, target.attention(dtype))
    return nnx.split(abstract_model(config, compute_dtype(dtype)))


def encoder_program(target: Target, model: str, image_size: int, dtype: str, batch: int):
    """(jitted, args): the evaluator's encode step on `batch` photos per chip."""
    graphdef, state = _model(target, model, image_size, dtype)
    n = batch * target.num_chips
    args = (graphdef, target.mesh, image_size, _replicated(target, state),
            _on(target, (n, *CANVAS, 3), jnp.uint8), _on(target, (n, 2), jnp.int32))
    return eval_steps.encode_step, args


def decode_program(target: Target, model: str, image_size: int, dtype: str, batch: int,
                   people: int = DECODE_PEOPLE, points: int = DECODE_POINTS):
    """(jitted, args): the evaluator's decode step, `people` people per photo in one pass."""
    graphdef, state = _model(target, model, image_size, dtype)
    n, low = batch * target.num_chips, 4 * image_size // 16
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode_image(x), state,
                              jax.ShapeDtypeStruct((n, image_size, image_size, 3), jnp.float32))
    args = (graphdef, target.mesh, None, False, MaskPostprocess(), _replicated(target, state),
            jax.tree.map(lambda x: _on(target, x.shape, x.dtype), features),
            _on(target, (n, people, points, 2), jnp.float32),
            _on(target, (n, people, points), jnp.int32), _on(target, (n, people), jnp.bool_),
            _on(target, (n, CANVAS[0], low), jnp.float32),
            _on(target, (n, CANVAS[1], low), jnp.float32))
    return eval_steps.decode_step, args


def train_program(target: Target, model: str, image_size: int, dtype: str, batch: int,
                  preset: str = "paper"):
    """(jitted, args): the train step of `preset` ('paper', 'tiny'), `batch` images per chip;
    the keypoints of the preset's `data.schema` (COCO-17 when the data names none)."""
    config = train_config.PRESETS[preset]()
    config = dataclasses.replace(config, model=model, image_size=image_size, compute_dtype=dtype,
                                 attention=target.attention(dtype),
                                 global_batch_size=batch * target.num_chips, total_steps=1000)
    graphdef, tx, state, frozen = abstract_state(config)
    batch_args = {k: _on(target, s.shape, s.dtype)
                  for k, s in batch_shapes(config, get_schema(config.data.schema or "coco17")
                                           .num_keypoints).items()}
    step = make_train_step(graphdef, tx, config, target.mesh)
    return step, (_replicated(target, state), _replicated(target, frozen), batch_args)


def block_programs(target: Target, model: str, image_size: int, dtype: str, batch: int):
    """[(description, jitted, args)]: each Hiera block alone on `batch` maps per chip of the size
    it sees in the trunk, data parallel like the encoder."""
    config = get_config(model, image_size, target.attention(dtype))
    trunk, side = config.trunk, image_size // config.trunk.patch_stride
    apply = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)
    programs = []
    for index, layout in enumerate(block_layout(trunk)):
        block = nnx.eval_shape(lambda: MultiScaleBlock(mlp_ratio=trunk.mlp_ratio,
                                                       dtype=compute_dtype(dtype),
                                                       rngs=nnx.Rngs(0), **layout))
        block.attn.attention = target.attention(dtype)
        graphdef, state = nnx.split(block)
        x = _on(target, (batch * target.num_chips, side, side, layout["dim"]), compute_dtype(dtype))
        description = {"block": index, "side": side, "dim": layout["dim"],
                       "dim_out": layout["dim_out"], "heads": layout["num_heads"],
                       "window": layout["window_size"], "q_pool": layout["q_stride"] is not None}
        programs.append((description, apply, (graphdef, _replicated(target, state), x)))
        if layout["q_stride"] is not None:
            side //= layout["q_stride"][0]
    return programs


def predictor_programs(target: Target, model: str, image_size: int, dtype: str, batch: int,
                       people: int = DECODE_PEOPLE, points: int = DECODE_POINTS):
    """[(description, jitted, args)]: the interactive `Predictor`'s three programs (`p2s
    segment`, one photo at a time): resize and normalisation of `batch` photos on the canvas,
    the encoder, and the decoder with masks for `people` people of one photo. Single-device
    programs (no data axis), as the Predictor runs them."""
    graphdef, state = _model(target, model, image_size, dtype)
    state = _replicated(target, state)
    low = 4 * image_size // 16
    photos = (_on(target, (batch, *CANVAS, 3), jnp.uint8, REPLICATED),
              _on(target, (batch, 2), jnp.int32, REPLICATED), image_size)
    pixels = _on(target, (batch, image_size, image_size, 3), jnp.float32, REPLICATED)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode_image(x), state, pixels)
    one_photo = jax.tree.map(lambda x: _on(target, (1, *x.shape[1:]), x.dtype, REPLICATED),
                             features)
    decode = functools.partial(predictor.decode_prompts, multimask_output=True)
    prompts = (_on(target, (people, points, 2), jnp.float32, REPLICATED),
               _on(target, (people, points), jnp.int32, REPLICATED), None, None,
               _on(target, (CANVAS[0], low), jnp.float32, REPLICATED),
               _on(target, (CANVAS[1], low), jnp.float32, REPLICATED))
    return [({"part": "preprocess"}, predictor.preprocess_images, photos),
            ({"part": "encode"}, predictor.encode_images, (graphdef, state, pixels)),
            ({"part": "decode", "people": people},
             jax.jit(decode, static_argnums=0), (graphdef, state, one_photo, *prompts))]


PROGRAMS: dict[str, Callable] = {"encoder": encoder_program, "decode": decode_program,
                                 "train": train_program, "blocks": block_programs,
                                 "predictor": predictor_programs}


def compile_for(target: Target, jitted, args):
    """The program compiled for the target's platform."""
    return jitted.trace(*args).lower(lowering_platforms=(target.platform,)).compile()


def concat_bitcast_correction(hlo_text: str, target: Target) -> float:
    """Seconds to add to v5e's `optimal_seconds`: one per `ConcatBitcast` custom call."""
    if not target.name.startswith("v5e"):
        return 0.0
    return float(hlo_text.count('custom_call_target="ConcatBitcast"'))


def instruction_costs(hlo_text: str, top: int) -> list[dict]:
    """The `top` instructions of an optimised TPU program that XLA's cost model prices highest
    (`estimated_cycles` in each instruction's backend config): share of the program's cycles,
    opcode, result shape with its tiled layout, and the JAX operation it comes from."""
    entry = hlo_text[max(hlo_text.find("\nENTRY"), 0):]
    rows = []
    for line in entry.splitlines():
        cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
        if not cycles or "=" not in line:
            continue
        result = line.split("=", 1)[1].strip()
        opcode = re.search(r"\s([a-z][\w-]*)\(", result)
        source = re.search(r'op_name="([^"]*)"', line)
        rows.append({"cycles": int(cycles.group(1)),
                     "opcode": opcode.group(1) if opcode else "?",
                     "shape": result.split(" ")[0] if not result.startswith("(") else "tuple",
                     "op_name": source.group(1) if source else ""})
    total = sum(row["cycles"] for row in rows) or 1
    rows.sort(key=lambda row: -row["cycles"])
    return [{**row, "share": row["cycles"] / total} for row in rows[:top]]


def report(program: str, target: Target, batch: int, compiled, top: int = 0) -> dict:
    """One JSON-ready line about a compiled program (per chip); `top` > 0 adds its costliest
    instructions on TPU (`instruction_costs`)."""
    memory = compiled.memory_analysis()
    used = None
    if memory is not None:
        used = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                   + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    text = compiled.as_text()
    line = {"program": program, "target": target.name, "chips": target.num_chips,
            "batch_per_chip": batch, "compiled": True, "memory_per_chip_bytes": used,
            "hbm_per_chip_bytes": target.chip.hbm,
            "fits": None if used is None else used <= target.chip.hbm,
            "while_loops": len(re.findall(r"\bwhile\(", text)),
            "cudnn_attention_calls": text.count("__cudnn$fmha")}
    cost = xla_cost(compiled)
    flops = cost.get("flops")
    line["flops_per_chip"] = None if flops is None else float(flops)
    line["bytes_accessed_per_chip"] = cost.get("bytes accessed")
    seconds = cost.get("optimal_seconds")
    if seconds is not None:
        seconds = float(seconds) + concat_bitcast_correction(text, target)
        line["optimal_seconds"] = seconds
        if seconds > 0 and flops:
            line["hfu"] = float(flops) / seconds / target.chip.peak_bf16
            line["images_per_s"] = batch * target.num_chips / seconds
            if program == "train":
                epochs = train_config.paper().epochs * train_config.paper().dataset_multiplier
                line["paper_training_hours"] = (epochs * PAPER_TRAIN_IMAGES
                                                / line["images_per_s"] / 3600)
        else:
            line["cost_model_note"] = (f"optimal_seconds {seconds:.3g} is not a time: the cost "
                                       f"model failed on this program")
    if top > 0 and target.platform == "tpu":
        line["top_instructions"] = instruction_costs(text, top)
    return line


def _error_line(program: str, target: Target, batch: int, err: Exception) -> dict:
    return {"program": program, "target": target.name, "batch_per_chip": batch,
            "compiled": False, "error": f"{type(err).__name__}: {err}"[:2000]}


def program_model_flops(program: str, description: dict, model: str, image_size: int,
                        batch: int, train_preset: str) -> float:
    """The architecture's own FLOPs (`model.flops`) of one program instance per chip: what MFU
    divides (XLA's count of the compiled program, padding and resizes included, gives HFU)."""
    config = get_config(model, image_size)
    image = model_flops.encoder_flops(config) + model_flops.image_feature_flops(config)
    decode = DECODE_PEOPLE * model_flops.decoder_flops(config, DECODE_POINTS + 1)
    if program == "encoder":
        return batch * image
    if program == "decode":
        return batch * decode
    if program == "train":
        preset = train_config.PRESETS[train_preset]()
        return batch * model_flops.train_flops_per_image(
            config, preset.correction.num_points, preset.data.objects_per_image,
            preset.freeze_image_encoder)
    if program == "blocks":
        layout = block_layout(config.trunk)[description["block"]]
        stride = layout["q_stride"][0] if layout["q_stride"] else 1
        return batch * sum(model_flops.hiera_block_flops(
            description["side"], layout["dim"], layout["dim_out"], layout["window_size"], stride,
            config.trunk.mlp_ratio))
    part = description.get("part")
    return {"preprocess": 0.0, "encode": batch * image, "decode": decode}[part]


def _instances(program: str, target: Target, model: str, image_size: int, dtype: str,
               batch: int, train_preset: str) -> list:
    """[(description, jitted, args)] of one program at one batch: one entry, or for `blocks`
    one per Hiera block; each description carries the instance's model FLOPs per chip."""
    if program in ("blocks", "predictor"):
        instances = PROGRAMS[program](target, model, image_size, dtype, batch)
    else:
        extra = {"preset": train_preset} if program == "train" else {}
        instances = [({}, *PROGRAMS[program](target, model, image_size, dtype, batch, **extra))]
    return [({**description, "model_flops_per_chip": program_model_flops(
        program, description, model, image_size, batch, train_preset)}, jitted, args)
        for description, jitted, args in instances]


def run(target: Target, programs, model: str, image_size: int, dtype: str, batches,
        train_preset: str = "paper", top: int = 0) -> Iterator[dict]:
    """Compiles each program at each per-chip batch; yields one report line each (`blocks` one
    per Hiera block), or the line saying why it did not build or compile: one failed program
    is a line, the others still compile."""
    for program in programs:
        for batch in batches:
            try:
                instances = _instances(program, target, model, image_size, dtype, batch,
                                       train_preset)
            except Exception as err:
                yield _error_line(program, target, batch, err)
                continue
            for description, jitted, args in instances:
                try:
                    compiled = compile_for(target, jitted, args)
                    line = report(program, target, batch, compiled, top)
                except Exception as err:
                    line = _error_line(program, target, batch, err)
                line = {**line, **description}
                if line.get("hfu") is not None:
                    line["mfu"] = (description["model_flops_per_chip"] / line["optimal_seconds"]
                                   / target.chip.peak_bf16)
                yield line


def format_line(line: dict) -> str:
    return json.dumps(line, sort_keys=True)
