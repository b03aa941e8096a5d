"""The version of convcli's machine-readable output (JSON documents, sweep records).

:data:`SCHEMA_VERSION` is raised by one whenever a document changes incompatibly: a key
removed or renamed, or a value whose type or meaning changes. Added keys do not raise it, so
readers should ignore keys they do not know.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_VERSION = 1


def versioned(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` with ``"schema_version"`` as its first key."""
    return {"schema_version": SCHEMA_VERSION, **document}
