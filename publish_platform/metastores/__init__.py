"""Where batches are published: the metastore interface and its implementations.

``open_metastore`` picks one from ``PUBLISH_PLATFORM_METASTORE``: ``atlan`` selects Atlan through
pyatlan; a SQL URL selects the local catalog (SQLite or Postgres, one schema for both). Each is
imported only when selected (pyatlan's import alone takes seconds).
"""

from __future__ import annotations

from publish_platform.config import Settings
from publish_platform.metastores.base import EntityWrite, Identity, Metastore, WriteResult


def open_metastore(settings: Settings) -> Metastore:
    if settings.metastore_kind == "atlan":
        from publish_platform.metastores.atlan import AtlanMetastore

        return AtlanMetastore(settings)
    from publish_platform.metastores.sql import SqlCatalog

    return SqlCatalog(settings.metastore_url)


__all__ = ["EntityWrite", "Identity", "Metastore", "WriteResult", "open_metastore"]
