"""Test doubles for bfl_async: `FakeBFL`, Black Forest Labs' FLUX API faked over real HTTP."""

from ._fake import FakeBFL, FakeTask, Fault, FaultKind, ModelSpec, run_fake_server

__all__ = ["FakeBFL", "FakeTask", "Fault", "FaultKind", "ModelSpec", "run_fake_server"]
