"""Polling benchmark: bfl_async against the polling BFL's own docs and client suggest.

    python benchmarks/polling.py                # 3 workloads x 5 seeds, about 25 minutes
    python benchmarks/polling.py --quick        # a smoke run, about 2 minutes

Runs the same workload, one client after the other, against a FakeBFL on loopback that runs
in another process (`fake_server.py`); each client runs in a process of its own
(`clients.py`), so its CPU time and peak RSS are its own. The fake is restarted before every
run and gives the k-th accepted task the k-th generation time of a sequence fixed by the
workload and the seed, so every client faces the same times in the same submit order.

Per run it measures: makespan (from the first submit to the last image on disk) over the
ideal makespan (the same generation times, list-scheduled in submit order on the in-flight
slots with zero overhead); detection delay (when the client saw a task Ready minus when the
fake finished it, same clock) p50 and p90; polls per task; peak polls in any sliding 1 s
window; client CPU seconds per job; client peak RSS; 429 answers. Each figure reported is
the median over the seeds. It prints the tables, writes them as JSON (and Markdown), and
plots detection delay against polls per task, and the poll-budget curve (matplotlib).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import heapq
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MiB = 1 << 20
BASE_CLIENTS = ("bfl_async", "seeds-fixed", "seeds-backoff", "blackforest")
BUDGETS = (20.0, 40.0, 80.0)
BUDGET_WORKLOAD = "flux2-96"
CLIENT_TIMEOUT = 900.0


@dataclass(frozen=True)
class Workload:
    """A batch of identical jobs and the generation times the fake gives them."""

    name: str
    about: str
    """The workload in words, after the number of jobs."""
    jobs: int
    model: str
    flux1_model: str | None
    """The model `blackforest` runs instead (it knows FLUX.1 only); None leaves it out."""
    slots: int
    """The account's in-flight limit for the model."""
    median: float
    sigma: float
    """Log-sd of the lognormal generation times (0: every job takes `median`)."""
    image_bytes: int | None = None
    delivery_rate: float | None = None
    """Bytes per second the fake sends each image at (None: as fast as loopback goes)."""


WORKLOADS = {
    "flux2-96": Workload(
        name="flux2-96",
        about="flux-2-pro, lognormal generation time (median 4 s, sigma 0.4)",
        jobs=96,
        model="flux-2-pro",
        flux1_model="flux-pro-1.1",
        slots=24,
        median=4.0,
        sigma=0.4,
    ),
    "kontext-max-30": Workload(
        name="kontext-max-30",
        about="flux-kontext-max (in-flight limit 6), same generation times",
        jobs=30,
        model="flux-kontext-max",
        flux1_model=None,
        slots=6,
        median=4.0,
        sigma=0.4,
    ),
    "20mb-48": Workload(
        name="20mb-48",
        about=(
            "flux-2-pro, 20 MiB images sent at 16 MiB/s each, generation time median 4 s, "
            "sigma 0.1 (each wave of 24 ends within about a second, so downloads overlap)"
        ),
        jobs=48,
        model="flux-2-pro",
        flux1_model="flux-pro-1.1",
        slots=24,
        median=4.0,
        sigma=0.1,
        image_bytes=20 * MiB,
        delivery_rate=16 * MiB,
    ),
}


@dataclass(frozen=True)
class Run:
    """One client on one workload with one seed."""

    workload: Workload
    seed: int
    label: str
    client: str
    poll_rate: float | None = None


# -- metrics -------------------------------------------------------------------------------


def list_schedule(durations: Sequence[float], slots: int) -> float:
    """Makespan of `durations` started in order, each on the first free of `slots`."""
    free = [0.0] * slots
    end = 0.0
    for duration in durations:
        start = heapq.heappop(free)
        end = max(end, start + duration)
        heapq.heappush(free, start + duration)
    return end


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def peak_rate(times: Sequence[float], window: float = 1.0) -> int:
    """Most events in any sliding window of `window` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def peak_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """Most intervals open at once."""
    spans = list(intervals)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    best = current = 0
    for _, change in events:
        current += change
        best = max(best, current)
    return best


def measure(run: Run, report: dict[str, Any], fake: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run, from the client's report and the fake's counters."""
    tasks = {task["id"]: task for task in fake["tasks"]}
    jobs = report["jobs"]
    done = [job for job in jobs if job["error"] is None and job["task_id"] in tasks]
    delays = [job["seen"] - tasks[job["task_id"]]["end_time"] for job in done]
    # The jobs' generation times (the fake's first `jobs`): a client that submitted a job
    # twice must not lengthen its own ideal, nor spread its polls over the extra task.
    durations = [task["duration"] for task in fake["tasks"]][: run.workload.jobs]
    ideal = list_schedule(durations, run.workload.slots)
    makespan = max((job["saved"] for job in done), default=math.nan) - report["started"]
    count = run.workload.jobs
    return {
        "makespan": makespan,
        "ideal": ideal,
        "makespan_ratio": makespan / ideal if ideal else math.nan,
        "detect_p50": percentile(delays, 50),
        "detect_p90": percentile(delays, 90),
        "detect_max": max(delays, default=math.nan),
        "polls_per_task": fake["polls"] / count,
        "peak_polls_per_s": peak_rate(fake["poll_times"]),
        "cpu_ms_per_job": 1000 * report["cpu_seconds"] / len(jobs),
        "peak_rss_mb": report["maxrss_kb"] / 1024,
        "rate_limited": fake["rate_limited"],
        "peak_downloads": peak_overlap((job["download_start"], job["saved"]) for job in done),
        "errors": len(jobs) - len(done),
        "first_error": next((job["error"] for job in jobs if job["error"]), None),
        "server_errors": len(fake["server_errors"]),
        "submits": fake["submits"],
    }


METRICS = (
    # key, heading, format
    ("makespan_ratio", "makespan/ideal", "{:.3f}"),
    ("detect_p50", "detect p50 s", "{:.2f}"),
    ("detect_p90", "detect p90 s", "{:.2f}"),
    ("polls_per_task", "polls/task", "{:.2f}"),
    ("peak_polls_per_s", "peak polls/s", "{:.0f}"),
    ("cpu_ms_per_job", "CPU ms/job", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("peak_downloads", "peak downloads", "{:.0f}"),
    ("rate_limited", "429s", "{:.0f}"),
    ("errors", "failed jobs", "{:.0f}"),
)
NUMERIC = [key for key, _, _ in METRICS] + [
    "makespan",
    "ideal",
    "detect_max",
    "server_errors",
    "submits",
]


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median over seeds of every figure, per workload and client label."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["workload"], result["label"]), []).append(result["metrics"])
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for (workload, label), runs in groups.items():
        medians = {key: statistics.median(run[key] for run in runs) for key in NUMERIC}
        medians["seeds"] = len(runs)
        summary.setdefault(workload, {})[label] = medians
    return summary


# -- running -------------------------------------------------------------------------------


class FakeServer:
    """`fake_server.py` in a child process, driven over its stdin and stdout."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "fake_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, line: str) -> str:
        """Send one command and return the answer line."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        if not answer or answer.startswith("error"):
            raise RuntimeError(f"fake server answered {answer!r} to {line!r}")
        return answer

    def reset(self, workload: Workload, seed: int) -> dict[str, str]:
        """A fresh fake for this workload and seed; returns its base URLs."""
        spec = {
            "rng": f"{workload.name}/{seed}",
            "median": workload.median,
            "sigma": workload.sigma,
            "count": workload.jobs,
            "image_bytes": workload.image_bytes,
            "delivery_rate": workload.delivery_rate,
        }
        answer = self.ask("reset " + json.dumps(spec))
        urls: dict[str, str] = json.loads(answer.removeprefix("ready "))
        return urls

    def dump(self, path: Path) -> dict[str, Any]:
        """The fake's counters."""
        self.ask(f"dump {path}")
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def close(self) -> None:
        """Stop the child process."""
        with contextlib.suppress(RuntimeError, OSError):
            self.ask("quit")
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_one(fake: FakeServer, run: Run, env: dict[str, str]) -> dict[str, Any]:
    """Run one client on a fresh fake and measure it."""
    urls = fake.reset(run.workload, run.seed)
    model = run.workload.flux1_model if run.client == "blackforest" else run.workload.model
    assert model is not None
    with tempfile.TemporaryDirectory(prefix="bfl-bench-") as scratch:
        work = Path(scratch)
        command = [
            sys.executable, str(HERE / "clients.py"), run.client,
            "--api", urls["api"],
            "--model", model,
            "--jobs", str(run.workload.jobs),
            "--slots", str(run.workload.slots),
            "--out", str(work / "images"),
            "--report", str(work / "report.json"),
        ]  # fmt: skip
        if run.poll_rate is not None:
            command += ["--poll-rate", str(run.poll_rate)]
        finished = subprocess.run(
            command,
            stdout=subprocess.DEVNULL,  # blackforest prints a line per poll
            stderr=subprocess.PIPE,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
            env=env,
        )
        if finished.returncode != 0:
            raise RuntimeError(f"{run.label} failed:\n{finished.stderr[-3000:]}")
        report = json.loads((work / "report.json").read_text())
        shutil.rmtree(work / "images", ignore_errors=True)
        state = fake.dump(work / "fake.json")
    return {
        "workload": run.workload.name,
        "seed": run.seed,
        "label": run.label,
        "client": run.client,
        "poll_rate": run.poll_rate,
        "model": model,
        "metrics": measure(run, report, state),
        "bfl_async_from": report.get("bfl_async_from"),
        "imported_during_run": report.get("imported_during_run"),
    }


def defaults_match_budget_20() -> bool:
    """Whether `AsyncBFL()`'s defaults are the R = 20 budget point (so one run serves both)."""
    import inspect

    from bfl_async import AsyncBFL

    return bool(inspect.signature(AsyncBFL).parameters["poll_rate"].default == 20)


def budget_label(rate: float) -> str:
    """The label of a bfl_async run with poll budget `rate`."""
    return f"bfl_async R={rate:g}"


def plan(
    workloads: Sequence[Workload],
    seeds: Sequence[int],
    clients: Sequence[str],
    budgets: Sequence[float],
) -> list[Run]:
    """Every run, seed by seed, so slow drift of the machine touches every client alike; the
    clients take turns going first from one seed to the next."""
    runs: list[Run] = []
    alias_20 = defaults_match_budget_20() and "bfl_async" in clients
    for n, seed in enumerate(seeds):
        for workload in workloads:
            turn = [
                Run(workload, seed, client, client)
                for client in clients
                if client != "blackforest" or workload.flux1_model is not None
            ]
            if workload.name == BUDGET_WORKLOAD:
                turn += [
                    Run(workload, seed, budget_label(rate), "bfl_async", rate)
                    for rate in budgets
                    if not (rate == 20 and alias_20)
                ]
            first = n % len(turn)
            runs += turn[first:] + turn[:first]
    return runs


def budget_curve(
    summary: dict[str, dict[str, dict[str, float]]], budgets: Sequence[float]
) -> list[dict[str, float]]:
    """Per poll budget R, the medians of the bfl_async run on the budget workload."""
    from clients import planned_polls

    rows = summary.get(BUDGET_WORKLOAD, {})
    curve = []
    for rate in budgets:
        medians = rows.get(budget_label(rate)) or (rows.get("bfl_async") if rate == 20 else None)
        if medians is not None:
            setting = planned_polls(rate)
            curve.append({"poll_rate": rate, "polls_per_task_setting": setting, **medians})
    return curve


# -- reporting -----------------------------------------------------------------------------


def fmt(key: str, value: float) -> str:
    """A figure as the tables show it."""
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return next(f for k, _, f in METRICS if k == key).format(value)


def table(rows: list[list[str]], markdown: bool) -> str:
    """Rows (the first is the heading) as aligned text, or a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(
            1, "|" + "|".join("---" if i == 0 else "--:" for i in range(len(rows[0]))) + "|"
        )
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


TARGETS: tuple[tuple[str, str, float, str, bool], ...] = (
    # (workload, metric, limit, description, relative): a relative limit is a multiple of
    # blackforest's figure
    ("flux2-96", "detect_p50", 0.4, "detection delay p50 <= 0.4 s", False),
    ("flux2-96", "detect_p90", 0.9, "detection delay p90 <= 0.9 s", False),
    ("flux2-96", "polls_per_task", 3.6, "<= 3.6 polls per task", False),
    ("flux2-96", "peak_polls_per_s", 20, "peak poll rate <= 20/s", False),
    ("flux2-96", "makespan_ratio", 1.08, "makespan within 8 % of ideal", False),
    ("flux2-96", "makespan_ratio", 1.0, "makespan <= blackforest's", True),
    ("flux2-96", "polls_per_task", 0.6, "40 % fewer polls than blackforest", True),
    ("flux2-96", "rate_limited", 0, "0 429s", False),
    ("20mb-48", "peak_rss_mb", 64, "peak RSS < 64 MB, 20 MiB images", False),
    ("flux2-96", "cpu_ms_per_job", 1.0, "CPU per job <= blackforest's", True),
)


def target_rows(summary: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    """bfl_async against the targets of issue 5."""
    rows = [["target", "bfl_async", "met"]]
    for workload, key, limit, text, relative in TARGETS:
        ours = summary.get(workload, {}).get("bfl_async")
        if ours is None:
            continue
        value = ours[key]
        if relative:
            theirs = summary.get(workload, {}).get("blackforest")
            if theirs is None:
                continue
            ok = value <= limit * theirs[key]
            shown = f"{fmt(key, value)} vs {fmt(key, theirs[key])}"
        else:
            ok = value < limit if key == "peak_rss_mb" else value <= limit
            shown = fmt(key, value)
        rows.append([text, shown, "yes" if ok else "NO"])
    return rows


def render(data: dict[str, Any], markdown: bool) -> str:
    """All tables of a result file."""
    summary = data["summary"]
    seeds = data["meta"]["seeds"]
    parts = []
    jobs = {w["name"]: w["jobs"] for w in data["meta"]["workloads"]}
    for name, rows in summary.items():
        workload = WORKLOADS[name]
        heading = ["client", *(h for _, h, _ in METRICS)]
        body = [
            [label, *(fmt(k, medians[k]) for k, _, _ in METRICS)] for label, medians in rows.items()
        ]
        ideal = statistics.median(m["ideal"] for m in rows.values())
        title = (
            f"{name}: {jobs[name]} jobs, {workload.about}. Median of {len(seeds)} seeds; "
            f"ideal makespan {ideal:.1f} s"
        )
        parts.append(
            ("### " if markdown else "== ") + title + "\n\n" + table([heading, *body], markdown)
        )
    curve = data["budget_curve"]
    if curve:
        heading = [
            "poll budget R",
            "polls_per_task setting",
            "makespan/ideal",
            "detect p50 s",
            "detect p90 s",
            "polls/task",
            "peak polls/s",
        ]
        body = [
            [f"{row['poll_rate']:g}/s", f"{row['polls_per_task_setting']:g}",
             fmt("makespan_ratio", row["makespan_ratio"]), fmt("detect_p50", row["detect_p50"]),
             fmt("detect_p90", row["detect_p90"]), fmt("polls_per_task", row["polls_per_task"]),
             fmt("peak_polls_per_s", row["peak_polls_per_s"])]
            for row in curve
        ]  # fmt: skip
        title = "Poll budget curve (bfl_async, flux2-96)"
        parts.append(
            ("### " if markdown else "== ") + title + "\n\n" + table([heading, *body], markdown)
        )
    targets = target_rows(summary)
    if len(targets) > 1:
        title = "bfl_async against the targets"
        parts.append(("### " if markdown else "== ") + title + "\n\n" + table(targets, markdown))
    return "\n\n".join(parts) + "\n"


def plot(data: dict[str, Any], path: Path) -> bool:
    """Detection delay against polls per task per client, and the budget curve, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    rows = data["summary"].get(BUDGET_WORKLOAD)
    if not rows:
        print(f"no {BUDGET_WORKLOAD} results: no plot", file=sys.stderr)
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, medians) in enumerate(rows.items()):
        color = colors[i % len(colors)]
        x = medians["polls_per_task"]
        left.plot([x, x], [medians["detect_p50"], medians["detect_p90"]], color=color, lw=2)
        left.scatter(
            [x], [medians["detect_p50"]], color=color, marker="o", s=40, zorder=3, label=label
        )
        left.scatter([x], [medians["detect_p90"]], color=color, marker="^", s=40, zorder=3)
        per_seed = [
            r["metrics"]
            for r in data["runs"]
            if r["workload"] == BUDGET_WORKLOAD and r["label"] == label
        ]
        left.scatter(
            [m["polls_per_task"] for m in per_seed],
            [m["detect_p50"] for m in per_seed],
            color=color,
            s=10,
            alpha=0.35,
        )
    left.axhline(0.4, color="grey", ls=":", lw=1, label="target p50 0.4 s")
    left.axhline(0.9, color="grey", ls="--", lw=1, label="target p90 0.9 s")
    left.axvline(3.6, color="grey", ls="-.", lw=1, label="target 3.6 polls/task")
    left.set_xlabel("polls per task")
    left.set_ylabel("detection delay, s (circle p50, triangle p90)")
    jobs = next(w["jobs"] for w in data["meta"]["workloads"] if w["name"] == BUDGET_WORKLOAD)
    left.set_title(f"Detection delay vs polls per task ({jobs} jobs, flux-2-pro)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    curve = data["budget_curve"]
    if curve:
        rates = [row["poll_rate"] for row in curve]
        right.plot(
            rates,
            [row["makespan_ratio"] for row in curve],
            "o-",
            color="black",
            label="makespan / ideal",
        )
        right.axhline(1.0, color="grey", lw=1)
        right.axhline(1.08, color="grey", ls="--", lw=1, label="ideal + 8 %")
        right.set_xscale("log", base=2)
        right.set_xticks(rates, [f"{r:g}" for r in rates])
        per_20 = curve[0]["polls_per_task_setting"] * 20 / curve[0]["poll_rate"]
        right.set_xlabel(f"poll budget R (polls/s; polls_per_task = {per_20:g} R / 20)")
        right.set_ylabel("makespan / ideal")
        twin = right.twinx()
        twin.plot(
            rates,
            [row["detect_p50"] for row in curve],
            "s--",
            color="tab:blue",
            label="detect p50 (s)",
        )
        twin.plot(
            rates,
            [row["detect_p90"] for row in curve],
            "^:",
            color="tab:blue",
            label="detect p90 (s)",
        )
        twin.set_ylabel("detection delay, s")
        twin.set_ylim(bottom=0)
        lines = right.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper right")
        right.set_title("bfl_async with a larger poll budget")
        right.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def snapshot_library(into: Path) -> dict[str, str]:
    """Copy the bfl_async package into `into` and return an environment that imports it
    from there, so every run measures the same code even while the library is edited."""
    import bfl_async

    source = Path(bfl_async.__file__).parent
    shutil.copytree(source, into / "bfl_async", ignore=shutil.ignore_patterns("__pycache__"))
    # Compiled once here: with no bytecode written, every client process would compile the
    # library afresh (outside the CPU measured, but not outside its peak RSS).
    compileall.compile_dir(into / "bfl_async", quiet=1)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(into), env.get("PYTHONPATH")]))
    return env


def versions(library: Path) -> dict[str, str]:
    """Versions of what ran."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("bfl-async", "blackforest", "httpx", "requests"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    with contextlib.suppress(OSError):
        found["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        found["git_dirty"] = subprocess.run(
            ["git", "status", "--porcelain", "--", "bfl_async"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    digest = hashlib.sha256()
    for source in sorted((library / "bfl_async").rglob("*.py")):
        digest.update(source.read_bytes())
    found["bfl_async_sources_sha256"] = digest.hexdigest()[:16]
    return found


# -- command line --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeded runs per client (5)")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--clients",
        default=",".join(BASE_CLIENTS),
        help=f"comma-separated, from {', '.join(BASE_CLIENTS)}",
    )
    parser.add_argument(
        "--budgets",
        default=",".join(f"{r:g}" for r in BUDGETS),
        help="bfl_async poll budgets R to run on flux2-96 ('' for none)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 seed, a quarter of the jobs, budgets 20 and 80",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results/polling.json (--quick: results/quick/polling.json, so a smoke run never "
        "overwrites a full one)",
    )
    parser.add_argument("--markdown", type=Path, help="the tables (default: beside --json)")
    parser.add_argument("--plot", type=Path, help="the plot (default: beside --json)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render the tables and plot from --json without running",
    )
    args = parser.parse_args(argv)
    if args.json is None:
        args.json = (RESULTS / "quick" if args.quick else RESULTS) / "polling.json"
    args.markdown = args.markdown or args.json.with_suffix(".md")
    args.plot = args.plot or args.json.with_suffix(".png")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and report it."""
    args = parse_args(argv)
    if args.report_only:
        data = json.loads(args.json.read_text())
    else:
        data = benchmark(args)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    print(render(data, markdown=False))
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(render(data, markdown=True))
    if plot(data, args.plot):
        print(f"wrote {args.markdown} and {args.plot}", file=sys.stderr)
    return 0


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every planned run and gather the results."""
    names = [name for name in args.workloads.split(",") if name]
    unknown = [name for name in names if name not in WORKLOADS]
    clients = [name for name in args.clients.split(",") if name]
    unknown += [name for name in clients if name not in BASE_CLIENTS]
    if unknown:
        raise SystemExit(f"unknown workload or client: {', '.join(unknown)}")
    workloads = [WORKLOADS[name] for name in names]
    budgets = [float(r) for r in args.budgets.split(",") if r]
    if "bfl_async" not in clients:
        budgets = []
    seeds = list(range(1 if args.quick else args.seeds))
    if args.quick:
        workloads = [replace(w, jobs=max(w.slots, w.jobs // 4)) for w in workloads]
        budgets = [r for r in budgets if r in (20, 80)]
    runs = plan(workloads, seeds, clients, budgets)
    started = time.time()
    print(
        f"{len(runs)} runs: {', '.join(w.name for w in workloads)} x {len(seeds)} seeds",
        file=sys.stderr,
    )
    results = []
    library = Path(tempfile.mkdtemp(prefix="bfl-bench-lib-"))
    env = snapshot_library(library)
    meta_versions = versions(library)
    fake = FakeServer(env)
    try:
        for number, run in enumerate(runs, 1):
            result = run_one(fake, run, env)
            results.append(result)
            m = result["metrics"]
            elapsed = time.time() - started
            left = elapsed / number * (len(runs) - number)
            print(
                f"[{number}/{len(runs)} {elapsed / 60:.1f} min, ~{left / 60:.1f} left] "
                f"{run.workload.name} seed {run.seed} {run.label}: makespan "
                f"{m['makespan']:.1f} s (x{m['makespan_ratio']:.3f}), detect p50 "
                f"{m['detect_p50']:.2f} p90 {m['detect_p90']:.2f} s, {m['polls_per_task']:.2f} "
                f"polls/task, peak {m['peak_polls_per_s']}/s, {m['cpu_ms_per_job']:.1f} ms "
                f"CPU/job, {m['peak_rss_mb']:.0f} MB, {m['rate_limited']} 429s"
                + (f", {m['errors']} FAILED: {m['first_error']}" if m["errors"] else ""),
                file=sys.stderr,
            )
    finally:
        fake.close()
        shutil.rmtree(library, ignore_errors=True)
    summary = summarise(results)
    return {
        "meta": {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "duration_s": round(time.time() - started, 1),
            "seeds": seeds,
            "quick": args.quick,
            "workloads": [asdict(w) for w in workloads],
            "budgets": budgets,
            "versions": meta_versions,
            "machine": {"cpus": _cpus(), "platform": platform.platform()},
        },
        "runs": results,
        "summary": summary,
        "budget_curve": budget_curve(summary, budgets),
    }


def _cpus() -> int:
    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
