"""A small image service on bfl_async and FastAPI, with BFL's results pushed by webhook.

    BFL_API_KEY=... PUBLIC_URL=https://images.example.com BFL_WEBHOOK_SECRET=... \\
        uvicorn --factory examples.fastapi_app.app:app_from_environment

- `POST /images` `{"prompt": "a red fox"}`: generates one image, answers with its URL.
- `POST /images/batch` `{"prompts": [...]}`: many at once, one entry per prompt.
- `GET /tasks/{task_id}`: pending, ready (with the URL) or failed.
- `POST /bfl/webhook`: where BFL pushes each task's end (verified, 401 if forged); only
  with webhooks configured.
- `GET /files/{name}`: the images, served from disk.
- `GET /health`: ok, and which worker process answered.

One `AsyncBFL` serves every request, so all of them share its in-flight limit. Without
PUBLIC_URL and BFL_WEBHOOK_SECRET it polls instead. With BFL_LIMITER_URL=redis://... it runs
under `uvicorn --workers N`: the workers share the account's limits and poll budget, and a
webhook reaching any worker ends the wait of the one that submitted the task. (`/tasks/{id}`
stays per worker: a real service keeps that state in its database.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from bfl_async import (
    BFLError,
    LimiterUnavailableError,
    ModerationError,
    ParameterError,
    Task,
    WaitTimeoutError,
)
from bfl_async.fastapi import BFLClient, bfl_lifespan, webhook_router

WEBHOOK_PATH = "/bfl/webhook"


class ImageRequest(BaseModel):
    """One image to generate."""

    prompt: str = Field(min_length=1, max_length=4000)
    seed: int | None = None


class BatchRequest(BaseModel):
    """Many images to generate, one per prompt."""

    prompts: list[str] = Field(min_length=1, max_length=100)


def create_app(
    *,
    images_dir: Path,
    public_url: str | None = None,
    webhook_secret: str | None = None,
    model: str = "flux-2-pro",
    **client_options: Any,
) -> FastAPI:
    """The service; `client_options` go to `AsyncBFL` (api_key, base_url, limits...)."""
    jobs: dict[str, dict[str, Any]] = {}

    def submitted(task: Task) -> None:
        jobs[task.id] = {"task_id": task.id, "status": "pending"}

    if public_url and webhook_secret:
        client_options["webhook_url"] = public_url.rstrip("/") + WEBHOOK_PATH
        client_options["webhook_secret"] = webhook_secret
    images_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(
        title="bfl_async example", lifespan=bfl_lifespan(on_submitted=submitted, **client_options)
    )
    if client_options.get("webhook_url"):  # else it polls, and the route has no use
        app.include_router(webhook_router(WEBHOOK_PATH))
    app.mount("/files", StaticFiles(directory=images_dir), name="files")

    def finished(request: Request, task_id: str, path: Path, seed: int | None) -> dict[str, Any]:
        url = str(request.url_for("files", path=path.name))
        jobs[task_id] = {"task_id": task_id, "status": "ready", "url": url, "seed": seed}
        return jobs[task_id]

    def failed(error: Exception) -> dict[str, Any]:
        task = getattr(error, "task", None)
        answer = {"status": "failed", "error": str(error)}
        if isinstance(task, Task):
            jobs[task.id] = answer = {"task_id": task.id, **answer}
        return answer

    @app.post("/images")
    async def create_image(body: ImageRequest, request: Request, client: BFLClient) -> Any:
        try:
            image = await client.generate(
                model, prompt=body.prompt, seed=body.seed, output_dir=images_dir
            )
        except (ParameterError, ModerationError) as exc:
            raise HTTPException(422, failed(exc)) from None
        except WaitTimeoutError as exc:  # BFL is slow: the answer names the task, still paid
            raise HTTPException(504, failed(exc)) from None
        except LimiterUnavailableError as exc:  # nothing was sent
            raise HTTPException(503, failed(exc)) from None
        except BFLError as exc:
            raise HTTPException(502, failed(exc)) from None
        return finished(request, image.task_id, image.path, image.seed)

    @app.post("/images/batch")
    async def create_batch(body: BatchRequest, request: Request, client: BFLClient) -> Any:
        answers: list[dict[str, Any]] = [{}] * len(body.prompts)
        jobs_in = [{"model": model, "prompt": prompt} for prompt in body.prompts]
        async for outcome in client.generate_many(jobs_in, output_dir=images_dir):
            if outcome.image is not None:
                image = outcome.image
                answers[outcome.index] = finished(request, image.task_id, image.path, image.seed)
            else:
                assert outcome.error is not None
                answers[outcome.index] = failed(outcome.error)
        return answers

    @app.get("/health")
    async def health() -> dict[str, str]:
        """For the load balancer; `worker` tells which process answered."""
        return {"status": "ok", "worker": str(os.getpid())}

    @app.get("/tasks/{task_id}")
    async def task_status(task_id: str) -> Any:
        job = jobs.get(task_id)
        if job is None:
            raise HTTPException(404, "unknown task")
        return job

    return app


def app_from_environment() -> FastAPI:
    """The service configured from the environment (see the module docstring)."""
    return create_app(
        images_dir=Path(os.environ.get("IMAGES_DIR", "images")),
        public_url=os.environ.get("PUBLIC_URL"),
        webhook_secret=os.environ.get("BFL_WEBHOOK_SECRET"),
        model=os.environ.get("BFL_MODEL", "flux-2-pro"),
    )
