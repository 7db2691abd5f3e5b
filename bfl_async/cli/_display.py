"""What the commands print: numbers, per-job lines, the live batch display and its summary."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from bfl_async import InFlightLimiter

from ._batch import BatchStats, JobResult

__all__ = [
    "LiveDisplay",
    "PlainDisplay",
    "credits_text",
    "duration",
    "number",
    "print_summary",
    "usd",
]


def number(value: float, decimals: int = 4, keep: int = 0) -> str:
    """`value` with thousands separators and up to `decimals` decimals (at least `keep`)."""
    whole, _, fraction = f"{value:,.{decimals}f}".partition(".")
    fraction = fraction.rstrip("0").ljust(keep, "0")
    return f"{whole}.{fraction}" if fraction else whole


def usd(credits: float) -> str:
    """Credits in US dollars (1 credit = 1 cent): `$0.03`, `$0.014`, `$10.00`."""
    return f"${number(credits / 100, decimals=5, keep=2)}"


def credits_text(credits: float) -> str:
    """`3 credits ($0.03)`."""
    unit = "credit" if credits == 1 else "credits"
    return f"{number(credits)} {unit} ({usd(credits)})"


def duration(seconds: float) -> str:
    """`h:mm:ss`."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def job_line(result: JobResult, stats: BatchStats) -> Text:
    """One finished job: `[ 3/12] ok     fox-1 -> out/fox-1.jpg (seed 7, 3 credits)`."""
    width = len(str(stats.total))
    text = Text(f"[{stats.finished:>{width}}/{stats.total}] ")
    if result.ok:
        text.append("ok    ", style="bold green")
        text.append(f" {result.job.label}", style="bold")
        cost = "" if result.cost is None else f", {number(result.cost)} credits"
        text.append(f" -> {result.path} (seed {result.seed}{cost})")
    else:
        text.append(f"{result.status:<6} ", style="bold red")  # always one space after
        text.append(_failure(result))
    return text


def _failure(result: JobResult) -> Text:
    """`snake (line 2, flux-2-pro): task … was moderated`; unnamed jobs say their line once."""
    job = result.job
    where = f"line {job.line}, " if job.name is not None else ""
    text = Text(job.label, style="bold")
    text.append(f" ({where}{job.model}): {result.error}")
    return text


class PlainDisplay:
    """Progress as plain lines, for logs and pipes: one line per finished job."""

    def __init__(self, console: Console, stats: BatchStats) -> None:
        self._console = console
        self._stats = stats

    def job_finished(self, result: JobResult) -> None:
        """Print the job's line."""
        self._console.print(job_line(result, self._stats), soft_wrap=True)


class LiveDisplay:
    """A live panel of a batch's counters, redrawn in place; finished jobs scroll above it."""

    def __init__(self, console: Console, stats: BatchStats, limiter: InFlightLimiter) -> None:
        self._stats = stats
        self._limiter = limiter
        self._spinner = Spinner("dots", style="cyan")
        self._live = Live(
            console=console,
            get_renderable=self.render,
            refresh_per_second=8,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def __enter__(self) -> LiveDisplay:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()

    def job_finished(self, result: JobResult) -> None:
        """Print the job's line above the live panel."""
        self._live.console.print(job_line(result, self._stats), soft_wrap=True)
        self._live.refresh()  # the counters move with the line, not at the next tick

    def render(self) -> RenderableType:
        """The panel as it is now: progress bar, counters, credits, rate and ETA."""
        stats = self._stats
        head = Table.grid(padding=(0, 1))
        head.add_row(
            self._spinner if stats.finished < stats.total else Text("✓", style="green"),
            Text(f"{stats.finished}/{stats.total}", style="bold"),
            ProgressBar(total=stats.total, completed=stats.finished, width=40),
            Text(f"{100 * stats.finished // max(1, stats.total)}%"),
            Text(f"elapsed {duration(stats.elapsed)}", style="dim"),
            Text(f"ETA {'-' if stats.eta is None else duration(stats.eta)}", style="cyan"),
        )
        return Group(head, self._counters(), self._money())

    def _counters(self) -> Text:
        stats, limiter = self._stats, self._limiter
        text = Text("  ")
        _field(text, "queued", str(stats.queued), "yellow")
        _field(
            text,
            "in flight",
            f"{limiter.in_use('standard')}/{limiter.limit('standard')} standard · "
            f"{limiter.in_use('kontext-max')}/{limiter.limit('kontext-max')} kontext-max",
            "blue",
        )
        _field(text, "done", str(stats.ok), "green")
        _field(text, "failed", str(stats.failed), "red" if stats.failed else "dim")
        return text

    def _money(self) -> Text:
        stats = self._stats
        text = Text("  ")
        _field(text, "spent", credits_text(stats.credits), "magenta")
        _field(text, "rate", f"{number(stats.rate, decimals=1)} images/min", "cyan")
        return text


def _field(text: Text, label: str, value: str, style: str) -> None:
    text.append(f"{label} ", style="dim")
    text.append(value, style=f"bold {style}")
    text.append("   ")


_NOT_OK = ("uncertain", "skipped", "expired", "pending")


def _others(stats: BatchStats) -> str:
    """`; 2 uncertain, 1 skipped` for the jobs that neither succeeded nor plainly failed."""
    parts = [f"{stats.statuses[s]} {s}" for s in _NOT_OK if stats.statuses.get(s)]
    return "; " + ", ".join(parts) if parts else ""


def print_summary(console: Console, stats: BatchStats, manifest: Path) -> None:
    """The batch's totals and each failed job with its error: a table in a terminal."""
    if console.is_terminal:
        _summary_tables(console, stats, manifest)
        return
    print_line = console.print
    print_line(
        f"summary: {stats.total} jobs, {stats.ok} ok, {stats.failed} failed; "
        f"{credits_text(stats.credits)}; {duration(stats.elapsed)}, "
        f"{number(stats.rate, decimals=1)} images/min{_others(stats)}",
        soft_wrap=True,
    )
    print_line(
        f"spend: estimated {credits_text(stats.estimated)}, charged {credits_text(stats.spent)}",
        soft_wrap=True,
    )
    print_line(f"manifest: {manifest}", soft_wrap=True)
    for result in stats.failures:
        print_line(Text("failed: ") + _failure(result), soft_wrap=True)


def _summary_tables(console: Console, stats: BatchStats, manifest: Path) -> None:
    totals = Table(title="Batch summary", show_header=False, title_justify="left")
    totals.add_column(style="bold")
    totals.add_column()
    totals.add_row("jobs", str(stats.total))
    totals.add_row("ok", Text(str(stats.ok), style="green"))
    totals.add_row("failed", Text(str(stats.failed), style="red" if stats.failed else ""))
    totals.add_row("spent", credits_text(stats.credits))
    totals.add_row("estimated", credits_text(stats.estimated))
    totals.add_row("charged", f"{credits_text(stats.spent)} (every run, images or not)")
    for status in _NOT_OK:
        if stats.statuses.get(status):
            totals.add_row(status, Text(str(stats.statuses[status]), style="yellow"))
    totals.add_row(
        "time", f"{duration(stats.elapsed)} ({number(stats.rate, decimals=1)} images/min)"
    )
    totals.add_row("manifest", str(manifest))
    console.print(totals)
    failures = stats.failures
    if not failures:
        return
    table = Table(title="Failed jobs", title_justify="left", title_style="bold red")
    table.add_column("job", style="bold")
    table.add_column("line", justify="right")
    table.add_column("model")
    table.add_column("error", overflow="fold")
    for result in failures:
        table.add_row(result.job.label, str(result.job.line), result.job.model, result.error)
    console.print(table)
