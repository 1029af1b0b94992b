"""Model directories (Hugging Face models, converted models, LoRA adapters) saved to and loaded
from a store: a local folder (a path or `file://`) or S3 (`s3://bucket/prefix`, any
S3-compatible endpoint).

S3 credentials come from the usual AWS variables (or an instance role); the endpoint from the
settings (`MLFLOW_S3_ENDPOINT_URL`) for MinIO or moto. Downloads are staged then renamed, so a
reader never sees half a model.
"""

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ModelSourceError, one_line
from .cache import COMPLETE_MARKER

log = logging.getLogger(__name__)
PULL_MARKER = ".pulled-from"  # written into every folder `pull_dir` makes: only those it replaces


def push_dir(source: Path, uri: str, endpoint_url: str | None = None) -> int:
    """Copy every file under `source` to the store at `uri`; return the number of files.

    Raises FileNotFoundError for a missing source, ModelSourceError when S3 refuses.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not uri.startswith("s3://"):
        target = _local_path(uri)
        _check_replaceable(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            staging = Path(tmp) / "dir"
            shutil.copytree(source, staging)
            (staging / PULL_MARKER).write_text(f"{source}\n")
            if target.exists():
                target.rename(Path(tmp) / "old")
            staging.rename(target)
        return len(files)
    bucket, prefix = _bucket_and_prefix(uri)
    client = _s3(endpoint_url)
    for number, path in enumerate(files, 1):
        key = f"{prefix}/{path.relative_to(source).as_posix()}".lstrip("/")
        log.info("[%d/%d] uploading %s to s3://%s/%s", number, len(files), path.name, bucket, key)
        _s3_call(lambda: client.upload_file(str(path), bucket, key), uri)  # noqa: B023
    return len(files)


def pull_dir(uri: str, target: Path, endpoint_url: str | None = None) -> Path:
    """Copy the directory at `uri` into `target` (replaced whole); return `target`.

    Raises ModelSourceError when nothing is stored at `uri` or S3 refuses.
    """
    _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "dir"
        if uri.startswith("s3://"):
            _pull_s3(uri, staging, endpoint_url)
        else:
            source = _local_path(uri)
            if not source.is_dir():
                raise ModelSourceError(f"nothing is stored at {uri}")
            shutil.copytree(source, staging)
        (staging / PULL_MARKER).write_text(uri + "\n")
        _check_replaceable(target)
        if target.exists():  # swapped, not deleted first: a reader sees the old or the new
            old = Path(tmp) / "old"
            target.rename(old)
        staging.rename(target)
    return target


def _check_replaceable(target: Path) -> None:
    """Refuse to replace a folder that `pull_dir` did not make (the current one, a home...)."""
    if target.is_file() or target.is_symlink():
        raise ModelSourceError(f"{target} is a file; pull into a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        if not (target / PULL_MARKER).is_file() and not (target / COMPLETE_MARKER).is_file():
            raise ModelSourceError(
                f"{target} already holds files that `artifacts pull` did not put there; "
                "pull into a new or empty folder"
            )


def fetch_model(uri: str, models_dir: Path, endpoint_url: str | None = None) -> Path:
    """The model directory stored at `uri`, downloaded once into the cache and reused."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    target = models_dir / "stored" / f"{uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    pull_dir(uri, target, endpoint_url)
    (target / COMPLETE_MARKER).write_text(uri + "\n")
    return target


def _pull_s3(uri: str, staging: Path, endpoint_url: str | None) -> None:
    bucket, prefix = _bucket_and_prefix(uri)
    client = _s3(endpoint_url)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    keys = _s3_call(lambda: [o["Key"] for page in pages for o in page.get("Contents", [])], uri)
    if not keys:
        raise ModelSourceError(f"nothing is stored at {uri}")
    staging.mkdir(parents=True, exist_ok=True)
    root = staging.resolve()
    for number, key in enumerate(keys, 1):
        if key.endswith("/"):
            continue  # a "folder" placeholder object
        path = safe_path(root, key.removeprefix(f"{prefix}/"), uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("[%d/%d] downloading s3://%s/%s", number, len(keys), bucket, key)
        _s3_call(lambda: client.download_file(bucket, key, str(path)), uri)  # noqa: B023


def safe_path(root: Path, relative: str, uri: str) -> Path:
    """`root / relative`, refused (ModelSourceError) if it would land outside `root`."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or path == root:
        raise ModelSourceError(f"stored name {relative!r} would be written outside {uri}'s folder")
    return path


def _local_path(uri: str) -> Path:
    return Path(urlsplit(uri).path if uri.startswith("file://") else uri).expanduser()


def _bucket_and_prefix(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if not parts.netloc:
        raise ModelSourceError(f"{uri} names no bucket (s3://bucket/prefix)")
    return parts.netloc, parts.path.strip("/")


def _s3(endpoint_url: str | None) -> Any:
    try:
        import boto3
    except ImportError:
        raise ModelSourceError(
            "s3:// needs boto3: render with artifact_store=s3 or `pip install boto3`"
        ) from None
    return boto3.client("s3", endpoint_url=endpoint_url)


def _s3_call(call: Any, uri: str) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except (BotoCoreError, ClientError) as exc:
        first = one_line(exc, 200)
        raise ModelSourceError(f"S3 refused {uri}: {first}") from None
