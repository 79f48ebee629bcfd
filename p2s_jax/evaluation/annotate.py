"""`p2s annotate`: keypoint-only person datasets -> instance masks, resumable, for any schema.

Input: a COCO-format file whose person annotations carry keypoints (ground truth, v in
{0, 1, 2}; masks absent or ignored), or a keypoint-results list (detections with scores, as a
pose estimator writes them) together with a COCO-format file that lists the images. The
keypoint names of `categories[].keypoints` pick the schema (`p2s_jax.keypoints`).

Output: the input annotations, every field kept, each person with
  * `segmentation` (compressed RLE), `area` and `bbox` from the predicted mask (the input's own
    `bbox` / `area`, when present, move to `p2s.input_bbox` / `p2s.input_area`);
  * `p2s`: `status`, `predicted_iou`, `object_score` (logit), `prompt` ([x, y, label] per
    point). Status: `ok`; `empty_prompt` (no keypoint passed the preset's gate and the person
    was segmented from the empty prompt, `no_prompt="empty"`: what SAM finds salient, not a
    pose-prompted mask); `no_prompt` (no mask); `low_iou` (predicted IoU below `min_iou`);
    `empty_mask`; `missing_image`.
A summary (counts by status, images/s, the images that could not be read) is printed and
written beside the output (`<out>.summary.json`).

How the work runs: the evaluator's data-parallel runner (`evaluation.runner.run_dataset`, the
same jitted encode / prompt / decode steps) over *shards* of `shard_images` images in image-id
order. The input is read and every pose checked first (`AnnotationInput`, before the model
loads); the shard folder `<out>.shards/` is created only when the first shard is written, with
the settings it was made with (`settings.json`), and refuses a run with other settings. Each
finished shard goes to `<out>.shards/<index>.json` atomically; a run started again with the
same command skips the finished shards, and the output is assembled from the shards in order, so
a killed and resumed run ends with the same bytes as an uninterrupted one. Ctrl-C or SIGTERM
stops at once; the finished shards are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from pycocotools import mask as mask_utils

from p2s_jax.data import coco as coco_lib
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.plan import ground_truth_prompt_poses, run_items
from p2s_jax.evaluation.runner import run_dataset
from p2s_jax.inference.overlay import draw_overlay
from p2s_jax.inference.prompting import LABEL_EMPTY, PromptConfig
from p2s_jax.keypoints import KeypointSchema, labelled_points
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import make_mesh
from p2s_jax.utils.errors import InputError, Interrupted, interrupt_signal
from p2s_jax.utils.files import read_json, summary_path, write_atomic, write_json
from p2s_jax.utils.nested import differences
from p2s_jax.utils.text import plural
from p2s_jax.utils.images import ImageError, load_image, save_image

STATUSES = ("ok", "empty_prompt", "no_prompt", "low_iou", "empty_mask", "missing_image")


@dataclasses.dataclass(frozen=True)
class AnnotateConfig:
    """Attributes:
      inference: prompts, post-processing and batching (`EvalConfig`; a preset's for the paper).
      ground_truth_prompt: the prompt for ground-truth keypoints (binary visibility cannot rank:
        MaxSpread, Tab. 3); None: `inference.prompt` for both kinds of input.
      min_iou: a mask whose predicted IoU is below this gets status `low_iou` (kept, marked).
      shard_images: images per shard (the unit of resumption).
      overlay_sample: images drawn into the overlay folder, chosen evenly over the image ids.
    """

    inference: EvalConfig = EvalConfig()
    ground_truth_prompt: PromptConfig | None = None
    min_iou: float = 0.0
    shard_images: int = 256
    overlay_sample: int = 50

    def __post_init__(self):
        if self.shard_images < 1 or self.overlay_sample < 0 or not 0 <= self.min_iou <= 1:
            raise InputError(f"shard_images must be >= 1, overlay_sample >= 0 and min_iou in "
                             f"[0, 1]; got {self.shard_images}, {self.overlay_sample}, "
                             f"{self.min_iou}")


class AnnotationInput:
    """The persons to annotate, read and checked before any model work: the output's skeleton
    (`data`), an indexed COCO of them, their poses per image, the annotation id of each pose,
    and the run's inference settings (`inference`: the ground-truth prompt for ground-truth
    input, score channels resolved, every pose validated under them).

    Args:
      keypoints_path: COCO-format persons with keypoints, or a keypoint-results list.
      image_info_path: with keypoint results, the COCO-format file listing their images.
      config: the run's settings.
      schema: read the keypoints by position in this schema (names that fit none).
    """

    def __init__(self, keypoints_path, image_info_path=None,
                 config: AnnotateConfig = AnnotateConfig(),
                 schema: KeypointSchema | None = None):
        keypoints_path = Path(keypoints_path)
        self.keypoints_path = keypoints_path
        raw = read_json(keypoints_path, "keypoint file", coco_lib.CocoFormatError)
        if isinstance(raw, list):  # detections (keypoint results): persons of a listed image set
            first = raw[0] if raw else {}
            if not (isinstance(first, dict) and {"image_id", "keypoints"} <= set(first)):
                keys = sorted(first) if isinstance(first, dict) else type(first).__name__
                raise InputError(
                    f"{keypoints_path} is a JSON list whose entries are not keypoint results "
                    f"(entry 0: {keys}); p2s annotate reads a COCO-format keypoint file (an "
                    "object with 'images', 'annotations' and 'categories') or COCO keypoint "
                    "results (a list of entries with 'image_id' and 'keypoints') with "
                    "--image-info")
            if image_info_path is None:
                raise InputError(f"{keypoints_path} is a list of keypoint results: give "
                                 "--image-info, a COCO-format file whose 'images' and "
                                 "'categories' they refer to")
            info = read_json(image_info_path, "image list", coco_lib.CocoFormatError)
            self.data = {**{k: v for k, v in info.items() if k != "annotations"},
                         "annotations": _detections_as_annotations(keypoints_path, raw)}
            self.coco = coco_lib.load_keypoint_annotations_dict(
                coco_lib.with_schema(self.data, schema, image_info_path), keypoints_path)
            self.poses = coco_lib.load_keypoint_detections(keypoints_path, self.coco, raw)
            self.ground_truth = False
            self.ann_ids = {}
            for ann in self.data["annotations"]:
                self.ann_ids.setdefault(ann["image_id"], []).append(ann["id"])
        else:
            self.data, self.coco = coco_lib.load_keypoint_annotations(keypoints_path, schema)
            self.poses = ground_truth_prompt_poses(self.coco)
            self.ground_truth = True
            self.ann_ids = {i: p.ann_ids.tolist() for i, p in self.poses.items()}
        self.schema = coco_lib.keypoint_schema(self.coco)
        self.image_ids = [i for i in sorted(self.coco.getImgIds()) if len(self.poses.get(i, ()))]
        inference = config.inference
        if self.ground_truth and config.ground_truth_prompt is not None:
            inference = dataclasses.replace(inference, prompt=config.ground_truth_prompt)
        self.inference = inference.resolve_channels(self.poses, keypoints_path)
        run_items(self.coco, ".", self.poses, self.inference)  # raises on an unusable pose


def _detections_as_annotations(path: Path, entries: list) -> list[dict]:
    """Keypoint results -> annotations (ids 1.. in file order), every field kept."""
    annotations = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or "keypoints" not in entry:
            raise coco_lib.CocoFormatError(f"{path}: entry {index} must be an object with "
                                           "'image_id' and 'keypoints'")
        annotations.append({"id": index + 1, "category_id": 1, "iscrowd": 0, **entry})
    return annotations


def _settings(source: AnnotationInput, checkpoint, model: SAM2Image,
              config: AnnotateConfig) -> dict:
    return {"keypoints": str(source.keypoints_path.absolute()), "checkpoint": str(checkpoint),
            "model": model.config.name, "image_size": model.config.image_size,
            "schema": source.schema.name, "images": len(source.image_ids),
            "config": json.loads(json.dumps(dataclasses.asdict(config), default=str))}


def shard_dir(out: Path) -> Path:
    """The folder of `out`'s finished shards (the unit of resumption)."""
    return out.with_name(out.name + ".shards")


# The `p2s annotate` option of each setting (`_settings`' flattened keys; the others are
# named by their dotted key).
SETTING_OPTIONS = {
    "keypoints": "--keypoints", "checkpoint": "--checkpoint", "model": "--model",
    "image_size": "--image-size", "schema": "--schema", "images": "images with persons",
    "config.min_iou": "--min-iou", "config.shard_images": "--shard-images",
    "config.overlay_sample": "--sample",
    "config.inference.images_per_device": "--batch-size",
    "config.inference.num_workers": "--workers",
    "config.inference.prompt.selection": "--selection",
    "config.inference.prompt.num_points": "--num-points",
    "config.inference.prompt.visibility_threshold": "--threshold",
    "config.inference.prompt.no_prompt": "--no-prompt",
    "config.inference.prompt.outside_keypoints": "--outside-keypoints",
    "config.inference.prompt.negatives": "--negatives",
    "config.inference.prompt.box": "--box",
    "config.inference.keypoint_score": "--score-type",
    "config.inference.confidence_score": "--confidence-score",
    "config.inference.exclusive": "--exclusive",
}


def _check_settings(shards: Path, settings: dict, overwrite: bool = False) -> None:
    """The shard folder's recorded settings, when it has any, must be these (a resumed run is
    the same run); with `overwrite`, the shards of a run with other settings are removed."""
    recorded = shards / "settings.json"
    if recorded.is_file():
        changed = differences(read_json(recorded, "annotation settings"), settings,
                              SETTING_OPTIONS)
        if changed and overwrite:
            shutil.rmtree(shards)
        elif changed:
            raise InputError(f"{shards} holds the shards of a run with other settings "
                             f"({'; '.join(changed)}): pass --overwrite to replace them, or "
                             "write to another --out")


def _prompt_points(prompts, person: int) -> list:
    labels = prompts.labels[person]
    used = labels != -1
    return [[round(float(x), 2), round(float(y), 2), int(label)] for (x, y), label
            in zip(prompts.coords[person][used], labels[used])]


def _person_records(source: AnnotationInput, output, image_ids, min_iou: float) -> dict:
    """ann_id (str) -> its annotation fields from one run of `run_dataset`."""
    skipped = {s["image_id"]: s for s in output.report.skipped_images}
    by_image: dict[int, list] = {}
    for result in output.results:
        by_image.setdefault(result["image_id"], []).append(result)
    records = {}
    for image_id in image_ids:
        ids = source.ann_ids.get(image_id, [])
        if image_id in skipped:
            for ann_id in ids:
                records[str(ann_id)] = {"p2s": {"status": "missing_image"}}
            continue
        prompts = output.prompts[image_id]
        results = iter(by_image.get(image_id, []))
        iou, object_score = output.predictions.get(image_id, ((), ()))
        kept = iter(range(len(iou)))
        for person, ann_id in enumerate(ids):
            prompt = _prompt_points(prompts, person)
            if not prompts.has_prompt[person]:
                records[str(ann_id)] = {"p2s": {"status": "no_prompt", "prompt": prompt}}
                continue
            result, k = next(results), next(kept)
            area = float(mask_utils.area(result["segmentation"]))
            status = ("empty_mask" if area == 0
                      else "empty_prompt" if prompts.labels[person][0] == LABEL_EMPTY
                      else "low_iou" if iou[k] < min_iou else "ok")
            records[str(ann_id)] = {
                "segmentation": result["segmentation"], "area": area,
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(result["segmentation"])],
                "p2s": {"status": status, "predicted_iou": round(float(iou[k]), 5),
                        "object_score": round(float(object_score[k]), 4), "prompt": prompt}}
    return records


def annotate(model: SAM2Image, source: AnnotationInput, images_dir, out,
             config: AnnotateConfig = AnnotateConfig(), *, checkpoint: str = "", overlays=None,
             mesh: Mesh | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Annotates every person of `source` (`AnnotationInput`, read with the same `config`) with
    a mask (module docstring); -> summary. `overwrite`: the shards that a run with other
    settings left in `out`'s shard folder are replaced (without it, such shards are refused)."""
    out = Path(out)
    mesh = make_mesh() if mesh is None else mesh
    shards = shard_dir(out)
    settings = _settings(source, checkpoint, model, config)
    _check_settings(shards, settings, overwrite)
    ids = source.image_ids
    chunks = [ids[i:i + config.shard_images] for i in range(0, len(ids), config.shard_images)]
    start, run_images = time.perf_counter(), 0
    try:
        for index, chunk in enumerate(chunks):
            path = shards / f"{index:06d}.json"
            if path.is_file():
                continue
            if progress and jax.process_index() == 0:
                print(f"shard {index + 1}/{len(chunks)}: {len(chunk)} images", flush=True)
            output = run_dataset(model, source.coco, images_dir,
                                 {i: source.poses[i] for i in chunk}, source.inference,
                                 mesh=mesh, progress=progress, label="annotate")
            run_images += len(chunk)
            records = _person_records(source, output, chunk, config.min_iou)
            if jax.process_index() == 0:
                if not (shards / "settings.json").is_file():
                    write_json(shards / "settings.json", settings, indent=2)
                write_json(path, {"images": chunk, "skipped": output.report.skipped_images,
                                  "persons": records})
    except BaseException as err:
        number = interrupt_signal(err)
        if number is None:
            raise
        done = sum((shards / f"{i:06d}.json").is_file() for i in range(len(chunks)))
        raise Interrupted(
            f"interrupted: {done} of {len(chunks)} shards finished and kept in {shards}; run "
            "the same command again to resume", number) from None
    seconds = time.perf_counter() - start
    records, skipped = {}, []
    for index in range(len(chunks)):
        shard = read_json(shards / f"{index:06d}.json", "annotation shard")
        records.update(shard["persons"])
        skipped += shard["skipped"]
    data = _merge(source.data, records)
    counts = Counter(a["p2s"]["status"] for a in data["annotations"] if "p2s" in a)
    summary = {"output": str(out), "schema": source.schema.name, "images": len(ids),
               "persons": sum(counts.values()),
               "status": {s: counts.get(s, 0) for s in STATUSES},
               "images_per_second": run_images / seconds if run_images and seconds > 0 else None,
               "images_this_run": run_images, "skipped_images": skipped}
    if jax.process_index() == 0:
        write_atomic(out, json.dumps(data))
        write_json(summary_path(out), summary, indent=2)
        if overlays is not None and config.overlay_sample:
            summary["overlays"] = draw_overlays(source, data, images_dir, overlays,
                                                config.overlay_sample,
                                                source.inference.prompt.visibility_threshold)
    return summary


def annotation_summary_lines(summary: dict) -> list[str]:
    """What `p2s annotate` prints of a run's summary (`annotate`)."""
    speed = summary["images_per_second"]
    lines = [f"{plural(summary['persons'], 'person')} on {plural(summary['images'], 'image')} "
             f"({summary['schema']}): "
             + ", ".join(f"{k} {v}" for k, v in summary["status"].items())
             + (f"; {speed:.2f} images/s" if speed else "; nothing left to run")]
    lines += [f"unreadable image {image['file_name']}: {image['reason']}"
              for image in summary["skipped_images"]]
    return lines + [f"annotated: {summary['output']}"]


def _merge(data: dict, records: dict) -> dict:
    """The input with each annotated person's fields; the input's own bbox / area move into
    `p2s` (`input_bbox`, `input_area`) when a mask replaces them."""
    data = copy.deepcopy(data)
    for ann in data["annotations"]:
        record = records.get(str(ann["id"]))
        if record is None:
            continue
        if "segmentation" in record:
            for key in ("bbox", "area"):
                if key in ann:
                    record["p2s"][f"input_{key}"] = ann[key]
        ann.update(copy.deepcopy(record))
    return data


def prompt_arrays(annotations: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The `p2s.prompt` lists of P annotated persons -> coords (P, K, 2) float32 and labels
    (P, K) int32, padded with label -1 to the longest prompt."""
    prompts = [np.asarray(a["p2s"].get("prompt", []), np.float32).reshape(-1, 3)
               for a in annotations]
    slots = max(1, max(len(p) for p in prompts))
    coords = np.zeros((len(prompts), slots, 2), np.float32)
    labels = np.full((len(prompts), slots), -1, np.int32)
    for i, prompt in enumerate(prompts):
        coords[i, :len(prompt)], labels[i, :len(prompt)] = prompt[:, :2], prompt[:, 2]
    return coords, labels


def draw_overlays(source: AnnotationInput, data: dict, images_dir, folder, sample: int,
                  threshold: float) -> list[str]:
    """`sample` images spread evenly over the annotated ones, drawn with their masks,
    skeletons and prompt points -> the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    picks = sorted({source.image_ids[int(i)] for i in
                    np.linspace(0, len(source.image_ids) - 1, min(sample, len(source.image_ids)))})
    by_id = {a["id"]: a for a in data["annotations"]}
    written = []
    for image_id in picks:
        try:
            image = load_image(Path(images_dir) / source.coco.imgs[image_id]["file_name"])
        except ImageError:
            continue
        anns = [by_id[i] for i in source.ann_ids[image_id]]
        masks = np.stack([mask_utils.decode(a["segmentation"]).astype(bool) if "segmentation"
                          in a and isinstance(a["segmentation"], dict)
                          else np.zeros(image.shape[:2], bool) for a in anns])
        keypoints, visibility = labelled_points(np.asarray(
            [a["keypoints"] for a in anns], np.float32).reshape(len(anns), -1, 3))
        coords, labels = prompt_arrays(anns)
        overlay = draw_overlay(image, masks, keypoints, visibility, coords, labels, threshold,
                               source.schema.skeleton)
        path = folder / f"{image_id}.png"
        save_image(path, overlay)
        written.append(str(path))
    return written
