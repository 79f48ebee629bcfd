"""Downloading checkpoints once into a local cache: resumable, atomic and verified (urllib only).

`fetch(url, filename)` returns `cache_dir() / filename`, downloading it first if it is not there:

- resumable: bytes go to `filename.part`; a later call continues it with an HTTP Range request
  (a server that ignores Range, answering 200, is handled by starting over);
- atomic: the part file is fsync'ed, verified, then renamed with os.replace, so `filename` only
  ever exists complete (a file already in the cache is trusted and no network is used);
- verified: against `sha256` when given, else against the sha256 the host publishes. Hugging
  Face answers `resolve/` URLs with a redirect carrying `X-Linked-ETag` (the LFS object's sha256)
  and serves `ETag` for LFS files; any of these headers, on the redirect or the final response,
  holding a 64-hex string is used. A mismatch deletes the part file and raises, naming both hashes.
  When neither exists the file is stored unverified;
- concurrent calls for the same file are refused (an exclusive lock on the part file, POSIX only)
  instead of interleaving bytes.

When the host cannot be reached, the error says what to download, where to put it, or to pass
--checkpoint.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from p2s_jax.utils.errors import Error

try:  # advisory locks; Windows goes without
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

SAM_POSE2SEG_FILENAME = "SAM-pose2seg_hiera_b+.pt"
SAM_POSE2SEG_URL = ("https://huggingface.co/vrg-prague/BBoxMaskPose/resolve/main/"
                    + SAM_POSE2SEG_FILENAME)

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_HEADERS = ("X-Linked-ETag", "ETag")
_USER_AGENT = "p2s_jax-download (urllib)"


class DownloadError(Error, RuntimeError):
    """A file could not be downloaded (unreachable host, HTTP error, interrupted transfer)."""

    keep_lines = True  # the message is download instructions: printed as written


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected sha256."""


def cache_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The directory downloads are cached in (not created here).

    `$P2S_CACHE` if set; otherwise the platform's cache directory + '/p2s_jax': $XDG_CACHE_HOME or
    ~/.cache on Linux and other POSIX systems, ~/Library/Caches on macOS, %LOCALAPPDATA% on
    Windows.

    Args:
      environ: the environment to read (os.environ by default).
      platform: a sys.platform value (the running one by default).
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


def _host_sha256(header_sets: list) -> str | None:
    """The sha256 a host advertises in (X-Linked-)ETag headers, if it is a 64-hex string."""
    for headers in header_sets:
        for name in _HASH_HEADERS:
            value = (headers.get(name) or "").strip()
            value = value.removeprefix("W/").strip('"').lower()
            if _SHA256.fullmatch(value):
                return value
    return None


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, keeping each redirect response's headers."""

    def __init__(self):
        self.headers = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _unreachable(url: str, dest: Path, reason: str) -> DownloadError:
    return DownloadError(
        f"could not download {url}: {reason}.\n"
        f"Download it by hand and save it as {dest}\n"
        f"  (e.g. curl -L -o '{dest}' '{url}'; set P2S_CACHE to use another cache directory),\n"
        "or pass --checkpoint with the path of a local copy.")


def _sha256_of(f: BinaryIO, size: int):
    """sha256 of the first `size` bytes of an open file (the part already downloaded)."""
    digest = hashlib.sha256()
    f.seek(0)
    remaining = size
    while remaining:
        block = f.read(min(_CHUNK, remaining))
        if not block:
            break
        digest.update(block)
        remaining -= len(block)
    return digest


def _content_range_total(value: str | None) -> int | None:
    """Total size from a Content-Range header ('bytes 0-9/100' or 'bytes */100')."""
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def _open(url: str, offset: int, timeout: float):
    """GET `url` from byte `offset`; -> (response or None if already complete, header list)."""
    redirects = _RecordingRedirects()
    opener = urllib.request.build_opener(redirects)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        # 416 with the part's own size as total: the part is already complete.
        if e.code == 416 and offset and _content_range_total(e.headers.get("Content-Range")) \
                == offset:
            return None, redirects.headers + [e.headers]
        raise
    return response, redirects.headers + [response.headers]


def _download_into(part: BinaryIO, url: str, dest: Path, timeout: float, progress: bool) -> tuple:
    """Appends the rest of `url` to the open part file; -> (sha256 hexdigest, header list)."""
    offset = part.seek(0, os.SEEK_END)
    try:
        response, header_sets = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part does not fit the remote file: start over
            part.truncate(0)
            return _download_into(part, url, dest, timeout, progress)
        raise _unreachable(url, dest, f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise _unreachable(url, dest, str(getattr(e, "reason", e))) from e
    if response is None:
        return _sha256_of(part, offset).hexdigest(), header_sets
    with response:
        if offset and response.status != 206:  # Range ignored: the body is the whole file
            part.truncate(0)
            offset = 0
        digest = _sha256_of(part, offset)
        part.seek(offset)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=dest.name, disable=not progress) as bar:
            while True:
                try:
                    block = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:  # timeouts, resets, cuts
                    part.flush()
                    raise _unreachable(url, dest, f"transfer interrupted after {received} bytes "
                                       f"({e}); run again to resume") from e
                if not block:
                    break
                part.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        part.flush()
        raise DownloadError(f"{url}: connection closed after {received} of {total} bytes; run "
                            f"again to resume into {dest}.part")
    return digest.hexdigest(), header_sets


def _lock(f: BinaryIO, part: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(f"{part} is being written by another process; wait for it to "
                            "finish") from None


def _fsync_dir(directory: Path) -> None:
    """Makes a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fetch(url: str, filename: str, sha256: str | None = None, progress: bool = True,
          directory: str | os.PathLike | None = None, timeout: float = 30.0) -> Path:
    """Returns the local path of `url`, downloading it into the cache the first time.

    Args:
      url: where the file lives (http/https; redirects are followed).
      filename: its name in the cache (a plain file name).
      sha256: expected hex digest; by default the one the host advertises, if any.
      progress: show a tqdm progress bar.
      directory: the cache directory; `cache_dir()` by default.
      timeout: seconds without progress before a connection is given up.

    Returns:
      `directory / filename`, complete and verified. If it already exists it is returned at once:
      no network, no re-hashing (only verified files are ever renamed into place).

    Raises:
      DownloadError: the host is unreachable or answers with an error; the message names the URL,
        the path to save the file at, and --checkpoint. An interrupted transfer keeps the part
        file, so that the next call resumes.
      ChecksumError: the bytes do not match; the part file is deleted, both hashes are named.
    """
    if not filename or Path(filename).name != filename:
        raise ValueError(f"filename must be a plain file name, got {filename!r}")
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    directory = Path(cache_dir() if directory is None else directory)
    dest = directory / filename
    if dest.is_file():
        return dest
    directory.mkdir(parents=True, exist_ok=True)
    part_path = directory / (filename + ".part")
    with open(part_path, "ab+") as part:
        _lock(part, part_path)
        try:
            actual, header_sets = _download_into(part, url, dest, timeout, progress)
        except DownloadError:
            if part.seek(0, os.SEEK_END) == 0:  # nothing to resume: leave no empty part file
                part.close()
                part_path.unlink(missing_ok=True)
            raise
        expected = sha256.lower() if sha256 else _host_sha256(header_sets)
        if expected is not None and actual != expected:
            part.close()
            part_path.unlink(missing_ok=True)
            raise ChecksumError(f"{url}: sha256 mismatch: expected {expected}, got {actual}; "
                                f"the partial download {part_path} was deleted, run again to "
                                "retry")
        part.flush()
        os.fsync(part.fileno())
    os.replace(part_path, dest)
    _fsync_dir(directory)
    return dest
