"""One step of a dataset run: the host's batch (`host_batch`, around the photos the host workers
decoded, `evaluation.host`, started ahead by `prefetch`) and the three jitted data-parallel device programs,
`encode_step`, `prompts_step` and `decode_step`: `jax.shard_map`s over the 'data' axis with the
weights replicated, around the predictor's own jitted functions (`encode_images`,
`decode_prompts`) and `select_prompts`. They are module-level and static in (graphdef, mesh,
settings), so that jit's cache reuses their compilations across runs (the evaluator, the
annotator, and evaluation while training).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from p2s_jax.evaluation.plan import Item
from p2s_jax.inference.postprocess import MaskPostprocess, exclusive_masks
from p2s_jax.inference.predictor import decode_prompts, encode_images
from p2s_jax.inference.preprocess import preprocess_on_device, to_model_coords, upsample_matrix
from p2s_jax.inference.prompting import PromptConfig, select_prompts
from p2s_jax.parallel import DATA, REPLICATED

def _prompts_shard(keypoints, scores, confidence, boxes, image_hw, num_people, *,
                   prompt: PromptConfig, image_size: int):
    """keypoints (B, P, J, 2), scores / confidence (B, P, J), boxes (B, P, 4) or None,
    image_hw (B, 2), num_people (B,) real people per image (the rest is padding) -> model coords
    (B, P, K, 2), pixel coords (B, P, K, 2), labels (B, P, K), has_prompt (B, P)."""
    prompts = jax.vmap(lambda k, s, c, hw, b: select_prompts(k, s, hw, prompt, b, c))(
        keypoints, scores, confidence, image_hw, boxes)
    real = jnp.arange(keypoints.shape[1])[None, :] < num_people[:, None]
    prompts = prompts._replace(has_prompt=prompts.has_prompt & real,
                               labels=jnp.where(real[..., None], prompts.labels, -1))
    model_coords = to_model_coords(prompts.coords, image_hw[:, None, None, :], image_size)
    return model_coords, prompts.coords, prompts.labels, prompts.has_prompt


def _decode_shard(graphdef, state, features, coords, labels, has_prompt, up_y, up_x, *,
                  people_per_chunk: int | None, exclusive: bool, postprocess: MaskPostprocess):
    """features (B, ...), coords (B, P, K, 2), labels (B, P, K), has_prompt (B, P),
    up_y (B, Hc, low), up_x (B, Wc, low) -> masks (B, P, Hc, Wc / 8) uint8, eight pixels of a
    row to a byte (`jnp.packbits` along the width: an eighth of the bytes to read back and hand
    to the host workers, which unpack them), iou (B, P), object score logits (B, P).

    The P people of an image are decoded `people_per_chunk` at a time inside the decoder
    (`SAM2Image.decode`; None: all at once); people without a prompt get empty masks; with
    `exclusive`, every
    pixel goes to one mask (`exclusive_masks`)."""

    def one_image(image_features, image_coords, image_labels, image_up_y, image_up_x):
        out, masks = decode_prompts(graphdef, state, image_features, image_coords, image_labels,
                                    None, None, image_up_y, image_up_x, multimask_output=False,
                                    people_per_chunk=people_per_chunk, postprocess=postprocess)
        return masks[:, 0], out.iou[:, 0], out.object_score_logits

    masks, iou, object_score = jax.vmap(one_image)(features, coords, labels, up_y, up_x)
    masks = masks & has_prompt[:, :, None, None]
    if exclusive:
        masks = jax.vmap(exclusive_masks)(masks, jnp.where(has_prompt, iou, 0.0))
    return jnp.packbits(masks, axis=-1), iou, object_score.reshape(iou.shape)


def _encode_shard(graphdef, state, images, image_hw, *, image_size: int):
    """images (B, Hc, Wc, 3) uint8 on the canvas, image_hw (B, 2) -> ImageFeatures (B, ...):
    resize and normalisation on the device, then the encoder."""
    return encode_images(graphdef, state, preprocess_on_device(images, image_hw, image_size))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def encode_step(graphdef, mesh: Mesh, image_size: int, state, images, image_hw):
    fn = functools.partial(_encode_shard, graphdef, image_size=image_size)
    return jax.shard_map(fn, mesh=mesh, in_specs=(REPLICATED, DATA, DATA), out_specs=DATA)(
        state, images, image_hw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def prompts_step(mesh: Mesh, prompt: PromptConfig, image_size: int, keypoints, scores, confidence,
                 boxes, image_hw, num_people):
    fn = functools.partial(_prompts_shard, prompt=prompt, image_size=image_size)
    # check_vma=False: MaxSpread's fori_loop starts from constant carries, which shard_map's
    # varying-axis type check rejects; every value here is per device anyway.
    return jax.shard_map(fn, mesh=mesh, in_specs=DATA, out_specs=DATA, check_vma=False)(
        keypoints, scores, confidence, boxes, image_hw, num_people)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def decode_step(graphdef, mesh: Mesh, people_per_chunk: int | None, exclusive: bool,
                postprocess: MaskPostprocess, state, features, coords, labels, has_prompt, up_y,
                up_x):
    fn = functools.partial(_decode_shard, graphdef, people_per_chunk=people_per_chunk,
                           exclusive=exclusive, postprocess=postprocess)
    specs = (REPLICATED, DATA, DATA, DATA, DATA, DATA, DATA)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=DATA)(
        state, features, coords, labels, has_prompt, up_y, up_x)


def prefetch(start: Callable[..., concurrent.futures.Future], args: Iterable[tuple],
             depth: int) -> Iterator[concurrent.futures.Future]:
    """Futures of start(*a) in order, at most `depth` started ahead of the one yielded."""
    args = iter(args)
    pending = collections.deque(start(*a) for a in itertools.islice(args, depth))
    while pending:
        future = pending.popleft()
        for a in itertools.islice(args, 1):
            pending.append(start(*a))
        yield future


class HostBatch(NamedTuple):
    images: np.ndarray  # (L, Hc, Wc, 3) uint8 on the canvas, zeros in empty rows
    keypoints: np.ndarray  # (L, P, J, 2)
    scores: np.ndarray  # (L, P, J)
    confidence: np.ndarray  # (L, P, J)
    boxes: np.ndarray | None  # (L, P, 4)
    image_hw: np.ndarray  # (L, 2) int32
    num_people: np.ndarray  # (L,) int32 real people (the rest of P is padding)
    up_y: np.ndarray  # (L, Hc, low)
    up_x: np.ndarray  # (L, Wc, low)


def host_batch(slots: Sequence[Item | None], images: np.ndarray, num_people: int, low: int,
               canvas: tuple[int, int], with_boxes: bool, joints: int) -> HostBatch:
    """This process's slots around their photos `images` ((L, Hc, Wc, 3), taken as they are);
    empty slots (padding, skipped images) have no people."""
    n = len(slots)
    batch = HostBatch(
        images=images,
        keypoints=np.full((n, num_people, joints, 2), np.nan, np.float32),
        scores=np.zeros((n, num_people, joints), np.float32),
        confidence=np.zeros((n, num_people, joints), np.float32),
        boxes=np.zeros((n, num_people, 4), np.float32) if with_boxes else None,
        image_hw=np.ones((n, 2), np.int32),
        num_people=np.zeros(n, np.int32),
        up_y=np.zeros((n, canvas[0], low), np.float32),
        up_x=np.zeros((n, canvas[1], low), np.float32),
    )
    for row, item in enumerate(slots):
        if item is None:
            continue
        people = len(item.poses.det_score)
        batch.keypoints[row, :people] = item.poses.keypoints
        batch.scores[row, :people] = item.poses.scores
        batch.confidence[row, :people] = item.poses.confidence
        if with_boxes:
            batch.boxes[row, :people] = item.poses.boxes
        batch.image_hw[row] = item.hw
        batch.num_people[row] = people
        upsample_matrix(item.hw[0], low, canvas[0], out=batch.up_y[row])
        upsample_matrix(item.hw[1], low, canvas[1], out=batch.up_x[row])
    return batch
