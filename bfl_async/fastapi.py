"""FastAPI integration: one shared `AsyncBFL` per app, and the route BFL's webhooks reach.

```
app = FastAPI(lifespan=bfl_lifespan(webhook_url=URL, webhook_secret=SECRET))
app.include_router(webhook_router())  # POST /bfl/webhook

@app.post("/images")
async def create(prompt: str, client: BFLClient) -> dict[str, str]:
    image = await client.generate("flux-2-pro", prompt=prompt, output_dir="images/")
    ...
```
Needs the `fastapi` extra: `pip install 'bfl-async[fastapi]'`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

try:
    from fastapi import APIRouter, Depends, FastAPI, Request, Response
    from fastapi.responses import JSONResponse
except ImportError as exc:
    raise ImportError(
        "bfl_async.fastapi needs FastAPI: install it with pip install 'bfl-async[fastapi]'"
    ) from exc

from . import AsyncBFL, WebhookPayloadError, WebhookVerificationError

__all__ = ["MAX_WEBHOOK_BYTES", "BFLClient", "bfl_lifespan", "get_client", "webhook_router"]

_STATE = "bfl_client"
MAX_WEBHOOK_BYTES = 1 << 20
"""The largest webhook body the router reads; a task event is a few hundred bytes."""


def bfl_lifespan(
    **options: Any,
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]:
    """A lifespan opening one `AsyncBFL(**options)` for the app, closed on shutdown.

    Shutdown waits for the tasks in flight as `AsyncBFL.aclose` does. To combine it with a
    lifespan of your own, enter `bfl_lifespan(...)(app)` in yours and yield its state.
    Under `uvicorn --workers N`, pass `limiter="redis://..."` (or set BFL_LIMITER_URL): the
    workers then share the account's limits, and webhooks reach the worker that waits.

    ```python
    app = FastAPI(lifespan=bfl_lifespan(region="eu", limits={"standard": 12}))
    ```
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with AsyncBFL(**options) as client:
            yield {_STATE: client}

    return lifespan


def get_client(request: Request) -> AsyncBFL:
    """The app's shared `AsyncBFL`, as a FastAPI dependency."""
    client = getattr(request.state, _STATE, None)
    if not isinstance(client, AsyncBFL):
        raise RuntimeError(
            "this app has no AsyncBFL: create it with FastAPI(lifespan=bfl_lifespan(...))"
        )
    return client


async def _client(request: Request) -> AsyncBFL:
    # `async`, so FastAPI calls it on the event loop: a sync dependency takes a thread of the
    # pool that sync routes and file serving share, and queues behind them when it is busy.
    return get_client(request)


BFLClient = Annotated[AsyncBFL, Depends(_client)]
"""A route parameter annotated `BFLClient` receives the app's shared `AsyncBFL`."""


def webhook_router(path: str = "/bfl/webhook") -> APIRouter:
    """A router receiving BFL's webhooks at `path` for the app's shared client.

    Each delivery is verified with the client's `webhook_secret` and handed to the client,
    which ends the task's watch; nothing else happens in the request, so BFL gets its
    answer at once: 204, 401 for a forged delivery, 400 for a malformed one, 413 for a
    body over `MAX_WEBHOOK_BYTES`, 404 if the client has no webhook (the route is not in
    use). Duplicate deliveries are answered 204 and change nothing. Point the client's
    `webhook_url` here.
    """
    router = APIRouter()

    @router.post(path, status_code=204, include_in_schema=False)
    async def receive_webhook(request: Request, client: BFLClient) -> Response:
        if client.webhook_url is None:  # no secret either: nothing could verify a delivery
            return JSONResponse(
                {"detail": "webhooks are not enabled on this client"}, status_code=404
            )
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_WEBHOOK_BYTES:  # read no more of what cannot be an event
                return JSONResponse({"detail": "webhook body too large"}, status_code=413)
        try:
            client.handle_webhook(bytes(body), request.headers)
        except WebhookVerificationError:
            return JSONResponse({"detail": "invalid webhook signature"}, status_code=401)
        except WebhookPayloadError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        return Response(status_code=204)

    return router
