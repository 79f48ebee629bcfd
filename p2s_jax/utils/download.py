"""Plain downloads of files that are not on the Hugging Face Hub (hub-hosted weights go through
`huggingface_hub`, `p2s_jax.inference.weights`), and the project's own cache folder.

`fetch_url(url, filename)` returns `cache_dir() / filename`, downloading it first if it is not
there: into a temporary file beside it, checked against `sha256` when one is given, then renamed
into place, so that the cached file only ever exists whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from p2s_jax.utils.errors import Error

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(Error, RuntimeError):
    """A file could not be downloaded (unreachable host, HTTP error, interrupted transfer)."""

    keep_lines = True  # the message is download instructions: printed as written


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


def cache_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The project's cache folder (converted weights, plain downloads; not created here).

    `$P2S_CACHE` if set; otherwise the platform's cache directory + '/p2s_jax': $XDG_CACHE_HOME or
    ~/.cache on Linux and other POSIX systems, ~/Library/Caches on macOS, %LOCALAPPDATA% on
    Windows.
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if environ.get("P2S_CACHE"):
        return Path(environ["P2S_CACHE"]).expanduser()
    home = Path(environ.get("HOME") or Path.home())
    if platform == "darwin":
        base = home / "Library" / "Caches"
    elif platform.startswith("win"):
        base = Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    else:
        xdg = environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if os.path.isabs(xdg) else home / ".cache"  # XDG: ignore relative paths
    return base / "p2s_jax"


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_url(url: str, filename: str, sha256: str | None = None, progress: bool = True,
              directory: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """`directory / filename` (default: `cache_dir()`), downloaded from `url` the first time.

    Raises:
      DownloadError: the host is unreachable or answers with an error; the message names the
        URL, where to put a copy by hand, and --checkpoint.
      ChecksumError: the bytes do not have `sha256` (nothing is kept).
    """
    if not filename or Path(filename).name != filename:
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    directory = Path(cache_dir() if directory is None else directory)
    dest = directory / filename
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{filename}.{os.getpid()}.download"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "p2s_jax"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as f:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=filename, disable=not progress) as bar:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    f.write(block)
                    bar.update(len(block))
        if sha256 is not None and sha256_file(tmp) != sha256.lower():
            raise ChecksumError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got "
                                f"{sha256_file(tmp)}; nothing was kept")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"could not download {url}: {getattr(err, 'reason', err)}.\n"
            f"Download it by hand and save it as {dest},\n"
            "or pass --checkpoint with the path of a local copy.") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest
