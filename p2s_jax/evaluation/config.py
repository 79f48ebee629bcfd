"""The settings of a dataset run (`EvalConfig`) and the backend's batching defaults.

Result score (`EvalConfig.result_score`): COCOeval ranks all masks of the dataset by their
score. "detection" uses the pose detector's instance score, "iou" SAM's predicted mask IoU,
"constant" 1.0 for every mask (Pose2Seg's protocol), and "product" (the default) the product of
the first two. The default is the product because the two carry
complementary information: the detection score says whether the person exists at all (it
demotes false-positive detections, which SAM still segments confidently) and the predicted IoU
says how good the mask is (it demotes failed masks of real people); multiplying them is the
mask-scoring rule of Mask Scoring R-CNN. With ground-truth poses the detection score is 1.0 and
the product is the predicted IoU.
"""

from __future__ import annotations

import dataclasses

import jax

from p2s_jax.data.poses import SCORE_NAMES, ScoreChannels, resolve_channels
from p2s_jax.inference.postprocess import MaskPostprocess
from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.utils.errors import InputError

RESULT_SCORES = ("product", "detection", "iou", "constant")
DEFAULT_RESULT_SCORE = "product"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that decides the evaluation's results and its speed.

    Attributes:
      prompt: how a pose becomes a prompt (`PromptConfig()`: MaxVis_3).
      keypoint_score: the per-keypoint visibility channel (ranks MaxVis, filters candidates),
        one of `poses.SCORE_NAMES`; None (default): 'visibility' when the poses carry it
        (ProbPose's visibility, or binary for ground-truth poses), else 'confidence' (the s of
        each [x, y, s]), the rule of every command (`poses.resolve_channels`).
      confidence_score: the per-keypoint confidence channel (the prompt gate and MaxSpread's
        ranking, `prompting.select_prompts`); None: the same as `keypoint_score`.
      result_score: 'product' (default, see the module docstring), 'detection', 'iou' or
        'constant'.
      exclusive: each pixel keeps only the covering mask with the highest predicted IoU.
      postprocess: hole filling / sprinkle removal on the low-res logits (off by default;
        the authors' 10 / 50 in the SAM-pose2seg preset, `presets.PRESETS`).
      box_source: where box prompts come from: 'detection' (the pose's own box) or 'gt' (the
        box of the ground-truth person the pose matches by OKS, `matching.ground_truth_boxes`;
        Tab. 4's "GT" rows).
      crop_to_box: 0 (off), or each person is segmented on its own crop of the photo: its box
        (`box_source`) scaled by this factor about its centre (1.5 in Tab. 7), rounded and
        clipped to the photo, as the authors' `crop` mode; the mask is pasted back, and
        exclusive masks are applied across the persons of the photo afterwards.
      images_per_device: images encoded together on one device (the chunk size); 0: the
        backend's default (`backend_defaults`: 2 on CPU, 8 on accelerators).
      people_per_chunk: people of an image decoded together inside the decoder (a `lax.map`
        over chunks); 0: the backend's default (4 on CPU, where a chunk's activations stay in
        cache; all people of an image at once on accelerators).
      num_workers: host workers that decode the photos and RLE-encode the masks.
      host_workers: what they are: "processes" (worker processes, the main process only feeds
        the devices and collects) or "threads" (in the main process); the same results
        (`evaluation.host`).
      prefetch_steps: steps of images prepared ahead of the device.
    """

    prompt: PromptConfig = PromptConfig()
    keypoint_score: str | None = None
    confidence_score: str | None = None
    result_score: str = DEFAULT_RESULT_SCORE
    exclusive: bool = False
    postprocess: MaskPostprocess = MaskPostprocess()
    box_source: str = "detection"
    crop_to_box: float = 0.0
    images_per_device: int = 0
    people_per_chunk: int = 0
    num_workers: int = 4
    host_workers: str = "processes"
    prefetch_steps: int = 2

    def __post_init__(self):
        for name in ("keypoint_score", "confidence_score"):
            value = getattr(self, name)
            if value not in SCORE_NAMES and value is not None:
                raise InputError(f"{name} must be one of {SCORE_NAMES} or None, got "
                                 f"{value!r}")
        if self.box_source not in ("detection", "gt"):
            raise InputError(f"box_source must be 'detection' or 'gt', got {self.box_source!r}")
        if self.crop_to_box < 0:
            raise InputError(f"crop_to_box must be >= 0 (0: off), got {self.crop_to_box}")
        if self.host_workers not in ("threads", "processes"):
            raise InputError(f"host_workers must be 'threads' or 'processes', got "
                             f"{self.host_workers!r}")
        if self.result_score not in RESULT_SCORES:
            raise InputError(f"result_score must be one of {RESULT_SCORES}, "
                             f"got {self.result_score!r}")
        for name in ("images_per_device", "people_per_chunk"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0 (0: the backend's default), got "
                                 f"{getattr(self, name)}")
        for name in ("num_workers", "prefetch_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def channels(self) -> ScoreChannels:
        """The visibility and confidence channels (after `resolve_channels`)."""
        return ScoreChannels(self.keypoint_score, self.confidence_score or self.keypoint_score)

    def resolve_channels(self, poses, source) -> "EvalConfig":
        """This config with its visibility channel named, both channels checked against what
        `poses` (image_id -> `PoseInstances`) carry (`poses.resolve_channels`; errors name
        `source`)."""
        channels = resolve_channels(poses.values(), self.keypoint_score, self.confidence_score,
                                    source)
        return dataclasses.replace(self, keypoint_score=channels.visibility)

    def for_backend(self, backend: str | None = None) -> "EvalConfig":
        """This config with the backend's defaults filled in (`backend_defaults`)."""
        images, people = backend_defaults(backend)
        return dataclasses.replace(self, images_per_device=self.images_per_device or images,
                                   people_per_chunk=self.people_per_chunk or people)


def backend_defaults(backend: str | None = None) -> tuple[int, int]:
    """(images per device, people per decoder chunk) for `backend` (default: JAX's). On CPU,
    small chunks keep activations in cache; accelerators want everything in one call (a chunk
    of 1024 people is more than any image holds, so it is one pass)."""
    backend = jax.default_backend() if backend is None else backend
    return (2, 4) if backend == "cpu" else (8, ALL_PEOPLE)


ALL_PEOPLE = 1024  # people_per_chunk that decodes every person of an image in one pass
