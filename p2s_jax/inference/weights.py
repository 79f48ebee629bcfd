"""The released SAM-pose2seg weights: downloaded once, converted once, reused.

`released_checkpoint()` fetches `SAM-pose2seg_hiera_b+.pt` into the cache folder
(`P2S_CACHE`, else the platform's cache dir; `p2s_jax.utils.download`) from `P2S_WEIGHTS_URL`
or the Hugging Face release, and converts it next to itself with the strict converter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from p2s_jax.utils import download
from weights_conversion import METADATA_FILE, convert_checkpoint

WEIGHTS_URL_ENV = "P2S_WEIGHTS_URL"


def released_checkpoint(progress: bool = True) -> Path:
    """The converted SAM-pose2seg release folder, downloading and converting it the first time.

    Download: `download.fetch` (resumable, atomic, sha256-verified). Conversion: into a
    temporary folder renamed into place, so that the converted folder only ever exists whole.
    """
    cache = download.cache_dir()
    converted = cache / Path(download.SAM_POSE2SEG_FILENAME).stem
    if (converted / METADATA_FILE).is_file():
        return converted
    url = os.environ.get(WEIGHTS_URL_ENV) or download.SAM_POSE2SEG_URL
    checkpoint = download.fetch(url, download.SAM_POSE2SEG_FILENAME, progress=progress)
    staging = cache / f"{converted.name}.converting-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    convert_checkpoint(checkpoint, staging)
    try:
        os.replace(staging, converted)
    except OSError:  # converted concurrently by another process: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return converted
