"""Strict conversion between official checkpoints and the Flax model, and Orbax storage.

- `load_torch_state_dict(path)`: an official `.pt` (`{"model": state_dict}`) as NumPy arrays, with
  clear errors for a missing, truncated or corrupt file.
- `from_state_dict(model, state_dict)`: fills every Flax array from exactly one tensor of the right
  shape. Leftover tensors are allowed only under the video-memory prefixes; anything else, and any
  missing key, raises naming the key (and both shapes). Nothing is ever filled with a default.
- `to_state_dict(model)`: the inverse, an official-format state_dict (the official code loads it).
- `save_orbax` / `load_orbax`: a converted model as an Orbax checkpoint plus `p2s_model.json`;
  `convert_checkpoint` also keeps the original's video-memory tensors (`video_memory.npz`), so
  that a model fine-tuned from the folder exports to a file the official strict loader takes.
- `video_memory_tensors(path)`: those tensors from a `.pt` or a converted folder.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from p2s_jax.model.configs import CONFIGS, get_config
from p2s_jax.model.sam2 import SAM2Image, abstract_model, build_model
from p2s_jax.utils.errors import InputError
from p2s_jax.utils.files import read_json, replace_folder, write_atomic, write_json
from p2s_jax.utils.text import plural
from weights_conversion.mapping import iter_rules, torch_shape_of

VIDEO_MEMORY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial", "mask_downsample.",
)
METADATA_FILE = "p2s_model.json"
VIDEO_MEMORY_FILE = "video_memory.npz"  # beside the weights of a converted folder
RANDOM_INIT_KEY = "p2s_random_init"  # marks weights drawn by `p2s init`


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded: the message names the file, key and shapes."""


def load_torch_state_dict(path) -> Dict[str, np.ndarray]:
    """Reads an official checkpoint into {key: float32 array}. Needs torch (the `torch` extra)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CheckpointError(f"reading {path} needs torch: pip install 'p2s_jax[torch]'") from err
    payload = _torch_load(path, mmap=False)
    if isinstance(payload, dict) and "model" in payload and isinstance(payload["model"], dict):
        payload = payload["model"]
    if not isinstance(payload, dict) or not payload:
        raise CheckpointError(f"checkpoint {path} holds no state_dict (expected {{'model': "
                              f"state_dict}}), got {type(payload).__name__}")
    state = {}
    for key, tensor in payload.items():
        if not hasattr(tensor, "detach"):
            raise CheckpointError(f"checkpoint {path}: entry {key!r} is not a tensor")
        state[key] = tensor.detach().to(torch.float32).cpu().numpy()
    return state


def _torch_load(path: Path, mmap: bool):
    """torch.load of an official checkpoint (tensors only), with errors that say what the file
    is: not a PyTorch file at all, one holding Python objects, or a damaged one."""
    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # a zip archive, or a pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (.pt): expected a file "
                              "written by torch.save, such as the official SAM 2.1 or "
                              "SAM-pose2seg weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} is not a checkpoint of tensors: it holds Python objects "
                              "that are not loaded (the official weights hold tensors only)"
                              ) from err
    except Exception as err:  # torch raises many types for a damaged file (even IndexError)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else err}"
                              ) from err


def random_weights_note(path) -> Optional[str]:
    """A line saying that `path` holds `p2s init`'s random weights; None for trained ones."""
    info = random_init_info(path)
    if info is None:
        return None
    return (f"note: {path} holds random weights (p2s init, {info.get('model')}, seed "
            f"{info.get('seed')}): the masks show the pipeline at work, not a trained model")


def random_init_info(path) -> Optional[dict]:
    """What `p2s init` recorded in a checkpoint it wrote with random weights ({"model",
    "seed"}), for a `.pt` (read memory-mapped: no tensor is loaded) or a converted folder; None
    for trained weights."""
    path = Path(path)
    if path.is_dir():
        meta = path / METADATA_FILE
        return read_json(meta, "converted checkpoint metadata").get(RANDOM_INIT_KEY) \
            if meta.is_file() else None
    if not path.is_file():
        return None
    payload = _torch_load(path, mmap=True)
    return payload.get(RANDOM_INIT_KEY) if isinstance(payload, dict) else None


def detect_model_name(state_dict: Dict[str, np.ndarray]) -> Optional[str]:
    """The SAM 2.1 size a state_dict belongs to, from its trunk width and depth (None if unknown)."""
    pos = state_dict.get("image_encoder.trunk.pos_embed")
    if pos is None:
        return None
    blocks = {int(m.group(1)) for k in state_dict
              if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
    for name, cfg in CONFIGS.items():
        if cfg.trunk.embed_dim == pos.shape[1] and cfg.trunk.depth == len(blocks):
            return name
    return None


def _check_size(state_dict, config_name: str, source: str) -> None:
    found = detect_model_name(state_dict)
    if found is not None and found != config_name:
        raise CheckpointError(f"{source} is a {found} checkpoint, but the model {config_name} "
                              f"was requested (pass --model {found})")


def from_state_dict(model: SAM2Image, state_dict: Dict[str, np.ndarray], source: str = "checkpoint",
                    dtype=jnp.float32) -> List[str]:
    """Loads `state_dict` into `model` in place (abstract or concrete): every array is replaced,
    or the call raises before returning. Returns the ignored (video-memory) keys."""
    _check_size(state_dict, model.config.name, source)
    used, errors = set(), []
    for path, variable, rule in iter_rules(model):
        if rule.key not in state_dict:
            errors.append(f"missing key {rule.key!r} (for {'/'.join(map(str, path))}, "
                          f"shape {torch_shape_of(rule, variable.shape)})")
            continue
        tensor = np.asarray(state_dict[rule.key])
        expected = torch_shape_of(rule, variable.shape)
        if tuple(tensor.shape) != expected:
            errors.append(f"key {rule.key!r} has shape {tuple(tensor.shape)} in the checkpoint "
                          f"but the model needs {expected}")
            continue
        if not np.all(np.isfinite(tensor)):
            errors.append(f"key {rule.key!r} holds non-finite values")
            continue
        variable.set_value(jnp.asarray(rule.to_flax(tensor), dtype=dtype))
        used.add(rule.key)
    leftover = sorted(set(state_dict) - used)
    unexpected = [k for k in leftover if not k.startswith(VIDEO_MEMORY_PREFIXES)]
    errors += [f"unexpected key {k!r} with shape {tuple(np.shape(state_dict[k]))}" for k in unexpected]
    if errors:
        raise CheckpointError(f"{source} does not match {model.config.name}:\n  " + "\n  ".join(errors))
    return leftover


def to_state_dict(model: SAM2Image) -> Dict[str, np.ndarray]:
    """The model's weights as an official-format state_dict (image path keys only)."""
    return {rule.key: np.ascontiguousarray(rule.to_torch(np.asarray(variable[...], np.float32)))
            for _, variable, rule in iter_rules(model)}


def save_torch_checkpoint(model: SAM2Image, path, base_state_dict: Optional[Dict] = None,
                          random_init: Optional[dict] = None) -> None:
    """Writes `{"model": state_dict}` atomically, with the user's umask. `base_state_dict`
    supplies the video-memory tensors (e.g. from the checkpoint that was fine-tuned) so the
    official video code loads it too; `random_init` marks weights `p2s init` drew
    (`RANDOM_INIT_KEY`, beside "model": the official loaders read "model" only)."""
    import torch

    state = dict(base_state_dict or {})
    state.update(to_state_dict(model))
    tensors = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in state.items()}
    payload = {"model": tensors}
    if random_init is not None:
        payload[RANDOM_INIT_KEY] = dict(random_init)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getbuffer())


def video_memory_tensors(path) -> Optional[Dict[str, np.ndarray]]:
    """The video-memory tensors of an official `.pt` or of a converted folder (None when the
    folder was written without them)."""
    path = Path(path)
    if path.is_dir():
        if not (path / VIDEO_MEMORY_FILE).is_file():
            return None
        with np.load(path / VIDEO_MEMORY_FILE) as stored:
            return {key: stored[key] for key in stored.files}
    return {k: v for k, v in load_torch_state_dict(path).items()
            if k.startswith(VIDEO_MEMORY_PREFIXES)}


def save_orbax(model: SAM2Image, out_dir, source: str = "",
               video_memory: Optional[Dict[str, np.ndarray]] = None,
               random_init: Optional[dict] = None) -> Path:
    """Saves the weights (Orbax, atomic), `p2s_model.json` (model name, image size, and
    `RANDOM_INIT_KEY` for weights `p2s init` drew) and, when given, the video-memory tensors
    (`video_memory.npz`, for `p2s export`)."""
    out_dir = Path(out_dir).absolute()
    if (out_dir / "weights").exists():
        raise CheckpointError(f"{out_dir / 'weights'} exists already; choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if video_memory:
        buffer = io.BytesIO()
        np.savez(buffer, **video_memory)
        write_atomic(out_dir / VIDEO_MEMORY_FILE, buffer.getbuffer())
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "weights", nnx.state(model))
    meta = {"model": model.config.name, "image_size": model.config.image_size, "source": str(source)}
    if random_init is not None:
        meta[RANDOM_INIT_KEY] = dict(random_init)
    write_json(out_dir / METADATA_FILE, meta, indent=2)
    return out_dir


def load_orbax(path, model_name: Optional[str] = None, image_size: Optional[int] = None,
               dtype=jnp.float32, attention: str = "auto") -> SAM2Image:
    path = Path(path).absolute()
    meta_file = path / METADATA_FILE
    if not meta_file.is_file() or not (path / "weights").is_dir():
        raise CheckpointError(f"{path} is not a converted p2s_jax checkpoint "
                              f"(expected {METADATA_FILE} and weights/)")
    meta = read_json(meta_file, "converted checkpoint metadata", CheckpointError)
    if model_name is not None and get_config(model_name).name != meta["model"]:
        raise CheckpointError(f"{path} is a {meta['model']} checkpoint, but the model "
                              f"{get_config(model_name).name} was requested")
    config = get_config(meta["model"], image_size or meta["image_size"], attention)
    model = abstract_model(config, dtype)
    graphdef, abstract_state = nnx.split(model)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(path / "weights", abstract_state)
    except Exception as err:  # orbax raises many types; name the file in every case
        raise CheckpointError(f"cannot restore {path / 'weights'}: {err}") from err
    return nnx.merge(graphdef, state)


def load_model(path, model_name: Optional[str] = None, image_size: Optional[int] = None,
               dtype=jnp.float32, attention: str = "auto") -> SAM2Image:
    """A `.pt` official checkpoint or a converted folder -> `SAM2Image`.

    model_name None: detected from the checkpoint. image_size None: the converted folder's, or
    1024 for a `.pt`. `dtype` is the compute dtype (weights stay float32); `attention` the
    attention implementation (`SAM2Config.attention`).
    """
    path = Path(path)
    if path.is_dir():
        return load_orbax(path, model_name, image_size, dtype, attention)
    state_dict = load_torch_state_dict(path)
    detected = detect_model_name(state_dict)
    name = model_name or detected
    if name is None:
        raise CheckpointError(f"{path}: cannot tell the model size (no image_encoder.trunk."
                              f"pos_embed); pass the model name")
    model = abstract_model(get_config(name, image_size or 1024, attention), dtype)
    from_state_dict(model, state_dict, source=str(path))
    return model



def convert_checkpoint(checkpoint, out_dir, model_name: Optional[str] = None,
                       image_size: int = 1024, replace: bool = False) -> Tuple[Path, List[str]]:
    """`p2s convert`: official `.pt` -> Orbax folder. Returns (folder, ignored video keys).

    The folder is written beside `out_dir` and renamed into place once complete, so that
    `out_dir` is at every moment absent (or empty), the old folder, or the whole new one;
    `replace`: an existing `out_dir` is replaced (`files.replace_folder`), otherwise the rename
    fails (OSError) where one is there."""
    state_dict = load_torch_state_dict(checkpoint)
    name = model_name or detect_model_name(state_dict)
    if name is None:
        raise CheckpointError(f"{checkpoint}: cannot tell the model size; pass --model")
    model = abstract_model(get_config(name, image_size))
    ignored = from_state_dict(model, state_dict, source=str(checkpoint))
    video = {k: state_dict[k] for k in ignored}
    out_dir = Path(out_dir).absolute()
    staging = out_dir.with_name(f".{out_dir.name}.converting-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_orbax(model, staging, source=checkpoint, video_memory=video,
                   random_init=random_init_info(checkpoint))
        if replace:
            replace_folder(staging, out_dir)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir, ignored


def conversion_summary(checkpoint, folder, ignored: List[str]) -> str:
    """What `p2s convert` says: the model and image size written, the tensors left out."""
    meta = read_json(Path(folder) / METADATA_FILE, "converted checkpoint metadata")
    return (f"converted {checkpoint} ({meta['model']}, image size {meta['image_size']}) to "
            f"{folder}\nignored {plural(len(ignored), 'video-memory tensor')} (not used on "
            "images)")


def write_random_checkpoint(model_name: str, out, image_size: int = 1024, seed: int = 0) -> Path:
    """`p2s init`: a SAM 2.1 model of any size with seeded random weights as an official-format
    `.pt` (image-path tensors), marked with `RANDOM_INIT_KEY` so that every command that loads
    it says the weights are random. For trying the commands without the released weights."""
    config = get_config(model_name, image_size)
    save_torch_checkpoint(build_model(config, seed=seed), out,
                          random_init={"model": config.name, "seed": int(seed)})
    return Path(out)
