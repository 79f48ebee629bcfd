"""`p2s review`: the review page of real annotate output in headless Chromium (the cards against
the file, worst first, decisions with the keys, kept over a reload, exported), the decisions
applied as a curated file that training's default filter honours, for two skeletons; an error
analysis of evaluate results against pycocotools' mask IoU; crops made in worker processes equal
those made in one; the page served over HTTP; a stopped page resumed; the refusals of --apply."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from support.browser import chromium, wait_for
from support.shared import REAL_COCO
from support.skeletons import as_crowdpose
from p2s_jax import cli
from p2s_jax.data.builder import generate_examples
from p2s_jax.data.coco import load_coco
from p2s_jax.data.config import DataConfig
from p2s_jax.review import cards as cards_lib
from p2s_jax.review.crops import TRUTH_COLOUR, crop_path, draw_card
from p2s_jax.review.page import write_page
from p2s_jax.utils.download import sha256_file
from p2s_jax.utils.images import load_image
from weights_conversion import write_random_checkpoint

pytestmark = pytest.mark.skipif(not (REAL_COCO / "test_coco.json").is_file(),
                                reason=f"the real COCO sample is not at {REAL_COCO}")
MODEL, SIZE = "t", 256


def _keypoint_only(skeleton: str) -> dict:
    """The published persons with keypoints, masks and boxes removed, in `skeleton`."""
    data = json.loads((REAL_COCO / "test_coco.json").read_text())
    data["annotations"] = [{k: v for k, v in a.items() if k not in ("segmentation", "area",
                                                                     "bbox")}
                           for a in data["annotations"] if a.get("num_keypoints", 0) > 0]
    return as_crowdpose(data) if skeleton == "crowdpose14" else data


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """skeleton -> (root, annotate output) of the real photos, t at 256 with random weights."""
    root = tmp_path_factory.mktemp("review")
    checkpoint = write_random_checkpoint(MODEL, root / "random_t.pt", SIZE, seed=0)
    out = {}
    for skeleton in ("coco17", "crowdpose14"):
        keypoints = root / f"{skeleton}_keypoints.json"
        keypoints.write_text(json.dumps(_keypoint_only(skeleton)))
        annotated = root / f"{skeleton}_annotated.json"
        assert cli.main(["annotate", "--keypoints", str(keypoints), "--images", str(REAL_COCO),
                         "--out", str(annotated), "--checkpoint", str(checkpoint),
                         "--image-size", str(SIZE), "--min-iou", "0.5", "--no-progress"]) == 0
        out[skeleton] = annotated
    return root, out


def _worst_first(annotated: Path) -> list[str]:
    """The annotation ids a page must show, worst predicted IoU first (ties: by id)."""
    anns = json.loads(annotated.read_text())["annotations"]
    kept = [a for a in anns if a["p2s"]["status"] not in ("no_prompt", "missing_image")]
    return [str(a["id"]) for a in sorted(kept, key=lambda a: (a["p2s"]["predicted_iou"],
                                                              a["id"]))]


def _card_ids(driver) -> list[str]:
    return [e.get_attribute("data-ann-id") for e in driver.find_elements("css selector", ".card")]


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


@pytest.mark.parametrize("skeleton", ["coco17", "crowdpose14"])
def test_decide_with_the_keyboard_export_apply_and_train_without_the_rejected(
        annotated, skeleton, tmp_path, capsys):
    root, files = annotated
    source = files[skeleton]
    page = tmp_path / "page"
    assert cli.main(["review", str(source), "--images", str(REAL_COCO), "--out", str(page),
                     "--workers", "2", "--no-progress"]) == 0
    expected = _worst_first(source)
    assert len(expected) >= 10 and {p.name for p in page.iterdir()} >= {
        "index.html", "review.js", "review.css", "data.js", "crops"}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with chromium(downloads) as driver:
        driver.get(page.joinpath("index.html").as_uri())
        wait_for(driver, "return window.P2S_READY_MS")
        assert _card_ids(driver) == expected  # every predicted person, worst first
        assert _text(driver, "total") == str(len(expected)) and _text(driver, "reviewed") == "0"
        broken = driver.execute_script(
            "return [...document.images].filter(i => i.complete && !i.naturalWidth).length")
        assert broken == 0
        body = driver.find_element("tag name", "body")
        for key in "rrau" + "a":  # reject, reject, accept, undo it, accept again
            body.send_keys(key)
        assert _text(driver, "reviewed") == "3" and _text(driver, "rejected") == "2"
        driver.refresh()  # the decisions live in the browser's storage
        wait_for(driver, "return window.P2S_READY_MS")
        classes = {e.get_attribute("data-ann-id"): e.get_attribute("class").split()
                   for e in driver.find_elements("css selector", ".card")}
        assert [d for i in expected[:4] for d in ("accept", "reject") if d in classes[i]] == [
            "reject", "reject", "accept"]
        driver.find_element("id", "export").click()
        exported = downloads / "decisions.json"
        _wait_file(exported)
    decisions = json.loads(exported.read_text())
    assert decisions == {"source": source.name, "fingerprint": "sha256:" + sha256_file(source),
                         "decisions": {expected[0]: "reject", expected[1]: "reject",
                                       expected[2]: "accept"}}
    curated = tmp_path / "curated.json"
    capsys.readouterr()
    assert cli.main(["review", str(source), "--apply", str(exported), "--out",
                     str(curated)]) == 0
    assert "1 accepted, 2 rejected" in capsys.readouterr().out
    before, after = (json.loads(p.read_text()) for p in (source, curated))
    assert [a["id"] for a in after["annotations"]] == [a["id"] for a in before["annotations"]]
    for old, new in zip(before["annotations"], after["annotations"]):
        decided = decisions["decisions"].get(str(old["id"]))
        p2s = dict(new["p2s"])
        assert p2s.pop("review", None) == decided
        if decided == "reject":
            assert p2s.pop("status") == "rejected"
            assert p2s.pop("status_before_review") == old["p2s"]["status"]
            p2s["status"] = old["p2s"]["status"]
        assert {**new, "p2s": p2s} == old  # nothing else changes
    kept = {int(i) for _, record in generate_examples(
        curated, REAL_COCO, statuses=DataConfig().statuses, schema=skeleton)
        for i in record["annotation_id"]}
    ok = {a["id"] for a in before["annotations"] if a["p2s"]["status"] == "ok"}
    assert kept == ok - {int(expected[0]), int(expected[1])} and int(expected[2]) in kept


def _wait_file(path: Path, timeout: float = 20.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and path.stat().st_size:
            return True
        time.sleep(0.1)
    raise AssertionError(f"{path} was not downloaded")


def test_a_hundred_thousand_cards_open_and_page(tmp_path):
    """A generated page of 100k cards (no crops: the numbers are the page's own work): every
    card is counted, the first page is the worst, the filters and the last page work."""
    rng = np.random.default_rng(0)
    count = 100_000
    iou = np.round(rng.random(count), 4)
    order = np.lexsort((np.arange(count), iou))
    data = {"source": "generated.json", "fingerprint": "sha256:0", "mode": "annotate",
            "schema": "coco17", "labels": {"iou": "predicted IoU", "score": "object score"},
            "crop_size": 256, "statuses": ["low_iou", "ok"], "files": ["a.jpg"], "left_out": {},
            "cards": {"id": (order + 1).tolist(), "image": (order // 3 + 1).tolist(),
                      "file": [0] * count, "status": (iou[order] >= 0.5).astype(int).tolist(),
                      "iou": iou[order].tolist(), "score": [1.0] * count}}
    page = tmp_path / "page"
    page.mkdir()
    (page / "data.js").write_text("window.P2S_REVIEW = " + json.dumps(data) + ";\n")
    for name in ("index.html", "review.js", "review.css"):
        shutil.copyfile(Path(cards_lib.__file__).with_name("assets") / name, page / name)
    with chromium(tmp_path) as driver:
        driver.get(page.joinpath("index.html").as_uri())
        wait_for(driver, "return window.P2S_READY_MS")
        assert _text(driver, "total") == "100000"
        shown = _card_ids(driver)
        assert len(shown) == 48 and shown == [str(i + 1) for i in order[:48]]
        assert "page 1 / 2084" in _text(driver, "page")
        driver.find_element("id", "status").send_keys("low_iou")
        low = int((iou < 0.5).sum())
        assert f"({low} shown)" in _text(driver, "page")
        body = driver.find_element("tag name", "body")
        body.send_keys("n")
        assert _card_ids(driver) == [str(i + 1) for i in order[48:96]]
        driver.find_element("id", "status").send_keys("all")
        for box, value in (("iou-min", "0.25"), ("iou-max", "0.3")):
            field = driver.find_element("id", box)
            field.clear()
            field.send_keys(value + "\n")
        driver.execute_script("document.getElementById('iou-max').dispatchEvent("
                              "new Event('change'))")
        inside = order[(iou[order] >= 0.25) & (iou[order] <= 0.3)]
        assert f"({len(inside)} shown)" in _text(driver, "page")
        assert _card_ids(driver) == [str(i + 1) for i in inside[:48]]
        wanted = int(inside[200] // 3 + 1)  # the image of a card on page 5
        field = driver.find_element("id", "image-id")
        field.send_keys(str(wanted) + "\n")
        current = driver.find_element("css selector", ".card.current")
        position = next(k for k, i in enumerate(inside) if i // 3 + 1 == wanted)
        assert current.get_attribute("data-ann-id") == str(inside[position] + 1)
        assert f"page {position // 48 + 1} / " in _text(driver, "page")


def test_error_analysis_cards_are_persons_ranked_by_their_mask_iou(tmp_path):
    """Results made from the published masks (one eroded, one missing, one matching nobody):
    each card's IoU is pycocotools' IoU of the matched pair, missing persons score 0, and the
    crop draws the ground truth's outline."""
    gt_path = REAL_COCO / "test_coco.json"
    coco = load_coco(gt_path)
    persons = [a for a in coco.loadAnns(coco.getAnnIds(iscrowd=False))]
    results, eroded, dropped = [], persons[0]["id"], persons[1]["id"]
    for ann in persons:
        mask = coco.annToMask(ann).astype(bool)
        if ann["id"] == dropped:
            continue
        if ann["id"] == eroded:
            mask[: mask.shape[0] // 2] = False
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        results.append({"image_id": ann["image_id"], "category_id": 1, "score": 0.9,
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    stray = np.zeros_like(coco.annToMask(persons[0]), np.uint8)
    stray[:5, :5] = 1
    rle = mask_utils.encode(np.asfortranarray(stray))
    results.append({"image_id": persons[0]["image_id"], "category_id": 1, "score": 0.1,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))
    review = cards_lib.read_review(results_path, gt_path)
    assert review.mode == "evaluate" and len(review.cards) == len(persons)
    assert review.left_out == {"results matching no person": 1}
    by_id = {c.ann_id: c for c in review.cards}
    assert by_id[dropped].status == "missed" and by_id[dropped].iou == 0.0
    truth = coco.annToRLE(coco.anns[eroded])
    expected = float(mask_utils.iou([by_id[eroded].mask], [truth], [0])[0, 0])
    assert by_id[eroded].iou == pytest.approx(expected) and 0 < expected < 0.9
    assert all(c.iou == pytest.approx(1.0) for c in review.cards if c.ann_id not in (
        eroded, dropped))
    assert [c.ann_id for c in review.cards[:2]] == [dropped, eroded]
    card = by_id[eroded]
    photo = load_image(REAL_COCO / review.files[card.image_id])
    picture = np.asarray(draw_card(photo, card, review.schema.skeleton, 17, 128))
    assert max(picture.shape[:2]) == 128
    assert (picture == TRUTH_COLOUR).all(-1).sum() > 50  # the ground truth's outline
    with pytest.raises(Exception, match="results list .*--annotations"):
        cards_lib.read_review(results_path)
    write_page(review, REAL_COCO, tmp_path / "errors", workers=0, progress=False)
    data = json.loads((tmp_path / "errors" / "data.js").read_text()
                      .removeprefix("window.P2S_REVIEW = ").rstrip(";\n"))
    assert data["mode"] == "evaluate" and data["cards"]["id"][:2] == [dropped, eroded]
    assert data["labels"]["iou"] == "IoU with ground truth"
    with _served(tmp_path / "errors") as address, chromium(tmp_path) as driver:
        driver.get(address + "index.html")  # as `python -m http.server` serves the folder
        wait_for(driver, "return window.P2S_READY_MS")
        shown = _card_ids(driver)
        assert shown == [str(c.ann_id) for c in review.cards][:48]
        wait_for(driver, "const all = [...document.images];"
                 "return all.length && all.every(i => i.complete) || null")
        sizes = driver.execute_script("return [...document.images].map(i => i.naturalWidth)")
        assert len(sizes) == len(shown) and min(sizes) > 0  # every crop came over HTTP


@contextlib.contextmanager
def _served(folder: Path):
    """`folder` served over HTTP on a free local port -> its address."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_match_takes_the_pair_of_highest_iou_first():
    """Two results over two persons: the greedy pairing by IoU, against brute force over the
    four masks (pycocotools' IoU)."""
    def rle(x0, x1):
        mask = np.zeros((10, 10), np.uint8)
        mask[:, x0:x1] = 1
        return mask_utils.encode(np.asfortranarray(mask))

    truths = [{"segmentation": rle(0, 4)}, {"segmentation": rle(3, 10)}]
    results = [{"segmentation": rle(0, 5)}, {"segmentation": rle(2, 9)}]
    iou = mask_utils.iou([r["segmentation"] for r in results],
                         [t["segmentation"] for t in truths], [0, 0])
    assert cards_lib.match(results, truths) == [(0, pytest.approx(iou[0, 0])),
                                                (1, pytest.approx(iou[1, 1]))]
    assert cards_lib.match([], truths) == [(None, 0.0), (None, 0.0)]


def test_crops_in_worker_processes_equal_those_of_one_and_a_stopped_page_resumes(
        annotated, tmp_path, capsys):
    _, files = annotated
    review = cards_lib.read_review(files["coco17"]).select(worst=6)
    assert [str(c.ann_id) for c in review.cards] == _worst_first(files["coco17"])[:6]
    one, two = tmp_path / "one", tmp_path / "two"
    write_page(review, REAL_COCO, one, workers=0, progress=False)
    write_page(review, REAL_COCO, two, workers=2, progress=False)
    for index in range(6):
        assert crop_path(one, index).read_bytes() == crop_path(two, index).read_bytes()
    # a run stopped after three crops: its staging folder is resumed, the rest made
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed.with_name("resumed.partial"))
    for index in range(3, 6):
        crop_path(resumed.with_name("resumed.partial"), index).unlink()
    lines = write_page(review, REAL_COCO, resumed, workers=0, progress=False)
    assert lines[0].startswith("resuming") and "crops: 3 made" in lines[2]
    assert all(crop_path(resumed, i).read_bytes() == crop_path(one, i).read_bytes()
               for i in range(6))
    data = json.loads((one / "data.js").read_text().removeprefix("window.P2S_REVIEW = ")
                      .rstrip(";\n"))
    assert data["cards"]["id"] == [c.ann_id for c in review.cards]
    assert data["left_out"]["not selected"] == len(_worst_first(files["coco17"])) - 6


def test_status_filter_and_refusals_of_apply(annotated, tmp_path, capsys):
    _, files = annotated
    source = files["coco17"]
    data = json.loads(source.read_text())
    statuses = {a["p2s"]["status"] for a in data["annotations"]}
    status = sorted(statuses)[0]
    review = cards_lib.read_review(source).select(statuses=(status,))
    assert {c.status for c in review.cards} == {status}
    with pytest.raises(Exception, match="--status rejected: no card"):
        cards_lib.read_review(source).select(statuses=("rejected",))
    first = data["annotations"][0]["id"]

    def apply(decisions, out="curated.json", *extra):
        path = tmp_path / "decisions.json"
        path.write_text(json.dumps(decisions))
        capsys.readouterr()
        code = cli.main(["review", str(source), "--apply", str(path), "--out",
                         str(tmp_path / out), *extra])
        return code, capsys.readouterr().err.strip()

    code, err = apply({"fingerprint": "sha256:" + "0" * 64, "source": "other.json",
                       "decisions": {str(first): "reject"}})
    assert code == 2 and "made for another file (other.json" in err and len(err.splitlines()) == 1
    code, err = apply({"decisions": {"123456789": "reject"}})
    assert code == 2 and "1 annotation ids that" in err and "123456789" in err
    code, err = apply({"decisions": {str(first): "maybe"}})
    assert code == 2 and "'maybe'" in err
    assert apply({"decisions": {str(first): "reject"}})[0] == 0  # by hand: decisions alone
    curated = json.loads((tmp_path / "curated.json").read_text())
    assert curated["annotations"][0]["p2s"]["status"] == "rejected"
    code, err = apply({"decisions": {str(first): "accept"}})
    assert code == 2 and "already exists" in err
    assert cli.main(["review", str(source), "--apply", str(tmp_path / "decisions.json"),
                     "--out", str(source), "--overwrite"]) == 2
    assert "is an input of this command" in capsys.readouterr().err


def test_fiftyone_importer_reads_the_annotate_output(annotated):
    """Where fiftyone is installed: its COCO importer (the parsing `Dataset.from_dir` runs) puts
    the `p2s` record on each detection and decodes the RLE mask (docs/annotate.md)."""
    coco_importer = pytest.importorskip("fiftyone.utils.coco")
    _, files = annotated
    _, classes, _, images, objects = coco_importer.load_coco_detection_annotations(
        str(files["coco17"]), extra_attrs=True)
    data = json.loads(files["coco17"].read_text())
    by_id = {a["id"]: a for a in data["annotations"]}
    seen = 0
    for image_id, found in objects.items():
        info = images[image_id]
        for obj in found:
            detection = obj.to_detection((info["width"], info["height"]), classes,
                                         load_segmentation=True)
            assert detection["p2s"] == by_id[obj.id]["p2s"]
            assert detection.mask.sum() == pytest.approx(by_id[obj.id]["area"], rel=0.05)
            seen += 1
    assert seen == len(data["annotations"])
