"""`p2s` as a new user meets it on real COCO photos (`../shared/data/real/coco`): every command
run through `cli.main` (or as a process, for signals), each defect a user reported as a test.

The model is the official SAM 2.1 tiny at 256 px with seeded random weights, converted."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from support.shared import NEEDS_REAL_COCO_AND_REFERENCE, REAL_COCO, SHARED_DATA, model_pair
from p2s_jax import cli
from p2s_jax.evaluation.metrics import evaluate_segm
from p2s_jax.data.coco import load_coco
from weights_conversion import save_orbax

REPO = Path(__file__).resolve().parents[1]
MODEL, SIZE = "sam2.1_hiera_t", 256
HAS_CUDA = any(importlib.util.find_spec(name) is not None
               for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))

pytestmark = NEEDS_REAL_COCO_AND_REFERENCE


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "t256"
    save_orbax(model_pair(MODEL, SIZE)[1], folder)
    return folder


@pytest.fixture
def real(tmp_path):
    """A writable copy of the real sample: annotations, images/, and keypoint results of its 4
    photos as a pose estimator writes them ([x, y, s] triplets, no visibility channel)."""
    images = tmp_path / "images"
    images.mkdir()
    for photo in REAL_COCO.glob("*.jpg"):
        shutil.copy(photo, images / photo.name)
    annotations = tmp_path / "annotations.json"
    shutil.copy(REAL_COCO / "test_coco.json", annotations)
    data = json.loads(annotations.read_text())
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 0.9,
                "keypoints": [v if i % 3 != 2 else (0.95 if v > 0 else 0.05)
                              for i, v in enumerate(a["keypoints"])]}
               for a in data["annotations"] if a["num_keypoints"] > 0]
    (tmp_path / "results.json").write_text(json.dumps(results))
    return {"root": tmp_path, "images": images, "annotations": annotations,
            "results": tmp_path / "results.json", "data": data}


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------ wrong results


def test_segment_takes_the_photos_own_results(real, converted, tmp_path, capsys):
    """Keypoint results of 4 photos: the photo's own persons, by the image id its file name
    spells, or by --image-id; a photo whose name says nothing is refused."""
    persons = {i: sum(1 for a in real["data"]["annotations"] if a["image_id"] == i
                      and a["num_keypoints"] > 0) for i in (785, 196141)}
    args = ["segment", "--image", str(real["images"] / "000000000785.jpg"), "--keypoints",
            str(real["results"]), "--checkpoint", str(converted), "--image-size", str(SIZE),
            "--out", str(tmp_path / "a.png"), "--masks-out", str(tmp_path / "a.json"),
            "--no-progress"]
    assert cli.main(args) == 0
    assert f"{persons[785]} person, " in capsys.readouterr().out
    assert len(json.loads((tmp_path / "a.json").read_text())["people"]) == persons[785]

    renamed = tmp_path / "photo.jpg"
    shutil.copy(real["images"] / "000000196141.jpg", renamed)
    args[2], args[-4], args[-2] = str(renamed), str(tmp_path / "b.png"), str(tmp_path / "b.json")
    assert cli.main(args) == 2
    err = _error(capsys)
    assert "holds keypoint results of 4 images (image ids 785, 40083, 196141, 197388)" in err
    assert "pass --image-id" in err and not (tmp_path / "b.png").exists()
    assert cli.main(args + ["--image-id", "196141"]) == 0
    assert f"{persons[196141]} people, " in capsys.readouterr().out
    assert len(json.loads((tmp_path / "b.json").read_text())["people"]) == persons[196141]


def test_evaluate_without_detections_is_ap_zero_said_plainly(real, converted, tmp_path, capsys):
    """A pose estimator that found nobody writes `[]`: a valid input, every person missed."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert cli.main(["evaluate", "--annotations", str(real["annotations"]), "--images",
                     str(real["images"]), "--keypoints", str(empty), "--checkpoint",
                     str(converted), "--image-size", str(SIZE), "--out",
                     str(tmp_path / "r.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{empty} holds no poses of these images: no mask was made, every person is missed " \
           "(AP 0)" in printed
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == []
    coco = load_coco(real["annotations"])
    assert summary["metrics"]["AP"] == evaluate_segm(coco, [])["AP"] == 0.0


def test_evaluate_refuses_missing_photos_or_scores_only_those_present(real, converted, tmp_path,
                                                                      capsys):
    """A photo missing from --images is named before any work (the model is not even loaded:
    the checkpoint given does not exist); --skip-missing-images scores the 3 photos left, as
    COCOeval does on those 3 image ids, and the summary says so."""
    (real["images"] / "000000040083.jpg").unlink()
    args = ["evaluate", "--annotations", str(real["annotations"]), "--images",
            str(real["images"]), "--keypoints", str(real["results"]), "--image-size", str(SIZE),
            "--out", str(tmp_path / "r.json"), "--no-progress"]
    assert cli.main(args + ["--checkpoint", str(tmp_path / "not_there.pt")]) == 2
    err = _error(capsys)
    assert "1 image(s) of the ground truth cannot be read" in err
    assert "000000040083.jpg (image file not found)" in err and "--skip-missing-images" in err
    assert not (tmp_path / "r.json").exists()

    # a batch far larger than the photos is cut to them (it used to allocate 91.6 GiB)
    assert cli.main(args + ["--checkpoint", str(converted), "--skip-missing-images",
                            "--batch-size", "100000"]) == 0
    printed = capsys.readouterr().out
    assert "left out of the scoring (--skip-missing-images): AP is over 3 of 4 images" in printed
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert summary["scored_images"] == 3 and summary["settings"]["skip_missing_images"]
    coco = load_coco(real["annotations"])
    expected = evaluate_segm(coco, json.loads((tmp_path / "r.json").read_text()),
                             image_ids=[785, 196141, 197388])
    assert summary["metrics"]["AP"] == expected["AP"]


# ------------------------------------------------------------------------------ outputs


def test_no_command_writes_over_its_input_or_an_existing_output(real, converted, tmp_path,
                                                                capsys):
    keypoints = real["root"] / "keypoint_only.json"
    data = json.loads(real["annotations"].read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    keypoints.write_text(json.dumps(data))
    before = keypoints.read_bytes()
    annotate = ["annotate", "--keypoints", str(keypoints), "--images", str(real["images"]),
                "--checkpoint", str(converted), "--image-size", str(SIZE), "--no-progress"]
    assert cli.main(annotate + ["--out", str(keypoints), "--overwrite"]) == 2
    assert "is an input of this command" in _error(capsys)
    assert keypoints.read_bytes() == before
    evaluate = ["evaluate", "--annotations", str(real["annotations"]), "--images",
                str(real["images"]), "--gt-keypoints", "--checkpoint", str(converted),
                "--image-size", str(SIZE), "--no-progress"]
    assert cli.main(evaluate + ["--out", str(tmp_path / "r.json"), "--summary",
                                str(real["annotations"])]) == 2
    assert "--summary" in _error(capsys) and not (tmp_path / "r.json").exists()
    assert cli.main(["segment", "--image", str(real["images"] / "000000000785.jpg"),
                     "--keypoints", str(real["results"]), "--checkpoint", str(converted),
                     "--out", str(real["images"] / "000000000785.jpg")]) == 2
    assert "is an input" in _error(capsys)

    # an existing output: refused (naming --overwrite), before any work; replaced with it
    existing = tmp_path / "taken.json"
    existing.write_text("mine")
    assert cli.main(evaluate + ["--out", str(existing)]) == 2
    assert f"--out {existing} already exists (a file): pass --overwrite" in _error(capsys)
    assert existing.read_text() == "mine"
    assert cli.main(evaluate + ["--out", str(existing), "--overwrite"]) == 0
    assert json.loads(existing.read_text())
    capsys.readouterr()
    # a folder named as a file: refused before the run, nothing left behind
    folder = tmp_path / "folder"
    folder.mkdir()
    assert cli.main(evaluate + ["--out", str(folder)]) == 2
    assert f"--out {folder} is a folder: name a file" in _error(capsys)
    assert not list(tmp_path.glob(".*.tmp")) and not list(folder.iterdir())
    for args in (["prepare", "coco-persons", str(real["annotations"]), str(existing)],
                 ["init", "--model", "t", "--out", str(existing)],
                 ["convert", str(existing), str(folder.parent)]):
        assert cli.main(args) == 2
        assert "already exists" in _error(capsys)


def test_a_failed_annotate_leaves_nothing_and_checks_before_the_model(real, tmp_path, capsys):
    """A bad option is found before the model loads (the checkpoint does not even exist) and
    before any shard folder is made, so that the corrected command is not refused."""
    out = tmp_path / "annotated.json"
    args = ["annotate", "--keypoints", str(real["results"]), "--image-info",
            str(real["annotations"]), "--images", str(real["images"]), "--out", str(out),
            "--checkpoint", str(tmp_path / "not_there.pt"), "--no-progress"]
    assert cli.main(args + ["--score-type", "presence"]) == 2
    err = _error(capsys)
    assert "carry no 'presence' keypoint scores" in err and "--score-type" in err
    assert not out.with_name(out.name + ".shards").exists() and not out.exists()
    assert cli.main(args) == 2  # now the missing checkpoint is what stops it
    assert "not_there.pt" in _error(capsys)


def test_plain_keypoint_results_use_their_confidence_everywhere(real, converted, tmp_path,
                                                                capsys):
    """One rule for segment, evaluate and annotate: results without a visibility channel use
    the confidence (the s of [x, y, s]), and the command says so."""
    assert cli.main(["evaluate", "--annotations", str(real["annotations"]), "--images",
                     str(real["images"]), "--keypoints", str(real["results"]), "--checkpoint",
                     str(converted), "--image-size", str(SIZE), "--out",
                     str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert "keypoint scores: confidence" in capsys.readouterr().err
    summary = json.loads((tmp_path / "r.summary.json").read_text())
    assert summary["settings"]["keypoint_score"] == "confidence"
    out = tmp_path / "annotated.json"
    assert cli.main(["annotate", "--keypoints", str(real["results"]), "--image-info",
                     str(real["annotations"]), "--images", str(real["images"]), "--out",
                     str(out), "--checkpoint", str(converted), "--image-size", str(SIZE),
                     "--batch-size", "100000"]) == 0  # cut to the images of a shard
    captured = capsys.readouterr()
    assert "annotate" in captured.err and "evaluate" not in captured.err  # the bar's label
    assert json.loads(out.read_text())["annotations"]


USER_SAMPLER = """
from p2s_jax.train.samplers import register_sampler, sample_random_point_from_errors


@register_sampler("error_uniform_{tag}")
def error_uniform(key, gt_mask, pred_mask, keypoints, visibility, step):
    return sample_random_point_from_errors(key, gt_mask, pred_mask)
"""


def test_a_sampler_study_of_three_samplers_and_two_seeds_in_one_command(
        real, tmp_path, monkeypatch, capsys):
    """One `p2s curve`: the built-in center and PoseMaskRefine beside a user's sampler from a
    module outside the package, 2 seeds, on `p2s init`'s random weights (said once) with a
    progress bar; every reported number follows from the per-person IoUs it writes."""
    from p2s_jax.train.study import run_metrics

    weights = tmp_path / "random_t.pt"
    assert cli.main(["init", "--model", "t", "--image-size", str(SIZE), "--out",
                     str(weights)]) == 0
    assert "random weights" in capsys.readouterr().out
    tag = os.getpid()
    (tmp_path / f"my_samplers_{tag}.py").write_text(USER_SAMPLER.format(tag=tag))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study.png"
    samplers = ["center", "pose_mask_refine", f"error_uniform_{tag}"]
    assert cli.main(["curve", "--import", f"my_samplers_{tag}", "--annotations",
                     str(real["annotations"]), "--images", str(real["images"]), "--checkpoint",
                     f"t={weights}", "--image-size", str(SIZE), "--points", "3",
                     "--max-images", "2", "--max-people", "3", "--seeds", "2", "--out", str(out),
                     *[a for s in samplers for a in ("--sampler", s)]]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err.count("holds random weights (p2s init") == 1
    assert "curve: 100%" in captured.err and "2/2" in captured.err
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["points"] == 3 and out.stat().st_size > 1000
    assert [(r["sampler"], r["seed"]) for r in data["runs"]] == [
        ("center", 0), ("pose_mask_refine", 0), ("pose_mask_refine", 1),
        (samplers[2], 0), (samplers[2], 1)]
    persons = {(a["image_id"], a["id"]) for a in real["data"]["annotations"]}
    for run in data["runs"]:
        iou = np.asarray(run["iou"])
        assert iou.shape == (len(run["persons"]), 3) and len(run["persons"]) >= 4
        assert {tuple(p) for p in run["persons"]} <= persons
        again = run_metrics(iou)
        assert run["miou"] == pytest.approx(again["miou"]) and run["nof"] == again["nof"]
        assert run["noc"] == pytest.approx(again["noc"])
    table = out.with_suffix(".md").read_text()
    assert table in printed
    user = [r for r in data["runs"] if r["sampler"] == samplers[2]]
    at1 = [r["miou"][0] for r in user]
    assert f"| t | {samplers[2]} | 2 | {np.mean(at1):.3f} ± {np.std(at1):.3f} |" in table


def test_compare_two_real_summaries_and_refuse_anything_else(real, converted, tmp_path,
                                                             capsys):
    """`p2s compare` on the summaries of two `p2s evaluate` runs (detected and ground-truth
    keypoints): Table 1's columns as the summaries hold them; a file that is neither is
    refused in one line."""
    summaries = []
    for name, source in (("detected", ["--keypoints", str(real["results"])]),
                         ("gt", ["--gt-keypoints"])):
        assert cli.main(["evaluate", "--annotations", str(real["annotations"]), "--images",
                         str(real["images"]), *source, "--checkpoint", str(converted),
                         "--image-size", str(SIZE), "--out", str(tmp_path / f"{name}.json"),
                         "--no-progress"]) == 0
        summaries.append(tmp_path / f"{name}.summary.json")
    capsys.readouterr()
    assert cli.main(["compare", *map(str, summaries), "--out", str(tmp_path / "t.md")]) == 0
    printed = capsys.readouterr().out
    for path in summaries:
        metrics = json.loads(path.read_text())["metrics"]
        cells = ["-" if metrics[c] < 0 else f"{100 * metrics[c]:.1f}"
                 for c in ("AP", "AP50", "AP75", "APm", "APl")]
        row = f"| {path.name.removesuffix('.summary.json')} | summary | {' | '.join(cells)} |"
        assert row in printed and row in (tmp_path / "t.md").read_text()
    assert cli.main(["compare", str(summaries[0]), str(real["annotations"])]) == 2
    err = _error(capsys)
    assert f"{real['annotations']} is neither a p2s evaluate summary" in err


def test_persons_without_a_usable_keypoint_get_their_own_status(real, converted, tmp_path,
                                                                 capsys):
    """Under the preset a person without a gated keypoint is segmented from the empty prompt:
    status `empty_prompt` (not `ok`), left out of the training data by default."""
    from p2s_jax.data.builder import _annotated

    keypoints = real["root"] / "keypoint_only.json"
    data = json.loads(real["annotations"].read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    keypoints.write_text(json.dumps(data))
    out = tmp_path / "annotated.json"
    assert cli.main(["annotate", "--keypoints", str(keypoints), "--images", str(real["images"]),
                     "--out", str(out), "--checkpoint", str(converted), "--image-size",
                     str(SIZE), "--preset", "sam-pose2seg", "--no-progress"]) == 0
    assert "empty_prompt 2" in capsys.readouterr().out
    annotated = json.loads(out.read_text())["annotations"]
    without = {a["id"] for a in data["annotations"] if a["num_keypoints"] == 0}
    assert len(without) == 2
    for ann in annotated:
        assert (ann["p2s"]["status"] == "empty_prompt") == (ann["id"] in without)
        if ann["id"] in without:
            assert ann["p2s"]["prompt"][0][2] == -2 and "segmentation" in ann
    trained_on = _annotated(out, ("ok",))
    assert not without & set(trained_on.anns) and len(trained_on.anns) == len(annotated) - 2


def test_keypoint_names_of_no_schema_are_read_by_position_with_schema(real, converted,
                                                                        tmp_path, capsys):
    """A 17-keypoint file whose names fit no schema (k0 .. k16): refused naming --schema, read
    by position with --schema coco17 (the same result as the COCO names)."""
    data = json.loads(real["annotations"].read_text())
    data["categories"][0]["keypoints"] = [f"k{i}" for i in range(17)]
    custom = real["root"] / "custom.json"
    custom.write_text(json.dumps(data))
    args = ["evaluate", "--annotations", str(custom), "--images", str(real["images"]),
            "--gt-keypoints", "--checkpoint", str(converted), "--image-size", str(SIZE),
            "--no-progress"]
    assert cli.main(args + ["--out", str(tmp_path / "a.json")]) == 2
    assert "fit no known schema" in (err := _error(capsys)) and "--schema NAME" in err
    assert cli.main(args + ["--out", str(tmp_path / "a.json"), "--schema", "coco17"]) == 0
    assert cli.main(args[:2] + [str(real["annotations"])] + args[3:]
                    + ["--out", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    assert (json.loads((tmp_path / "a.json").read_text())
            == json.loads((tmp_path / "b.json").read_text()))


def test_malformed_inputs_are_one_line(real, converted, tmp_path, capsys):
    poses = tmp_path / "poses.json"
    poses.write_text(json.dumps([[[10, 20, 0.9]] * 17 + [[1, 2]]]))
    assert cli.main(["segment", "--image", str(real["images"] / "000000000785.jpg"),
                     "--keypoints", str(poses), "--checkpoint", str(converted), "--out",
                     str(tmp_path / "o.png")]) == 2
    assert "poses.json: person 0: keypoint 17 must be [x, y, score], got [1, 2] (2 numbers)" \
        in _error(capsys)
    assert cli.main(["evaluate", "--annotations", "a", "--images", "i", "--gt-keypoints",
                     "--checkpoint", "c", "--out", "o", "--batch-size", "-1"]) == 2
    assert _error(capsys).endswith("images_per_device must be >= 0 (0: the backend's default), "
                                   "got -1")
    not_a_checkpoint = tmp_path / "weights.pt"
    not_a_checkpoint.write_text("hello")
    assert cli.main(["convert", str(not_a_checkpoint), str(tmp_path / "c")]) == 2
    err = _error(capsys)
    assert "is not a PyTorch checkpoint (.pt)" in err and "weights_only" not in err


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA wheels are installed here")
def test_aot_for_a_gpu_without_the_cuda_wheels_says_what_to_install(capsys):
    gpu = SHARED_DATA / "gpu" / "h100_sxm.txtpb"
    target = str(gpu) if gpu.is_file() else __file__
    assert cli.main(["aot", "--target", "h100", "--gpu-target", target]) == 2
    err = _error(capsys)
    assert "pip install 'p2s_jax[cuda12]'" in err and "JAX_PLATFORMS=cpu" in err


# ------------------------------------------------------------------------------ signals


def _started(args, tmp_path, env=None) -> subprocess.Popen:
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "p2s_jax.cli", *args], env=environment,
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _many_photos(real, count: int) -> Path:
    """The annotation file with each photo listed `count / 4` times (new ids, same files)."""
    data = json.loads(real["annotations"].read_text())
    images, annotations = [], []
    for copy in range(count // 4):
        for image in data["images"]:
            images.append({**image, "id": image["id"] * 100 + copy})
        for ann in data["annotations"]:
            annotations.append({**ann, "id": ann["id"] * 100 + copy,
                                "image_id": ann["image_id"] * 100 + copy})
    path = real["root"] / "many.json"
    path.write_text(json.dumps({**data, "images": images, "annotations": annotations}))
    return path


def test_ctrl_c_and_sigterm_end_in_one_line_at_once(real, converted, tmp_path):
    """Ctrl-C in annotate after its first shard: one line saying what was kept, exit 130, and
    the same command resumes; SIGTERM in evaluate: one line, exit 143; no traceback, and
    each stops within seconds."""
    many = _many_photos(real, 48)
    out = tmp_path / "annotated.json"
    args = ["annotate", "--keypoints", str(many), "--images", str(real["images"]), "--out",
            str(out), "--checkpoint", str(converted), "--image-size", str(SIZE),
            "--shard-images", "4", "--no-progress"]
    proc = _started(args, tmp_path)
    shards = out.with_name(out.name + ".shards")
    deadline = time.time() + 300
    while not (shards / "000000.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 10
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("p2s annotate:")]
    assert line.startswith("p2s annotate: interrupted: ") and "shards finished and kept in" in line
    assert line.endswith("run the same command again to resume")
    done = len(list(shards.glob("0*.json")))
    assert 1 <= done < 12 and not out.exists()

    evaluate = _started(["evaluate", "--annotations", str(many), "--images",
                         str(real["images"]), "--gt-keypoints", "--checkpoint", str(converted),
                         "--image-size", str(SIZE), "--out", str(tmp_path / "r.json")],
                        tmp_path)
    deadline = time.time() + 300
    while True:  # the bar has started: the run is under way
        line = evaluate.stderr.readline()
        assert line and time.time() < deadline, "no progress bar"
        if line.startswith("evaluate:") or "evaluate:" in line:
            break
    evaluate.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = evaluate.communicate(timeout=60)
    assert time.time() - sent < 10
    assert evaluate.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ("p2s evaluate: interrupted (SIGTERM); nothing was "
                                            "written")
    assert not (tmp_path / "r.json").exists()
