"""Property tests: whatever the parameters or the server's answers, only typed errors.

A caller catches `BFLError`; a bare KeyError, TypeError or pydantic ValidationError from a
server body would slip past that, so none may escape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bfl_async import MODELS, AsyncBFL, Backoff, BFLError, Result, Task, estimate_cost

from .helpers import JPEG, PNG, WEBP

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
API = "https://api.bfl.ai"
TASK = Task(id="t1", polling_url=f"{API}/v1/get_result?id=t1", model="flux-2-pro")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
param_names = st.sampled_from(
    ["prompt", "width", "height", "seed", "output_format", "safety_tolerance", "guidance",
     "steps", "aspect_ratio", "input_image", "input_image_2", "raw", "image", "mask",
     "webhook_url", "webhook_secret", "prompt_upsampling", "top", "extra"]
) | st.text(max_size=12)  # fmt: skip
models = st.sampled_from(list(MODELS)) | st.text(max_size=20)
statuses = st.sampled_from(
    ["Pending", "Ready", "Request Moderated", "Content Moderated", "Error", "Task not found"]
) | st.text(max_size=12)  # fmt: skip
poll_bodies = st.fixed_dictionaries(
    {"status": statuses},
    optional={"id": json_values, "result": json_values, "details": json_values,
              "progress": json_values, "preview": json_values},
) | json_values  # fmt: skip
raw_bodies = st.binary(max_size=200) | st.sampled_from(
    [b"<html><body>502 Bad Gateway</body></html>", b"{", b"null", b"[]", b'{"id": 1}']
)


def answer(status: int, body: Any, raw: bool = False) -> httpx.Response:
    if raw:
        return httpx.Response(status, content=body)
    return httpx.Response(status, content=json.dumps(body).encode())


def client_on(handler: Callable[[httpx.Request], httpx.Response]) -> AsyncBFL:
    return AsyncBFL(
        api_key="k",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        poll_schedule=Backoff(initial=0.001, factor=1.0, maximum=0.001, jitter=0.0),
        retry_base_delay=0.001,
        poll_rate=None,
        close_grace=0.0,
        submit_retries=1,
        rate_limit_retries=1,
        download_attempts=1,
    )


async def outcome(action: Callable[[AsyncBFL], Any], handler: Any) -> Any:
    """Run `action(client)`; return its value or its exception, raised outside the client."""
    async with client_on(handler) as client:
        try:
            return await action(client)
        except Exception as exc:
            return exc


def only_typed(value: Any) -> None:
    if isinstance(value, Exception):
        assert isinstance(value, BFLError), f"{type(value).__name__}: {value}"


@SETTINGS
@given(model=models, params=st.dictionaries(param_names, json_values, max_size=6))
def test_any_parameters_are_accepted_or_refused_with_a_parameter_error(
    model: str, params: dict[str, Any]
) -> None:
    try:
        cost = estimate_cost(model, **params)
    except BFLError:
        return
    assert cost >= 0


@SETTINGS
@given(
    status=st.sampled_from([200, 201, 400, 401, 402, 403, 404, 422, 429, 500, 502, 503, 504]),
    body=json_values,
    raw=raw_bodies,
    use_raw=st.booleans(),
)
def test_any_submit_answer_gives_a_task_or_a_typed_error(
    status: int, body: Any, raw: bytes, use_raw: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/flux-2-pro":
            return answer(status, raw if use_raw else body, use_raw)
        return answer(200, {"status": "Pending"})

    async def submit(client: AsyncBFL) -> Any:
        return await client.submit("flux-2-pro", prompt="a fox")

    value = anyio.run(outcome, submit, handler)
    only_typed(value)
    if not isinstance(value, Exception):
        assert isinstance(value, Task) and value.id == body["id"]


@SETTINGS
@given(status=st.sampled_from([200, 400, 401, 403, 404, 410, 429, 500]), body=poll_bodies)
def test_any_poll_answer_gives_a_result_or_a_typed_error(status: int, body: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return answer(status, body)

    async def wait(client: AsyncBFL) -> Any:
        return await client.wait(TASK, timeout=0.05)

    value = anyio.run(outcome, wait, handler)
    only_typed(value)
    if not isinstance(value, Exception):
        assert isinstance(value, Result) and isinstance(value.sample, str)


@SETTINGS
@given(body=json_values, raw=raw_bodies, use_raw=st.booleans())
def test_any_credits_answer_gives_a_number_or_a_typed_error(
    body: Any, raw: bytes, use_raw: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return answer(200, raw if use_raw else body, use_raw)

    async def credits(client: AsyncBFL) -> Any:
        return await client.credits()

    only_typed(anyio.run(outcome, credits, handler))


@SETTINGS
@given(
    content=st.binary(max_size=64) | st.sampled_from([PNG, JPEG, WEBP, PNG[:5], b""]),
    status=st.sampled_from([200, 403, 404, 500]),
)
def test_any_download_saves_an_image_or_raises_a_typed_error(
    content: bytes, status: int, tmp_path: Path
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content)

    result = Result(task=TASK, sample="https://delivery-eu1.bfl.ai/x.png", ready_at=0.0)

    async def download(client: AsyncBFL) -> Any:
        return await client.download(result, tmp_path, overwrite=True)

    value = anyio.run(outcome, download, handler)
    only_typed(value)
    if not isinstance(value, Exception):
        assert value.read_bytes()[:3] in (PNG[:3], JPEG[:3], WEBP[:3])
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("payload", [{"status": "Ready", "result": {"sample": 5}}, []])
def test_known_awkward_bodies(payload: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return answer(200, payload)

    async def wait(client: AsyncBFL) -> Any:
        return await client.wait(TASK, timeout=0.05)

    value = anyio.run(outcome, wait, handler)
    assert isinstance(value, BFLError)
