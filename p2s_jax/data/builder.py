"""A tensorflow-datasets builder of person segmentation training data (COCO, CIHP), no TF needed.

`PersonSegmentation` (registered as `p2s_person_segmentation`) reads, from the manual directory:
a COCO-format ground-truth file with person masks, its image folder and optionally a keypoint
detection file (COCO keypoint results, as ProbPose writes them). It writes one record per image
that holds at least one non-crowd person, in tfds' `array_record` format, and training reads them
back through `builder.as_data_source()` (random access by record index). Neither step imports
TensorFlow: the features are plain `tfds.features.Tensor` / `Text`, which tfds serialises with its
own protobuf copy of tf.Example.

Record (P = the image's non-crowd persons, small ones included, in annotation-file order):

  image          bytes        the image file as stored (JPEG / PNG), decoded by the loader
  image_id       int64
  file_name      bytes        relative to the image folder (utf-8)
  height, width  int64        from the annotation file (checked against the image header)
  rle            (P,) bytes   COCO compressed RLE counts of each person's mask; the mask size is
                              (height, width) (checked at build time)
  keypoints      (P, J, 2)    float32 x, y in original image pixels (pixel-centre convention);
                              J and the order are the file's keypoint schema (`p2s_jax.keypoints`,
                              named in the dataset's metadata: `load_source(...).schema`)
  visibility     (P, J)       float32; 0 = unusable (unmatched person, unlabelled keypoint)
  bbox           (P, 4)       float32 ground-truth box [x, y, w, h]
  area           (P,)         float32 ground-truth mask area
  annotation_id  (P,)         int64 ground-truth annotation id
  score          (P,)         float32 instance score of the matched detection (1 for ground-truth
                              poses, 0 for a person without a detection)

Keypoint source. Without a detection file, the ground-truth keypoints: visibility 1.0 where COCO
v > 0, else 0. With one, each ground-truth person takes the keypoints of the detection matched to
it (`p2s_jax.data.matching`): a detection naming its ground truth ('annotation_id', or 'id') is matched
to it; the others, highest score first, to the unmatched ground-truth person of largest box IoU,
if >= 0.5 (box: the detection's 'bbox', else the extent of its keypoints). visibility is the
detection's per-keypoint 'visibility' (ProbPose), else the triplets' confidence s. A person left
without a detection gets visibility 0 everywhere, so the prompt sampler falls back to its mask.

What the records were made from (`source_fingerprint`: the sha256 of the annotation and
detection files, a digest of the image folder's listing, the statuses and schemas) is kept in
the dataset's metadata (`prepared_source`), so that records made from other files or settings
are never mistaken for those of the files named now (`source_differences`).

Annotated files (`p2s annotate`): persons whose `p2s.status` is not among the config's
`statuses` are left out (by default only `ok` masks are trained on); annotations without a
`p2s` field are kept. Crowd regions (iscrowd = 1) are not targets and are not stored. A missing image is an error that
lists the missing files (checked before anything is written); an image whose header size differs
from the annotation is an error naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from p2s_jax.data.coco import (CocoFormatError, annotation_schema, coco_from_dict,
                               ground_truth_poses, keypoint_schema, load_keypoint_detections,
                               person_category_id, with_schema)
from p2s_jax.data.matching import load_detection_ids, matched_poses
from p2s_jax.data.poses import PoseInstances
from p2s_jax.keypoints import NUM_KEYPOINTS, get_schema
from p2s_jax.utils.files import read_json

BUILDER_NAME = "p2s_person_segmentation"


@dataclasses.dataclass(eq=False)
class PersonSegmentationConfig(tfds.core.BuilderConfig):
    """Where one dataset lies inside the manual directory (paths relative to it, or absolute).

    Attributes:
      annotations: COCO-format ground truth with person masks (e.g. person_keypoints_*.json).
      images: the folder the ground truth's 'file_name's are relative to.
      detections: keypoint detections (COCO keypoint results, ProbPose format) or None for the
        ground-truth keypoints.
      statuses: the `p2s.status` values of an annotated file (`p2s annotate`) kept as targets.
      schema: the annotation file's keypoint schema (`p2s_jax.keypoints`): the records' J; ""
        = read from the file when the records are prepared.
      read_schema: "" (the file's keypoint names pick the schema) or a schema name the file's
        keypoints are read in by position (names that fit no registered schema).
      source: what the records are made from (`source_fingerprint`), stored in the dataset's
        metadata; None until `prepare` fills it in.
    """

    annotations: str = ""
    images: str = ""
    detections: str | None = None
    statuses: tuple = ("ok",)
    schema: str = ""
    read_schema: str = ""
    source: dict | None = None


def _config(name: str, annotations: str, images: str, detections: str | None,
            description: str) -> PersonSegmentationConfig:
    return PersonSegmentationConfig(name=name, annotations=annotations, images=images,
                                    detections=detections, description=description)


BUILDER_CONFIGS = (
    _config("coco_train2017", "coco/annotations/person_keypoints_train2017.json",
            "coco/train2017", "probpose/coco_train2017.json",
            "COCO train2017 persons, ProbPose keypoints"),
    _config("coco_train2017_gt", "coco/annotations/person_keypoints_train2017.json",
            "coco/train2017", None, "COCO train2017 persons, ground-truth keypoints"),
    _config("cihp_train", "cihp/annotations/cihp_train.json", "cihp/Training/Images",
            "probpose/cihp_train.json", "CIHP train (COCO format), ProbPose keypoints"),
)


class PersonSegmentation(tfds.core.GeneratorBasedBuilder):
    """Persons of COCO-format datasets with masks and keypoint prompts; see the module doc."""

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Any keypoint schema (J per dataset, in the metadata); annotated "
                              "files filtered by status.",
                     "1.2.0": "What the records were made from, in the metadata ('source')."}
    BUILDER_CONFIGS = list(BUILDER_CONFIGS)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the files named by the builder config inside manual_dir (see docs/data.md): a "
        "COCO-format annotation file, its image folder and optionally a ProbPose keypoint "
        "detection file.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. tfds' own lookup (4.9.10) imports `importlib_resources` for classes defined
        in installed packages, a module it declares as a dependency on Python < 3.9 only."""
        return epath.Path(__file__)

    def _log_download_bytes(self) -> None:
        """One line of our own instead of tfds's "Downloading and preparing dataset" (nothing
        is downloaded: the records are built from local files)."""
        print(f"preparing {self.name}/{self.builder_config.name} records in {self.data_dir} "
              "(once; later runs reuse them)", flush=True)

    def _log_download_done(self) -> None:
        print(f"prepared {self.builder_config.name}: {self.data_dir}", flush=True)

    def _info(self) -> tfds.core.DatasetInfo:
        schema = get_schema(self.builder_config.schema)
        return tfds.core.DatasetInfo(
            builder=self, features=record_features(schema.num_keypoints),
            metadata=tfds.core.MetadataDict(schema=schema.name,
                                            source=self.builder_config.source or {}),
            description="Person masks with keypoint prompts, one record per image.")

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = Path(dl_manager.manual_dir)
        annotations = _resolve(root, config.annotations, "annotations")
        images_dir = _resolve(root, config.images, "images")
        detections = (None if config.detections is None
                      else _resolve(root, config.detections, "detections"))
        return {"train": self._generate_examples(annotations, images_dir, detections)}

    def _generate_examples(self, annotations: Path, images_dir: Path, detections: Path | None
                           ) -> Iterator[tuple[int, dict]]:
        config = self.builder_config
        yield from generate_examples(annotations, images_dir, detections, config.statuses,
                                     config.schema, config.read_schema)


def _resolve(root: Path, relative: str, what: str) -> Path:
    if not relative:
        raise ValueError(f"builder config: '{what}' is empty; name a path inside manual_dir")
    return root / relative


def record_features(num_keypoints: int = NUM_KEYPOINTS) -> tfds.features.FeaturesDict:
    """The record layout (see the module docstring); every feature encodes without TensorFlow."""
    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "image": tensor(shape=(), dtype=np.object_),
        "image_id": tensor(shape=(), dtype=np.int64),
        "file_name": tfds.features.Text(),
        "height": tensor(shape=(), dtype=np.int64),
        "width": tensor(shape=(), dtype=np.int64),
        "rle": tensor(shape=(None,), dtype=np.object_),
        "keypoints": tensor(shape=(None, num_keypoints, 2), dtype=np.float32),
        "visibility": tensor(shape=(None, num_keypoints), dtype=np.float32),
        "bbox": tensor(shape=(None, 4), dtype=np.float32),
        "area": tensor(shape=(None,), dtype=np.float32),
        "annotation_id": tensor(shape=(None,), dtype=np.int64),
        "score": tensor(shape=(None,), dtype=np.float32),
    })


# ----------------------------------------------------------------------------------------------
# Records


def _rle_counts(coco: COCO, ann: dict, height: int, width: int) -> bytes:
    """The annotation's mask as compressed RLE counts (polygons and raw RLE converted)."""
    rle = coco.annToRLE(ann)
    if [int(v) for v in rle["size"]] != [height, width]:
        raise CocoFormatError(f"annotation id {ann['id']}: mask size {list(rle['size'])} differs "
                              f"from its image's (height, width) [{height}, {width}]")
    counts = rle["counts"]
    return counts.encode("ascii") if isinstance(counts, str) else bytes(counts)


def _read_image(path: Path, height: int, width: int) -> bytes:
    """The file's bytes, after checking (from the header) that it is an image of that size."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError) as e:
        raise CocoFormatError(f"{path}: not a readable image ({e})") from e
    if size != (width, height):
        raise CocoFormatError(f"{path}: image is {size[0]} x {size[1]} (W x H) but the annotation "
                              f"file says {width} x {height}")
    return data


def _persons(coco: COCO, image_id: int, detections: PoseInstances | None,
             detection_ids: np.ndarray | None) -> dict | None:
    """Per-person arrays of one image (everything but the image); None without persons."""
    gt = ground_truth_poses(coco, image_id)
    if len(gt) == 0:
        return None
    info = coco.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    anns = coco.loadAnns(gt.ann_ids.tolist())
    if detections is None:
        keypoints, visibility, score = gt.keypoints, gt.scores["visibility"], gt.det_score
    else:
        keypoints, visibility, score = matched_poses(gt, detections, detection_ids)
    return {
        "rle": np.asarray([_rle_counts(coco, a, height, width) for a in anns], dtype=object),
        "keypoints": np.asarray(keypoints, np.float32),
        "visibility": np.asarray(visibility, np.float32),
        "bbox": np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4),
        "area": np.asarray([a["area"] for a in anns], np.float32),
        "annotation_id": gt.ann_ids.astype(np.int64),
        "score": np.asarray(score, np.float32),
    }


def image_example(coco: COCO, image_id: int, images_dir: Path, source: str,
                  detections: PoseInstances | None = None,
                  detection_ids: np.ndarray | None = None) -> dict | None:
    """The record of one image (see the module docstring); None when it has no non-crowd person.

    Args:
      coco: ground truth (`load_coco`). image_id: one of its images.
      images_dir: folder of the image files.
      source: the annotation (and detection) file names, for error messages.
      detections: the image's detections, or None for ground-truth keypoints.
      detection_ids: (D,) ground-truth ids named by the detections, or None.

    Raises:
      CocoFormatError: naming `source`, the image id and the problem (an unusable mask or
        keypoint list, a detection naming a foreign annotation id), or the image file.
    """
    try:
        persons = _persons(coco, image_id, detections, detection_ids)
    except ValueError as e:  # CocoFormatError included
        raise CocoFormatError(f"{source}: image_id {image_id}: {e}") from e
    if persons is None:
        return None
    info = coco.imgs[image_id]
    height, width = int(info["height"]), int(info["width"])
    return {"image": _read_image(images_dir / info["file_name"], height, width),
            "image_id": int(image_id), "file_name": str(info["file_name"]),
            "height": height, "width": width, **persons}


def person_image_ids(coco: COCO) -> list[int]:
    """Sorted ids of the images holding at least one non-crowd person."""
    person = person_category_id(coco)
    return sorted({a["image_id"] for a in coco.dataset["annotations"]
                   if a["category_id"] == person and not a.get("iscrowd", 0)})


def missing_images(coco: COCO, image_ids: list[int], images_dir: Path) -> list[Path]:
    """Image files of `image_ids` that do not exist under images_dir."""
    paths = [images_dir / coco.imgs[i]["file_name"] for i in image_ids]
    return [p for p in paths if not p.is_file()]


def _annotated(annotations: Path, statuses: tuple, read_schema: str = "") -> COCO:
    """The ground truth, without the annotated persons whose `p2s.status` is not kept; its
    keypoints read in `read_schema` by position when one is named."""
    data = read_json(annotations, "COCO annotation file", CocoFormatError)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = {**data, "annotations": [
            a for a in data["annotations"] if not isinstance(a, dict) or a.get("iscrowd")
            or "p2s" not in a or a["p2s"].get("status") in statuses]}
    data = with_schema(data, get_schema(read_schema) if read_schema else None, annotations)
    return coco_from_dict(data, annotations)


def generate_examples(annotations: Path, images_dir: Path, detections: Path | None = None,
                      statuses: tuple = ("ok",), schema: str = "coco17", read_schema: str = ""
                      ) -> Iterator[tuple[int, dict]]:
    """(image_id, record) for every image with a non-crowd person, by increasing image id.

    Raises:
      FileNotFoundError: missing image files of those images (counted, the first five named,
        before anything is yielded), or a
        missing annotation / detection file.
      CocoFormatError: malformed annotation or detection files, naming the file and the entry.
    """
    coco = _annotated(annotations, statuses, read_schema)
    found = keypoint_schema(coco).name
    if found != schema:
        raise CocoFormatError(f"{annotations}: its keypoints are {found}, the builder config "
                              f"says {schema}")
    image_ids = person_image_ids(coco)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"image folder {images_dir}: " + (
            "a file, not a folder" if images_dir.exists() else "folder not found"))
    missing = missing_images(coco, image_ids, images_dir)
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        raise FileNotFoundError(f"{len(missing)} image file(s) of {annotations} are missing "
                                f"under {images_dir}: {shown}" + (" ..." if len(missing) > 5
                                                                  else ""))
    poses = ids = None
    if detections is not None:
        poses = load_keypoint_detections(detections, coco)
        ids = load_detection_ids(detections, coco)
    source = str(annotations) + ("" if detections is None else f" with {detections}")
    for image_id in image_ids:
        example = image_example(
            coco, image_id, images_dir, source,
            None if poses is None else poses[image_id],
            None if ids is None else ids.get(image_id))
        if example is not None:
            yield image_id, example


# ----------------------------------------------------------------------------------------------
# What the records are made from


def _file_fingerprint(path: epath.Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"path": os.fspath(path), "sha256": digest.hexdigest(), "bytes": path.stat().length}


def _folder_fingerprint(folder: epath.Path) -> dict:
    """A digest of the folder's listing: every file's relative path, size and modification
    time (the bytes are not read: a changed photo changes its size or time). Folders that are
    not local (gs://) are named only."""
    local = Path(os.fspath(folder))
    if not local.is_dir():
        return {"path": os.fspath(folder), "files": None, "digest": None}
    entries = []
    for root, _, names in os.walk(local):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            entries.append((os.path.relpath(path, local), stat.st_size, stat.st_mtime_ns))
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"path": os.fspath(folder), "files": len(entries), "digest": digest}


def source_fingerprint(manual_dir, config: PersonSegmentationConfig) -> dict:
    """What `config`'s records are made from: the annotation and detection files (sha256), the
    image folder (`_folder_fingerprint`), the statuses and schemas, the record version."""
    root = epath.Path(manual_dir)
    return {
        "version": str(PersonSegmentation.VERSION),
        "annotations": _file_fingerprint(root / config.annotations),
        "detections": (None if config.detections is None
                       else _file_fingerprint(root / config.detections)),
        "images": _folder_fingerprint(root / config.images),
        "statuses": sorted(config.statuses), "read_schema": config.read_schema,
    }


def prepared_source(data_dir, name: str) -> dict:
    """The `source_fingerprint` stored with the prepared records of `name` ({} for records
    prepared before records carried it)."""
    versions = _versions(data_dir, name)
    metadata = versions[-1] / "metadata.json" if versions else None
    if metadata is None or not metadata.is_file():
        return {}
    return json.loads(metadata.read_text()).get("source") or {}


# What each part of the fingerprint is called in a difference (`source_differences`).
SOURCE_PARTS = {"annotations": "annotations", "detections": "detections", "images": "images",
                "statuses": "statuses", "read_schema": "schema"}


def source_differences(stored: dict, current: dict, names: dict | None = None) -> list[str]:
    """How the records' stored source differs from the current one, one phrase each (names:
    what to call each part, e.g. {'annotations': 'data.annotations'}); [] when they agree."""
    names = {**SOURCE_PARTS, **(names or {})}
    if not stored:
        return ["they were prepared before records kept what they were made from"]
    out = []
    if stored.get("version") != current["version"]:
        out.append(f"record version {stored.get('version')} -> {current['version']}")
    for part in ("annotations", "detections"):
        old, new = stored.get(part), current[part]
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            out.append(f"{names[part]} {(new or old or {}).get('path', 'none')}: "
                       + ("added" if old is None else "removed" if new is None else
                          f"another file (sha256 {old['sha256'][:12]} -> "
                          f"{new['sha256'][:12]})"))
    old, new = stored.get("images") or {}, current["images"]
    if new["digest"] is not None and old.get("digest") != new["digest"]:
        out.append(f"{names['images']} {new['path']}: other files ({old.get('files')} -> "
                   f"{new['files']} files, or changed sizes or times)")
    for part in ("statuses", "read_schema"):
        if stored.get(part) != current[part]:
            out.append(f"{names[part]} {stored.get(part)!r} -> {current[part]!r}")
    return out


def replace_prepared(manual_dir, data_dir, config: PersonSegmentationConfig,
                     progress: bool = True) -> PersonSegmentation:
    """Prepares `config` anew where records of its name exist already: the old ones are moved
    aside, and deleted once the new ones are written (put back if preparing fails)."""
    folder = epath.Path(data_dir) / BUILDER_NAME / config.name
    aside = folder.parent / f".{config.name}.replaced"
    if aside.exists():
        aside.rmtree()
    folder.rename(aside)
    try:
        builder = prepare(manual_dir, data_dir, config, progress)
    except BaseException:
        if folder.exists():
            folder.rmtree()
        aside.rename(folder)
        raise
    aside.rmtree()
    return builder


# ----------------------------------------------------------------------------------------------
# Entry points


def prepare(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
            config: str | PersonSegmentationConfig = "coco_train2017",
            progress: bool = True) -> PersonSegmentation:
    """Builds the dataset once, as array_record files under data_dir (no TensorFlow needed).

    Args:
      manual_dir: the folder holding the files named by the config.
      data_dir: tfds data folder; the records go to data_dir/p2s_person_segmentation/<config
        name>/<version>/. A dataset already prepared there is reused.
      config: the name of a predefined config (`BUILDER_CONFIGS`) or a
        `PersonSegmentationConfig` with your own paths (and a new name).
      progress: tfds' progress bars while the records are written.

    Returns:
      The builder; `builder.as_data_source()["train"]` reads the records.
    """
    if isinstance(config, str):
        config = next((c for c in BUILDER_CONFIGS if c.name == config), None) or _unknown(config)
    if config.source is None:
        config = dataclasses.replace(config, source=source_fingerprint(manual_dir, config))
    if not config.schema:
        read = get_schema(config.read_schema) if config.read_schema else None
        config = dataclasses.replace(config, schema=annotation_schema(
            epath.Path(manual_dir) / config.annotations, read).name)
    with _quiet_custom_config():
        builder = PersonSegmentation(config=config, data_dir=os.fspath(data_dir),
                                     file_format="array_record")
    tfds.display_progress_bar(progress)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    finally:
        tfds.display_progress_bar(True)
    return builder


def _unknown(name: str):
    raise ValueError(f"no predefined dataset {name!r}; predefined: "
                     f"{[c.name for c in BUILDER_CONFIGS]}")


class _CustomConfigFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config():
    """Without tfds' warning that a config is not predefined: every run of your own files, the
    generated ones included, uses one, and `prepare` prints what it builds itself."""
    quiet = _CustomConfigFilter()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _versions(data_dir, name: str) -> list:
    """The prepared version folders of config `name` under data_dir, oldest first."""
    root = epath.Path(data_dir) / BUILDER_NAME / name
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if (p / "dataset_info.json").is_file()),
                  key=lambda p: tfds.core.Version(p.name) if _is_version(p.name) else
                  tfds.core.Version("0.0.0"))


def is_prepared(data_dir, name: str) -> bool:
    """Whether `prepare` has written config `name` under data_dir."""
    return bool(data_dir) and bool(_versions(data_dir, name))


def load_source(data_dir: str | os.PathLike, name: str, split: str = "train"):
    """The prepared records of config `name` as a random-access source (`as_data_source`).

    Works for predefined and custom configs alike: the builder is restored from the files that
    `prepare` wrote (latest version), so neither the manual directory nor the config is needed.

    Returns:
      A tfds ArrayRecordDataSource: len(source) records, source[i] -> the record dict of numpy
      arrays / bytes / ints described in the module docstring.

    Raises:
      FileNotFoundError: nothing prepared for `name` under data_dir (naming what is there).
    """
    root = epath.Path(data_dir) / BUILDER_NAME / name
    versions = _versions(data_dir, name)
    if not versions:
        found = sorted(p.name for p in root.parent.iterdir()) if root.parent.is_dir() else []
        raise FileNotFoundError(f"no prepared dataset '{name}' under {root} (prepared configs "
                                f"in {root.parent}: {found}); run prepare() first")
    builder = tfds.builder_from_directory(os.fspath(versions[-1]))
    return SchemaSource(builder.as_data_source(split=split),
                        builder.info.metadata.get("schema", "coco17")
                        if builder.info.metadata else "coco17")


class SchemaSource:
    """A prepared source and the keypoint schema of its records (`schema`, a name)."""

    def __init__(self, source, schema: str):
        self.source, self.schema = source, schema

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return {**self.source[index], "schema": self.schema}


def _is_version(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)
