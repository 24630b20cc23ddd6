"""The embedded S3 API: a moto server on 127.0.0.1, for the local mode and the tests.

It is a real S3 endpoint over HTTP in its own process, so every platform process (CLI, Dagster
webserver, daemon, run workers) reaches it through boto3 exactly as it would reach AWS.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local-moto",
    "AWS_SECRET_ACCESS_KEY": "local-moto",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto_server(port: int, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start ``moto_server`` on 127.0.0.1:port and wait until it answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={**os.environ, **LOCAL_CREDENTIALS},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("moto server did not start within 30s")


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client; the endpoint defaults to boto3's own AWS_ENDPOINT_URL."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def ensure_bucket(s3: Any, bucket: str) -> None:
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def notify_landing_queue(s3: Any, bucket: str, queue_name: str) -> str:
    """An SQS queue receiving the bucket's ObjectCreated notifications (what a production
    bucket has configured for the landing sensor); returns its URL."""
    sqs = boto3.client("sqs", endpoint_url=s3.meta.endpoint_url)
    queue_url = sqs.create_queue(QueueName=queue_name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": arn["Attributes"]["QueueArn"],
                    "Events": ["s3:ObjectCreated:*"],
                }
            ]
        },
    )
    return queue_url


def landing_order(key: str) -> tuple[int, str]:
    """Data files first, then their ``.sha256`` sidecars, the manifest last: the order the
    Application SDK writes them, so a watching sensor never sees a half-landed run as ready."""
    if key.rsplit("/", 1)[-1] == "publish-request.json":
        return (2, key)
    return (1 if key.endswith(".sha256") else 0, key)


def put_files(s3: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> list[str]:
    """Upload files keyed by their path below ``prefix``, in landing order."""
    keys = []
    for relative in sorted(files, key=landing_order):
        s3.put_object(Bucket=bucket, Key=prefix + relative, Body=files[relative])
        keys.append(prefix + relative)
    return keys


def upload_tree(s3: Any, folder: Path, bucket: str, prefix: str = "") -> list[str]:
    """Upload every file below ``folder`` with its path relative to it as the key."""
    files = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }
    return put_files(s3, bucket, prefix, files)
