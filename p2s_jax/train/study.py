"""A sampler study: the correction curve and interactive segmentation's metrics of any number
of samplers and checkpoints, in one run (`p2s curve`).

For every checkpoint the image encoder runs once per image; every (sampler, seed) run's
correction loop (the training one, forward only: `curve.loop_ious`) reuses those features. A
run is one (checkpoint, sampler, seed); samplers registered as deterministic (`center`) run once
(seed 0), the others once per seed 0 .. seeds - 1. Over the persons with a non-empty mask, with
K points:

  mIoU@k    the mean IoU after point k (k = 1 .. K): the correction curve (Fig. 2).
  NoC@t     RITM's `compute_noc_metric`: per person the first point count k whose IoU >= t,
            else K; the mean over persons.
  NoF@t     the persons that never reach t within K points (RITM's `over_max` also counts the
            persons that reach t exactly at point K: its NoF is the count of NoC == K).

The work is cut into shards of images (`shard_images`), written atomically under
`<out>.runs/<checkpoint label>/` as they finish: a study that is killed keeps its finished
shards, and the same command continues from them (its settings must be the same, as
`p2s annotate`'s shards).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pycocotools.coco import COCO
from tqdm.auto import tqdm

from p2s_jax.model.sam2 import SAM2Image
from p2s_jax.parallel import all_gather_json
from p2s_jax.train.correction import CorrectionConfig
from p2s_jax.train.curve import (CurveConfig, curve_image_ids, encode_image, image_targets,
                                 loop_ious)
from p2s_jax.train.samplers import get_sampler, is_deterministic
from p2s_jax.utils.errors import InputError, Interrupted, interrupt_signal
from p2s_jax.utils.files import read_json, write_json
from p2s_jax.utils.nested import differences

THRESHOLDS = (0.80, 0.85, 0.90)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Attributes:
      samplers: registered sampler names, compared side by side.
      num_points: K, points per person (1 + K - 1 corrections).
      seeds: seeds 0 .. seeds - 1 for the samplers that draw at random.
      max_people: persons per image (the first ones in file order).
      max_images: images used (the first ones by id with a person); 0: all.
      shard_images: images per shard (the unit a killed study keeps).
    """

    samplers: tuple = ("center",)
    num_points: int = 8
    seeds: int = 1
    max_people: int = 8
    max_images: int = 0
    shard_images: int = 16

    def __post_init__(self):
        if not self.samplers or self.num_points < 1 or self.seeds < 1 or self.shard_images < 1:
            raise InputError(f"a study needs a sampler, points >= 1, seeds >= 1 and "
                             f"shard_images >= 1; got {list(self.samplers)}, {self.num_points}, "
                             f"{self.seeds}, {self.shard_images}")
        for name in self.samplers:
            get_sampler(name)  # an unknown name fails here, before any work

    def runs(self) -> list[tuple[str, int]]:
        """(sampler, seed) of every run of one checkpoint."""
        return [(name, seed) for name in self.samplers
                for seed in range(1 if is_deterministic(name) else self.seeds)]


# ------------------------------------------------------------------------------ metrics


def number_of_clicks(iou: np.ndarray, threshold: float) -> np.ndarray:
    """(P, K) IoU after each point -> (P,) NoC: the first k (1-based) with IoU >= threshold,
    else K (RITM's `_get_noc`)."""
    reached = np.asarray(iou) >= threshold
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, reached.shape[1])


def threshold_key(threshold: float) -> str:
    """0.85 -> "85", the key of NoC@t and NoF@t."""
    return f"{round(100 * threshold)}"


def run_metrics(iou: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """(P, K) per-person IoUs -> mIoU@k (K,), mean NoC@t and NoF@t keyed "80", "85", "90"
    (None where there is no person)."""
    iou = np.asarray(iou, np.float64)
    if len(iou) == 0:
        return {"miou": [None] * iou.shape[1],
                "noc": {threshold_key(t): None for t in thresholds},
                "nof": {threshold_key(t): 0 for t in thresholds}}
    return {"miou": iou.mean(axis=0).tolist(),
            "noc": {threshold_key(t): float(number_of_clicks(iou, t).mean()) for t in thresholds},
            "nof": {threshold_key(t): int((~(iou >= t).any(axis=1)).sum()) for t in thresholds}}


# ------------------------------------------------------------------------------ the runs


def labelled(values: list[str]) -> list[tuple[str, str]]:
    """`--checkpoint` values (PATH or LABEL=PATH) -> (label, path); a path's label is its file
    or folder name without suffix. Labels must differ."""
    pairs = []
    for value in values:
        label, _, path = value.partition("=") if "=" in value else ("", "", value)
        pairs.append((label or Path(path).stem or path, path))
    labels = [label for label, _ in pairs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"--checkpoint: the label(s) {twice} name several checkpoints; give "
                         "each its own as LABEL=PATH")
    return pairs


class Checkpoint(NamedTuple):
    """A checkpoint of a study: its label and how to load it (loaded only when it has runs to
    do)."""

    label: str
    path: str
    load: Callable[[], SAM2Image]
    loading: dict = {}  # how it is loaded (model, image size, dtype): kept shards must match


def checkpoints(values: list[str], load: Callable[[str], SAM2Image], loading: dict
                ) -> list[Checkpoint]:
    """`--checkpoint` values (`labelled`) as a study's checkpoints, each loaded by
    `load(path)` as `loading` says."""
    return [Checkpoint(label, path, functools.partial(load, path), loading)
            for label, path in labelled(values)]


def _settings(config: StudyConfig, checkpoint: Checkpoint, annotations) -> dict:
    return {"checkpoint": checkpoint.path, "loading": dict(checkpoint.loading),
            "annotations": str(Path(annotations).absolute()),
            "study": {**dataclasses.asdict(config), "samplers": list(config.samplers)},
            "runs": [list(r) for r in config.runs()]}


def _check_settings(folder: Path, settings: dict, overwrite: bool) -> None:
    recorded = folder / "settings.json"
    if not recorded.is_file():
        return
    changed = differences(read_json(recorded, "study settings"), settings)
    if changed and not overwrite:
        raise InputError(f"{folder} holds the runs of a study with other settings "
                         f"({'; '.join(changed)}): pass --overwrite to replace them, or write "
                         "to another --out")
    if changed:
        for path in folder.iterdir():
            path.unlink()


def _shard(model: SAM2Image, coco: COCO, images_dir, config: StudyConfig, image_ids,
           offset: int, bar) -> dict:
    """One shard: its persons (image id, annotation id) and, per run, their IoU after each
    point. Each process takes every process_count-th image; the rows are gathered back into
    image order."""
    graphdef, state = nnx.split(model)
    loops = {name: CorrectionConfig(num_points=config.num_points, sampler=name)
             for name in config.samplers}
    rows = []  # (position, persons, {run: ious})
    mine = list(enumerate(image_ids))[jax.process_index()::jax.process_count()]
    for position, image_id in mine:
        image, targets, ann_ids = image_targets(coco, image_id, images_dir,
                                                model.config.image_size, config.max_people)
        present = (targets.valid & targets.masks.any(axis=(1, 2)))[:len(ann_ids)]
        features = encode_image(graphdef, state, image)
        device_targets = jax.tree.map(jnp.asarray, targets)
        ious = {}
        for sampler, seed in config.runs():
            key = jax.random.fold_in(jax.random.key(seed), offset + position)
            iou = np.asarray(loop_ious(graphdef, loops[sampler], state, features,
                                       device_targets, key))  # (K, P)
            ious[f"{sampler}/{seed}"] = iou[:, :len(ann_ids)][:, present].T.tolist()
        rows.append((position, [[int(image_id), int(a)] for a in ann_ids[present]], ious))
        bar.update(1)
    rows = sorted((tuple(r) for g in all_gather_json(rows) for r in g), key=lambda r: r[0])
    return {"images": [int(i) for i in image_ids],
            "persons": [p for _, persons, _ in rows for p in persons],
            "ious": {f"{s}/{seed}": [row for _, _, ious in rows for row in ious[f"{s}/{seed}"]]
                     for s, seed in config.runs()}}


def study(checkpoints: list[Checkpoint], coco: COCO, annotations, images_dir, runs_dir,
          config: StudyConfig = StudyConfig(), *, overwrite: bool = False,
          progress: bool = True) -> list[dict]:
    """Every run of `config` on every checkpoint (see the module docstring) -> the runs, each
    {"checkpoint", "sampler", "seed", "persons", "iou", "miou", "noc", "nof"}, in the order of
    the checkpoints, then `config.runs()`.

    Raises:
      Interrupted: Ctrl-C or SIGTERM; the finished shards are kept under `runs_dir`.
    """
    curve = CurveConfig(max_people=config.max_people, max_images=config.max_images)
    image_ids = curve_image_ids(coco, curve)
    chunks = [image_ids[i:i + config.shard_images]
              for i in range(0, len(image_ids), config.shard_images)]
    runs_dir = Path(runs_dir)
    try:
        for checkpoint in checkpoints:
            folder = runs_dir / checkpoint.label
            settings = _settings(config, checkpoint, annotations)
            _check_settings(folder, settings, overwrite)
            todo = [i for i in range(len(chunks)) if not (folder / f"{i:06d}.json").is_file()]
            if not todo:
                continue
            model = checkpoint.load()
            with tqdm(total=len(image_ids), unit="img", desc="curve", dynamic_ncols=True,
                      initial=sum(len(chunks[i]) for i in range(len(chunks)) if i not in todo),
                      disable=not progress or jax.process_index() != 0) as bar:
                for index in todo:
                    shard = _shard(model, coco, images_dir, config, chunks[index],
                                   index * config.shard_images, bar)
                    if jax.process_index() == 0:
                        if not (folder / "settings.json").is_file():
                            write_json(folder / "settings.json", settings, indent=2)
                        write_json(folder / f"{index:06d}.json", shard)
    except BaseException as err:
        number = interrupt_signal(err)
        if number is None:
            raise
        kept = sum((runs_dir / c.label / f"{i:06d}.json").is_file() for c in checkpoints
                   for i in range(len(chunks)))
        raise Interrupted(f"interrupted: {kept} of {len(chunks) * len(checkpoints)} shards "
                          f"finished and kept in {runs_dir}; run the same command again to "
                          "resume", number) from None
    return [run for checkpoint in checkpoints
            for run in _assemble(runs_dir / checkpoint.label, checkpoint.label, config,
                                 len(chunks))]


def _assemble(folder: Path, label: str, config: StudyConfig, num_shards: int) -> list[dict]:
    shards = [read_json(folder / f"{i:06d}.json", "study shard") for i in range(num_shards)]
    persons = [p for shard in shards for p in shard["persons"]]
    runs = []
    for sampler, seed in config.runs():
        iou = [row for shard in shards for row in shard["ious"][f"{sampler}/{seed}"]]
        runs.append({"checkpoint": label, "sampler": sampler, "seed": seed, "persons": persons,
                     "iou": iou, **run_metrics(np.asarray(iou).reshape(-1, config.num_points))})
    return runs
