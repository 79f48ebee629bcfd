"""`p2s evaluate`: files in, COCO segm results, AP table and JSON summary out.

The dataset side is read and checked before any model work (`load_inputs`): the ground truth,
the poses (a keypoint-results file or the ground-truth keypoints), every pose validated under
the run's settings, and every photo's file header. A photo that is missing or unreadable stops
the run with the list, because COCOeval would count its persons as missed and lower AP without
a word; `skip_missing_images` scores the images present instead, and the summary says so.
`evaluate_inputs` runs the model on checked inputs and scores the masks: `run_evaluation` (which
writes the results and the summary) and evaluation while training (`p2s_jax.train.evaluator`)
call it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import jax
from jax.sharding import Mesh
from pycocotools.coco import COCO

from p2s_jax.data import coco as coco_lib
from p2s_jax.evaluation.config import EvalConfig
from p2s_jax.evaluation.metrics import evaluate_segm
from p2s_jax.evaluation.plan import (check_image_files, ground_truth_prompt_poses,
                                     missing_images_error, run_items)
from p2s_jax.evaluation.report import EvalReport, format_report
from p2s_jax.evaluation.runner import EvalOutput, run_dataset
from p2s_jax.keypoints import KeypointSchema
from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.utils.errors import InputError
from p2s_jax.utils import files
from p2s_jax.utils.files import write_json


class EvalInputs(NamedTuple):
    """A dataset ready to run: read, validated under `config`, photos checked."""

    annotations: Path  # the ground truth's file
    coco: COCO
    images_dir: Path
    poses: dict  # image_id -> PoseInstances
    config: EvalConfig  # the run's settings, score channels resolved
    unreadable: list  # [{"image_id", "file_name", "reason"}]: photos that cannot be run
    description: str  # where the poses come from: the file, or "ground truth"
    image_ids: list  # the images scored (all of the ground truth, or the first `max_images`)
    skip_missing_images: bool  # photos that cannot be read are left out of the scoring


def load_inputs(annotations, images_dir, config: EvalConfig, *, keypoints=None,
                gt_keypoints: bool = False, schema: KeypointSchema | None = None,
                max_images: int = 0, skip_missing_images: bool = False) -> EvalInputs:
    """Reads and checks everything a run needs from files (see the module docstring);
    `max_images` > 0 keeps the first that many images with a person (by id).

    Raises:
      InputError: a malformed file, a pose the settings cannot use, a score channel the file
        does not carry, photos that cannot be read (unless `skip_missing_images`: then their
        images are left out of the scoring); `MissingFileError` for a missing file or folder.
    """
    if (keypoints is None) == (not gt_keypoints):
        raise InputError("give exactly one of keypoints (a detection file) and gt_keypoints")
    coco = coco_lib.load_coco(annotations, schema)
    images_dir = files.check_folder(images_dir, "image folder")
    poses = (ground_truth_prompt_poses(coco) if gt_keypoints
             else coco_lib.load_keypoint_detections(keypoints, coco))
    image_ids = sorted(coco.getImgIds())
    if max_images:
        with_people = set(coco.getImgIds(catIds=[coco_lib.person_category_id(coco)]))
        image_ids = [i for i in image_ids if i in with_people][:max_images]
        poses = {i: poses[i] for i in image_ids if i in poses}
    config = config.resolve_channels(poses, "ground truth" if gt_keypoints else keypoints)
    items = run_items(coco, images_dir, poses, config)  # raises on a pose it cannot use
    unreadable = check_image_files(items)
    if unreadable and not skip_missing_images:
        raise missing_images_error(unreadable, images_dir)
    return EvalInputs(Path(annotations), coco, images_dir, poses, config, unreadable,
                      "ground truth" if gt_keypoints else str(keypoints), image_ids,
                      skip_missing_images)


def evaluate_inputs(model: SAM2Image, inputs: EvalInputs, *, coco_star: bool = False,
                    mesh: Mesh | None = None, progress: bool = True, label: str = "evaluate"
                    ) -> tuple[dict, EvalOutput, list[int]]:
    """Masks for the persons of `inputs` and their mask AP -> (metrics, run output, the image
    ids scored). A photo that breaks while decoding stops the run unless
    `inputs.skip_missing_images`, which leaves its image out of the scoring, as it does the
    photos `load_inputs` found unreadable."""
    left_out = {p["image_id"] for p in inputs.unreadable}
    poses = {i: p for i, p in inputs.poses.items() if i not in left_out}
    output = run_dataset(model, inputs.coco, inputs.images_dir, poses, inputs.config, mesh=mesh,
                         progress=progress, label=label)
    left_out |= {s["image_id"] for s in output.report.skipped_images}
    if left_out and not inputs.skip_missing_images:  # a photo that broke while decoding
        raise missing_images_error(output.report.skipped_images, inputs.images_dir)
    image_ids = [i for i in inputs.image_ids if i not in left_out]
    if not image_ids:
        raise InputError(f"no image of the ground truth can be read under {inputs.images_dir}")
    metrics = evaluate_segm(inputs.coco, output.results, image_ids=image_ids,
                            coco_star=coco_star)
    return metrics, output, image_ids


def run_evaluation(inputs: EvalInputs, model: SAM2Image, *, checkpoint=None,
                   dtype: str | None = None, coco_star: bool = False, out=None,
                   summary_path=None, progress: bool = True, mesh: Mesh | None = None) -> dict:
    """`p2s evaluate`: checked inputs (`load_inputs`) and a loaded model in; COCO segm results,
    the AP table and a JSON summary out.

    Args:
      inputs: the dataset, read and checked (`load_inputs`).
      model: the loaded model (`weights_conversion.load_model`).
      checkpoint, dtype: what the model was loaded from and in, for the summary.
      coco_star: the paper's COCO* protocol (`metrics.evaluate_segm`).
      out: where to write the results JSON (None: not written); the summary goes to
        `summary_path`, by default next to it as `<out stem>.summary.json`.

    Returns:
      The summary dict (settings, metrics, "table", report; "no_poses" and "left_out_images"
      when they apply; the files written).
    """
    metrics, output, image_ids = evaluate_inputs(model, inputs, coco_star=coco_star, mesh=mesh,
                                                 progress=progress)
    left_out = sorted({s["image_id"]: s for s in
                       inputs.unreadable + output.report.skipped_images}.values(),
                      key=lambda s: s["image_id"])
    summary = {
        "settings": {
            "annotations": str(inputs.annotations), "images": str(inputs.images_dir),
            "keypoints": inputs.description,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "model": model.config.name, "image_size": model.config.image_size,
            "attention": model.config.attention, "dtype": dtype,
            "coco_star": coco_star, "skip_missing_images": inputs.skip_missing_images,
            **inputs.config.for_backend().to_dict(),
        },
        "metrics": {k: v for k, v in metrics.items() if k != "table"},
        "table": metrics["table"],
        "report": dataclasses.replace(output.report, skipped_images=left_out).to_dict(),
        "scored_images": len(image_ids),
        "jax": {"version": jax.__version__, "backend": jax.default_backend(),
                "devices": output.report.num_devices, "processes": jax.process_count()},
    }
    if left_out:
        summary["left_out_images"] = (
            f"{len(left_out)} image(s) could not be read and were left out of the scoring "
            f"(--skip-missing-images): AP is over {len(image_ids)} of "
            f"{len(inputs.image_ids)} images")
    if not any(len(p.det_score) for p in inputs.poses.values()):
        summary["no_poses"] = (f"{inputs.description} holds no poses of these images: no mask "
                               "was made, every person is missed (AP 0)")
    if out is not None and jax.process_index() == 0:
        out = Path(out)
        write_json(out, output.results)
        summary_path = files.summary_path(out) if summary_path is None else Path(summary_path)
        summary["results_file"] = str(out)
        write_json(summary_path, summary, indent=2)
        summary["summary_file"] = str(summary_path)
    return summary


def summary_lines(summary: dict) -> list[str]:
    """What `p2s evaluate` prints of a summary (`run_evaluation`): the run, its notes, the AP
    table and the files written."""
    lines = [format_report(EvalReport.from_dict(summary["report"]))]
    lines += [summary[note] for note in ("no_poses", "left_out_images") if note in summary]
    lines.append(summary["table"])
    if "results_file" in summary:
        lines.append(f"results: {summary['results_file']}\nsummary: {summary['summary_file']}")
    return lines
