"""Shared fixtures: tests run under anyio (asyncio by default; some on trio too)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Most tests run on asyncio; end-to-end ones parametrise over trio as well."""
    return "asyncio"
