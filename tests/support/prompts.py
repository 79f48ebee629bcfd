"""The loop-based NumPy reference of `p2s_jax.inference.prompting`, one person at a time: the
authors' keypoint selection (BBoxMaskPose `_select_keypoints`) and the project's documented
rules (see tests/test_prompting.py)."""

from __future__ import annotations

import numpy as np

from p2s_jax.inference.prompting import PromptConfig
from p2s_jax.keypoints import NUM_KEYPOINTS


def _usable(xy, height, width):
    x, y = float(xy[0]), float(xy[1])
    return np.isfinite(x) and np.isfinite(y) and 0 <= x < width and 0 <= y < height


def reference_positive_indices(xy, scores, image_hw, cfg: PromptConfig) -> list[int]:
    """One person: keypoint indices of the positive prompts, in prompt order."""
    height, width = image_hw
    threshold = cfg.visibility_threshold
    kept = [j for j in range(len(xy)) if _usable(xy[j], height, width)]
    if not kept:
        return []
    # The authors count the visible points with a strict '>' before selecting.
    if sum(scores[j] > threshold for j in kept) == 0:
        return [max(kept, key=lambda j: (scores[j], -j))]  # project fallback: best usable point

    if cfg.uses_face_rule:  # the authors' face anchor, on the usable face points
        face = [j for j in cfg.face if j in kept]
        if face:
            best = face[int(np.argmax([scores[j] for j in face]))]
            if scores[best] >= threshold:
                kept = [best] + [j for j in kept if j not in cfg.face]
    kept = [j for j in kept if scores[j] >= threshold]
    ranked = sorted(kept, key=lambda j: (-scores[j], j))  # documented tie rule

    if cfg.selection == "maxvis":
        return ranked[: cfg.num_points]

    coords = np.asarray([xy[j] for j in ranked], np.float32)
    available = np.asarray([scores[j] for j in ranked], np.float32)
    if len(ranked) <= 1:
        greedy = list(range(len(ranked)))
    else:
        dist = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=2)
        greedy = [0]
        available[0] = -1
        for _ in range(len(ranked) - 1):
            min_dist = np.min(dist[:, greedy], axis=1)
            if cfg.spread_percentile is None:
                min_dist[greedy] = -1
            else:
                min_dist[available < np.percentile(available, cfg.spread_percentile)] = -1
            next_idx = int(np.argmax(min_dist))
            greedy.append(next_idx)
            available[next_idx] = -1
    return [ranked[g] for g in greedy][: cfg.num_points]


def _box_centre(box):
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def reference_prompts(keypoints, scores, image_hw, cfg: PromptConfig, boxes=None):
    """All people: list of (coords (k, 2), labels (k,)) with only the real prompts."""
    height, width = image_hw
    num_people = len(keypoints)
    joints = len(keypoints[0]) if num_people else NUM_KEYPOINTS
    usable = [[_usable(keypoints[p][j], height, width) for j in range(joints)]
              for p in range(num_people)]
    result = []
    for p in range(num_people):
        positives = reference_positive_indices(keypoints[p], scores[p], image_hw, cfg)
        if not positives:
            result.append((np.zeros((0, 2)), np.zeros((0,), int)))
            continue
        points, labels = [], []
        if cfg.box != "none":
            x0, y0, x1, y1 = (float(v) for v in boxes[p])
            if cfg.box == "inflated":
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                hw_, hh = (x1 - x0) / 2 * cfg.box_inflation, (y1 - y0) / 2 * cfg.box_inflation
                x0, x1 = min(max(cx - hw_, 0), width), min(max(cx + hw_, 0), width)
                y0, y1 = min(max(cy - hh, 0), height), min(max(cy + hh, 0), height)
            points += [(x0, y0), (x1, y1)]
            labels += [2, 3]
        points += [tuple(keypoints[p][j]) for j in positives]
        labels += [1] * len(positives)
        if cfg.negatives == "least_visible_own":
            candidates = [j for j in range(joints) if usable[p][j] and j not in positives]
            chosen = sorted(candidates, key=lambda j: (scores[p][j], j))[: cfg.num_negatives]
            points += [tuple(keypoints[p][j]) for j in chosen]
            labels += [0] * len(chosen)
        elif cfg.negatives == "closest_other":
            if boxes is not None:
                centre = _box_centre(boxes[p])
            else:
                own = np.asarray([keypoints[p][j] for j in range(joints) if usable[p][j]])
                centre = (own.min(axis=0) + own.max(axis=0)) / 2
            candidates = []
            for q in range(num_people):
                for j in range(joints):
                    if q != p and usable[q][j] and scores[q][j] >= cfg.visibility_threshold:
                        d = float(np.linalg.norm(np.float32(keypoints[q][j]) - np.float32(centre)))
                        candidates.append((d, q * joints + j, tuple(keypoints[q][j])))
            chosen = sorted(candidates)[: cfg.num_negatives]
            points += [c[2] for c in chosen]
            labels += [0] * len(chosen)
        result.append((np.asarray(points, np.float64), np.asarray(labels)))
    return result
