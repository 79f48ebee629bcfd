"""p2s_jax.utils.download against a local HTTP server on 127.0.0.1 (no real host is ever contacted)."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from p2s_jax.utils import download
from p2s_jax.utils.download import ChecksumError, DownloadError, cache_dir, fetch

PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file (Range, ETag) and a Hugging Face-like redirect at /resolve."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path == "/resolve":
            self.send_response(302)
            self.send_header("Location", "/file")
            self.send_header("X-Linked-ETag", f'"{server.linked_etag}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/file":
            self.send_error(404)
            return
        data, start = server.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        if server.etag:
            self.send_header("ETag", f'"{server.etag}"')
        self.end_headers()
        self.wfile.write(body[:server.cut_after] if server.cut_after else body)
        server.cut_after = None  # only the first response is cut

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.payload, httpd.etag, httpd.linked_etag = [], PAYLOAD, SHA, SHA
    httpd.honour_range, httpd.cut_after = True, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_full_download(server, tmp_path):
    path = fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert path == tmp_path / "w.bin" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "w.bin.part").exists()
    assert server.requests == [("/file", None)]


def test_cached_file_makes_no_request(server, tmp_path):
    fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert len(server.requests) == 1
    server.payload = b"changed"  # would fail verification if it were downloaded again
    assert fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path).read_bytes() \
        == PAYLOAD
    assert len(server.requests) == 1


def test_resume_from_part_file(server, tmp_path):
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD[:123_456])
    path = fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("/file", "bytes=123456-")]


def test_interrupted_transfer_resumes(server, tmp_path):
    server.cut_after = 100_000
    with pytest.raises(DownloadError, match="run again to resume"):
        fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert (tmp_path / "w.bin.part").stat().st_size == 100_000
    assert not (tmp_path / "w.bin").exists()
    assert fetch(server.url + "/file", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/file", "bytes=100000-")


def test_server_ignoring_range_restarts(server, tmp_path):
    server.honour_range = False
    (tmp_path / "w.bin.part").write_bytes(b"x" * 5000)  # stale bytes that must not survive
    assert fetch(server.url + "/file", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD
    assert server.requests == [("/file", "bytes=5000-")]


def test_complete_part_file_is_finished(server, tmp_path):
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD)  # killed between download and rename
    assert fetch(server.url + "/file", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD
    assert server.requests == [("/file", f"bytes={len(PAYLOAD)}-")]


def test_given_sha256_mismatch(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError, match=f"expected {wrong}, got {SHA}"):
        fetch(server.url + "/file", "w.bin", sha256=wrong, progress=False, directory=tmp_path)
    assert not (tmp_path / "w.bin.part").exists() and not (tmp_path / "w.bin").exists()
    assert fetch(server.url + "/file", "w.bin", sha256=SHA.upper(), progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD


def test_etag_mismatch(server, tmp_path):
    server.etag = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(ChecksumError, match=f"expected {server.etag}, got {SHA}"):
        fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert not (tmp_path / "w.bin.part").exists()


def test_corrupt_part_file_is_caught_by_etag(server, tmp_path):
    (tmp_path / "w.bin.part").write_bytes(b"\0" * 1000)  # not the file's first bytes
    with pytest.raises(ChecksumError):
        fetch(server.url + "/file", "w.bin", progress=False, directory=tmp_path)
    assert fetch(server.url + "/file", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD


def test_non_sha_etag_is_not_a_checksum(server, tmp_path):
    server.etag = "5d41402abc4b2a76b9719d911017c592-3"  # S3 multipart style
    assert fetch(server.url + "/file", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD


def test_linked_etag_on_redirect(server, tmp_path):
    """Hugging Face puts the LFS sha256 on the redirect, not on the CDN's response."""
    server.etag = None
    server.linked_etag = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(ChecksumError, match=f"expected {server.linked_etag}"):
        fetch(server.url + "/resolve", "w.bin", progress=False, directory=tmp_path)
    server.linked_etag = SHA
    assert fetch(server.url + "/resolve", "w.bin", progress=False,
                 directory=tmp_path).read_bytes() == PAYLOAD
    assert server.requests[-2:] == [("/resolve", None), ("/file", None)]


def test_http_error_names_url_and_destination(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404") as error:
        fetch(server.url + "/missing", "w.bin", progress=False, directory=tmp_path)
    assert server.url + "/missing" in str(error.value)


def test_unreachable_host(tmp_path, monkeypatch):
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/SAM-pose2seg_hiera_b+.pt"
    monkeypatch.setenv("P2S_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DownloadError) as error:
        fetch(url, download.SAM_POSE2SEG_FILENAME, progress=False, timeout=5)
    message = str(error.value)
    assert url in message
    assert str(tmp_path / "cache" / "SAM-pose2seg_hiera_b+.pt") in message
    assert "--checkpoint" in message
    assert not (tmp_path / "cache" / "SAM-pose2seg_hiera_b+.pt.part").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        fetch("http://127.0.0.1:9/x", "../x", directory=tmp_path)
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch("http://127.0.0.1:9/x", "x", sha256="abc", directory=tmp_path)


def test_cache_dir_per_platform():
    home = "/home/u"
    assert cache_dir({"P2S_CACHE": "/data/c", "HOME": home}, "linux") == Path("/data/c")
    assert cache_dir({"HOME": home}, "linux") == Path("/home/u/.cache/p2s_jax")
    assert cache_dir({"HOME": home, "XDG_CACHE_HOME": "/xdg"}, "linux") == Path("/xdg/p2s_jax")
    assert cache_dir({"HOME": home, "XDG_CACHE_HOME": "rel"}, "linux") == Path(
        "/home/u/.cache/p2s_jax")
    assert cache_dir({"HOME": home}, "darwin") == Path("/home/u/Library/Caches/p2s_jax")
    assert cache_dir({"HOME": home, "LOCALAPPDATA": "/appdata"}, "win32") == Path(
        "/appdata/p2s_jax")


def test_constants():
    assert download.SAM_POSE2SEG_URL == ("https://huggingface.co/vrg-prague/BBoxMaskPose/"
                                         "resolve/main/SAM-pose2seg_hiera_b+.pt")
    assert download.SAM_POSE2SEG_URL.endswith("/" + download.SAM_POSE2SEG_FILENAME)
