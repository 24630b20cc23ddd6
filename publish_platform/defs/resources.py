"""Resources: S3 through dagster-aws, and the platform's settings, state store and metastore."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource

from publish_platform.config import Settings, load_settings
from publish_platform.metastores import Metastore, open_metastore
from publish_platform.state import StateStore

_S3_CLIENTS: dict[str, Any] = {}
_S3_CLIENTS_LOCK = threading.Lock()


class SharedS3Resource(S3Resource):
    """dagster-aws's S3 resource, its boto3 client made once per process, configuration and AWS
    environment.

    ``S3Resource.get_client`` builds a new boto3 session each call, which loads botocore's
    service models again: 0.1–0.4 s of CPU that every sensor tick and every step paid. boto3
    clients are thread-safe, and refreshable credentials refresh inside the client.
    """

    def get_client(self) -> Any:
        # What boto3 builds the client from: this configuration, and the AWS_* variables it
        # reads for what is not configured (endpoint, region, credentials, profile).
        aws_env = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
        key = self.model_dump_json() + repr(aws_env)
        with _S3_CLIENTS_LOCK:
            if key not in _S3_CLIENTS:
                _S3_CLIENTS[key] = super().get_client()
            return _S3_CLIENTS[key]


class PlatformResource(ConfigurableResource):
    """The platform's configuration, read from ``PUBLISH_PLATFORM_*`` in the process that runs.

    Nothing here is configured in Dagster itself, so no value (and no secret) is stored in the
    run config or shown in the launchpad.
    """

    def settings(self) -> Settings:
        return load_settings()

    def state_store(self, s3: Any) -> StateStore:
        return StateStore(s3, self.settings().state_location)

    @contextmanager
    def metastore(self) -> Iterator[Metastore]:
        metastore = open_metastore(self.settings())
        try:
            yield metastore
        finally:
            metastore.close()


def default_resources() -> dict[str, Any]:
    # endpoint_url unset: boto3 reads AWS_ENDPOINT_URL (and credentials) from the environment.
    return {"s3": SharedS3Resource(), "platform": PlatformResource()}
