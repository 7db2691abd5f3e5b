"""Test doubles for bfl_async: `FakeBFL`, Black Forest Labs' FLUX API faked over real HTTP
on loopback or in memory through an httpx transport."""

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
    "MEMORY_URLS",
    "FakeBFL",
    "FakeTask",
    "Fault",
    "FaultKind",
    "HostURLs",
    "ModelSpec",
    "run_fake_server",
]
