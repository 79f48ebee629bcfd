"""Released weights through the Hugging Face Hub's client against a fake Hub on 127.0.0.1
(`HF_ENDPOINT`; no real host is ever contacted): the first download, a cache hit that makes no
request, a transfer cut mid-file and resumed with a Range request, a file whose bytes do not
match the Hub's sha256 refused and deleted, and offline use with a message that says what to do;
then the plain download of a file that is not on the Hub, and the cache folder per platform."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from p2s_jax.inference import weights
from p2s_jax.inference.weights import HubFile, hub_file
from p2s_jax.utils.download import ChecksumError, DownloadError, cache_dir, fetch_url

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SPEC = HubFile("p2s-test/weights", "model.pt", "main")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Hub(BaseHTTPRequestHandler):
    """`/{repo}/resolve/{revision}/{file}` as the Hub answers it: HEAD with the commit, the LFS
    sha256 as ETag and the size; GET with Range."""

    protocol_version = "HTTP/1.1"

    def _headers(self, status: int, length: int, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{self.server.etag}"')
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _known(self) -> bool:
        if self.path != f"/{SPEC.repo_id}/resolve/{SPEC.revision}/{SPEC.filename}":
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return True

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self.server.requests.append(("HEAD", None))
        if self._known():
            self._headers(200, len(self.server.payload))

    def do_GET(self):  # noqa: N802
        self.server.requests.append(("GET", self.headers.get("Range")))
        if not self._known():
            return
        data, start = self.server.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            self._headers(206, len(data) - start,
                          {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            self._headers(200, len(data))
        body = data[start:]
        if self.server.cut_after:  # the first transfer breaks off mid-file
            body, self.server.cut_after = body[:self.server.cut_after], None
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub serving SPEC; the Hub cache in tmp_path; yields the server."""
    import huggingface_hub.constants as constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.payload, server.etag, server.cut_after, server.requests = PAYLOAD, SHA, None, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # the client keeps whole chunks of a broken transfer (10 MB by default): 64 KB here
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    yield server
    server.shutdown()
    server.server_close()


def test_first_download_then_a_cache_hit_without_requests(hub, tmp_path):
    path = hub_file(SPEC, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(tmp_path / "hub")  # the shared Hub cache, blob named by sha256
    assert path.resolve().name == SHA
    assert [method for method, _ in hub.requests] == ["HEAD", "GET"]
    hub.requests.clear()
    assert hub_file(SPEC, progress=False) == path
    assert hub.requests == []  # a cached file needs no network


def test_a_transfer_cut_mid_file_is_resumed_with_a_range_request(hub):
    hub.cut_after = 100_000
    path = hub_file(SPEC, progress=False)
    assert path.read_bytes() == PAYLOAD
    gets = [rng for method, rng in hub.requests if method == "GET"]
    assert gets == [None, "bytes=65536-"]  # the whole chunk received is kept


def test_bytes_that_differ_from_the_hubs_sha256_are_refused_and_deleted(hub, tmp_path):
    hub.payload = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])  # the ETag still names PAYLOAD
    with pytest.raises(ChecksumError, match=f"sha256 mismatch: the Hub publishes {SHA}"):
        hub_file(SPEC, progress=False)
    assert not [p for p in (tmp_path / "hub").rglob("*") if p.is_file() and p.name == SHA]
    hub.payload = PAYLOAD
    assert hub_file(SPEC, progress=False).read_bytes() == PAYLOAD  # a retry gets it right


def test_offline_and_a_missing_file_say_what_to_download(hub, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError) as offline:
        hub_file(SPEC, progress=False)
    message = str(offline.value)
    assert "HF_HUB_OFFLINE is set" in message and "--checkpoint" in message
    assert f"/{SPEC.repo_id}/resolve/{SPEC.revision}/{SPEC.filename}" in message
    assert hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    gone = HubFile(SPEC.repo_id, "gone.pt")  # the Hub answers 404
    with pytest.raises(DownloadError, match="could not download gone.pt from the Hugging "
                                            "Face Hub") as missing:
        hub_file(gone, progress=False)
    assert "--checkpoint" in str(missing.value)


def test_released_names_resolve_through_the_table(hub, tmp_path, monkeypatch):
    """A name of HUB_WEIGHTS given as --checkpoint is downloaded and converted once; a path
    is taken as it is."""
    converted = []
    monkeypatch.setitem(weights.HUB_WEIGHTS, "p2s-test", SPEC)
    monkeypatch.setenv("P2S_CACHE", str(tmp_path / "p2s"))

    def fake_convert(checkpoint, out_dir):
        assert Path(checkpoint).read_bytes() == PAYLOAD
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / weights.METADATA_FILE).write_text("{}")
        converted.append(checkpoint)

    monkeypatch.setattr(weights, "convert_checkpoint", fake_convert)
    folder = weights.resolve_checkpoint("p2s-test", progress=False)
    assert folder == tmp_path / "p2s" / "model" and (folder / weights.METADATA_FILE).is_file()
    assert weights.resolve_checkpoint("p2s-test", progress=False) == folder
    assert len(converted) == 1
    assert weights.resolve_checkpoint(str(tmp_path), progress=False) == tmp_path


# ------------------------------------------------------------------------------ not on the Hub


def test_plain_download_of_a_url_off_the_hub(hub, tmp_path):
    url = f"http://127.0.0.1:{hub.server_address[1]}/{SPEC.repo_id}/resolve/main/model.pt"
    path = fetch_url(url, "x.pt", sha256=SHA, progress=False, directory=tmp_path / "plain")
    assert path.read_bytes() == PAYLOAD and not list((tmp_path / "plain").glob(".*"))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        fetch_url(url, "y.pt", sha256="0" * 64, progress=False, directory=tmp_path / "plain")
    assert not (tmp_path / "plain" / "y.pt").exists()
    with pytest.raises(DownloadError, match="save it as"):
        fetch_url(url + "nope", "z.pt", progress=False, directory=tmp_path / "plain")


def test_cache_dir_per_platform():
    assert cache_dir({"P2S_CACHE": "/x/y"}, "linux") == Path("/x/y")
    assert cache_dir({"HOME": "/h"}, "linux") == Path("/h/.cache/p2s_jax")
    assert cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/c"}, "linux") == Path("/c/p2s_jax")
    assert cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "rel"}, "linux") == Path("/h/.cache/p2s_jax")
    assert cache_dir({"HOME": "/h"}, "darwin") == Path("/h/Library/Caches/p2s_jax")
    assert cache_dir({"HOME": "/h", "LOCALAPPDATA": "/l"}, "win32") == Path("/l/p2s_jax")
