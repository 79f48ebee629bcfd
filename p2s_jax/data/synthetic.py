"""A small COCO-format person dataset on real photos, for tests and demos that need no download.

`make_coco_dataset` pastes nothing onto the photos: it draws person-shaped masks (head, torso, two
two-segment arms and legs, randomly posed, rotated and scaled; later persons occlude earlier ones)
over the real photos scikit-image ships (astronaut, camera, coffee, logo, chelsea, rocket), and
writes exactly what COCO's person_keypoints files hold: visible-region segmentation (polygons or
compressed RLE), area and bbox computed by pycocotools from that segmentation, iscrowd 0, the 17
keypoints with v = 2 (visible), 1 (occluded by a person in front) or 0 (outside the image, or not
labelled: small persons are often left without keypoints, as in COCO) and num_keypoints.
`make_keypoint_detections` then writes ProbPose-like detections of those persons.

The photos are stored as JPEG, except camera (grayscale PNG, to exercise the grayscale path) and
logo (RGBA PNG, the alpha path). Everything is a function of the seed. scikit-image is a dev
dependency, imported only inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from p2s_jax.data.coco import (PERSON_CATEGORY, SMALL_AREA, load_coco, masks_to_rle,
                               person_category_id)
from p2s_jax.keypoints import NUM_KEYPOINTS
from p2s_jax.utils.errors import InputError

# (skimage.data name, file format), cycled through by image index.
PHOTOS = (("astronaut", "JPEG"), ("camera", "PNG"), ("coffee", "JPEG"), ("logo", "PNG"),
          ("chelsea", "JPEG"), ("rocket", "JPEG"))
# A standing person's keypoints in its box, (x, y) in [0, 1]: where detections put unlabelled ones.
_BOX_TEMPLATE = np.array([
    [.50, .06], [.55, .04], [.45, .04], [.60, .06], [.40, .06], [.70, .20], [.30, .20],
    [.78, .36], [.22, .36], [.80, .50], [.20, .50], [.62, .52], [.38, .52], [.62, .75],
    [.38, .75], [.62, .97], [.38, .97]], np.float64)


def _import_skimage():
    try:
        import skimage.data
        import skimage.measure
    except ImportError:
        raise InputError("the generated dataset (the 'tiny' preset, tests, benchmarks) draws "
                         "persons on scikit-image's sample photos: pip install -e '.[synthetic]' "
                         "(or pip install scikit-image)") from None
    return skimage


def _photo(skimage, index: int, image_size: int | tuple[int, int] | None) -> tuple[Image.Image,
                                                                                   str]:
    """The index-th photo (cycled) as a PIL image in its own mode (L, RGB or RGBA), resized."""
    name, fmt = PHOTOS[index % len(PHOTOS)]
    image = Image.fromarray(getattr(skimage.data, name)())
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        image = image.resize((int(width), int(height)), Image.Resampling.BILINEAR)
    return image, fmt


def _rotate(points: np.ndarray, center: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return (points - center) @ np.array([[c, s], [-s, c]]) + center


def _limb(start: np.ndarray, length1: float, length2: float, angle1: float,
          angle2: float) -> tuple[np.ndarray, np.ndarray]:
    """Two segments from `start`; angles from straight down, radians. -> (joint, end)."""
    joint = start + length1 * np.array([np.sin(angle1), np.cos(angle1)])
    end = joint + length2 * np.array([np.sin(angle1 + angle2), np.cos(angle1 + angle2)])
    return joint, end


def _random_pose(rng: np.random.Generator, height: float, center_x: float,
                 top: float) -> tuple[np.ndarray, dict]:
    """A person of `height` pixels: (17, 2) keypoints and the shapes to draw (pixel coords).

    COCO's left is the person's left: for a person facing the camera, the image's right (+x).
    """
    u = height / 8.0  # one head height
    head = np.array([center_x, top + 0.55 * u])
    neck_y, hip_y = top + 1.35 * u, top + 4.0 * u
    shoulders = np.array([[center_x + u, neck_y], [center_x - u, neck_y]])
    hips = np.array([[center_x + 0.7 * u, hip_y], [center_x - 0.7 * u, hip_y]])
    arms, legs = [], []
    for side in (1.0, -1.0):  # left, right
        raise_arm = side * rng.uniform(0.05, 1.9)
        arms.append(_limb(shoulders[0 if side > 0 else 1], 1.5 * u, 1.3 * u, raise_arm,
                          side * rng.uniform(-1.2, 0.3)))
        legs.append(_limb(hips[0 if side > 0 else 1], 1.9 * u, 1.9 * u,
                          side * rng.uniform(0.0, 0.45), side * rng.uniform(-0.5, 0.1)))
    face = [head + [0, 0.1 * u], head + [0.15 * u, -0.1 * u], head + [-0.15 * u, -0.1 * u],
            head + [0.33 * u, 0], head + [-0.33 * u, 0]]
    keypoints = np.array([
        *face, shoulders[0], shoulders[1], arms[0][0], arms[1][0], arms[0][1], arms[1][1],
        hips[0], hips[1], legs[0][0], legs[1][0], legs[0][1], legs[1][1]])
    theta = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    shapes = {
        "head": head + np.stack([0.38 * u * np.cos(theta), 0.55 * u * np.sin(theta)], axis=1),
        "torso": np.array([shoulders[0], hips[0], hips[1], shoulders[1]]),
        "limbs": [(np.array([shoulders[i], *arms[i]]), 0.45 * u) for i in (0, 1)]
        + [(np.array([hips[i], *legs[i]]), 0.6 * u) for i in (0, 1)],
        "neck": (np.array([head, [center_x, neck_y]]), 0.35 * u),
    }
    # A tilt of the whole body about its centre.
    angle = rng.uniform(-0.3, 0.3)
    center = np.array([center_x, top + height / 2])
    keypoints = _rotate(keypoints, center, angle)
    shapes["head"] = _rotate(shapes["head"], center, angle)
    shapes["torso"] = _rotate(shapes["torso"], center, angle)
    shapes["limbs"] = [(_rotate(p, center, angle), w) for p, w in shapes["limbs"]]
    shapes["neck"] = (_rotate(shapes["neck"][0], center, angle), shapes["neck"][1])
    return keypoints, shapes


def _rasterize(shapes: dict, height: int, width: int) -> np.ndarray:
    """(H, W) bool union of the body parts."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in shapes["head"]], fill=1)
    draw.polygon([tuple(p) for p in shapes["torso"]], fill=1)
    for points, thickness in [*shapes["limbs"], shapes["neck"]]:
        draw.line([tuple(p) for p in points], fill=1, width=max(1, round(thickness)),
                  joint="curve")
        r = thickness / 2
        for x, y in points[[0, -1]]:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    return np.asarray(canvas, bool)


def _segmentation(skimage, mask: np.ndarray, as_polygons: bool) -> list | dict:
    """COCO segmentation of a visible mask: polygons ([[x0, y0, x1, y1, ...], ...]) or RLE."""
    if as_polygons:
        padded = np.pad(mask.astype(np.float32), 1)
        polygons = []
        for contour in skimage.measure.find_contours(padded, 0.5):
            contour = skimage.measure.approximate_polygon(contour, tolerance=0.5) - 1.0
            if len(contour) >= 3:
                polygons.append([round(float(v), 2) for v in contour[:, ::-1].ravel()])
        if polygons:
            return polygons
    return masks_to_rle(mask[None])[0]


def _keypoint_labels(rng: np.random.Generator, keypoints: np.ndarray,
                     visible: np.ndarray) -> np.ndarray:
    """(17, 3) COCO triplets: v=2 on the visible mask, 1 occluded, 0 outside / not labelled."""
    height, width = visible.shape
    xy = np.round(keypoints, 1)
    col, row = np.floor(xy).astype(int).T
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    v = np.zeros(NUM_KEYPOINTS, np.int64)
    v[inside] = np.where(visible[row[inside], col[inside]], 2, 1)
    v[rng.random(NUM_KEYPOINTS) < 0.05] = 0  # the annotator skipped a few
    return np.concatenate([np.where(v[:, None] > 0, xy, 0.0), v[:, None]], axis=1)


def _image_annotations(skimage, rng: np.random.Generator, image_id: int, first_ann_id: int,
                       height: int, width: int, num_people: int) -> list[dict]:
    """Draws `num_people` persons back to front; -> their COCO annotations (some may be dropped)."""
    people = []
    for _ in range(num_people):
        size = float(np.exp(rng.uniform(np.log(0.12 * height), np.log(1.3 * height))))
        center_x = rng.uniform(0.05, 0.95) * width
        top = rng.uniform(-0.1 * size, height - 0.6 * size)
        keypoints, shapes = _random_pose(rng, size, center_x, top)
        people.append((keypoints, _rasterize(shapes, height, width)))
    annotations = []
    in_front = np.zeros((height, width), bool)
    for keypoints, own in reversed(people):  # front to back: each is occluded by those before
        visible = own & ~in_front
        in_front |= own
        if visible.sum() < 16:  # (almost) fully hidden or outside the image
            continue
        segmentation = _segmentation(skimage, visible, as_polygons=rng.random() < 0.5)
        rle = (mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
               if isinstance(segmentation, list) else segmentation)
        area = float(mask_utils.area(rle))
        triplets = _keypoint_labels(rng, keypoints, visible)
        if area < SMALL_AREA and rng.random() < 0.5:  # COCO leaves many small persons unposed
            triplets[:] = 0
        annotations.append({
            "id": first_ann_id + len(annotations), "image_id": image_id, "category_id": 1,
            "segmentation": segmentation, "area": area,
            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            "keypoints": [float(v) if i % 3 < 2 else int(v)
                          for i, v in enumerate(triplets.ravel())],
            "num_keypoints": int(np.count_nonzero(triplets[:, 2])),
        })
    return annotations[::-1]  # back to front, the drawing order


def make_coco_dataset(out_dir: str | os.PathLike, num_images: int,
                      people_per_image: int | tuple[int, int], seed: int,
                      image_size: int | tuple[int, int] | None = None,
                      image_format: str | None = None) -> tuple[Path, Path]:
    """Writes a COCO-format person dataset: images on disk plus a person_keypoints-style JSON.

    Args:
      out_dir: created if needed; receives `images/` and `annotations.json`.
      num_images: number of images (the photos are cycled through).
      people_per_image: persons drawn per image, or an inclusive (low, high) range; persons that
        end up (almost) fully occluded are dropped, so an image may hold fewer.
      seed: everything (poses, placements, labels, encodings) is a function of it.
      image_size: None (the photos' own sizes), an int (square) or (height, width).
      image_format: None (each photo's own: JPEG or PNG) or "JPEG" / "PNG" for all.

    Returns:
      (annotations_path, images_dir).
    """
    skimage = _import_skimage()
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    low, high = ((people_per_image, people_per_image) if isinstance(people_per_image, int)
                 else people_per_image)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        photo, fmt = _photo(skimage, index, image_size)
        fmt = image_format or fmt
        if fmt == "JPEG" and photo.mode not in ("L", "RGB"):
            photo = photo.convert("RGB")
        file_name = f"{image_id:012d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        photo.save(images_dir / file_name, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        images.append({"id": image_id, "file_name": file_name, "width": photo.width,
                       "height": photo.height})
        annotations += _image_annotations(skimage, rng, image_id, len(annotations) + 1,
                                          photo.height, photo.width,
                                          int(rng.integers(low, high + 1)))
    dataset = {"info": {"description": f"p2s_jax synthetic persons, seed {seed}"},
               "images": images, "annotations": annotations, "categories": [PERSON_CATEGORY]}
    annotations_path = out_dir / "annotations.json"
    annotations_path.write_text(json.dumps(dataset))
    return annotations_path, images_dir


def _detection(rng: np.random.Generator, ann: dict, noise_px: float) -> dict:
    """A ProbPose-like detection of one ground-truth person (keypoints jittered by noise_px)."""
    triplets = np.asarray(ann.get("keypoints") or np.zeros(3 * NUM_KEYPOINTS),
                          np.float64).reshape(-1, 3)
    x, y, w, h = ann["bbox"]
    labelled = triplets[:, 2] > 0
    template = np.array([x, y]) + _BOX_TEMPLATE * np.array([w, h])
    noise = rng.normal(0.0, noise_px, (NUM_KEYPOINTS, 2))
    xy = np.where(labelled[:, None], triplets[:, :2], template) + noise
    visibility = np.select([triplets[:, 2] == 2, triplets[:, 2] == 1],
                           [rng.uniform(0.6, 1.0, NUM_KEYPOINTS),
                            rng.uniform(0.05, 0.45, NUM_KEYPOINTS)],
                           rng.uniform(0.0, 0.3, NUM_KEYPOINTS))
    presence = np.where(labelled, rng.uniform(0.7, 1.0, NUM_KEYPOINTS),
                        rng.uniform(0.0, 0.6, NUM_KEYPOINTS))
    scale = max(np.sqrt(ann["area"]), 1.0) * 0.1
    expected_oks = np.where(labelled, np.exp(-(noise**2).sum(1) / (2 * scale**2)),
                            rng.uniform(0.0, 0.5, NUM_KEYPOINTS))
    confidence = np.clip(0.5 * visibility + 0.5 * presence + rng.normal(0, 0.05, NUM_KEYPOINTS),
                         0.0, 1.0)
    box = np.array([x, y, w, h]) + rng.normal(0.0, noise_px, 4)
    box[2:] = np.maximum(box[2:], 1.0)
    return {"image_id": ann["image_id"], "category_id": ann["category_id"],
            "keypoints": _r3(np.concatenate([xy, confidence[:, None]], axis=1).ravel()),
            "score": round(float(np.clip(confidence.mean() * rng.uniform(0.9, 1.1), 0, 1)), 4),
            "visibility": _r3(visibility), "presence": _r3(presence),
            "expected_oks": _r3(expected_oks), "bbox": _r3(box)}


def _r3(values: np.ndarray) -> list[float]:
    return [round(float(v), 3) for v in values]


def make_keypoint_detections(coco: COCO | str | os.PathLike, seed: int, noise_px: float,
                             out_path: str | os.PathLike) -> Path:
    """Writes ProbPose-like keypoint detections of every non-crowd person of `coco`.

    Like ProbPose run on all persons (small and unposed ones included): labelled keypoints are the
    ground truth plus N(0, noise_px) pixel noise, unlabelled ones a standing-person template in the
    (jittered) box; each entry carries per-keypoint 'visibility' (high for v=2, low for v=1 and
    unlabelled), 'presence', 'expected_oks' (from the actual error), the triplets' confidence,
    an instance 'score' and a 'bbox' [x, y, w, h], in the format `load_keypoint_detections` reads.

    Args:
      coco: ground truth (a COCO object or the path of its JSON).
      seed: the noise and scores are a function of it.
      noise_px: standard deviation of the keypoint and box noise, in pixels.
      out_path: the JSON file to write.

    Returns:
      out_path as a Path.
    """
    if not isinstance(coco, COCO):
        coco = load_coco(coco)
    rng = np.random.default_rng(seed)
    person = person_category_id(coco)
    detections = [_detection(rng, ann, noise_px)
                  for image_id in sorted(coco.getImgIds())
                  for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[person],
                                                          iscrowd=False))]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(detections))
    return out_path


def ellipse_batch(rng: np.random.Generator, batch_size: int, image_size: int,
                  objects_per_image: int) -> dict[str, np.ndarray]:
    """A training batch of ellipse "people" on noise, no image files involved (trainer tests and
    benchmarks): image (B, S, S, 3) uint8, masks (B, P, S, S) bool (later ellipses do not cover
    earlier ones), keypoints (B, P, 17, 2) float32 drawn inside each mask, visibility (B, P, 17)
    float32 in [0.05, 1), valid (B, P) bool."""
    b, s, p = batch_size, image_size, objects_per_image
    yy, xx = np.mgrid[0:s, 0:s]
    image = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
    masks = np.zeros((b, p, s, s), bool)
    keypoints = np.zeros((b, p, NUM_KEYPOINTS, 2), np.float32)
    visibility = np.zeros((b, p, NUM_KEYPOINTS), np.float32)
    for i in range(b):
        for j in range(p):
            cx, cy = rng.uniform(0.25 * s, 0.75 * s, 2)
            rx, ry = rng.uniform(0.1 * s, 0.25 * s, 2)
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            masks[i, j] = mask & ~masks[i, :j].any(0)
            image[i][mask] = 60 + 150 * j // max(p - 1, 1)
            ys, xs = np.nonzero(masks[i, j])
            pick = rng.choice(len(xs), NUM_KEYPOINTS)
            keypoints[i, j] = np.stack([xs[pick], ys[pick]], -1)
            visibility[i, j] = rng.uniform(0.05, 1.0, NUM_KEYPOINTS)
    return {"image": image, "masks": masks, "keypoints": keypoints, "visibility": visibility,
            "valid": masks.any((-2, -1))}
