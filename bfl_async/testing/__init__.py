"""Test doubles for bfl_async: `FakeBFL`, Black Forest Labs' FLUX API faked over real HTTP
on loopback or in memory through an httpx transport."""

from ._client import FAKE_TIME_SCALE_ENV, fake_client
from ._fake import (
    MEMORY_URLS,
    FakeBFL,
    FakeTask,
    Fault,
    FaultKind,
    HostURLs,
    ModelSpec,
    run_fake_server,
)

__all__ = [
    "FAKE_TIME_SCALE_ENV",
    "MEMORY_URLS",
    "FakeBFL",
    "FakeTask",
    "Fault",
    "FaultKind",
    "HostURLs",
    "ModelSpec",
    "fake_client",
    "run_fake_server",
]
