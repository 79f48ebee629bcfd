"""The `p2s` command line: convert, evaluate and segment, with a random-weight official
checkpoint (SAM 2.1 tiny, saved as the official code saves it) and, for the download path, a
local HTTP server on 127.0.0.1 (no real host is ever contacted)."""

from __future__ import annotations

import functools
import sys
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from support import reference
from support.shared import coco_dataset, model_pair
from p2s_jax import cli
from p2s_jax.inference.weights import WEIGHTS_URL_ENV
from p2s_jax.inference.weights import HUB_WEIGHTS
from p2s_jax.utils.errors import InputError
from weights_conversion import VIDEO_MEMORY_PREFIXES, load_model

pytestmark = pytest.mark.skipif(not reference.reference_available(),
                                reason="needs torch, sam2 and hydra (the dev extra)")

MODEL, SIZE = "sam2.1_hiera_t", 256
SAM_POSE2SEG_FILENAME = HUB_WEIGHTS["sam-pose2seg"].filename

ASSETS = Path(cli.__file__).parents[1] / "assets"
EXAMPLE_IMAGE = ASSETS / "example.jpg"  # the README's main-job photo
EXAMPLE_KEYPOINTS = ASSETS / "example_keypoints.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An official-format `{'model': state_dict}` .pt with seeded random weights."""
    torch = reference.import_torch()
    official = model_pair(MODEL, SIZE)[0]
    path = tmp_path_factory.mktemp("ckpt") / SAM_POSE2SEG_FILENAME
    torch.save({"model": official.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "t"
    assert cli.main(["convert", str(checkpoint), str(out), "--image-size", str(SIZE)]) == 0
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return coco_dataset(tmp_path_factory.mktemp("coco"), 2, seed=5)


def _segment_args(tmp_path, *extra):
    return ["segment", "--image", str(EXAMPLE_IMAGE), "--keypoints",
            str(EXAMPLE_KEYPOINTS), "--out", str(tmp_path / "overlay.png"),
            "--masks-out", str(tmp_path / "masks.json"), "--image-size", str(SIZE),
            "--no-progress", *extra]


# ------------------------------------------------------------------------------ convert


def test_convert(converted, checkpoint, capsys):
    official = model_pair(MODEL, SIZE)[0]
    video = [k for k in official.state_dict() if k.startswith(VIDEO_MEMORY_PREFIXES)]
    assert cli.main(["convert", str(checkpoint), str(converted.parent / "again"),
                     "--image-size", str(SIZE)]) == 0
    printed = capsys.readouterr().out
    assert f"ignored {len(video)} video-memory tensors" in printed and "sam2.1_hiera_t" in printed
    ours = model_pair(MODEL, SIZE)[1]
    loaded = load_model(converted)
    np.testing.assert_array_equal(np.asarray(loaded.no_mem_embed[...]),
                                  np.asarray(ours.no_mem_embed[...]))
    assert loaded.config.image_size == SIZE


def test_convert_errors_are_one_line(checkpoint, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    cases = [([str(tmp_path / "missing.pt")], "does not exist"),
             ([str(corrupt)], "truncated or corrupt"),
             ([str(checkpoint), "--model", "b+"], "is a sam2.1_hiera_t checkpoint")]
    for args, reason in cases:
        assert cli.main(["convert", args[0], str(tmp_path / "out"), *args[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("p2s convert: error: ") and reason in err
        assert len(err.splitlines()) == 1


# ------------------------------------------------------------------------------ segment


def test_segment_example(converted, tmp_path, capsys):
    assert cli.main(_segment_args(tmp_path, "--checkpoint", str(converted))) == 0
    assert "1 person, 1 mask (confidence scores, maxvis_3)" in capsys.readouterr().out
    photo = Image.open(EXAMPLE_IMAGE)
    overlay = Image.open(tmp_path / "overlay.png")
    assert overlay.format == "PNG" and overlay.size == photo.size and overlay.mode == "RGB"
    assert np.any(np.asarray(overlay) != np.asarray(photo.convert("RGB")))
    saved = json.loads((tmp_path / "masks.json").read_text())
    assert (saved["height"], saved["width"]) == (photo.height, photo.width)
    (person,) = saved["people"]
    # MaxVis_3 on the hand-placed example: nose (0.98), then both eyes (0.97, lower index first).
    assert person["prompt"] == [[225.0, 127.0, 1], [246.0, 102.0, 1], [202.0, 101.0, 1]]
    mask = mask_utils.decode(person["segmentation"])
    assert mask.shape == (photo.height, photo.width)


def test_segment_matches_predictor(converted, tmp_path):
    """The CLI's masks are the Predictor's for the chosen prompts."""
    from p2s_jax.utils.images import load_image
    from p2s_jax.inference.predictor import Predictor

    assert cli.main(_segment_args(tmp_path, "--checkpoint", str(converted), "--selection",
                                  "maxspread", "--num-points", "4")) == 0
    saved = json.loads((tmp_path / "masks.json").read_text())
    (person,) = saved["people"]
    assert len(person["prompt"]) == 4
    predictor = Predictor.from_checkpoint(converted)
    predictor.set_image(load_image(EXAMPLE_IMAGE))
    points = np.asarray(person["prompt"])
    expected = predictor.predict(point_coords=points[None, :, :2],
                                 point_labels=points[None, :, 2].astype(np.int32))
    np.testing.assert_array_equal(mask_utils.decode(person["segmentation"]).astype(bool),
                                  expected.masks[0, 0])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(checkpoint):
    """Serves the checkpoint's folder on 127.0.0.1; yields (url, requests, stop)."""
    requests = []

    class Handler(_QuietHandler):
        def do_GET(self):  # noqa: N802
            requests.append(self.path)
            super().do_GET()

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Handler, directory=str(checkpoint.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{SAM_POSE2SEG_FILENAME}"

    def stop():
        server.shutdown()
        server.server_close()

    yield url, requests, stop
    if thread.is_alive():
        stop()


def test_segment_downloads_and_converts_once(weights_server, tmp_path, monkeypatch, capsys):
    url, requests, stop = weights_server
    cache = tmp_path / "cache"
    monkeypatch.setenv("P2S_CACHE", str(cache))
    monkeypatch.setenv(WEIGHTS_URL_ENV, url)
    assert cli.main(_segment_args(tmp_path)) == 0
    assert requests == [f"/{SAM_POSE2SEG_FILENAME}"]
    converted = cache / Path(SAM_POSE2SEG_FILENAME).stem
    assert (converted / "p2s_model.json").is_file() and (cache / SAM_POSE2SEG_FILENAME).is_file()
    assert not list(cache.glob("*.converting-*")) and not list(cache.glob(".*.download"))
    first = (tmp_path / "masks.json").read_text()

    stop()  # the second run must not need the network
    assert cli.main(_segment_args(tmp_path, "--overwrite")) == 0
    assert requests == [f"/{SAM_POSE2SEG_FILENAME}"]
    assert (tmp_path / "masks.json").read_text() == first
    capsys.readouterr()


def test_segment_offline_says_what_to_download(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    monkeypatch.setenv("P2S_CACHE", str(cache))
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}/{SAM_POSE2SEG_FILENAME}")
    assert cli.main(_segment_args(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2s segment: error: could not download")
    assert str(cache / SAM_POSE2SEG_FILENAME) in err and "--checkpoint" in err


def test_segment_input_errors(converted, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[[1, 2, 3]]")
    args = _segment_args(tmp_path, "--checkpoint", str(converted))
    args[args.index("--keypoints") + 1] = str(bad)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "bad.json: 1 keypoints per person fit no schema" in err
    bad.write_text(json.dumps([[[10, 10, 1]] * 14]))  # CrowdPose or AI Challenger?
    assert cli.main(args) == 2
    assert "14 keypoints per person fit several schemas ['crowdpose14', 'aic14']; name one " \
        "(--schema)" in capsys.readouterr().err
    bad.write_text(json.dumps([[[10, 10, 1]] * 17, [[10, 10, 1]] * 14]))
    assert cli.main(args) == 2
    assert "persons carry different numbers of keypoints (17 for person 0, 14 for person 1)" \
        in capsys.readouterr().err
    args[args.index("--image") + 1] = str(tmp_path / "missing.jpg")
    assert cli.main(args) == 2
    assert "missing.jpg: image file not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------ evaluate


def test_evaluate(converted, dataset, tmp_path, capsys):
    annotations, images, detections = dataset
    out = tmp_path / "results.json"
    assert cli.main(["evaluate", "--annotations", str(annotations), "--images", str(images),
                     "--keypoints", str(detections), "--checkpoint", str(converted),
                     "--selection", "maxvis", "--num-points", "3", "--coco-star",
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "COCO* segm AP (person)" in printed and "AP50" in printed
    results = json.loads(out.read_text())
    assert results and all(set(r) == {"image_id", "category_id", "segmentation", "score"}
                           for r in results)
    summary = json.loads((tmp_path / "results.summary.json").read_text())
    settings = summary["settings"]
    assert settings["coco_star"] is True and settings["result_score"] == "product"
    assert settings["prompt"]["selection"] == "maxvis" and settings["prompt"]["num_points"] == 3
    assert settings["model"] == MODEL and settings["image_size"] == SIZE
    assert set(summary["metrics"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert summary["report"]["num_results"] == len(results)


def test_evaluate_ground_truth_keypoints(converted, dataset, tmp_path, capsys):
    annotations, images, _ = dataset
    summary = tmp_path / "summary.json"
    assert cli.main(["evaluate", "--annotations", str(annotations), "--images", str(images),
                     "--gt-keypoints", "--checkpoint", str(converted), "--out",
                     str(tmp_path / "r.json"), "--summary", str(summary), "--no-progress"]) == 0
    settings = json.loads(summary.read_text())["settings"]
    assert settings["keypoints"] == "ground truth"
    assert settings["prompt"]["selection"] == "maxspread"  # the paper's rule for GT poses
    capsys.readouterr()


def test_evaluate_errors(converted, dataset, tmp_path, capsys):
    annotations, images, detections = dataset
    broken = tmp_path / "gt.json"
    broken.write_text("{\"images\": [")
    assert cli.main(["evaluate", "--annotations", str(broken), "--images", str(images),
                     "--keypoints", str(detections), "--checkpoint", str(converted),
                     "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2s evaluate: error: ") and "gt.json: invalid JSON" in err
    with pytest.raises(SystemExit) as exit_info:  # neither --keypoints nor --gt-keypoints
        cli.main(["evaluate", "--annotations", str(annotations), "--images", str(images),
                  "--checkpoint", str(converted), "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    capsys.readouterr()


def test_only_the_projects_errors_become_one_line(monkeypatch, capsys, tmp_path):
    """An input error is one line and exit 2; any other exception (a bug) keeps its traceback."""

    def bad_input(args):
        raise InputError("first line\ndetail 1\ndetail 2")

    def bug(args):
        raise ValueError("a bug")

    args = ["convert", str(tmp_path / "x.pt"), str(tmp_path / "out")]
    monkeypatch.setitem(cli.COMMANDS, "convert", bad_input)
    assert cli.main(args) == 2
    assert capsys.readouterr().err == "p2s convert: error: first line detail 1; detail 2\n"
    monkeypatch.setitem(cli.COMMANDS, "convert", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(args)


def test_ctrl_c_inside_a_jit_dispatch_is_still_one_line(monkeypatch, capsys, tmp_path):
    """A real SIGINT delivered while JAX compares a jitted function's static arguments: JAX
    re-raises the KeyboardInterrupt as a ValueError that keeps only its text, and the command
    still ends with the one interrupt line and exit 130 (the signal's record, not the
    exception's type, says it was interrupted); the next bug keeps its traceback."""
    import os
    import signal

    import jax
    import jax.numpy as jnp

    class Static:
        def __init__(self, interrupt):
            self.interrupt = interrupt

        def __hash__(self):
            return 0

        def __eq__(self, other):
            if self.interrupt or other.interrupt:
                os.kill(os.getpid(), signal.SIGINT)
            return True

    add_one = jax.jit(lambda x, static: x + 1, static_argnums=1)
    add_one(jnp.ones(2), Static(False))
    seen = []

    def interrupted_in_jax(args):
        try:
            add_one(jnp.ones(2), Static(True))
        except BaseException as err:
            seen.append(type(err))
            raise

    args = ["convert", str(tmp_path / "x.pt"), str(tmp_path / "out")]
    monkeypatch.setitem(cli.COMMANDS, "convert", interrupted_in_jax)
    assert cli.main(args) == 130
    assert seen == [ValueError]  # what JAX makes of it; if JAX keeps it, this test has no case
    assert capsys.readouterr().err == "p2s convert: interrupted (SIGINT); nothing was written\n"
    monkeypatch.setitem(cli.COMMANDS, "convert", lambda args: int("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(args)


def test_generated_data_without_scikit_image_says_what_to_install(monkeypatch, tmp_path, capsys):
    for name in ("skimage", "skimage.data", "skimage.measure"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    assert cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "tiny"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2s train: error: ") and "pip install scikit-image" in err
    assert len(err.strip().splitlines()) == 1


def _settings(*flags, command="evaluate"):
    required = (["--annotations", "a", "--images", "i", "--keypoints", "k", "--checkpoint", "c",
                 "--out", "o"] if command == "evaluate" else
                ["--image", "i", "--keypoints", "k", "--out", "o"])
    args = cli.build_parser().parse_args([command, *required, *flags])
    return cli.inference_config(args, ground_truth=False)


def test_preset_and_flags_beside_it(monkeypatch):
    from p2s_jax.evaluation import presets
    from p2s_jax.evaluation.config import EvalConfig
    from p2s_jax.inference.postprocess import MaskPostprocess
    from p2s_jax.inference.prompting import PromptConfig

    assert _settings("--preset", "sam-pose2seg") == presets.settings("sam-pose2seg")
    plain = _settings()
    assert plain == EvalConfig()  # no preset: the project's defaults
    tuned = _settings("--preset", "sam-pose2seg", "--no-exclusive", "--max-hole-area", "0",
                      "--result-score", "product", "--num-points", "4", "--no-prompt", "skip")
    assert not tuned.exclusive and tuned.postprocess == MaskPostprocess(0.0, 50.0)
    assert tuned.result_score == "product" and tuned.confidence_score == "confidence"
    assert (tuned.prompt.num_points, tuned.prompt.no_prompt) == (4, "skip")
    gt_box = _settings("--box", "gt")
    assert (gt_box.prompt.box, gt_box.box_source) == ("given", "gt")
    inflated = _settings("--box", "inflated-gt", "--preset", "sam2.1")
    assert (inflated.prompt.box, inflated.box_source) == ("inflated", "gt")
    assert (inflated.prompt.selection, inflated.prompt.num_points) == ("maxspread", 6)
    with pytest.raises(InputError, match="--box gt needs the ground truth"):
        _settings("--box", "gt", command="segment")
    # a flag that is not given leaves the preset's value, whatever the flag's own default
    odd = EvalConfig(prompt=PromptConfig(spread_percentile=50.0, negatives="closest_other",
                                         num_negatives=2, box="given", box_inflation=3.0),
                     box_source="gt")
    monkeypatch.setitem(presets.PRESETS, "odd", {"detected": odd, "ground_truth": odd})
    assert presets.settings("odd") == odd
    args = cli.build_parser().parse_args(["segment", "--image", "i", "--keypoints", "k", "--out",
                                          "o", "--preset", "odd"])
    assert cli.inference_config(args, ground_truth=False) == odd
    assert _settings("--preset", "odd", "--spread-percentile", "none").prompt.spread_percentile \
        is None
