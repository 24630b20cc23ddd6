"""Resources: S3 through dagster-aws, and the platform's settings, state store and metastore."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import ConfigurableResource
from dagster_aws.s3 import S3Resource

from publish_platform.config import Settings, load_settings
from publish_platform.metastores import Metastore, open_metastore
from publish_platform.state import StateStore


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
    return {"s3": S3Resource(), "platform": PlatformResource()}
