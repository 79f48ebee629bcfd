"""The official (PyTorch state_dict) name of every model parameter.

Flax modules carry the official names, so a torch key is the Flax path joined by dots with a few
renames (the official `nn.Sequential` indices, the neck's `.conv`, the prompt encoder's buffer)
and the leaf renamed (kernel/scale/embedding -> weight). The weight converter and the
optimiser's parameter groups (which follow the official trainer's name patterns) both use them.
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

from flax import nnx

# (regex on the dotted Flax module path, replacement) applied in order.
MODULE_RENAMES = [
    (r"mask_downscaling\.conv1", "mask_downscaling.0"),
    (r"mask_downscaling\.norm1", "mask_downscaling.1"),
    (r"mask_downscaling\.conv2", "mask_downscaling.3"),
    (r"mask_downscaling\.norm2", "mask_downscaling.4"),
    (r"mask_downscaling\.conv3", "mask_downscaling.6"),
    (r"output_upscaling\.deconv1", "output_upscaling.0"),
    (r"output_upscaling\.norm", "output_upscaling.1"),
    (r"output_upscaling\.deconv2", "output_upscaling.3"),
    (r"neck\.convs\.(\d+)", r"neck.convs.\1.conv"),
]
LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight",
                "gaussian": "pe_layer.positional_encoding_gaussian_matrix"}

def torch_key(path: Tuple) -> str:
    module_path = ".".join(str(p) for p in path[:-1])
    for pattern, replacement in MODULE_RENAMES:
        module_path = re.sub(pattern, replacement, module_path)
    leaf = LEAF_RENAMES.get(path[-1], path[-1])
    return f"{module_path}.{leaf}" if module_path else leaf


def modules_by_path(model: nnx.Module) -> Dict[Tuple, nnx.Module]:
    """Every submodule of ``model`` (itself under ``()``) keyed by its Flax path tuple."""
    return {tuple(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module)}
