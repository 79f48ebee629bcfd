"""p2s_jax.evaluation.runner against the official SAM2ImagePredictor run person by person.

The dataset is generated (`p2s_jax.data.synthetic`: real scikit-image photos with drawn persons and
ProbPose-like detections); the model is the official SAM 2.1 tiny at 256 px with seeded random
weights (tests/support/reference.py) and its converted twin. Everything is compiled once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support import multihost
from support import reference
from support.shared import coco_dataset, model_pair
from p2s_jax.data import coco as coco_lib
from p2s_jax.data.poses import PoseInstances
from p2s_jax.evaluation import evaluate, host, plan
from p2s_jax.evaluation import runner as ev
from p2s_jax.evaluation.config import DEFAULT_RESULT_SCORE, EvalConfig
from p2s_jax.evaluation.metrics import METRIC_NAMES, evaluate_segm
from p2s_jax.evaluation.report import format_report
from p2s_jax.inference.postprocess import exclusive_masks
from p2s_jax.inference.prompting import PromptConfig, select_prompts
from p2s_jax.parallel import make_mesh
from p2s_jax.utils.images import load_image

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")

MODEL, SIZE = "sam2.1_hiera_t", 256
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 photos (RGB, grayscale, RGBA) of 2-3 drawn persons each, plus detections."""
    root = tmp_path_factory.mktemp("coco")
    annotations, images, detections = coco_dataset(root, 4, seed=3)
    coco = coco_lib.load_coco(annotations)
    return {"root": root, "annotations": annotations, "images": images,
            "detections": detections, "coco": coco,
            "poses": coco_lib.load_keypoint_detections(detections, coco)}


@pytest.fixture(scope="module")
def models():
    return model_pair(MODEL, SIZE)  # (official SAM2Base, our SAM2Image), same random weights


@pytest.fixture(scope="module")
def single_device():
    return make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def run(dataset, models, single_device):
    return ev.run_dataset(models[1], dataset["coco"], dataset["images"], dataset["poses"],
                        EvalConfig(images_per_device=2), mesh=single_device, progress=False)


@pytest.fixture(scope="module")
def official_run(dataset, models, run):
    """The official predictor, set_image once per image and predict per person, on our prompts.

    -> image_id -> list over people with a prompt of (logits (H, W), predicted IoU).
    """
    predictor = reference.official_predictor(models[0])
    coco, out = dataset["coco"], {}
    for image_id, prompts in sorted(run.prompts.items()):
        predictor.set_image(load_image(Path(dataset["images"]) / coco.imgs[image_id]["file_name"]))
        out[image_id] = []
        for coords, labels in zip(prompts.coords[prompts.has_prompt],
                                  prompts.labels[prompts.has_prompt]):
            used = labels != -1
            logits, iou, _ = predictor.predict(point_coords=coords[used],
                                               point_labels=labels[used],
                                               multimask_output=False, return_logits=True)
            out[image_id].append((logits[0], float(iou[0])))
    return out


def _decode(result: dict) -> np.ndarray:
    return mask_utils.decode(result["segmentation"]).astype(bool)


def _by_image(results):
    grouped = {}
    for r in results:
        grouped.setdefault(r["image_id"], []).append(r)
    return grouped


# ------------------------------------------------------------------------------ parity


def test_prompts_equal_select_prompts_per_image(dataset, run):
    """The batched, people-padded prompt step gives what select_prompts gives image by image."""
    coco, config = dataset["coco"], PromptConfig()
    assert sorted(run.prompts) == sorted(i for i, p in dataset["poses"].items() if len(p))
    for image_id, prompts in run.prompts.items():
        poses = dataset["poses"][image_id]
        info = coco.imgs[image_id]
        expected = select_prompts(poses.keypoints, poses.scores["visibility"],
                                  (info["height"], info["width"]), config, poses.boxes)
        np.testing.assert_array_equal(prompts.labels, np.asarray(expected.labels))
        np.testing.assert_array_equal(prompts.coords, np.asarray(expected.coords))
        np.testing.assert_array_equal(prompts.has_prompt, np.asarray(expected.has_prompt))


def test_masks_match_official_predictor(dataset, run, official_run):
    """Same masks as SAM2ImagePredictor person by person; a pixel may differ only where the
    official logit is within float32 noise of the threshold."""
    results = _by_image(run.results)
    assert sorted(results) == sorted(official_run)
    people = 0
    for image_id, reference_people in official_run.items():
        assert len(results[image_id]) == len(reference_people)
        det_score = dataset["poses"][image_id].det_score[run.prompts[image_id].has_prompt]
        for result, (logits, iou), det in zip(results[image_id], reference_people, det_score):
            ours = _decode(result)
            differ = ours != (logits > 0)
            assert ours.shape == logits.shape
            assert differ.mean() < 1e-3
            assert np.all(np.abs(logits[differ]) < 1e-3 * np.abs(logits).max())
            assert result["score"] == pytest.approx(det * iou, rel=1e-4)  # default: product
            people += 1
    assert people == run.report.num_results >= 8


@pytest.fixture(scope="module")
def official_results(dataset, run, official_run):
    """The official masks with the official scores, as COCO results."""
    results = []
    for image_id, people in official_run.items():
        det = dataset["poses"][image_id].det_score[run.prompts[image_id].has_prompt]
        masks = np.stack([logits > 0 for logits, _ in people])
        scores = det * np.array([iou for _, iou in people])
        results += coco_lib.encode_results(image_id, masks, scores)
    return results


@pytest.fixture(scope="module")
def anchored(dataset, official_results):
    """The dataset's ground truth with half the persons' masks replaced by official predictions
    (random weights give AP 0 on the drawn masks; this ground truth makes the ranking by score and
    every IoU threshold matter)."""
    anchored = json.loads(Path(dataset["annotations"]).read_text())
    by_image = _by_image(official_results)
    for ann in anchored["annotations"]:
        image_results = by_image.get(ann["image_id"], [])
        if ann["id"] % 2 and image_results:
            rle = image_results[ann["id"] % len(image_results)]["segmentation"]
            ann["segmentation"] = rle
            ann["area"] = float(mask_utils.area(rle))
            ann["bbox"] = [float(v) for v in mask_utils.toBbox(rle)]
    anchored_path = dataset["root"] / "anchored.json"
    anchored_path.write_text(json.dumps(anchored))
    return coco_lib.load_coco(anchored_path)


def test_ap_matches_official(dataset, run, official_results, anchored):
    """AP of our results equals AP of the official masks with the official scores: on the
    dataset's own ground truth, and on the anchored one."""
    for gt in (dataset["coco"], anchored):
        for coco_star in (False, True):
            ours = evaluate_segm(gt, run.results, coco_star=coco_star)
            theirs = evaluate_segm(gt, official_results, coco_star=coco_star)
            assert {k: ours[k] for k in METRIC_NAMES} == \
                {k: theirs[k] for k in METRIC_NAMES}
    assert ours["AP"] > 0.05  # the anchored ground truth makes AP informative


def test_bf16_ap_follows_float32(models, single_device, tmp_path):
    """bf16 compute (float32 weights) follows float32 on 16 generated images (40 people): the
    masks agree person by person (median IoU >= 0.98, at most one below 0.9: random weights
    leave some logits near zero, and a rounding can pick another of the multimask outputs), and
    segm AP, on a ground truth whose every other mask is the float32 prediction (equal to the
    official one, `test_ap_matches_official`) so that AP is informative, moves by at most one
    person's worth (1/40); with COCO* too."""
    from p2s_jax.model.configs import get_config
    from p2s_jax.model.sam2 import abstract_model
    from weights_conversion import from_state_dict

    annotations, images, detections = coco_dataset(tmp_path, 16, seed=11)
    coco = coco_lib.load_coco(annotations)
    poses = coco_lib.load_keypoint_detections(detections, coco)
    bf16 = abstract_model(get_config(MODEL, SIZE), jnp.bfloat16)
    from_state_dict(bf16, reference.official_state_dict(models[0]))
    config = EvalConfig(images_per_device=2)
    runs = [ev.run_dataset(model, coco, images, poses, config, mesh=single_device,
                           progress=False).results for model in (models[1], bf16)]
    assert len(runs[0]) == len(runs[1]) >= 30
    ious = np.array([mask_utils.iou([r16["segmentation"]], [r32["segmentation"]], [0])[0, 0]
                     for r32, r16 in zip(*runs, strict=True)
                     if r32["image_id"] == r16["image_id"]])
    assert len(ious) == len(runs[0])
    assert np.median(ious) >= 0.98 and (ious < 0.9).sum() <= 1, np.sort(ious)[:5]
    anchored = json.loads(Path(annotations).read_text())
    by_image = _by_image(runs[0])
    for ann in anchored["annotations"]:
        image_results = by_image.get(ann["image_id"], [])
        if ann["id"] % 2 and image_results:
            rle = image_results[ann["id"] % len(image_results)]["segmentation"]
            ann.update(segmentation=rle, area=float(mask_utils.area(rle)),
                       bbox=[float(v) for v in mask_utils.toBbox(rle)])
    (tmp_path / "anchored.json").write_text(json.dumps(anchored))
    gt = coco_lib.load_coco(tmp_path / "anchored.json")
    for coco_star in (False, True):
        ap32, ap16 = (evaluate_segm(gt, results, coco_star=coco_star)["AP"] for results in runs)
        assert ap32 > 0.2 and abs(ap16 - ap32) <= 1 / len(runs[0]), (coco_star, ap16, ap32)


def test_exclusive_masks_and_result_scores(dataset, models, single_device, run):
    config = EvalConfig(images_per_device=2, exclusive=True, result_score="iou")
    exclusive = ev.run_dataset(models[1], dataset["coco"], dataset["images"], dataset["poses"],
                             config, mesh=single_device, progress=False)
    plain, excl = _by_image(run.results), _by_image(exclusive.results)
    for image_id, results in plain.items():
        det = dataset["poses"][image_id].det_score[run.prompts[image_id].has_prompt]
        iou = np.array([r["score"] for r in excl[image_id]])
        np.testing.assert_allclose(iou * det, [r["score"] for r in results], rtol=1e-6)
        masks = np.stack([_decode(r) for r in results])
        expected = np.asarray(exclusive_masks(masks, iou))
        got = np.stack([_decode(r) for r in excl[image_id]])
        np.testing.assert_array_equal(got, expected)
        assert got.sum(0).max() <= 1


def test_result_score_choices():
    det, iou = np.array([0.5, 1.0]), np.array([0.8, 0.25])
    np.testing.assert_allclose(host.result_scores(det, iou, "product"), [0.4, 0.25])
    np.testing.assert_allclose(host.result_scores(det, iou, "detection"), det)
    np.testing.assert_allclose(host.result_scores(det, iou, "iou"), iou)
    assert EvalConfig().result_score == DEFAULT_RESULT_SCORE == "product"
    with pytest.raises(ValueError, match="result_score"):
        EvalConfig(result_score="mean")
    with pytest.raises(ValueError, match="keypoint_score"):
        EvalConfig(keypoint_score="vis")


def test_plan_steps_chunks_do_not_depend_on_device_count():
    one, four = plan.plan_steps(7, 2, 1), plan.plan_steps(7, 2, 4)
    assert one.shape == (4, 1, 2) and four.shape == (1, 4, 2)
    np.testing.assert_array_equal(one.reshape(-1, 2), four.reshape(-1, 2))
    np.testing.assert_array_equal(one.ravel(), [0, 1, 2, 3, 4, 5, 6, -1])
    assert plan.plan_steps(0, 2, 4).shape == (0, 4, 2)


# ------------------------------------------------------------------------------ devices

def _device_test_config() -> EvalConfig:
    return EvalConfig(images_per_device=1, people_per_chunk=2, exclusive=True,
                         prompt=PromptConfig(selection="maxspread", num_points=4,
                                             negatives="closest_other"))


_DEVICE_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from support import multihost
multihost.initialize()  # one of several processes (multi-host on one machine), if so
import jax
import numpy as np
from p2s_jax.data import coco as coco_lib
from p2s_jax.model.configs import get_config
from p2s_jax.model.sam2 import abstract_model
from weights_conversion import from_state_dict
from test_evaluation import _device_test_config, ev

weights, annotations, detections, images, out = sys.argv[1:6]
assert jax.device_count() == 4, jax.devices()
model = abstract_model(get_config("{model}", {size}))
from_state_dict(model, dict(np.load(weights)))
coco = coco_lib.load_coco(annotations)
poses = coco_lib.load_keypoint_detections(detections, coco)
output = ev.run_dataset(model, coco, images, poses, _device_test_config(), progress=False)
json.dump({{"results": output.results, "devices": output.report.num_devices,
           "processes": output.report.num_processes}}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def device_run(dataset, models, single_device, tmp_path_factory):
    """The device-test config on 1 device here, and a runner of `_DEVICE_SCRIPT` subprocesses."""
    root = tmp_path_factory.mktemp("devices")
    weights = root / "weights.npz"
    np.savez(weights, **reference.official_state_dict(models[0]))
    script = root / "run.py"
    script.write_text(_DEVICE_SCRIPT.format(model=MODEL, size=SIZE))
    one = ev.run_dataset(models[1], dataset["coco"], dataset["images"], dataset["poses"],
                       _device_test_config(), mesh=single_device, progress=False)

    def launch(name: str, devices_per_process: int, process_env: list[dict]) -> list[dict]:
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        outs = [root / f"{name}_{i}.json" for i in range(len(process_env))]
        procs = [subprocess.Popen([sys.executable, str(script), str(weights),
                                   str(dataset["annotations"]), str(dataset["detections"]),
                                   str(dataset["images"]), str(out)],
                                  env={**env, **extra}, cwd=REPO)
                 for out, extra in zip(outs, process_env)]
        for proc in procs:
            assert proc.wait(timeout=600) == 0
        return [json.loads(out.read_text()) for out in outs]

    return json.loads(json.dumps(one.results)), one.report.num_devices, launch


def test_one_and_four_devices_identical(device_run):
    """Bit-identical results on 1 device (here) and on 4 host devices (a subprocess): with 4
    images, every step of the 1-device run and the single step of the 4-device run hold
    chunks with different people counts."""
    one, one_devices, launch = device_run
    (four,) = launch("four", 4, [{}])
    assert (one_devices, four["devices"], four["processes"]) == (1, 4, 1)
    assert one == four["results"]
    assert len(one) >= 8


def test_two_processes_identical(device_run):
    """Multi-host: 2 processes x 2 devices (jax.distributed on this machine, gloo collectives)
    give every process the same, complete results as 1 device: each process feeds its own
    devices' chunks and the results are gathered across processes."""
    one, _, launch = device_run
    runs = launch("two_processes", 2, multihost.process_env(2))
    for run in runs:
        assert (run["devices"], run["processes"]) == (4, 2)
        assert run["results"] == one


def test_host_work_in_threads_equals_worker_processes(dataset, models, single_device, run):
    """The host's work (photos decoded onto the canvas, masks unpacked and RLE-encoded) in
    threads of this process gives the same bytes as in worker processes (the default), with
    one and with three workers, and with each person on its own crop (masks pasted back)."""
    assert EvalConfig().host_workers == "processes"
    reference_results = json.dumps(run.results)
    for workers in (1, 3):
        threaded = ev.run_dataset(models[1], dataset["coco"], dataset["images"],
                                  dataset["poses"], EvalConfig(images_per_device=2,
                                                               num_workers=workers,
                                                               host_workers="threads"),
                                  mesh=single_device, progress=False)
        assert json.dumps(threaded.results) == reference_results
        assert threaded.prompts.keys() == run.prompts.keys()
    crops = [ev.run_dataset(models[1], dataset["coco"], dataset["images"], dataset["poses"],
                            EvalConfig(images_per_device=2, crop_to_box=1.5,
                                       host_workers=kind), mesh=single_device, progress=False)
             for kind in ("threads", "processes")]
    assert json.dumps(crops[0].results) == json.dumps(crops[1].results)
    assert crops[0].results and crops[0].results != run.results


# ------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("host_workers", ["processes", "threads"])
def test_missing_and_unreadable_images_are_skipped(dataset, models, single_device, tmp_path,
                                                   capsys, host_workers):
    images = tmp_path / "images"
    shutil.copytree(dataset["images"], images)
    coco = dataset["coco"]
    names = {i: coco.imgs[i]["file_name"] for i in sorted(coco.imgs)}
    (images / names[1]).unlink()  # missing
    (images / names[2]).write_bytes(b"not an image")  # unreadable
    photo = load_image(images / names[3])  # wrong size
    from PIL import Image
    Image.fromarray(photo[:-10]).save(images / names[3])

    # One more person, with every keypoint outside the image: no prompt, no mask.
    poses = dict(dataset["poses"])
    base = poses[4]
    outside = base.select([0])
    outside = PoseInstances(outside.keypoints - 1000.0, outside.scores, outside.boxes,
                                     outside.det_score)
    poses[4] = PoseInstances(
        np.concatenate([base.keypoints, outside.keypoints]),
        {k: np.concatenate([v, outside.scores[k]]) for k, v in base.scores.items()},
        np.concatenate([base.boxes, outside.boxes]),
        np.concatenate([base.det_score, outside.det_score]))

    out = ev.run_dataset(models[1], coco, images, poses,
                         EvalConfig(images_per_device=2, host_workers=host_workers),
                         mesh=single_device, progress=False)
    report = out.report
    skipped = {s["image_id"]: s for s in report.skipped_images}
    assert sorted(skipped) == [1, 2, 3]
    assert names[1] in skipped[1]["file_name"] and "not found" in skipped[1]["reason"]
    assert "not a readable image" in skipped[2]["reason"]
    assert "annotation file says" in skipped[3]["reason"]
    printed = capsys.readouterr().out
    assert all(f"skipped image {images / names[i]}" in printed for i in (1, 2, 3))
    assert {r["image_id"] for r in out.results} == {4}
    assert report.people_without_prompt == 1
    assert report.num_results == len(base)
    assert report.num_people == len(base) + 1
    assert report.num_images == 4
    lines = format_report(report)
    assert "skipped 3 image(s)" in lines and names[2] in lines and "no usable keypoint" in lines
    evaluate_segm(coco, out.results)  # the run still evaluates


def test_malformed_files_stop_at_once(dataset, tmp_path):
    truncated = tmp_path / "annotations.json"
    truncated.write_text(Path(dataset["annotations"]).read_text()[:500])
    with pytest.raises(coco_lib.CocoFormatError, match=r"annotations\.json: invalid JSON"):
        evaluate.load_inputs(truncated, dataset["images"], EvalConfig(),
                             keypoints=dataset["detections"])
    detections = tmp_path / "detections.json"
    entries = json.loads(Path(dataset["detections"]).read_text())
    del entries[1]["visibility"]
    detections.write_text(json.dumps(entries))
    with pytest.raises(coco_lib.CocoFormatError, match=r"entry 1 .*missing key 'visibility'"):
        evaluate.load_inputs(dataset["annotations"], dataset["images"], EvalConfig(),
                             keypoints=detections)


def test_bad_poses_name_the_image(dataset, models, single_device):
    poses = dict(dataset["poses"])
    bad = poses[2]
    scores = dict(bad.scores)
    scores["visibility"] = scores["visibility"].copy()
    scores["visibility"][1, 5] = np.nan
    poses[2] = PoseInstances(bad.keypoints, scores, bad.boxes, bad.det_score)
    with pytest.raises(ValueError, match="image 2: person index 1 has non-finite"):
        ev.run_dataset(models[1], dataset["coco"], dataset["images"], poses,
                     mesh=single_device, progress=False)
    with pytest.raises(ValueError, match="no 'presence' keypoint scores|presence"):
        plain = {i: PoseInstances(p.keypoints, {"confidence": p.scores["confidence"]},
                                           p.boxes, p.det_score)
                 for i, p in dataset["poses"].items()}
        ev.run_dataset(models[1], dataset["coco"], dataset["images"], plain,
                     EvalConfig(keypoint_score="presence"), mesh=single_device,
                     progress=False)


def test_ground_truth_poses_never_use_unlabelled_keypoints(dataset):
    poses = plan.ground_truth_prompt_poses(dataset["coco"])
    for image_id, pose in poses.items():
        unlabelled = pose.scores["visibility"] == 0
        assert np.isnan(pose.keypoints[unlabelled]).all()
        assert np.isfinite(pose.keypoints[~unlabelled]).all()


def test_compilations_are_counted_exactly(models, single_device, tmp_path):
    """A whole evaluation over photos of several sizes and 1-7 people compiles one encoder (one
    canvas per run, the resize on the device) and, per distinct people-slot count P, one
    prompt and one decode program; P is the image's people rounded up to a power of two, or,
    past the chunk of 2, to a power of two of whole chunks: 1 -> 1, 2 -> 2, 3-4 -> 4, 5-8 -> 8.
    The count for this data is derived from its people counts; running it again compiles
    nothing."""
    from jax import monitoring

    from p2s_jax.data.synthetic import make_coco_dataset, make_keypoint_detections

    annotations, images = make_coco_dataset(tmp_path, 6, (1, 7), seed=5, image_size=None)
    detections = make_keypoint_detections(annotations, seed=6, noise_px=2.0,
                                          out_path=tmp_path / "detections.json")
    coco = coco_lib.load_coco(annotations)
    poses = coco_lib.load_keypoint_detections(detections, coco)
    assert len({(i["height"], i["width"]) for i in coco.dataset["images"]}) >= 4
    people = {len(p) for p in poses.values() if len(p)}
    assert len(people) >= 3

    def slots(n: int, chunk: int = 2) -> int:
        power = lambda k: 1 << (k - 1).bit_length()  # noqa: E731
        return power(n) if power(n) <= chunk else chunk * power(-(-n // chunk))

    expected = 1 + 2 * len({slots(n) for n in people})
    jax.clear_caches()  # nothing compiled by an earlier test is reused
    compiled = []
    monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kwargs: compiled.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    config = EvalConfig(images_per_device=1, people_per_chunk=2)
    first = ev.run_dataset(models[1], coco, images, poses, config, mesh=single_device,
                           progress=False)
    count = len(compiled)
    assert count == expected, (count, expected, sorted(people))
    again = ev.run_dataset(models[1], coco, images, poses, config, mesh=single_device,
                           progress=False)
    assert len(compiled) == count and again.results == first.results
