"""Where batches are published: the metastore interface and its implementations.

``open_metastore`` picks one from ``PUBLISH_PLATFORM_METASTORE``: a SQL URL selects the local
catalog (SQLite or Postgres, one schema for both).
"""

from __future__ import annotations

from publish_platform.metastores.base import EntityWrite, Identity, Metastore, WriteResult


def open_metastore(url: str) -> Metastore:
    if url == "atlan":
        raise NotImplementedError(
            "PUBLISH_PLATFORM_METASTORE=atlan is not available yet: use a sqlite:/// or"
            " postgresql:// URL"
        )
    from publish_platform.metastores.sql import SqlCatalog

    return SqlCatalog(url)


__all__ = ["EntityWrite", "Identity", "Metastore", "WriteResult", "open_metastore"]
