"""Official SAM 2.1 PyTorch checkpoints <-> p2s_jax Flax NNX weights (strict, both directions)."""

from weights_conversion.convert import (
    CheckpointError,
    METADATA_FILE,
    conversion_summary,
    convert_checkpoint,
    VIDEO_MEMORY_PREFIXES,
    detect_model_name,
    from_state_dict,
    load_model,
    load_torch_state_dict,
    save_orbax,
    load_orbax,
    to_state_dict,
    save_torch_checkpoint,
    video_memory_tensors,
    RANDOM_INIT_KEY,
    random_init_info,
    random_weights_note,
    write_random_checkpoint,
)

__all__ = [
    "CheckpointError", "METADATA_FILE", "conversion_summary", "convert_checkpoint", "VIDEO_MEMORY_PREFIXES", "detect_model_name", "from_state_dict",
    "load_model", "load_torch_state_dict", "save_orbax", "load_orbax", "to_state_dict",
    "save_torch_checkpoint", "video_memory_tensors", "RANDOM_INIT_KEY", "random_init_info",
    "random_weights_note", "write_random_checkpoint",
]
