"""What a user brings goes through every command exactly: the data a run names is the data it
trains on (records made again when their files or settings change), a module of one's own is
imported by every command that reads a sampler or schema name, and bad input ends in one line
that names the problem. Each case runs the CLI as a user does, on generated COCO-format files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from support.shared import coco_dataset
from p2s_jax import cli
from p2s_jax.train import loop
from p2s_jax.data.builder import load_source
from p2s_jax.train.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def annotated(tmp_path):
    """Generated persons as `p2s annotate` writes them: every person with a `p2s.status`, the
    first one `low_iou`."""
    annotations, images, _ = coco_dataset(tmp_path / "raw", 3, seed=4)
    data = json.loads(Path(annotations).read_text())
    for index, ann in enumerate(data["annotations"]):
        ann["p2s"] = {"status": "low_iou" if index == 0 else "ok"}
    path = tmp_path / "annotated.json"
    path.write_text(json.dumps(data))
    return {"path": path, "images": Path(images), "data": data, "tfds": tmp_path / "tfds"}


def _prepare_args(annotated, workdir, *overrides):
    return ["prepare", "train-data", "--config", "tiny", "--workdir", str(workdir),
            f"data.annotations={annotated['path']}", f"data.images={annotated['images']}",
            "data.custom_name=mine", f"data.data_dir={annotated['tfds']}", "data.manual_dir=/",
            *overrides]


def _trained_ids(annotated) -> list[int]:
    source = load_source(annotated["tfds"], "mine")
    return sorted(int(i) for k in range(len(source)) for i in source[k]["annotation_id"])


def _ids(data, statuses=("ok",)) -> list[int]:
    return sorted(a["id"] for a in data["annotations"] if a["p2s"]["status"] in statuses)


def test_the_named_file_is_the_data_and_its_changes_make_the_records_again(annotated, tmp_path,
                                                                          capsys):
    """The tiny preset with the keys docs/annotate.md gives: the user's file, not the preset's
    generated images; re-annotating the file, widening data.statuses or touching a photo makes
    the records again, saying which; unchanged inputs reuse them."""
    workdir = tmp_path / "run"
    args = _prepare_args(annotated, workdir)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"training data: 3 records, 'mine' from data.annotations {annotated['path']} " \
           "(statuses ok)" in out, out
    assert not (workdir / "synthetic").exists()
    assert _trained_ids(annotated) == _ids(annotated["data"])

    assert cli.main(args) == 0  # the same files and settings: the records are reused
    assert "preparing" not in capsys.readouterr().out

    data = annotated["data"]  # annotated again into the same file: one more person is low_iou
    data["annotations"][1]["p2s"]["status"] = "low_iou"
    annotated["path"].write_text(json.dumps(data))
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "the records 'mine' under" in out and "were made from other data (data.annotations " \
        f"{annotated['path']}: another file (sha256 " in out and "preparing them again" in out
    assert _trained_ids(annotated) == _ids(data)

    assert cli.main(args + ['data.statuses=["ok","low_iou"]']) == 0
    out = capsys.readouterr().out
    assert "(data.statuses ['ok'] -> ['low_iou', 'ok']): preparing them again" in out, out
    assert _trained_ids(annotated) == _ids(data, ("ok", "low_iou"))

    photo = sorted(annotated["images"].iterdir())[0]
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cli.main(args + ['data.statuses=["ok","low_iou"]']) == 0
    out = capsys.readouterr().out
    assert f"(data.images {annotated['images']}: other files (3 -> 3 files, or changed sizes " \
           "or times)): preparing them again" in out, out

    # both sources named on purpose: refused, nothing prepared
    assert cli.main(args + ["data.synthetic_images=4"]) == 2
    assert "both name training data: set data.synthetic_images=0" in _one_line(capsys)


def test_records_prepared_before_they_kept_their_source_are_made_again(annotated, tmp_path,
                                                                       capsys):
    assert cli.main(_prepare_args(annotated, tmp_path / "run")) == 0
    capsys.readouterr()
    (version,) = (annotated["tfds"] / "p2s_person_segmentation" / "mine").iterdir()
    metadata = version / "metadata.json"
    metadata.write_text(json.dumps({"schema": "coco17"}))  # as records of version 1.1.0 hold
    assert cli.main(_prepare_args(annotated, tmp_path / "run")) == 0
    assert "(they were prepared before records kept what they were made from): preparing " \
           "them again" in capsys.readouterr().out
    assert _trained_ids(annotated) == _ids(annotated["data"])
    assert not (version.parent.parent / ".mine.replaced").exists()  # the old ones are gone


SAMPLER_MODULE = '''
from p2s_jax.train.samplers import center, register_sampler

register_sampler("{name}", center)
'''


def _user_module(folder: Path, module: str, sampler: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(SAMPLER_MODULE.format(name=sampler))


def test_a_users_sampler_module_reaches_curve_export_and_prepare(tmp_path, monkeypatch,
                                                                 capsys):
    """A module outside the package, in the working folder: `--import` on curve, export and
    prepare; a run's config.json records it, so export imports it unasked; without it, "unknown
    sampler" says to pass it."""
    monkeypatch.chdir(tmp_path)
    module, sampler = f"study_{os.getpid()}", f"corner_{os.getpid()}"
    _user_module(tmp_path, module, sampler)
    curve = ["curve", "--annotations", "a.json", "--images", str(tmp_path), "--checkpoint",
             str(tmp_path / "none.pt"), "--sampler", sampler, "--out", str(tmp_path / "c.png")]
    assert cli.main(curve) == 2
    err = _one_line(capsys)
    assert f"unknown sampler '{sampler}'" in err and "pass --import MODULE" in err
    assert module not in sys.modules
    assert cli.main(curve + ["--import", module]) == 2  # now past the sampler, at the next file
    assert "a.json" in _one_line(capsys)

    # a run's config.json records its modules: export imports them unasked
    later_module, later_sampler = f"{module}_b", f"{sampler}_b"
    _user_module(tmp_path, later_module, later_sampler)
    written = to_dict(load_config("tiny", {"correction.sampler": later_sampler,
                                           "eval.every": 0}, imports=(later_module,)))
    assert written["imports"] == (later_module,)
    from p2s_jax.train import samplers

    monkeypatch.delitem(sys.modules, later_module)  # as in a new process
    monkeypatch.delitem(samplers._SAMPLERS, later_sampler)
    workdir = tmp_path / "run"
    workdir.mkdir()
    export = ["export", "--workdir", str(workdir), "--out", str(tmp_path / "x.pt"),
              "--image-only"]
    (workdir / "config.json").write_text(json.dumps({**written, "imports": []}))
    assert cli.main(export) == 2  # a config.json that does not name its module
    err = _one_line(capsys)
    assert f"unknown sampler '{later_sampler}'" in err and "pass --import MODULE" in err
    (workdir / "config.json").write_text(json.dumps(written))
    assert cli.main(export) == 2  # registered by the config's import: on to the checkpoints
    assert "holds no checkpoint" in _one_line(capsys)

    assert cli.main(["prepare", "train-data", "--config", "tiny", "--import", module,
                     "--workdir", str(tmp_path / "w"), f"correction.sampler={sampler}",
                     "data.synthetic_images=0"]) == 2
    assert "set data.data_dir" in _one_line(capsys)  # past the sampler


def test_an_interrupted_run_says_what_it_left(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the run wrote its config and generated data, before any checkpoint."""
    workdir = tmp_path / "run"

    def interrupted(config, path, *args):  # the records generated, the config written
        (Path(path) / "synthetic").mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "prepare_inputs", interrupted)
    assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir)]) == 130
    assert _one_line(capsys) == (f"p2s train: interrupted (SIGINT); left in {workdir} (new): "
                                 "config.json, synthetic/; no checkpoint")


def test_file_format_mistakes_are_named(tmp_path, capsys):
    """A list that is not keypoint results (MPII's list format), nested keypoint triplets, and
    a photo given as the image folder."""
    mpii = tmp_path / "mpii.json"
    mpii.write_text(json.dumps([{"image": "a.jpg", "joints": [[1, 2]] * 16, "center": [1, 2]}]))
    images = tmp_path / "images"
    images.mkdir()
    args = ["annotate", "--keypoints", str(mpii), "--images", str(images), "--out",
            str(tmp_path / "out.json"), "--checkpoint", str(tmp_path / "none.pt")]
    assert cli.main(args) == 2
    err = _one_line(capsys)
    assert "is a JSON list whose entries are not keypoint results (entry 0: ['center', " \
           "'image', 'joints'])" in err and "--image-info" in err

    annotations, photos, _ = coco_dataset(tmp_path / "raw", 1, seed=2)
    data = json.loads(Path(annotations).read_text())
    first = data["annotations"][0]
    first["keypoints"] = [first["keypoints"][i:i + 3] for i in range(0, 51, 3)]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(data))
    args[2], args[4] = str(nested), str(photos)
    assert cli.main(args) == 2
    err = _one_line(capsys)
    assert f"annotation id {first['id']}: 'keypoints' must be a flat list of 51 numbers " \
           "[x1, y1, v1, x2, ...] (COCO's format), got a nested list of shape (17, 3)" in err

    photo = sorted(Path(photos).iterdir())[0]
    args[2], args[4] = str(annotations), str(photo)
    assert cli.main(args) == 2
    assert f"--images {photo} is a file, not a folder" in _one_line(capsys)


def test_generated_data_has_an_extra_that_installs_it():
    """The tiny run's dependency is an extra of its own, which the README and the error name."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("scikit-image") for d in extras["synthetic"])
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[torch,synthetic]"' in readme
