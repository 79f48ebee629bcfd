"""Tests of p2s_jax.train.samplers against the official sam2 samplers and by construction."""

from __future__ import annotations

import functools
import inspect
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from p2s_jax.train import samplers
from p2s_jax.train.samplers import (available_samplers, distance_transform, get_sampler,
                              keypoint_pixels, register_sampler,
                              squared_distance_transform)
from support import paper_samplers as paper
from support.shared import REAL_COCO
from support.reference import import_torch, reference_available

H, W = 12, 16  # non-square, to catch x / y swaps
NAMES = ("mask_refine", "pose_mask_refine", "pose1_mask_refine", "center")
NO_KP = np.zeros((17, 2), np.float32)
NO_VIS = np.zeros((17,), np.float32)
needs_reference = pytest.mark.skipif(not reference_available(),
                                     reason="official sam2 not installed")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def box(y0, y1, x0, x1, shape=(H, W)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def random_blobs(rng, shape, n_blobs=3):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    m = np.zeros(shape, bool)
    for _ in range(n_blobs):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        ry, rx = rng.uniform(1.5, shape[0] / 2), rng.uniform(1.5, shape[1] / 2)
        m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return m


N = 4096  # draws per call: every test reuses the few compiled samplers below


@functools.lru_cache(maxsize=None)
def compiled(name, first, **static):
    """jit(vmap(sampler)) over (key, gt, pred, keypoints, visibility, step, prob), compiled once
    per (sampler, first point or not, static hyperparameters); the GT-draw probability is traced."""
    sample = get_sampler(name, **static)
    takes_prob = "prob_to_sample_from_gt" in inspect.signature(samplers._SAMPLERS[name]).parameters

    def one(key, gt, pred, kps, vis, step, prob):
        config = {"prob_to_sample_from_gt": prob} if takes_prob else {}
        return sample(key, gt, None if first else pred, kps, vis, step, **config)

    return jax.jit(jax.vmap(one))


def draw_batch(name, keys, gt, pred, kps, vis, steps, prob, **static):
    """Per-object inputs with a leading axis of N; pred None = first point."""
    fn = compiled(name, pred is None, **static)
    pred = np.zeros_like(gt) if pred is None else pred
    points, labels = fn(keys, jnp.asarray(gt), jnp.asarray(pred), jnp.asarray(kps, jnp.float32),
                        jnp.asarray(vis, jnp.float32), jnp.asarray(steps, jnp.int32),
                        jnp.asarray(prob, jnp.float32))
    return np.asarray(points), np.asarray(labels)


def draw(name, gt, pred, kps=NO_KP, vis=NO_VIS, seed=0, step=1, prob=0.1, **static):
    """N draws (N keys) of one sampler for one object: (N, 2) float32, (N,) int32."""
    tile = lambda a: None if a is None else np.broadcast_to(a, (N, *np.shape(a)))
    keys = jax.random.split(jax.random.key(seed), N)
    return draw_batch(name, keys, tile(gt), tile(pred), tile(kps), tile(vis),
                      np.full(N, step), np.full(N, prob), **static)


def pixels_of(points):
    """Integer (row, col) of points that must lie on the pixel grid."""
    assert np.all(points == np.round(points)), "drawn pixels must have integer coordinates"
    ij = points[:, ::-1].astype(int)
    assert np.all((ij >= 0) & (ij < (H, W))), "points outside the image"
    return ij[:, 0], ij[:, 1]


def official_uniform(gt, pred, n, seed=0):
    torch = import_torch()
    from sam2.modeling.sam2_utils import sample_random_points_from_errors

    torch.manual_seed(seed)
    g = torch.from_numpy(gt)[None, None].expand(n, 1, *gt.shape)
    p = None if pred is None else torch.from_numpy(pred)[None, None].expand(n, 1, *gt.shape)
    points, labels = sample_random_points_from_errors(g, p, num_pt=1)
    return points[:, 0].numpy(), labels[:, 0].numpy()


# fixture masks: A = GT, the prediction has a FN strip and a FP strip
GT = box(2, 10, 3, 11)
PRED = box(2, 7, 3, 14)  # rows 7..9 of the GT missed (FN), cols 11..13 spilled (FP)
FN, FP = GT & ~PRED, ~GT & PRED



# ------------------------------------------------------------------------------------------------
# registry and docs
# ------------------------------------------------------------------------------------------------

def test_registry(monkeypatch):
    monkeypatch.setattr(samplers, "_SAMPLERS", dict(samplers._SAMPLERS))
    assert set(NAMES) <= set(available_samplers())
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*mask_refine.*pose_mask_refine"):
        get_sampler("nope")
    with pytest.raises(ValueError, match="no hyperparameter"):
        get_sampler("mask_refine", prob=0.2)
    assert get_sampler("mask_refine") is samplers.mask_refine
    assert get_sampler("mask_refine", prob_to_sample_from_gt=0.0).keywords == {
        "prob_to_sample_from_gt": 0.0}

    @register_sampler("first_pixel")
    def first_pixel(key, gt_mask, pred_mask, keypoints, visibility, step):
        return jnp.zeros(2, jnp.float32), jnp.int32(1)

    def other(key, gt_mask, pred_mask, keypoints, visibility, step):
        return jnp.ones(2, jnp.float32), jnp.int32(0)

    assert get_sampler("first_pixel") is first_pixel
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("first_pixel", other)
    assert register_sampler("first_pixel", other, overwrite=True) is other
    assert get_sampler("first_pixel") is other and "first_pixel" in available_samplers()
    key, gt, pred = jax.random.key(0), jnp.asarray(GT), jnp.asarray(PRED)
    with pytest.raises(ValueError, match="prob_to_sample_from_gt"):
        samplers.mask_refine(key, gt, pred, NO_KP, NO_VIS, 1, prob_to_sample_from_gt=1.5)
    with pytest.raises(ValueError, match="keypoint_choice"):
        jax.eval_shape(lambda k: samplers.pose_mask_refine(k, gt, pred, NO_KP, NO_VIS, 1,
                                                           keypoint_choice="nearest"), key)
    with pytest.raises(TypeError, match="boolean"):
        samplers.mask_refine(key, gt, jnp.zeros((H, W)), NO_KP, NO_VIS, 1)


def test_docs_example_runs(monkeypatch):
    monkeypatch.setattr(samplers, "_SAMPLERS", dict(samplers._SAMPLERS))
    doc = pathlib.Path(__file__).parents[1] / "docs" / "samplers.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert "pose_first_k" in available_samplers()
    assert namespace["points"].shape == (3, 2) and namespace["labels"].dtype == jnp.int32


# ------------------------------------------------------------------------------------------------
# mask_refine
# ------------------------------------------------------------------------------------------------

def test_mask_refine_first_point_uniform_in_gt():
    points, labels = draw("mask_refine", GT, None)
    rows, cols = pixels_of(points)
    assert GT[rows, cols].all() and (labels == 1).all()
    assert len(set(zip(rows, cols))) == GT.sum()  # 4096 draws reach all 64 GT pixels


@needs_reference
def test_mask_refine_distribution_matches_official():
    """Correction draws: inside the error region, labels FN -> 1 / FP -> 0, and the (pixel, label)
    counts homogeneous with the official ones (chi-square) and uniform."""
    ours_p, ours_l = draw("mask_refine", GT, PRED, seed=3, prob=0.0)
    ref_p, ref_l = official_uniform(GT, PRED, N, seed=3)
    cells = np.flatnonzero((FN | FP).ravel())

    def counts(points, labels):
        rows, cols = pixels_of(points)
        np.testing.assert_array_equal(labels, FN[rows, cols])
        flat = rows * W + cols
        assert np.isin(flat, cells).all()
        return np.array([(flat == c).sum() for c in cells])

    ours, ref = counts(ours_p, ours_l), counts(ref_p, ref_l)
    assert 0 < ours_l.mean() < 1
    assert stats.chi2_contingency(np.stack([ours, ref]))[1] > 1e-3
    assert stats.chisquare(ours).pvalue > 1e-3 and stats.chisquare(ref).pvalue > 1e-3


@needs_reference
@pytest.mark.parametrize("case", ["perfect", "empty_gt_first", "empty_gt_fp", "full_gt_perfect"])
def test_mask_refine_edge_cases_match_official(case):
    gt, pred = {
        "perfect": (GT, GT.copy()),
        "empty_gt_first": (np.zeros((H, W), bool), None),
        "empty_gt_fp": (np.zeros((H, W), bool), PRED),
        "full_gt_perfect": (np.ones((H, W), bool), np.ones((H, W), bool)),
    }[case]
    expected = {  # the cells (x, y, label) the official rule can draw from: all negative
        "perfect": ~GT, "empty_gt_first": np.ones((H, W), bool), "empty_gt_fp": PRED,
        "full_gt_perfect": box(0, 1, 0, 1)}[case]  # nowhere to draw: pixel (0, 0), label 0
    expected = {(int(x), int(y), 0) for y, x in np.argwhere(expected)}
    ours_p, ours_l = draw("mask_refine", gt, pred, prob=0.0)
    ref_p, ref_l = official_uniform(gt, pred, N)
    support = lambda p, l: {(int(x), int(y), int(b)) for (x, y), b in zip(p, l)}
    assert support(ref_p, ref_l) == expected and support(ours_p, ours_l) == expected


# ------------------------------------------------------------------------------------------------
# the probability-0.1 GT draw
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mask_refine", "pose_mask_refine", "pose1_mask_refine"])
def test_prob_to_sample_from_gt_rate(name):
    """Prediction = GT plus a FP strip: error draws are negative, GT draws positive (in GT)."""
    pred = GT | box(2, 10, 11, 14)
    kps = NO_KP.copy()
    kps[0], kps[1] = (12.0, 5.0), (5.0, 5.0)  # one keypoint on the FP strip, one inside the GT
    vis = NO_VIS.copy()
    vis[:2] = 0.9
    points, labels = draw(name, GT, pred, kps, vis, seed=7)
    rows, cols = pixels_of(points)
    np.testing.assert_array_equal(GT[rows, cols], labels == 1)
    assert stats.binomtest(int(labels.sum()), N, 0.1).pvalue > 1e-3
    if name == "pose_mask_refine":  # every error draw is the keypoint on the error region
        assert (points[labels == 0] == kps[0]).all()
    for prob, expected in ((0.0, 0), (1.0, N)):
        assert draw(name, GT, pred, kps, vis, prob=prob)[1].sum() == expected


# ------------------------------------------------------------------------------------------------
# pose samplers
# ------------------------------------------------------------------------------------------------

def test_keypoint_pixels_convention():
    kps = np.array([[0.0, 0.0], [-0.5, -0.5], [-0.51, 3.0], [W - 0.51, H - 0.51], [W - 0.5, 2.0],
                    [np.nan, 1.0], [3.4, 5.6]], np.float32)
    vis = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)
    pix, available = jax.jit(keypoint_pixels, static_argnums=2)(kps, vis, (H, W))
    np.testing.assert_array_equal(available, [1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(pix)[[0, 1, 3, 6]],
                                  [[0, 0], [0, 0], [W - 1, H - 1], [3, 6]])


@pytest.mark.parametrize("name", ["pose_mask_refine", "pose1_mask_refine"])
def test_pose_first_point(name):
    kps = np.tile(np.array([[5.0, 5.0]], np.float32), (17, 1))
    vis = np.full(17, 0.2, np.float32)
    kps[0], vis[0] = (W + 3.0, 4.0), 0.99  # outside the image
    kps[1], vis[1] = (np.nan, 4.0), 0.98  # non-finite
    kps[2], vis[2] = (4.25, 1.5), 0.7  # the most visible available one (outside the GT: still 1)
    kps[3], vis[3] = (6.0, 6.0), 0.7  # a tie: the lower index wins
    points, labels = draw(name, GT, None, kps, vis)
    assert (points == kps[2]).all() and (labels == 1).all()
    # no available keypoint: uniform in the GT, label 1
    points, labels = draw(name, GT, None, kps, np.linspace(-1.0, 0.0, 17))
    rows, cols = pixels_of(points)
    assert GT[rows, cols].all() and (labels == 1).all() and len(set(zip(rows, cols))) == GT.sum()
    # absent object (empty GT): the official negative background point, keypoints ignored
    points, labels = draw(name, np.zeros((H, W), bool), None, kps, np.ones(17))
    assert (labels == 0).all() and len({tuple(p) for p in points}) == H * W


def _error_keypoints():
    kps = np.tile(np.array([[5.0, 4.0]], np.float32), (17, 1))  # on a correct GT pixel
    vis = np.full(17, 1.0, np.float32)  # the most visible ones are not on the error
    kps[4], vis[4] = (5.2, 8.4), 0.3  # FN pixel (row 8, col 5)
    kps[9], vis[9] = (12.0, 3.0), 0.6  # FP pixel (row 3, col 12)
    kps[10], vis[10] = (6.0, 9.0), 0.0  # FN pixel but unavailable
    assert FN[8, 5] and FP[3, 12] and FN[9, 6] and not (FN | FP)[4, 5]
    return kps, vis


def test_pose_correction_prefers_keypoints_on_errors():
    kps, vis = _error_keypoints()
    points, labels = draw("pose_mask_refine", GT, PRED, kps, vis, prob=0.0)
    is4, is9 = (points == kps[4]).all(1), (points == kps[9]).all(1)
    assert (is4 | is9).all()
    np.testing.assert_array_equal(labels, is4)  # FN -> 1, FP -> 0
    assert stats.binomtest(int(is4.sum()), N, 0.5).pvalue > 1e-3  # uniform among candidates
    points, labels = draw("pose_mask_refine", GT, PRED, kps, vis, prob=0.0,
                          keypoint_choice="max_visibility")
    assert (points == kps[9]).all() and (labels == 0).all()


def test_pose_correction_without_keypoint_on_errors_is_uniform_in_error():
    kps, vis = _error_keypoints()
    vis[[4, 9]] = 0.0
    points, labels = draw("pose_mask_refine", GT, PRED, kps, vis, prob=0.0)
    rows, cols = pixels_of(points)
    assert (FN | FP)[rows, cols].all()
    np.testing.assert_array_equal(labels, FN[rows, cols])
    assert len(set(zip(rows, cols))) == (FN | FP).sum()


def _frequencies(points, labels) -> dict:
    out: dict = {}
    for (x, y), label in zip(np.asarray(points, np.float64), labels):
        key = (float(x), float(y), int(label))
        out[key] = out.get(key, 0) + 1
    return out


def assert_follows(points, labels, expected: dict, where: str) -> None:
    """N draws against an exact distribution: nothing outside its support, and every outcome's
    count within 5 standard deviations of N p (binomial), so a wrong rule, label, tie break or
    probability is caught while a right sampler passes (deterministic keys)."""
    counts = _frequencies(points, labels)
    support = {(float(x), float(y), int(l)): p for (x, y, l), p in expected.items()}
    unexpected = set(counts) - set(support)
    assert not unexpected, f"{where}: outcomes the paper's rule never gives: {sorted(unexpected)[:5]}"
    n = len(labels)
    for outcome, p in support.items():
        count = counts.get(outcome, 0)
        assert abs(count - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1, (where, outcome, count,
                                                                         n * p)


def _random_case(rng, shape, with_errors_on_keypoints: bool):
    gt = random_blobs(rng, shape, 2)
    pred = random_blobs(rng, shape, 2) if rng.random() < 0.8 else gt.copy()
    keypoints = np.stack([rng.uniform(-1.5, shape[1] + 0.5, 17),
                          rng.uniform(-1.5, shape[0] + 0.5, 17)], -1).astype(np.float32)
    visibility = rng.choice([0.0, 0.3, 0.7, 0.7, 0.9], 17).astype(np.float32)  # ties, zeros
    keypoints[rng.random(17) < 0.1] = np.nan
    if not with_errors_on_keypoints:  # move every keypoint off the error pixels
        errors = gt ^ pred
        for j, point in enumerate(keypoints):
            pixel = paper.keypoint_pixel(point)
            if pixel and 0 <= pixel[0] < shape[1] and 0 <= pixel[1] < shape[0] \
                    and errors[pixel[1], pixel[0]]:
                visibility[j] = 0.0
    return gt, pred, keypoints, visibility


@pytest.mark.parametrize("seed", range(4))
def test_pose_mask_refine_follows_the_papers_text(seed):
    """First and correction points against the paper's rule written as an exact distribution
    (tests/support/paper_samplers.py) on random masks and poses: ties of visibility, keypoints
    that are missing, invisible, off the image, on false negatives and false positives, none on the
    errors, and error-free predictions."""
    rng = np.random.default_rng(seed)
    shape = (10, 14)
    keypoint_outcomes = 0
    for case in range(3):
        gt, pred, kps, vis = _random_case(rng, shape, with_errors_on_keypoints=case != 1)
        points, labels = draw("pose_mask_refine", gt, None, kps, vis, seed=10 * seed + case)
        assert_follows(points, labels, paper.first_point(gt, kps, vis), f"first {seed}/{case}")
        points, labels = draw("pose_mask_refine", gt, pred, kps, vis, seed=10 * seed + case)
        expected = paper.correction_point(gt, pred, kps, vis)
        assert_follows(points, labels, expected, f"correction {seed}/{case}")
        keypoint_outcomes += sum(x != int(x) or y != int(y) for x, y, _ in expected)
    assert keypoint_outcomes > 0  # keypoints on error pixels were drawn


def test_pose_mask_refine_edge_cases_follow_the_paper():
    """An error-free prediction, an empty ground truth, a full-image object, no keypoint."""
    vis = np.full(17, 0.8, np.float32)
    kps = np.stack([np.arange(17) % W, np.arange(17) % H], -1).astype(np.float32)
    full = np.ones((H, W), bool)
    for name, gt, pred, kp, v in (("perfect", GT, GT.copy(), kps, vis),
                                  ("empty gt", np.zeros((H, W), bool), PRED, kps, vis),
                                  ("full object", full, full.copy(), kps, vis),
                                  ("no keypoint", GT, PRED, NO_KP, NO_VIS)):
        points, labels = draw("pose_mask_refine", gt, pred, kp, v)
        assert_follows(points, labels, paper.correction_point(gt, pred, kp, v), name)
        points, labels = draw("pose_mask_refine", gt, None, kp, v)
        assert_follows(points, labels, paper.first_point(gt, kp, v), f"{name}, first")


def test_pose_mask_refine_on_a_real_person():
    """A COCO val2017 person (its published polygon and keypoints, at a quarter of the size),
    a prediction that misses a band of the body and spills beside it."""
    from pycocotools.coco import COCO

    real = REAL_COCO
    if not (real / "test_coco.json").is_file():
        pytest.skip(f"the real COCO sample is not at {real}")
    coco = COCO(str(real / "test_coco.json"))
    ann = max((a for a in coco.anns.values() if a["num_keypoints"] >= 12),
              key=lambda a: a["area"])
    full = coco.annToMask(ann).astype(bool)
    gt = full[::4, ::4]
    triplets = np.asarray(ann["keypoints"], np.float32).reshape(17, 3)
    kps = (triplets[:, :2] + 0.5) / 4 - 0.5  # pixel centres at a quarter of the size
    vis = np.where(triplets[:, 2] > 0, np.linspace(0.95, 0.55, 17), 0.0).astype(np.float32)
    rows = np.nonzero(gt.any(1))[0]
    pred = gt.copy()
    pred[rows[len(rows) // 3]:rows[len(rows) // 2]] = False  # a missed band: false negatives
    pred[:, :] |= np.roll(gt, 3, axis=1) & (np.arange(gt.shape[0]) > rows[-1] - 10)[:, None]
    assert (gt & ~pred).any() and (~gt & pred).any()
    for seed, first in ((0, True), (1, False)):
        tile = lambda a: np.broadcast_to(a, (N, *np.shape(a)))  # noqa: E731
        keys = jax.random.split(jax.random.key(seed), N)
        points, labels = draw_batch("pose_mask_refine", keys, tile(gt),
                                    None if first else tile(pred), tile(kps), tile(vis),
                                    np.ones(N), np.full(N, 0.1))
        expected = (paper.first_point(gt, kps, vis) if first
                    else paper.correction_point(gt, pred, kps, vis))
        assert_follows(points, labels, expected, "real person")


def test_pose1_corrections_are_mask_refine():
    kps, vis = _error_keypoints()
    ours = draw("pose1_mask_refine", GT, PRED, kps, vis, seed=5)
    plain = draw("mask_refine", GT, PRED, seed=5)
    np.testing.assert_array_equal(ours[0], plain[0])
    np.testing.assert_array_equal(ours[1], plain[1])


@pytest.mark.parametrize("name", ["mask_refine", "pose_mask_refine", "pose1_mask_refine"])
def test_perfect_prediction_gives_background_negative(name):
    kps, vis = _error_keypoints()
    points, labels = draw(name, GT, GT.copy(), kps, vis, prob=0.0)
    rows, cols = pixels_of(points)
    assert (labels == 0).all() and not GT[rows, cols].any()


# ------------------------------------------------------------------------------------------------
# center and the distance transform
# ------------------------------------------------------------------------------------------------

def test_distance_transform_is_exact():
    rng = np.random.default_rng(0)
    edt = jax.jit(jax.vmap(distance_transform))
    for shape in ((9, 23), (23, 9)):
        masks = np.stack([random_blobs(rng, shape, 4) for _ in range(4)])
        masks[:, rng.integers(shape[0])] = True  # a full row: columns without any False pixel
        masks[:, 0, 0] = False
        np.testing.assert_allclose(edt(masks), [ndimage.distance_transform_edt(m) for m in masks],
                                   rtol=1e-6)
    m = random_blobs(rng, (7, 5))
    m[0, 0] = False
    zeros = np.argwhere(~m)
    brute = ((np.argwhere(np.ones_like(m))[:, None] - zeros[None]) ** 2).sum(-1).min(1)
    np.testing.assert_array_equal(jax.jit(squared_distance_transform)(m), brute.reshape(m.shape))


@pytest.fixture
def exact_cv2(monkeypatch):
    """A cv2 stand-in for the official code: distanceTransform(DIST_L2, DIST_MASK_PRECISE) is the
    exact EDT, computed here by scipy and returned as float32 as cv2 does."""
    cv2 = types.ModuleType("cv2")
    cv2.DIST_L2 = 2

    def distance_transform_cv(src, distance_type, mask_size):
        assert distance_type == cv2.DIST_L2 and mask_size == 0
        return ndimage.distance_transform_edt(src).astype(np.float32)

    cv2.distanceTransform = distance_transform_cv
    monkeypatch.setitem(sys.modules, "cv2", cv2)


@needs_reference
def test_center_matches_official(exact_cv2):
    torch = import_torch()
    from sam2.modeling.sam2_utils import sample_one_point_from_error_center

    rng = np.random.default_rng(1)
    gts = [random_blobs(rng, (H, W)) for _ in range(11)]
    preds = [random_blobs(rng, (H, W)) for _ in range(11)]
    gts += [GT, GT, np.zeros((H, W), bool), np.ones((H, W), bool), box(0, H, 0, 5)]
    preds += [GT.copy(), box(0, 0, 0, 0), PRED, np.ones((H, W), bool), box(0, H, 0, 5)]
    gts, preds = np.stack(gts), np.stack(preds)
    keys = jax.random.split(jax.random.key(0), len(gts))
    zeros = np.zeros(len(gts))
    for pred in (preds, None):
        points, labels = draw_batch("center", keys, gts, pred, zeros[:, None, None] + NO_KP,
                                    zeros[:, None] + NO_VIS, zeros, zeros)
        ref_pred = None if pred is None else torch.from_numpy(pred)[:, None]
        ref_p, ref_l = sample_one_point_from_error_center(torch.from_numpy(gts)[:, None], ref_pred)
        np.testing.assert_array_equal(points, ref_p[:, 0].numpy())
        np.testing.assert_array_equal(labels, ref_l[:, 0].numpy())


def test_center_picks_deepest_error_pixel():
    pred = box(1, 10, 1, 4)  # FP region outside the GT, 3 px wide: depth 2
    gt = box(4, 9, 8, 13)  # FN region 5 x 5: depth 3 at its centre, row 6, col 10
    points, labels = draw("center", gt, pred)
    assert (points == (10.0, 6.0)).all() and (labels == 1).all()
    points, labels = draw("center", gt | pred, pred)  # FN only where the GT is not predicted
    assert (points == (10.0, 6.0)).all() and (labels == 1).all()


# ------------------------------------------------------------------------------------------------
# jit / vmap / determinism for every registered sampler
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_over_objects_and_determinism(name):
    """Vmapped over N different objects: right shapes and dtypes, the same key gives the same
    point, objects do not interact (reversing the batch reverses the output)."""
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 8, N)
    gt = np.stack([random_blobs(rng, (H, W)) for _ in range(8)])[idx]
    pred = np.stack([random_blobs(rng, (H, W)) for _ in range(8)])[idx]
    kps = rng.uniform(-2, W + 2, (N, 17, 2)).astype(np.float32)
    vis = rng.uniform(-0.5, 1.0, (N, 17)).astype(np.float32)
    steps, probs = np.arange(N) % 8, np.full(N, 0.1)
    keys = jax.random.split(jax.random.key(11), N)
    for p in (pred, None):
        args = (keys, gt, p, kps, vis, steps, probs)
        points, labels = draw_batch(name, *args)
        assert points.shape == (N, 2) and points.dtype == np.float32
        assert labels.shape == (N,) and labels.dtype == np.int32
        again = draw_batch(name, *args)
        np.testing.assert_array_equal(points, again[0])
        np.testing.assert_array_equal(labels, again[1])
        rev = draw_batch(name, *(None if a is None else a[::-1] for a in args))
        np.testing.assert_array_equal(points[::-1], rev[0])
        np.testing.assert_array_equal(labels[::-1], rev[1])
        if name != "center" and p is not None:  # random corrections: other keys, other points
            other = draw_batch(name, jax.random.split(jax.random.key(12), N), *args[1:])
            assert (other[0] != points).any(axis=1).mean() > 0.5


def test_raw_uint32_keys():
    fn = jax.jit(lambda k: samplers.mask_refine(k, GT, PRED, NO_KP, NO_VIS, 1))
    points, labels = fn(jax.random.PRNGKey(3))
    assert points.shape == (2,) and labels.dtype == jnp.int32
    rows, cols = pixels_of(np.asarray(points)[None])
    assert (GT | FN | FP)[rows, cols].all()


# ------------------------------------------------------------------------------------------------
# Fixed keypoints (Table 1, "mV" / "mS" training)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,selection", [("max_vis", "maxvis"), ("max_spread", "maxspread")])
def test_fixed_keypoint_samplers_walk_the_selection(name, selection):
    """Point t is the t-th keypoint of the inference selection (the NumPy reference of
    tests/support/prompts.py), then MaskRefine draws once the selection is used up."""
    from support.prompts import reference_positive_indices

    from p2s_jax.inference.prompting import PromptConfig

    rng = np.random.default_rng(4)
    size = (60, 80)
    gt = np.zeros(size, bool)
    gt[10:50, 20:60] = True
    pred = np.zeros(size, bool)
    pred[10:30, 20:60] = True
    sampler = get_sampler(name)
    first_point = jax.jit(lambda k, g, kp, v, t: sampler(k, g, None, kp, v, t))
    correction = jax.jit(sampler)
    cfg = PromptConfig(selection=selection, num_points=6)
    checked = 0
    for visible_count in (2, 4, 9, 17):
        keypoints = rng.uniform([20, 10], [60, 50], (17, 2)).astype(np.float32)
        visibility = np.zeros(17, np.float32)
        chosen = rng.choice(17, visible_count, replace=False)
        visibility[chosen] = rng.uniform(0.55, 1, visible_count)
        expected = reference_positive_indices(keypoints, visibility, size, cfg)
        assert len(expected) == min(visible_count, 6)
        for step in range(8):
            key = jax.random.key(step)
            first = step == 0
            point, label = (first_point(key, gt, keypoints, visibility, jnp.int32(step)) if first
                            else correction(key, gt, pred, keypoints, visibility, jnp.int32(step)))
            if step < len(expected):
                np.testing.assert_array_equal(np.asarray(point), keypoints[expected[step]])
                assert int(label) == 1
                checked += 1
            else:
                ref_point, ref_label = samplers.mask_refine(key, gt, None if first else pred,
                                                            keypoints, visibility, step)
                np.testing.assert_array_equal(np.asarray(point), np.asarray(ref_point))
                assert int(label) == int(ref_label)
    assert checked == 2 + 4 + 6 + 6
    assert name in available_samplers()
