"""Shared fixtures: tests run under anyio (asyncio by default; some on trio too)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from .redis_server import RedisServer, redis_server


@pytest.fixture
def anyio_backend() -> str:
    """Most tests run on asyncio; end-to-end ones parametrise over trio as well."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_shared_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BFL_LIMITER_URL of the developer's shell must not send every test to Redis."""
    monkeypatch.delenv("BFL_LIMITER_URL", raising=False)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client takes proxies from the environment: the tests' loopback servers must not
    be reached through the developer's."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def planned_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every `anyio.sleep` the code asks for, noted and skipped: long waits, tested at once."""
    waits: list[float] = []
    sleep = anyio.sleep

    async def planned(delay: float) -> None:
        waits.append(delay)
        await sleep(0)

    monkeypatch.setattr(anyio, "sleep", planned)
    return waits


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped after the test."""
    with redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """An existing directory no file can be created in, even by root (/proc on Linux)."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir(mode=0o500)
        yield directory
        directory.chmod(0o700)
    elif Path("/proc/self").is_dir():
        yield Path("/proc")
    else:
        pytest.skip("needs a directory root cannot write to")
