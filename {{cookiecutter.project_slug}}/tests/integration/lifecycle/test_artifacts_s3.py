"""Artifacts in S3: a local S3-compatible server (moto) started here, an MLflow server whose
artifacts go there, and clients that hold no S3 credentials (the server proxies them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from {{ cookiecutter.package_name }}.settings import DEFAULT_QUEUE_PREFIX, ENV_PREFIX

from .test_tracking import check_batch_run, cli, runs_of, write_questions

pytestmark = pytest.mark.integration
BUCKET = "test-artifacts"
# moto accepts any keys; real ones would come from the environment the same way.
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
KEYS |= {"AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(tmp_path):
    """(endpoint URL, boto3 client) of a moto_server on a free port, stopped afterwards."""
    from tests.conftest import free_port, wait_for_http

    port = free_port()
    log_path = tmp_path / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", process, log_path, timeout_s=30)
        yield endpoint, boto3.client("s3", endpoint_url=endpoint, **_boto_keys())
    finally:
        process.terminate()
        process.wait(timeout=30)


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
        "region_name": KEYS["AWS_DEFAULT_REGION"],
    }


def keys_in(client, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def client_env(**extra: str) -> dict[str, str]:
    """A client's environment: no AWS credentials at all, so only the proxy can reach S3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return (
        env
        | {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
        | extra
    )


def test_artifacts_land_in_the_bucket_and_the_champion_loads_back(
    s3, mlflow_server, tmp_path, model_dir, settings
):
    endpoint, bucket = s3
    server = mlflow_server(
        KEYS
        | {
            f"{ENV_PREFIX}MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": endpoint,
        }
    )
    bucket.head_bucket(Bucket=BUCKET)  # `mlflow-server` created it

    target = tmp_path / "replies.jsonl"
    env = client_env(MLFLOW_TRACKING_URI=server)
    result = cli("batch", str(write_questions(tmp_path)), str(target), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(server)
    check_batch_run(client, target, tmp_path)  # read back through the server
    (run,) = runs_of(client, "batch")
    stored = keys_in(bucket, "mlflow/")
    (results_key,) = [
        k for k in stored if k.endswith(f"{run.info.run_id}/artifacts/results/{target.name}")
    ]
    body = bucket.get_object(Bucket=BUCKET, Key=results_key)["Body"].read()
    assert body == target.read_bytes()

    registered = cli(
        "model", "register", env=env | {f"{ENV_PREFIX}CACHE_DIR": str(settings.cache_dir)}
    )
    assert registered.returncode == 0, registered.stderr[-3000:]
    weights = [
        k for k in keys_in(bucket, "mlflow/") - stored if k.endswith((".safetensors", "model.bin"))
    ]
    assert weights, "the registered model's weights should be in the bucket"

    fresh = tmp_path / "fresh-cache"
    serve_env = env | {
        f"{ENV_PREFIX}MODEL": f"models:/{DEFAULT_QUEUE_PREFIX}@champion",
        f"{ENV_PREFIX}CACHE_DIR": str(fresh),
    }
    served = cli("generate", "What is the capital of France?", env=serve_env)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "Paris" in served.stdout
    registry = fresh / "models" / "registry" / DEFAULT_QUEUE_PREFIX
    assert [p.name[:3] for p in registry.iterdir()] == ["v1-"]


def test_a_model_directory_round_trips_through_s3(s3, tmp_path, model_dir):
    endpoint, bucket = s3
    bucket.create_bucket(Bucket=BUCKET)
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (source / "nested").mkdir()
    (source / "nested" / "weights.bin").write_bytes(os.urandom(4096))
    env = KEYS | {"MLFLOW_S3_ENDPOINT_URL": endpoint}
    pushed = cli("artifacts", "push", str(source), f"s3://{BUCKET}/adapters/a1", env=env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert keys_in(bucket, "adapters/a1/") == {
        "adapters/a1/adapter_config.json",
        "adapters/a1/nested/weights.bin",
    }
    back = tmp_path / "back"
    pulled = cli("artifacts", "pull", f"s3://{BUCKET}/adapters/a1", str(back), env=env)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert (back / "nested" / "weights.bin").read_bytes() == (
        source / "nested" / "weights.bin"
    ).read_bytes()

    missing = cli("artifacts", "pull", f"s3://{BUCKET}/adapters/none", str(back), env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: nothing is stored at s3://{BUCKET}/adapters/none"
