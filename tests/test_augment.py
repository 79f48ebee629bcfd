"""p2s_jax.data.augment: geometry on pixel centres, colour, rates, determinism, and the official
transforms as the reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from support import reference
from support.shared import REAL_COCO

from p2s_jax.data import augment as aug
from p2s_jax.keypoints import KEYPOINT_NAMES

# pycocotools' mask.decode trips NumPy 2's __array__(copy=...) deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning",
                                        "ignore:Using custom data configuration")


def _partner(name: str) -> str:
    return name.replace("left", "#").replace("right", "left").replace("#", "right")


# Slot of the mirrored body part, derived from the names (independent of FLIP_PERMUTATION).
PARTNER = [KEYPOINT_NAMES.index(_partner(n)) for n in KEYPOINT_NAMES]
# Only geometry: no colour change (for the body-part tests).
NO_COLOR = dict(jitter=(0.0, 0.0, 0.0), grayscale_p=0.0, jitter_after_grayscale=(0.0, 0.0, 0.0))



# ----------------------------------------------------------------------------------------------
# Augmentations: geometry


def _scene(height: int, width: int, radius: float = 4.0, seed: int = 0):
    """Random image; 17 keypoints on a grid (one person); a disk mask around each keypoint."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    xs = np.linspace(12, width - 13, 5)
    ys = np.linspace(12, height - 13, 4)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)[:17]
    keypoints = (grid + rng.uniform(-0.45, 0.45, grid.shape))[None].astype(np.float32)
    yy, xx = np.mgrid[:height, :width]
    disks = np.stack([(xx - x) ** 2 + (yy - y) ** 2 <= radius**2 for x, y in keypoints[0]])
    return image, disks, keypoints, np.ones((1, 17), np.float32)


def _assert_on_body_part(masks, keypoints, visibility, flipped: bool) -> int:
    """Slot j reads the disk of body part j (of its mirror partner after a flip)."""
    checked = 0
    for j in range(17):
        if visibility[0, j] <= 0:
            continue
        col, row = np.floor(keypoints[0, j] + 0.5).astype(int)
        part = PARTNER[j] if flipped else j
        assert masks[part, row, col], (j, KEYPOINT_NAMES[j], keypoints[0, j])
        checked += 1
    return checked


@pytest.mark.parametrize("case", ["flip", "affine", "resize", "all"])
def test_keypoints_stay_on_their_body_part(case):
    configs = {
        "flip": (aug.AugmentConfig(flip_p=1.0, degrees=0.0, shear=0.0, **NO_COLOR), (72, 72), 72),
        "affine": (aug.AugmentConfig(flip_p=0.0, **NO_COLOR), (72, 72), 72),
        "resize": (aug.NO_AUGMENT, (60, 80), 50),
        "all": (aug.AugmentConfig(), (60, 80), 56),
    }
    config, (height, width), size = configs[case]
    checked, flips, affines = 0, 0, 0
    for seed in range(25):
        image, disks, keypoints, visibility = _scene(height, width, seed=seed)
        params = aug.sample_params(np.random.default_rng(seed), config)
        out = aug.apply_params(params, image, disks, keypoints, visibility, size)
        assert out[0].shape == (size, size, 3) and out[1].shape == (17, size, size)
        checked += _assert_on_body_part(out[1], out[2], out[3], params.flip)
        flips += params.flip
        affines += bool(params.affines) and params.affines[0] != (0.0, 0.0)
    assert checked > 25 * 12
    assert flips == {"flip": 25, "affine": 0, "resize": 0}.get(case, flips)
    assert 0 < flips < 25 if case == "all" else True
    assert affines == (25 if case in ("affine", "all") else 0)


def test_flip_maps_pixel_centres_exactly():
    """A one-pixel mask and a keypoint on its centre stay together: x -> (W - 1) - x."""
    image, masks = np.zeros((32, 32, 3), np.uint8), np.zeros((1, 32, 32), bool)
    masks[0, 5, 3] = True
    keypoints = np.zeros((1, 17, 2), np.float32)
    keypoints[0, 0] = (3.0, 5.0)  # nose: no partner
    visibility = np.linspace(0.1, 0.9, 17, dtype=np.float32)[None]
    flip = aug.AugmentParams(flip=True)
    _, out_masks, out_keypoints, out_vis = aug.apply_params(flip, image, masks, keypoints,
                                                            visibility, 32)
    assert tuple(out_keypoints[0, 0]) == (28.0, 5.0)
    assert out_masks[0, 5, 28] and out_masks.sum() == 1
    np.testing.assert_array_equal(out_vis[0], visibility[0, PARTNER])  # moved with the slots


def test_flip_twice_is_identity():
    image, disks, keypoints, visibility = _scene(40, 56)
    visibility = np.random.default_rng(1).random((1, 17)).astype(np.float32)
    once = aug.hflip(image, disks, keypoints, visibility)
    assert not np.array_equal(once[2], keypoints)
    for original, back in zip((image, disks, keypoints, visibility), aug.hflip(*once)):
        np.testing.assert_array_equal(back, original)
    assert once[0].dtype == np.uint8 and once[1].dtype == np.bool_


def test_resize_maps_pixel_centres_exactly():
    """Integer upscaling: pixel (3, 5) becomes the pixels of its 4 x 4 block where its bilinear
    weight is >= 1/2 (the block without its corners, whose weight is (5/8)^2), centred on the
    moved keypoint."""
    image, masks = np.zeros((16, 16, 3), np.uint8), np.zeros((1, 16, 16), bool)
    masks[0, 5, 3] = True
    keypoints = np.full((1, 17, 2), 8.0, np.float32)
    keypoints[0, 0] = (3.0, 5.0)
    _, out_masks, out_keypoints = aug.resize(image, masks, keypoints, 64)
    block = np.kron(masks[0], np.ones((4, 4), bool))
    block[[20, 20, 23, 23], [12, 15, 12, 15]] = False
    np.testing.assert_array_equal(out_masks[0], block)
    rows, cols = np.nonzero(out_masks[0])
    assert tuple(out_keypoints[0, 0]) == (cols.mean(), rows.mean()) == (13.5, 21.5)


@pytest.mark.parametrize("rotation, shear", [(25.0, 0.0), (-17.0, 20.0), (8.0, -14.0)])
def test_affine_image_masks_and_points_share_one_map(rotation, shear):
    height, width = 40, 56
    linear = aug.affine_matrix(rotation, shear)
    assert np.linalg.det(linear) == pytest.approx(1.0)
    sheared = aug.affine_matrix(0.0, shear) @ [[3.0, 0.0], [2.0, 2.0]]  # columns: points
    np.testing.assert_allclose(sheared[1], [2.0, 2.0])  # an x-shear keeps rows horizontal
    inverse = np.linalg.inv(linear)
    rows, cols = np.mgrid[:height, :width]
    out_points = np.stack([cols, rows], -1).astype(np.float64)
    source = aug.transform_points(inverse, out_points, height, width)
    np.testing.assert_allclose(aug.transform_points(linear, source, height, width), out_points,
                               atol=1e-9)
    # Bilinear image warp of a linear ramp reads the source coordinates of each output pixel.
    ramp_x = np.tile(np.arange(width, dtype=np.float32), (height, 1))
    warped = aug.warp_image(linear, ramp_x)
    inside = ((source[..., 0] >= 1) & (source[..., 0] <= width - 2) & (source[..., 1] >= 1)
              & (source[..., 1] <= height - 2))
    assert inside.sum() > 0.5 * height * width
    np.testing.assert_allclose(warped[inside], source[inside][:, 0], atol=1e-3)
    # Nearest mask warp reads the source pixel under each output pixel's centre.
    mask = np.random.default_rng(0).random((1, height, width)) < 0.5
    pixel = np.floor(source + 0.5).astype(int)
    in_image = ((pixel[..., 0] >= 0) & (pixel[..., 0] < width) & (pixel[..., 1] >= 0)
                & (pixel[..., 1] < height))
    expected = np.where(in_image, mask[0, pixel[..., 1].clip(0, height - 1),
                                       pixel[..., 0].clip(0, width - 1)], False)
    ambiguous = np.any(np.abs((source + 0.5) % 1.0 - 0.5) > 0.499, axis=-1)  # on a pixel edge
    got = aug.warp_masks(linear, mask)[0]
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got[~ambiguous], expected[~ambiguous])


def test_affine_clears_keypoints_that_leave():
    image, masks = np.zeros((40, 56, 3), np.uint8), np.zeros((1, 40, 56), bool)
    masks[0, 15:25, 20:36] = True  # central: survives the rotation
    keypoints = np.array([[[0.0, 0.0], [55.0, 39.0], [27.5, 19.5]] + [[28.0, 20.0]] * 14],
                         np.float32)
    visibility = np.ones((1, 17), np.float32)
    _, out_masks, out_keypoints, out_vis = aug.random_affine(((25.0, 0.0),), image, masks,
                                                             keypoints, visibility)
    expected = aug.transform_points(aug.affine_matrix(25.0, 0.0), keypoints, 40, 56)
    np.testing.assert_allclose(out_keypoints, expected, atol=1e-4)
    assert np.all(np.isfinite(out_keypoints))
    np.testing.assert_array_equal(out_vis[0, :3], [0.0, 0.0, 1.0])  # two corners left
    assert out_masks[0].sum() == pytest.approx(masks[0].sum(), rel=0.1)  # det = 1


def test_keypoints_outside_the_input_are_cleared():
    image, disks, keypoints, visibility = _scene(40, 56)
    keypoints[0, 0] = (-3.0, 5.0)
    keypoints[0, 1] = (np.nan, 5.0)
    keypoints[0, 2] = (55.49, 39.49)  # the last pixel: inside
    _, _, out_keypoints, out_vis = aug.augment(np.random.default_rng(0), image, disks, keypoints,
                                               visibility, aug.NO_AUGMENT, 28)
    assert np.all(np.isfinite(out_keypoints))
    np.testing.assert_array_equal(out_vis[0, :3], [0.0, 0.0, 1.0])


def test_affine_that_would_empty_a_mask_is_dropped():
    image, masks = np.zeros((40, 56, 3), np.uint8), np.zeros((1, 40, 56), bool)
    masks[0, 0, 0] = True  # a corner pixel: any rotation about the centre moves it out
    keypoints, visibility = np.zeros((1, 17, 2), np.float32), np.ones((1, 17), np.float32)
    out = aug.random_affine(((25.0, 0.0),), image, masks, keypoints, visibility)
    assert out[1] is masks and out[2] is keypoints
    out = aug.random_affine(((25.0, 0.0), (0.0, 0.0)), image, masks, keypoints, visibility)
    np.testing.assert_array_equal(out[1], masks)  # the second try keeps the corner


# ----------------------------------------------------------------------------------------------
# Augmentations: colour, rates, determinism


def test_color_ops_leave_masks_and_keypoints_untouched():
    image, disks, keypoints, visibility = _scene(48, 48)
    params = aug.AugmentParams(
        jitter=aug.ColorJitterParams((2, 0, 1), (1.1, 0.95, 1.04)), grayscale=True,
        jitter_after_grayscale=aug.ColorJitterParams((1, 2, 0), (0.92, 1.05, 0.95)))
    out_image, out_masks, out_keypoints, out_vis = aug.apply_params(params, image, disks,
                                                                    keypoints, visibility, 48)
    np.testing.assert_array_equal(out_masks, disks)
    np.testing.assert_array_equal(out_keypoints, keypoints)
    np.testing.assert_array_equal(out_vis, visibility)
    assert not np.array_equal(out_image, image)
    # Gray stays gray through the second jitter.
    np.testing.assert_array_equal(out_image[..., 0], out_image[..., 1])
    np.testing.assert_array_equal(out_image[..., 0], out_image[..., 2])
    jittered = aug.color_jitter(image, aug.ColorJitterParams((0, 1, 2), (1.1, 1.0, 1.0)))
    assert jittered.mean() > image.mean()  # brighter


def test_grayscale_gives_equal_channels():
    image = _scene(24, 30)[0]
    gray = aug.grayscale(image)
    assert gray.shape == image.shape and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[..., 0], gray[..., 1])
    np.testing.assert_array_equal(gray[..., 1], gray[..., 2])
    luma = image.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert np.abs(gray[..., 0] - luma).max() <= 1.0


def _binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    sd = np.sqrt(n * p * (1 - p))
    return n * p - sigmas * sd, n * p + sigmas * sd


def test_random_choices_at_the_configured_rates():
    n = 4000
    params = [aug.sample_params(np.random.default_rng(s), aug.AugmentConfig()) for s in range(n)]
    flips = sum(p.flip for p in params)
    grays = sum(p.grayscale for p in params)
    low, high = _binomial_bounds(n, 0.5)
    assert low < flips < high
    low, high = _binomial_bounds(n, 0.05)
    assert low < grays < high
    rotations = np.array([p.affines[0][0] for p in params])
    shears = np.array([p.affines[0][1] for p in params])
    assert -25 <= rotations.min() < -24 and 24 < rotations.max() <= 25
    assert -20 <= shears.min() < -19 and 19 < shears.max() <= 20
    brightness = np.array([p.jitter.factors[0] for p in params])
    contrast = np.array([p.jitter_after_grayscale.factors[1] for p in params])
    assert 0.9 <= brightness.min() < 0.91 and 1.09 < brightness.max() <= 1.1
    assert 0.95 <= contrast.min() < 0.951 and 1.049 < contrast.max() <= 1.05
    assert len({p.jitter.order for p in params}) == 6  # every order of the three operations
    assert aug.sample_params(np.random.default_rng(0), aug.NO_AUGMENT) == aug.IDENTITY


def test_augment_is_a_function_of_the_generator():
    image, disks, keypoints, visibility = _scene(40, 56)
    config = aug.AugmentConfig(flip_p=0.5, grayscale_p=0.5)
    outs = [aug.augment(np.random.default_rng(s), image, disks, keypoints, visibility, config, 32)
            for s in (11, 11, 12)]
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outs[0][0], outs[2][0])


def _official_augment(image, masks, params: aug.AugmentParams, size: int):
    """The official MOSE fine-tune transforms (`training/dataset/transforms.py`, the yaml's
    order and ranges) on one frame, their random draws replaced by `params`: flip and
    grayscale through `random.random`, the affine through `RandomAffine.get_params`, each
    colour jitter through `ColorJitter.get_params`. -> (image (S, S, 3) uint8, masks (M, S, S)
    bool)."""
    import random as python_random

    torch = reference.import_torch()
    import torchvision.transforms as T
    from PIL import Image
    from training.dataset import transforms as official
    from training.utils.data_utils import Frame, Object, VideoDatapoint

    (rotation, shear), = params.affines
    draws = iter([0.0 if params.flip else 1.0, 0.0 if params.grayscale else 1.0])
    jitters = iter([params.jitter, params.jitter_after_grayscale])

    def jitter_params(brightness, contrast, saturation, hue):
        drawn = next(jitters)
        return (torch.tensor([*drawn.order, 3]), *drawn.factors, None)

    patches = [(python_random, "random", lambda: next(draws)),
               (T.RandomAffine, "get_params", staticmethod(
                   lambda degrees, translate, scale_ranges, shears, img_size:
                   (rotation, (0, 0), 1.0, (shear, 0.0)))),
               (T.ColorJitter, "get_params", staticmethod(jitter_params))]
    saved = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else
              getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        transforms = official.ComposeAPI([
            official.RandomHorizontalFlip(consistent_transform=True),
            official.RandomAffine(degrees=25, shear=20, image_interpolation="bilinear",
                                  consistent_transform=True),
            official.RandomResizeAPI(sizes=size, square=True, consistent_transform=True),
            official.ColorJitter(consistent_transform=True, brightness=0.1, contrast=0.03,
                                 saturation=0.03, hue=None),
            official.RandomGrayscale(p=0.05, consistent_transform=True),
            official.ColorJitter(consistent_transform=False, brightness=0.1, contrast=0.05,
                                 saturation=0.05, hue=None)])
        objects = [Object(i, 0, torch.from_numpy(m.astype(np.uint8))) for i, m in enumerate(masks)]
        datapoint = transforms(VideoDatapoint([Frame(Image.fromarray(image), objects)], 0,
                                              image.shape[:2]))
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    frame = datapoint.frames[0]
    return np.asarray(frame.data), np.stack([o.segment.numpy() > 0 for o in frame.objects])


@pytest.mark.skipif(not reference.reference_available(), reason="needs the official sam2")
def test_augmentations_equal_the_official_transforms():
    """Flip, affine, square resize, both colour jitters and grayscale with the parameters drawn
    once (`sample_params`) and fed to ours and to the official transforms, on a real COCO photo
    with its published person masks and keypoints, at the training size: the same image (PIL
    does the resampling in both; within 1 grey level), masks IoU >= 0.99, and every keypoint
    where the official
    transforms carry a small disc drawn around it (the disc's centroid; a flip also swaps the
    slots by the schema's pairs)."""
    from pycocotools.coco import COCO

    from p2s_jax.keypoints import COCO17

    real = REAL_COCO
    if not (real / "test_coco.json").is_file():
        pytest.skip(f"the real COCO sample is not at {real}")
    coco = COCO(str(real / "test_coco.json"))
    image_id = 196141
    image = np.asarray(Image.open(real / coco.imgs[image_id]["file_name"]).convert("RGB"))
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if a["num_keypoints"]]
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
    triplets = np.asarray([a["keypoints"] for a in anns], np.float32).reshape(-1, 17, 3)
    keypoints, visibility = triplets[..., :2], (triplets[..., 2] > 0).astype(np.float32)
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]]
    size = 1024  # the training size (COCO photos are upsampled to it)
    rng = np.random.default_rng(0)
    flips = grays = 0
    for draw in range(6):
        params = aug.sample_params(rng, aug.AugmentConfig())
        if draw < 2:  # make sure both flip directions and grayscale are covered
            params = dataclasses.replace(params, flip=bool(draw), grayscale=bool(draw))
        flips, grays = flips + params.flip, grays + params.grayscale
        out_image, out_masks, out_keypoints, out_vis = aug.apply_params(
            params, image, masks, keypoints, visibility, size)
        # a disc around every keypoint that stays in the picture (a disc the affine would
        # empty would make the official transform drop the affine, as for any empty object);
        # a flip moves the keypoint of slot perm[j] to slot j
        perm = list(COCO17.flip_permutation) if params.flip else list(range(17))
        kept = [(p, j) for p in range(len(anns)) for j in range(17)
                if out_vis[p, j] and 8 < out_keypoints[p, j].min()
                and out_keypoints[p, j].max() < size - 8]
        discs = np.stack([(xx - keypoints[p, perm[j], 0]) ** 2
                          + (yy - keypoints[p, perm[j], 1]) ** 2 <= 16 for p, j in kept])
        ref_image, ref_masks = _official_augment(image, np.concatenate([masks, discs]), params,
                                                 size)
        assert np.abs(out_image.astype(int) - ref_image.astype(int)).max() <= 1, draw
        for ours, theirs in zip(out_masks, ref_masks[:len(anns)]):
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99, draw
        for (p, j), disc in zip(kept, ref_masks[len(anns):]):
            ys, xs = np.nonzero(disc)
            centre = np.array([xs.mean(), ys.mean()])
            assert np.abs(out_keypoints[p, j] - centre).max() < 1.0, (draw, p, j)
        assert len(kept) >= 30, draw
    assert flips and grays


def test_augment_config_errors():
    with pytest.raises(ValueError, match="flip_p"):
        aug.AugmentConfig(flip_p=1.5)
    with pytest.raises(ValueError, match="shear"):
        aug.AugmentConfig(shear=90.0)
    image, disks, keypoints, visibility = _scene(40, 56)
    with pytest.raises(ValueError, match=r"masks must be \(M, H, W\) bool"):
        aug.augment(np.random.default_rng(0), image, disks[:, :-1], keypoints, visibility,
                    aug.NO_AUGMENT, 32)
    with pytest.raises(ValueError, match="visibility must be"):
        aug.augment(np.random.default_rng(0), image, disks, keypoints, visibility[:, :5],
                    aug.NO_AUGMENT, 32)
