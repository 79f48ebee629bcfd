"""Batched image predictor: `SAM2ImagePredictor` semantics, all people of an image in one call.

Pre/post-processing follow the official predictor (`p2s_jax.inference.preprocess`, on the
device): the image is resized to S x S (not aspect preserving) with torchvision's antialiased
bilinear resize and ImageNet-normalised; point coordinates are scaled from the original
width/height; masks are upsampled bilinearly to the original size and thresholded at 0;
low-res logits are clamped to [-32, 32].

The heavy lifting is two jitted pure functions over (graphdef, state) — `encode_images` and
`decode_prompts` — that the evaluator and the trainer call too. The number of people N and of
prompt slots K are padded to buckets, so a new count rarely compiles anew; padded prompt slots
(label -1) are masked out of attention, so padding never changes a person's result.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2s_jax.inference.postprocess import MaskPostprocess, remove_small_regions
from p2s_jax.inference.preprocess import (LOW_RES_CLAMP, bucket, canvas_hw,
                                          preprocess_on_device, to_model_coords, upsample_masks,
                                          upsample_matrices)
from p2s_jax.model.sam2 import ImageFeatures, SAM2Image
from p2s_jax.utils.images import pad_to_canvas, to_rgb_uint8
from weights_conversion import load_model

VALID_LABELS = (-2, -1, 0, 1, 2, 3)  # -2: the empty prompt (`prompting.LABEL_EMPTY`)


class Prediction(NamedTuple):
    masks: np.ndarray  # (N, M, H, W) bool
    iou: np.ndarray  # (N, M) float32
    low_res_logits: np.ndarray  # (N, M, S/4, S/4) float32, clamped to [-32, 32]
    object_score: np.ndarray  # (N,) float32 logits


# ----------------------------------------------------------------------------- jitted core

# (B, Hc, Wc, 3) uint8 canvases, (B, 2) sizes -> (B, S, S, 3) normalised; one small program per
# canvas size, so that the encoder compiles once whatever the photos' sizes.
preprocess_images = jax.jit(preprocess_on_device, static_argnums=2)
# (..., h, w) low-res logits -> holes filled and sprinkles removed (`MaskPostprocess` static).
postprocess_logits = jax.jit(remove_small_regions, static_argnums=1)


@functools.partial(jax.jit, static_argnums=0)
def encode_images(graphdef, state, pixels: jax.Array) -> ImageFeatures:
    """(B, S, S, 3) normalised -> ImageFeatures with a leading B."""
    return nnx.merge(graphdef, state).encode_image(pixels)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("multimask_output", "dynamic_stability", "object_score_gate",
                                    "people_per_chunk", "postprocess"))
def decode_prompts(graphdef, state, features: ImageFeatures, coords, labels, mask_input=None,
                   has_mask_input=None, upsample_y=None, upsample_x=None, *,
                   multimask_output: bool = False, dynamic_stability: Optional[bool] = None,
                   object_score_gate: bool = False, people_per_chunk: Optional[int] = None,
                   postprocess: MaskPostprocess = MaskPostprocess()):
    """One image's features, N prompt sets -> (`Decoded`, masks or None).

    The low-res logits are not clamped (the official predictor upsamples unclamped logits and
    clamps only the low-res output: callers clamp with `LOW_RES_CLAMP`). With the upsampling
    matrices (Hp, h), (Wp, w), masks (N, M, Hp, Wp) bool are computed in the same program; without
    them, call `upsample_masks` separately (one compilation per image-size bucket instead of one
    of the whole decoder). `postprocess` (holes and sprinkles) changes only the masks, as in the
    official predictor; the returned logits are the decoder's.
    """
    model = nnx.merge(graphdef, state)
    out = model.decode(features, coords, labels, mask_input, has_mask_input,
                       multimask_output=multimask_output, dynamic_stability=dynamic_stability,
                       object_score_gate=object_score_gate, people_per_chunk=people_per_chunk)
    masks = None
    if upsample_y is not None:
        masks = upsample_masks(remove_small_regions(out.low_res_logits, postprocess), upsample_y,
                               upsample_x)
    return out, masks


# ----------------------------------------------------------------------------- input checks

def check_prompts(coords, labels, orig_hw, name: str = "point") -> Tuple[np.ndarray, np.ndarray]:
    """Validates (N, K, 2) coords and (N, K) labels; single instances (K, 2) / (K,) get N = 1."""
    coords = np.asarray(coords, np.float64)
    labels = np.asarray(labels)
    if coords.ndim == 2 and labels.ndim == 1:
        coords, labels = coords[None], labels[None]
    if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
        raise ValueError(f"{name}_coords must be (N, K, 2) and {name}_labels (N, K); got "
                         f"{coords.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}_labels must be integers, got dtype {labels.dtype}")
    bad_label = ~np.isin(labels, VALID_LABELS)
    if bad_label.any():
        n, k = np.argwhere(bad_label)[0]
        raise ValueError(f"{name}_labels[{n}, {k}] = {labels[n, k]}; labels are 1 (positive), "
                         f"0 (negative), 2 / 3 (box corners), -1 (padding) or -2 (no points)")
    used = labels >= 0
    finite = np.isfinite(coords).all(-1)
    if (used & ~finite).any():
        n, k = np.argwhere(used & ~finite)[0]
        raise ValueError(f"{name}_coords[{n}, {k}] = {coords[n, k].tolist()} is not finite")
    del orig_hw  # points may lie outside the photo: the official predictor does not clip them
    return np.where(used[..., None], coords, 0).astype(np.float32), labels.astype(np.int32)


# ----------------------------------------------------------------------------- predictor

def default_people_per_chunk() -> Optional[int]:
    """4 on CPU (cache-sized chunks of people, `SAM2Image.decode`), all at once on accelerators."""
    return 4 if jax.default_backend() == "cpu" else None


class Predictor:
    """`set_image` once, then `predict` any number of people in one compiled call.

    people_per_chunk: people decoded together inside that call (`SAM2Image.decode`); "auto" is
    `default_people_per_chunk()`, None all at once. Results do not depend on it.
    postprocess: hole filling / sprinkle removal on the low-res logits before the masks are
    upsampled (`SAM2ImagePredictor(max_hole_area=..., max_sprinkle_area=...)`; off by default
    as there; `MaskPostprocess(10, 50)` for SAM-pose2seg's inference, the authors' values).
    """

    def __init__(self, model: SAM2Image, people_per_chunk: Union[int, None, str] = "auto",
                 postprocess: MaskPostprocess = MaskPostprocess()):
        if people_per_chunk == "auto":
            people_per_chunk = default_people_per_chunk()
        if people_per_chunk is not None and (not isinstance(people_per_chunk, int)
                                             or people_per_chunk < 1
                                             or people_per_chunk & (people_per_chunk - 1)):
            raise ValueError(f"people_per_chunk must be a power of two (people are padded to one), "
                             f"None or 'auto'; got {people_per_chunk!r}")
        self.people_per_chunk = people_per_chunk
        self.postprocess = postprocess
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self._features: Optional[ImageFeatures] = None
        self._orig_hw: Optional[Tuple[int, int]] = None

    @classmethod
    def from_checkpoint(cls, path, model: Optional[str] = None, image_size: Optional[int] = None,
                        dtype=jnp.float32, people_per_chunk: Union[int, None, str] = "auto",
                        attention: str = "auto",
                        postprocess: MaskPostprocess = MaskPostprocess()) -> "Predictor":
        """An official `.pt` checkpoint (SAM 2.1 or SAM-pose2seg) or a converted folder, computing
        in `dtype` (float32 or bfloat16; weights stay float32) with `attention`."""
        return cls(load_model(path, model, image_size, dtype, attention), people_per_chunk,
                   postprocess)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def set_image(self, image: np.ndarray) -> None:
        """H x W x 3 uint8 RGB (grayscale and RGBA are converted; anything else raises).

        The photo goes to the device as it is, padded to a canvas (`canvas_hw`); resize and
        normalisation run there (`preprocess_images`), then the encoder."""
        image = to_rgb_uint8(image, "image")
        canvas = pad_to_canvas(image, canvas_hw(image.shape[:2]))
        pixels = preprocess_images(jnp.asarray(canvas[None]),
                                   jnp.asarray([image.shape[:2]], jnp.int32), self.image_size)
        features = encode_images(self.graphdef, self.state, pixels)
        self._features = jax.tree.map(lambda x: x[0], features)
        self._orig_hw = image.shape[:2]

    def predict(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                multimask_output: bool = False) -> Prediction:
        """point_coords (N, K, 2) original-image pixels; point_labels (N, K) in {1, 0, -1, 2, 3};
        boxes (N, 4) xyxy pixels (prepended as corner points 2 / 3, as the official predictor);
        mask_input (N, 1, S/4, S/4) logits. Returns `Prediction` for the N people."""
        if self._features is None:
            raise RuntimeError("call set_image(image) before predict(...)")
        coords, labels = self._prompt_arrays(point_coords, point_labels, boxes)
        n, k = labels.shape
        n_pad, k_pad = bucket(n), bucket(k, 4)
        coords = np.pad(coords, ((0, n_pad - n), (0, k_pad - k), (0, 0)))
        labels = np.pad(labels, ((0, n_pad - n), (0, k_pad - k)), constant_values=-1)
        masks_in, has_mask = self._mask_arrays(mask_input, n, n_pad)
        low = self.config.low_res_mask_size
        up_y, up_x = upsample_matrices(tuple(self._orig_hw), low)
        out, _ = decode_prompts(self.graphdef, self.state, self._features, jnp.asarray(coords),
                                jnp.asarray(labels), masks_in, has_mask,
                                multimask_output=multimask_output,
                                people_per_chunk=self.people_per_chunk)
        masks = upsample_masks(postprocess_logits(out.low_res_logits, self.postprocess), up_y,
                               up_x)
        h, w = self._orig_hw
        return Prediction(masks=np.asarray(masks[:n, :, :h, :w]), iou=np.asarray(out.iou[:n]),
                          low_res_logits=np.clip(np.asarray(out.low_res_logits[:n]),
                                                 -LOW_RES_CLAMP, LOW_RES_CLAMP),
                          object_score=np.asarray(out.object_score_logits[:n]))

    def _prompt_arrays(self, point_coords, point_labels, boxes):
        hw = self._orig_hw
        if point_coords is None and boxes is None:
            raise ValueError("give point_coords / point_labels, boxes, or both")
        parts = []
        if boxes is not None:
            boxes = np.asarray(boxes, np.float64)
            if boxes.ndim == 1:
                boxes = boxes[None]
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"boxes must be (N, 4) xyxy, got shape {boxes.shape}")
            corner_labels = np.tile(np.array([[2, 3]]), (len(boxes), 1))
            parts.append(check_prompts(boxes.reshape(-1, 2, 2), corner_labels, hw, "box"))
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            parts.append(check_prompts(point_coords, point_labels, hw))
        if len(parts) == 2 and len(parts[0][1]) != len(parts[1][1]):
            raise ValueError(f"boxes give {len(parts[0][1])} instances but point_coords "
                             f"{len(parts[1][1])}")
        coords = np.concatenate([p[0] for p in parts], axis=1)
        labels = np.concatenate([p[1] for p in parts], axis=1)
        return to_model_coords(coords, hw, self.image_size), labels

    def _mask_arrays(self, mask_input, n: int, n_pad: int):
        if mask_input is None:
            return None, None
        low = self.config.low_res_mask_size
        mask_input = np.asarray(mask_input, np.float32)
        if mask_input.shape != (n, 1, low, low):
            raise ValueError(f"mask_input must be (N, 1, {low}, {low}) = ({n}, 1, {low}, {low}) "
                             f"logits, got {mask_input.shape}")
        if not np.isfinite(mask_input).all():
            raise ValueError("mask_input holds non-finite values")
        masks = np.pad(mask_input[:, 0, :, :, None], ((0, n_pad - n), (0, 0), (0, 0), (0, 0)))
        return jnp.asarray(masks), jnp.asarray(np.arange(n_pad) < n)
