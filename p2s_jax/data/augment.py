"""Host-side training augmentations (NumPy + PIL) of an image with its person masks and poses.

The order and ranges are those of the official SAM 2.1 fine-tuning config
(`sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml`):

1. horizontal flip, p = 0.5;
2. random affine: rotation in [-25, 25] degrees and an x-shear in [-20, 20] degrees about the
   image centre (no translation, no scale; torchvision's angle conventions, `affine_matrix`);
   bilinear for the image (border filled with the ImageNet mean in uint8, (123, 116, 103)),
   nearest for the masks. As in the official `RandomAffine` (num_tentatives = 1) the affine is
   dropped when it would empty a mask that was not empty;
3. square resize to `image_size` x `image_size` (the aspect ratio is not kept): bilinear
   (antialiased when shrinking) for the image and, rounded back to 0 / 1, for the masks;
4. colour jitter (brightness 0.1, contrast 0.03, saturation 0.03, in a random order);
5. grayscale, p = 0.05;
6. colour jitter (brightness 0.1, contrast 0.05, saturation 0.05).

ImageNet normalisation is left to the device: the image stays uint8.

Conventions. Images are (H, W, 3) uint8, masks (M, H, W) bool, keypoints (P, J, 2) float
(x, y) with visibility (P, J) float (<= 0: unavailable). A point with integer coordinates
(x, y) is the CENTRE of pixel mask[y, x] (as in `p2s_jax.train.samplers`), so the pixel under a
keypoint is (floor(x + 0.5), floor(y + 0.5)) and a keypoint lies in the image when
-0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5. Every geometric step moves image, masks and
keypoints with one map:

- flip:   x' = (W - 1) - x, and the left / right keypoints swap slots (`FLIP_PERMUTATION`),
          visibility with them, so slot 'left_wrist' holds what now looks like a left wrist;
- affine: p' = A (p - c) + c with c = ((W - 1) / 2, (H - 1) / 2); keypoints that leave the
          image get visibility 0 (their coordinates stay finite);
- resize: x' = (x + 0.5) * S / W - 0.5 (and likewise for y).

Randomness: `sample_params(rng, config)` draws every random choice from a NumPy Generator into an
`AugmentParams`; `apply_params` is then deterministic. `augment` does both, so the same seed
gives the same result.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance

from p2s_jax.keypoints import FLIP_PERMUTATION
from p2s_jax.utils.errors import InputError

# The official RandomAffine fills the uncovered border with the ImageNet mean in uint8.
IMAGE_FILL = (123, 116, 103)
# Colour operations a jitter applies, in the order given by `ColorJitterParams.order`.
_JITTER_OPS = ("brightness", "contrast", "saturation")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (defaults: the official SAM 2.1 config).

    Attributes:
      enabled: False turns every random step off (only the resize is left): evaluation and
        overfitting runs.
      flip_p: probability of a horizontal flip.
      degrees: rotation drawn uniformly from [-degrees, degrees].
      shear: x-shear angle drawn uniformly from [-shear, shear], degrees (< 90).
      affine_tries: affines drawn before giving up when each would empty a mask.
      fill: RGB value of the image border uncovered by the affine.
      jitter: (brightness, contrast, saturation) strengths b of the first jitter: each factor is
        drawn from [max(0, 1 - b), 1 + b].
      grayscale_p: probability of turning the image gray (three equal channels).
      jitter_after_grayscale: strengths of the second jitter.
    """

    enabled: bool = True
    flip_p: float = 0.5
    degrees: float = 25.0
    shear: float = 20.0
    affine_tries: int = 1
    fill: tuple[int, int, int] = IMAGE_FILL
    jitter: tuple[float, float, float] = (0.1, 0.03, 0.03)
    grayscale_p: float = 0.05
    jitter_after_grayscale: tuple[float, float, float] = (0.1, 0.05, 0.05)

    def __post_init__(self):
        for name in ("flip_p", "grayscale_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InputError(f"AugmentConfig.{name} must be a probability in [0, 1], "
                                 f"got {value}")
        if not 0.0 <= self.degrees <= 180.0:
            raise InputError(f"AugmentConfig.degrees must be in [0, 180], got {self.degrees}")
        if not 0.0 <= self.shear < 90.0:
            raise InputError(f"AugmentConfig.shear must be in [0, 90) degrees, got {self.shear}")
        if self.affine_tries < 1:
            raise InputError(f"AugmentConfig.affine_tries must be >= 1, got {self.affine_tries}")
        if len(self.fill) != 3 or not all(0 <= v <= 255 for v in self.fill):
            raise InputError(f"AugmentConfig.fill must be 3 values in [0, 255], got {self.fill}")
        for name in ("jitter", "jitter_after_grayscale"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) < 0:
                raise InputError(f"AugmentConfig.{name} must be 3 non-negative strengths "
                                 f"(brightness, contrast, saturation), got {value}")


NO_AUGMENT = AugmentConfig(enabled=False)


@dataclasses.dataclass(frozen=True)
class ColorJitterParams:
    """One colour jitter: `order` is a permutation of (0, 1, 2) = (brightness, contrast,
    saturation); `factors` are the three enhancement factors (1.0 = unchanged)."""

    order: tuple[int, int, int] = (0, 1, 2)
    factors: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Every random choice of one `augment` call.

    Attributes:
      flip: whether to flip horizontally.
      affines: (rotation, shear) pairs in degrees, tried in order (the first one that empties no
        mask is applied; none when all do). Empty: no affine.
      jitter, grayscale, jitter_after_grayscale: the colour steps.
    """

    flip: bool = False
    affines: tuple[tuple[float, float], ...] = ()
    jitter: ColorJitterParams = ColorJitterParams()
    grayscale: bool = False
    jitter_after_grayscale: ColorJitterParams = ColorJitterParams()


IDENTITY = AugmentParams()


# ----------------------------------------------------------------------------------------------
# Random parameters


def _sample_jitter(rng: np.random.Generator, strengths: tuple[float, float, float]
                   ) -> ColorJitterParams:
    order = tuple(int(i) for i in rng.permutation(len(_JITTER_OPS)))
    factors = tuple(float(rng.uniform(max(0.0, 1.0 - s), 1.0 + s)) for s in strengths)
    return ColorJitterParams(order, factors)


def sample_params(rng: np.random.Generator, config: AugmentConfig) -> AugmentParams:
    """Draws the random choices of one augmentation; `IDENTITY` when `config.enabled` is False."""
    if not config.enabled:
        return IDENTITY
    flip = bool(rng.random() < config.flip_p)
    affines = tuple((float(rng.uniform(-config.degrees, config.degrees)),
                     float(rng.uniform(-config.shear, config.shear)))
                    for _ in range(config.affine_tries))
    jitter = _sample_jitter(rng, config.jitter)
    grayscale = bool(rng.random() < config.grayscale_p)
    jitter_after = _sample_jitter(rng, config.jitter_after_grayscale)
    return AugmentParams(flip, affines, jitter, grayscale, jitter_after)


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray,
                  visibility: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2] or masks.dtype != np.bool_:
        raise ValueError(f"masks must be (M, H, W) bool with (H, W) = {image.shape[:2]}, got "
                         f"{masks.shape} {masks.dtype}")
    if keypoints.ndim != 3 or keypoints.shape[2] != 2:
        raise ValueError(f"keypoints must be (P, J, 2), got {keypoints.shape}")
    if visibility.shape != keypoints.shape[:2]:
        raise ValueError(f"visibility must be (P, J) = {keypoints.shape[:2]} to match "
                         f"keypoints, got {visibility.shape}")


def clear_outside(keypoints: np.ndarray, visibility: np.ndarray, height: int, width: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Visibility 0 for keypoints outside the (height, width) image or not finite.

    Args:
      keypoints: (P, J, 2) x, y in pixels (pixel-centre convention).
      visibility: (P, J).

    Returns:
      (keypoints, visibility): non-finite coordinates replaced by 0 (dtype kept); visibility
      float32.
    """
    finite = np.all(np.isfinite(keypoints), axis=-1)
    keypoints = np.where(finite[..., None], keypoints, 0.0)
    x, y = keypoints[..., 0], keypoints[..., 1]
    inside = finite & (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return keypoints, np.where(inside, visibility, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Geometry


def hflip(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray, visibility: np.ndarray,
          flip_permutation: tuple = FLIP_PERMUTATION
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mirrors left <-> right: x -> (W - 1) - x, and left / right keypoint slots swapped.

    Args:
      image: (H, W, 3); masks: (M, H, W); keypoints: (P, J, 2); visibility: (P, J).
      flip_permutation: the schema's (`KeypointSchema.flip_permutation`; COCO-17's default).

    Returns:
      The four arrays flipped, keypoints as float64: exact for float32 (or float64 with at most
      ~50 significant bits) coordinates, so that flipping twice gives the inputs back.
    """
    width = image.shape[1]
    perm = list(flip_permutation)
    if len(perm) != np.shape(keypoints)[1]:
        raise ValueError(f"flip permutation of {len(perm)} keypoints for poses of "
                         f"{np.shape(keypoints)[1]}")
    flipped = np.asarray(keypoints, np.float64)[:, perm]
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return (np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1]),
            flipped, visibility[:, perm].copy())


def affine_matrix(rotation: float, shear: float) -> np.ndarray:
    """(2, 2) linear part A = R(rotation) @ Shear_x(shear), angles in degrees, in torchvision's
    convention (`F.affine(img, angle, translate, scale, shear)`, what the official
    `RandomAffine` draws): the same (rotation, shear) moves the pixels as the official
    transform does.

    R turns clockwise as seen on screen (y pointing down); the x-shear maps (x, y) to
    (x - tan(shear) y, y). det(A) = 1: areas are preserved.
    """
    a, s = math.radians(rotation), math.radians(shear)
    rotate = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return rotate @ np.array([[1.0, -math.tan(s)], [0.0, 1.0]])


def transform_points(linear: np.ndarray, points: np.ndarray, height: int, width: int
                     ) -> np.ndarray:
    """p' = A (p - c) + c with c = ((W - 1) / 2, (H - 1) / 2), for (..., 2) points (x, y)."""
    center = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    return (np.asarray(points, np.float64) - center) @ linear.T + center


def _pil_affine_data(linear: np.ndarray, height: int, width: int) -> tuple[float, ...]:
    """PIL's AFFINE data: output -> input map in PIL's frame, where pixel i spans [i, i + 1).

    PIL samples output pixel (i, j) at (i + 0.5, j + 0.5); in that frame our centre c becomes
    (W / 2, H / 2), and p = A^-1 (p' - c) + c reads q = A^-1 q' + (c' - A^-1 c').
    """
    inverse = np.linalg.inv(linear)
    center = np.array([width / 2.0, height / 2.0])
    offset = center - inverse @ center
    return (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])


def warp_masks(linear: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(M, H, W) bool masks through the affine, nearest neighbour, outside = False."""
    height, width = masks.shape[1:]
    data = _pil_affine_data(linear, height, width)
    out = [np.asarray(Image.fromarray(m.astype(np.uint8)).transform(
        (width, height), Image.Transform.AFFINE, data, resample=Image.Resampling.NEAREST,
        fillcolor=0)) for m in masks]
    return np.stack(out).astype(bool) if out else masks.copy()


def warp_image(linear: np.ndarray, image: np.ndarray,
               fill: tuple[int, int, int] = IMAGE_FILL) -> np.ndarray:
    """(H, W, 3) uint8 (or (H, W) float32) image through the affine, bilinear, border = fill."""
    height, width = image.shape[:2]
    data = _pil_affine_data(linear, height, width)
    fillcolor = tuple(int(v) for v in fill) if image.ndim == 3 else float(fill[0])
    return np.asarray(Image.fromarray(image).transform(
        (width, height), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR,
        fillcolor=fillcolor))


def _kept_every_mask(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether every mask non-empty in `before` is still non-empty in `after`."""
    return bool(np.all(after.any(axis=(1, 2)) | ~before.any(axis=(1, 2))))


def random_affine(affines: tuple[tuple[float, float], ...], image: np.ndarray, masks: np.ndarray,
                  keypoints: np.ndarray, visibility: np.ndarray,
                  fill: tuple[int, int, int] = IMAGE_FILL
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Applies the first (rotation, shear) of `affines` that empties no non-empty mask.

    When every candidate empties a mask (the person would leave the image) the inputs are
    returned unchanged, as the official RandomAffine does after its tentatives.

    Args:
      affines: (rotation, shear) pairs in degrees.
      image: (H, W, 3) uint8; masks: (M, H, W) bool; keypoints: (P, J, 2); visibility: (P, J).

    Returns:
      (image, masks, keypoints, visibility); keypoints that leave the image get visibility 0.
    """
    height, width = masks.shape[1:]
    for rotation, shear in affines:
        linear = affine_matrix(rotation, shear)
        warped = warp_masks(linear, masks)
        if _kept_every_mask(masks, warped):
            moved = transform_points(linear, keypoints, height, width)
            moved, visibility = clear_outside(moved, visibility, height, width)
            return warp_image(linear, image, fill), warped, moved, visibility
    return image, masks, keypoints, visibility


def resize(image: np.ndarray, masks: np.ndarray, keypoints: np.ndarray, size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square resize to size x size: image bilinear (antialiased), masks as the official
    transform resizes them (torchvision's antialiased bilinear resize of the 0 / 1 uint8 mask,
    rounded back to 0 / 1: a pixel is in the mask when at least half of its bilinear weight
    is; PIL's antialiased bilinear here, the algorithm torchvision's copies).

    Keypoints follow the pixel-centre convention: x' = (x + 0.5) * size / W - 0.5 (y alike),
    so a keypoint inside the image stays inside.

    Returns:
      (image (S, S, 3), masks (M, S, S), keypoints (P, J, 2) float64).
    """
    height, width = image.shape[:2]
    scale = np.array([size / width, size / height])
    moved = (np.asarray(keypoints, np.float64) + 0.5) * scale - 0.5
    if (height, width) == (size, size):
        return image, masks, moved
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    out = [np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
        (size, size), Image.Resampling.BILINEAR)) >= 128 for m in masks]
    masks = np.stack(out) if out else np.zeros((0, size, size), bool)
    return image, masks, moved


# ----------------------------------------------------------------------------------------------
# Colour (image only)


def color_jitter(image: np.ndarray, params: ColorJitterParams) -> np.ndarray:
    """Brightness, contrast and saturation enhancements (PIL ImageEnhance) in `params.order`.

    Brightness blends with black, contrast with the mean gray level, saturation with the gray
    version of the image; factor 1.0 leaves the image unchanged.
    """
    if params.factors == (1.0, 1.0, 1.0):
        return image
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    pil = Image.fromarray(image)
    for index in params.order:
        pil = enhancers[index](pil).enhance(params.factors[index])
    return np.asarray(pil)


def grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the same shape with three equal channels (ITU-R 601 luma, PIL 'L')."""
    gray = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(gray[:, :, None], 3, axis=2)


# ----------------------------------------------------------------------------------------------
# The pipeline


def apply_params(params: AugmentParams, image: np.ndarray, masks: np.ndarray,
                 keypoints: np.ndarray, visibility: np.ndarray, image_size: int,
                 fill: tuple[int, int, int] = IMAGE_FILL,
                 flip_permutation: tuple = FLIP_PERMUTATION
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """flip -> affine -> resize -> jitter -> grayscale -> jitter, as drawn in `params`.

    Args:
      params: from `sample_params` (or `IDENTITY`: resize only).
      image: (H, W, 3) uint8. masks: (M, H, W) bool. keypoints: (P, J, 2) float in image
        pixels, visibility: (P, J) (M and P may differ).
      image_size: S, the side of the square output.
      fill: image border colour of the affine.
      flip_permutation: the keypoint schema's left / right swap (COCO-17 by default).

    Returns:
      image (S, S, 3) uint8, masks (M, S, S) bool, keypoints (P, J, 2) float32 in output pixels,
      visibility (P, J) float32, 0 for keypoints outside the output (or non-finite).
    """
    image, masks = np.asarray(image), np.asarray(masks)
    keypoints, visibility = np.asarray(keypoints), np.asarray(visibility)
    _check_inputs(image, masks, keypoints, visibility)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    keypoints, visibility = clear_outside(np.asarray(keypoints, np.float64), visibility,
                                          *image.shape[:2])
    if params.flip:
        image, masks, keypoints, visibility = hflip(image, masks, keypoints, visibility,
                                                    flip_permutation)
    image, masks, keypoints, visibility = random_affine(params.affines, image, masks, keypoints,
                                                        visibility, fill)
    image, masks, keypoints = resize(image, masks, keypoints, image_size)
    image = color_jitter(image, params.jitter)
    if params.grayscale:
        image = grayscale(image)
    image = color_jitter(image, params.jitter_after_grayscale)
    keypoints, visibility = clear_outside(keypoints, visibility, image_size, image_size)
    return np.ascontiguousarray(image), masks, keypoints.astype(np.float32), visibility


def augment(rng: np.random.Generator, image: np.ndarray, masks: np.ndarray,
            keypoints: np.ndarray, visibility: np.ndarray, config: AugmentConfig,
            image_size: int, flip_permutation: tuple = FLIP_PERMUTATION
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random augmentation of one image with its masks and poses (see `apply_params`).

    Args:
      rng: NumPy Generator; the same generator state gives the same output.
      image: (H, W, 3) uint8. masks: (M, H, W) bool. keypoints: (P, J, 2), visibility (P, J).
      config: `AugmentConfig` (`NO_AUGMENT`: resize only).
      image_size: side S of the square output.

    Returns:
      image (S, S, 3) uint8, masks (M, S, S) bool, keypoints (P, J, 2) float32, visibility
      (P, J) float32.
    """
    params = sample_params(rng, config)
    return apply_params(params, image, masks, keypoints, visibility, image_size, config.fill,
                        flip_permutation)
