"""Released weights by name: downloaded once with the Hugging Face Hub's client, converted once.

`HUB_WEIGHTS` is the one table of hub-hosted checkpoints (repo id, file name, revision). They
are fetched with `huggingface_hub.hf_hub_download`: resumed after a dropped connection, locked
against concurrent downloads, and stored in the Hub cache every other tool shares (`HF_HOME` /
`HF_HUB_CACHE`; a file another tool fetched is a cache hit). The bytes of a fresh download are
checked against the sha256 the Hub publishes for the file (its LFS ETag, which also names the
cached blob); a mismatch deletes them. `HF_ENDPOINT` points at a mirror, `HF_HUB_OFFLINE=1`
uses the cache only.

`P2S_WEIGHTS_URL` replaces the SAM-pose2seg release by a plain URL (not on the Hub:
`utils.download.fetch_url`). The converted folder lives in the project's cache
(`P2S_CACHE`), written under a temporary name and renamed, so it only ever exists whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from p2s_jax.utils import download
from p2s_jax.utils.download import ChecksumError, DownloadError
from weights_conversion import METADATA_FILE, convert_checkpoint

WEIGHTS_URL_ENV = "P2S_WEIGHTS_URL"
_SHA256 = re.compile(r"[0-9a-f]{64}")
RELEASE = "sam-pose2seg"


class HubFile(NamedTuple):
    """A checkpoint on the Hugging Face Hub."""

    repo_id: str
    filename: str
    revision: str = "main"


HUB_WEIGHTS = {
    "sam-pose2seg": HubFile("vrg-prague/BBoxMaskPose", "SAM-pose2seg_hiera_b+.pt"),
    "sam2.1_hiera_t": HubFile("facebook/sam2.1-hiera-tiny", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": HubFile("facebook/sam2.1-hiera-small", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": HubFile("facebook/sam2.1-hiera-base-plus", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": HubFile("facebook/sam2.1-hiera-large", "sam2.1_hiera_large.pt"),
}


def _offline_message(spec: HubFile, endpoint: str, reason: str) -> str:
    url = f"{endpoint}/{spec.repo_id}/resolve/{spec.revision}/{spec.filename}"
    return (f"could not download {spec.filename} from the Hugging Face Hub ({reason}).\n"
            f"Download {url} by hand (or with `hf download {spec.repo_id} {spec.filename}`)\n"
            "and pass its path with --checkpoint; HF_HUB_OFFLINE=1 uses the Hub cache only, "
            "HF_ENDPOINT a mirror.")


def hub_file(spec: HubFile, progress: bool = True) -> Path:
    """The local path of `spec` in the Hub cache, downloading (and verifying) it the first time.

    Raises:
      DownloadError: unreachable / offline without a cached copy, or an HTTP error; the message
        says what to download and where to pass it.
      ChecksumError: the downloaded bytes differ from the Hub's sha256 (they are deleted).
    """
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    kwargs = dict(repo_id=spec.repo_id, filename=spec.filename, revision=spec.revision,
                  endpoint=endpoint)
    try:
        return Path(huggingface_hub.hf_hub_download(**kwargs, local_files_only=True))
    except (hub_errors.LocalEntryNotFoundError, FileNotFoundError):
        pass  # not cached yet
    try:
        path = Path(huggingface_hub.hf_hub_download(
            **kwargs, tqdm_class=None if progress else _Silent))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError, OSError) as err:
        from huggingface_hub import constants

        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if constants.HF_HUB_OFFLINE or isinstance(err, hub_errors.OfflineModeIsEnabled):
            reason = "HF_HUB_OFFLINE is set and the file is not in the Hub cache"
        raise DownloadError(_offline_message(spec, endpoint, reason)) from err
    blob = path.resolve()  # the cache names an LFS file's blob by its sha256 (its ETag)
    if _SHA256.fullmatch(blob.name):
        actual = download.sha256_file(blob)
        if actual != blob.name:
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise ChecksumError(f"{spec.repo_id}/{spec.filename}: sha256 mismatch: the Hub "
                                f"publishes {blob.name}, the download is {actual}; it was "
                                "deleted, run again to retry")
    return path


class _Silent(tqdm):
    """A tqdm that shows nothing (progress off)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


def converted_checkpoint(name: str = RELEASE, progress: bool = True) -> Path:
    """The converted folder of the hub checkpoint `name` (`HUB_WEIGHTS`), downloading and
    converting it the first time. For the release, `P2S_WEIGHTS_URL` replaces the Hub."""
    if name not in HUB_WEIGHTS:
        raise KeyError(name)
    spec = HUB_WEIGHTS[name]
    cache = download.cache_dir()
    converted = cache / Path(spec.filename).stem
    if (converted / METADATA_FILE).is_file():
        return converted
    url = os.environ.get(WEIGHTS_URL_ENV) if name == RELEASE else None
    checkpoint = (download.fetch_url(url, spec.filename, progress=progress) if url
                  else hub_file(spec, progress))
    try:
        convert_checkpoint(checkpoint, converted)
    except OSError:  # converted concurrently by another process: keep theirs
        if not (converted / METADATA_FILE).is_file():
            raise
    return converted


def released_checkpoint(progress: bool = True) -> Path:
    """The converted SAM-pose2seg release (`converted_checkpoint(RELEASE)`)."""
    return converted_checkpoint(RELEASE, progress)


def resolve_checkpoint(value: str | None, progress: bool = True) -> Path:
    """A --checkpoint value: a path (a `.pt` or a converted folder) as it is; a name of
    `HUB_WEIGHTS` that is not a path, its converted folder; None, the SAM-pose2seg release."""
    if value is None:
        return released_checkpoint(progress)
    if value in HUB_WEIGHTS and not Path(value).exists():
        return converted_checkpoint(value, progress)
    return Path(value)
