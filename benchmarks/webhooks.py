"""Webhook benchmark: results pushed to a FastAPI app instead of polled.

    python benchmarks/webhooks.py               # flux2-96, 3 seeds, webhooks and polling
    python benchmarks/webhooks.py --quick       # 1 seed, 24 jobs

The app is what `bfl_async.fastapi` makes: one shared `AsyncBFL` opened by `bfl_lifespan`,
`webhook_router()` receiving BFL's webhooks, served by uvicorn on loopback. The driver sends
every job at once as an HTTP request to the app, which runs `client.generate`. FakeBFL runs
in another process (`fake_server.py`, the polling benchmark's) and POSTs each task's end to
the app's webhook route. The same workload runs with webhooks and, for comparison, with the
client's default polling. Figures, as in `polling.py` (whose helpers this reuses): makespan
over the ideal one, detection delay (when the client saw the task ended minus when the
fake ended it), polls per task, 429s; the median over the seeds of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from polling import (  # noqa: E402  (a sibling script, not a package)
    RESULTS,
    WORKLOADS,
    FakeServer,
    Run,
    Workload,
    measure,
    table,
)

from bfl_async.fastapi import BFLClient, bfl_lifespan, webhook_router  # noqa: E402

API_KEY = "bench-key"
SECRET = "bench-webhook-secret"
MODES = ("webhooks", "polling")
METRICS = (
    ("makespan_ratio", "makespan/ideal", "{:.3f}"),
    ("detect_p50", "detect p50 ms", "{:.0f}"),
    ("detect_p90", "detect p90 ms", "{:.0f}"),
    ("detect_max", "detect max ms", "{:.0f}"),
    ("polls_per_task", "polls/task", "{:.2f}"),
    ("webhooks_per_task", "webhooks/task", "{:.2f}"),
    ("rate_limited", "429s", "{:.0f}"),
    ("errors", "failed jobs", "{:.0f}"),
)
IN_MS = {"detect_p50", "detect_p90", "detect_max"}


def make_app(urls: dict[str, str], base_url: str, mode: str, out: Path, model: str) -> FastAPI:
    """The app under test; with `mode == "webhooks"` its client asks BFL to push results."""
    hook: dict[str, Any] = {}
    if mode == "webhooks":
        hook = {"webhook_url": f"{base_url}/bfl/webhook", "webhook_secret": SECRET}
    received: list[float] = []
    app = FastAPI(lifespan=bfl_lifespan(api_key=API_KEY, base_url=urls["api"], **hook))
    app.include_router(webhook_router())

    @app.middleware("http")
    async def count_webhooks(request: Any, call_next: Any) -> Any:
        if request.url.path == "/bfl/webhook":
            received.append(time.time())
        return await call_next(request)

    @app.post("/jobs/{index}")
    async def job(index: int, client: BFLClient) -> dict[str, Any]:
        try:
            image = await client.generate(
                model, prompt=f"benchmark job {index}: a lighthouse", output_dir=out
            )
        except Exception as exc:
            return {"index": index, "error": repr(exc)}
        saved = time.time()
        return {
            "index": index,
            "error": None,
            "task_id": image.task.id,
            "seen": image.result.ready_at,
            "download_start": saved - image.timings.download,
            "saved": saved,
            "polls": image.result.polls,
        }

    app.state.received = received
    return app


async def run_jobs(
    urls: dict[str, str], workload: Workload, mode: str, out: Path
) -> dict[str, Any]:
    """Serve the app, send every job at once, return a report shaped like `clients.py`'s."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = make_app(urls, base_url, mode, out, workload.model)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(server.serve([sock]))
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    cpu = time.process_time()
    limits = httpx.Limits(max_connections=workload.jobs + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        started = time.time()

        async def one(index: int) -> dict[str, Any]:
            answer = await http.post(f"/jobs/{index}")
            answer.raise_for_status()
            result: dict[str, Any] = answer.json()
            return result

        jobs = await asyncio.gather(*(one(index) for index in range(workload.jobs)))
    cpu = time.process_time() - cpu
    server.should_exit = True
    await serving
    sock.close()
    return {
        "jobs": jobs,
        "started": started,
        "cpu_seconds": cpu,
        "maxrss_kb": 0,
        "webhooks_received": len(app.state.received),
    }


def run_one(fake: FakeServer, workload: Workload, seed: int, mode: str) -> dict[str, Any]:
    """One mode on a fresh fake; its figures."""
    urls = fake.reset(workload, seed)
    with tempfile.TemporaryDirectory(prefix="bfl-bench-hooks-") as scratch:
        work = Path(scratch)
        report = asyncio.run(run_jobs(urls, workload, mode, work / "images"))
        state = fake.dump(work / "fake.json")
    run = Run(workload=workload, seed=seed, label=mode, client="bfl_async")
    metrics = measure(run, report, state)
    metrics["webhooks_per_task"] = report["webhooks_received"] / max(1, state["submits"])
    return {"workload": workload.name, "seed": seed, "mode": mode, "metrics": metrics}


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median over the seeds of each figure, per mode."""
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        runs = [r["metrics"] for r in results if r["mode"] == mode]
        if runs:
            summary[mode] = {
                key: statistics.median(run[key] for run in runs) for key, _, _ in METRICS
            }
            summary[mode]["seeds"] = len(runs)
    return summary


def render(data: dict[str, Any], markdown: bool) -> str:
    """The summary table, and the targets met or missed."""
    rows = [["mode"] + [heading for _, heading, _ in METRICS]]
    for mode, figures in data["summary"].items():
        cells = [mode]
        for key, _, form in METRICS:
            value = figures[key] * (1000 if key in IN_MS else 1)
            cells.append(form.format(value))
        rows.append(cells)
    hooks = data["summary"].get("webhooks")
    lines = [
        f"{data['meta']['workload']['about']}, {data['meta']['workload']['jobs']} jobs, "
        f"{data['meta']['workload']['slots']} slots; median of {len(data['meta']['seeds'])} "
        "seed(s)",
        "",
        table(rows, markdown),
    ]
    if hooks is not None:
        lines += [
            "",
            f"target polls/task <= 1: {hooks['polls_per_task']:.2f} "
            f"({'met' if hooks['polls_per_task'] <= 1 else 'MISSED'})",
            f"target detection p50 <= 50 ms: {1000 * hooks['detect_p50']:.0f} ms "
            f"({'met' if hooks['detect_p50'] <= 0.05 else 'MISSED'})",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write JSON and Markdown under results/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 seed, a quarter of the jobs")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", type=Path, default=RESULTS / "webhooks.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "webhooks.md")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"modes are {', '.join(MODES)}")
    workload = WORKLOADS["flux2-96"]
    seeds = list(range(1 if args.quick else args.seeds))
    if args.quick:
        workload = replace(workload, jobs=workload.slots)
    started = time.time()
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), *sys.path])}
    fake = FakeServer(env)
    try:
        for seed in seeds:
            for mode in modes:
                result = run_one(fake, workload, seed, mode)
                results.append(result)
                m = result["metrics"]
                print(
                    f"seed {seed} {mode}: makespan x{m['makespan_ratio']:.3f}, detect p50 "
                    f"{1000 * m['detect_p50']:.0f} ms, {m['polls_per_task']:.2f} polls/task, "
                    f"{m['webhooks_per_task']:.2f} webhooks/task, {m['errors']} failed",
                    file=sys.stderr,
                )
    finally:
        fake.close()
    data = {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "seeds": seeds,
            "workload": asdict(workload),
            "machine": {"cpus": os.cpu_count() or 0, "platform": platform.platform()},
        },
        "runs": results,
        "summary": summarise(results),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1))
    args.markdown.write_text(render(data, markdown=True))
    print(render(data, markdown=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
