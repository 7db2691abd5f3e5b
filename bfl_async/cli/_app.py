"""The `bfl` commands: thin typer wrappers over the public API of bfl_async."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import json
import os
import shlex
import sqlite3
import sys
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import anyio
import pydantic
import typer
from rich.console import Console
from rich.status import Status
from rich.table import Table
from rich.text import Text

from bfl_async import (
    MODELS,
    AsyncBFL,
    Batch,
    BatchInUseError,
    BFLError,
    DownloadError,
    GeneratedImage,
    MissingAPIKeyError,
    ModelSpec,
    OutputExistsError,
    ParameterError,
    SubmissionUncertainError,
    Task,
    TaskError,
    WaitTimeoutError,
    estimate_cost,
)
from bfl_async._download import check_file_name
from bfl_async.testing import FakeBFL

from ._batch import MANIFEST, BatchStats, one_line, parse_budget, run_batch
from ._connect import (
    CLIError,
    Connection,
    Region,
    fake_generation_time,
    open_client,
    with_client,
)
from ._display import (
    LiveDisplay,
    PlainDisplay,
    credits_text,
    number,
    print_summary,
    usd,
)
from ._jobs import (
    Job,
    JobFileError,
    describe_parameter_error,
    existing_image,
    load_jobs,
    parse_param,
)
from ._one import OneTask, Saved, handles_told, watch_one

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="bfl",
    help="Generate images with Black Forest Labs' FLUX API, one at a time or by the batch.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    add_completion=False,
    # Locals in a traceback could show the API key.
    pretty_exceptions_show_locals=False,
)


class RegionName(str, enum.Enum):
    """The API hosts `--region` chooses from."""

    GLOBAL = "global"
    EU = "eu"
    US = "us"


_REGIONS: dict[RegionName, Region] = {
    RegionName.GLOBAL: "global",
    RegionName.EU: "eu",
    RegionName.US: "us",
}

# --- options shared by the commands --------------------------------------------------------

ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="BFL_API_KEY",
        show_default=False,
        help="Your BFL API key (default: the BFL_API_KEY variable). Never printed.",
    ),
]
BaseUrl = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        envvar="BFL_BASE_URL",
        show_default=False,
        help="The API host, instead of the region's (e.g. a fake started by `bfl fake-server`).",
    ),
]
RegionOption = Annotated[
    RegionName, typer.Option("--region", help="Which of BFL's API hosts to use.")
]
Concurrency = Annotated[
    int | None,
    typer.Option(
        "--concurrency",
        min=1,
        show_default=False,
        help="At most N tasks in flight (default: the account's 24; kontext-max: at most 6).",
    ),
]
LimiterURL = Annotated[
    str | None,
    typer.Option(
        "--limiter",
        envvar="BFL_LIMITER_URL",
        show_default=False,
        help="Share the account's in-flight limits with other processes through Redis "
        "(redis://[:password@]host:port/db; needs the redis extra).",
    ),
]
Fake = Annotated[
    bool,
    typer.Option("--fake", help="Run against a fake API started in this process: no key, no cost."),
]
OutputDir = Annotated[
    Path,
    typer.Option("--output-dir", "-o", file_okay=False, help="Where the images are saved."),
]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace images that already exist in the output dir.")
]
Grace = Annotated[
    float,
    typer.Option(
        "--grace",
        min=0,
        help="On Ctrl-C, seconds to keep watching paid tasks in flight (a second Ctrl-C "
        "stops at once).",
    ),
]
JobsFile = Annotated[
    Path,
    typer.Argument(
        exists=True,
        dir_okay=False,
        show_default=False,
        help="One JSON object per line: model, prompt, other parameters, optional name.",
    ),
]


def _connection(
    api_key: str | None,
    base_url: str | None,
    region: RegionName,
    concurrency: int | None,
    fake: bool,
) -> Connection:
    return Connection(
        api_key=api_key if api_key and api_key.strip() else None,  # blank: no key at all
        base_url=base_url or None,
        region=_REGIONS[region],
        concurrency=concurrency,
        fake=fake,
    )


# --- running and failing cleanly -----------------------------------------------------------


def _stdout() -> Console:
    # Paths, names and errors are printed as they are: `[v2]` is no markup, `:smile:` no emoji.
    return Console(highlight=False, markup=False, emoji=False)


def _print_error(message: str) -> None:
    """`error: message` on stderr, on one line whatever the terminal's width."""
    console = Console(stderr=True, highlight=False)
    console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)


def _fail(message: str, exit_code: int) -> typer.Exit:
    """Print `error: message`; return the Exit to raise."""
    _print_error(message)
    return typer.Exit(exit_code)


def _exit_code(error: Exception) -> int:
    if isinstance(error, CLIError):
        return error.exit_code
    if isinstance(error, ParameterError | OutputExistsError | MissingAPIKeyError | BatchInUseError):
        return 2  # the input is wrong, or the output taken; nothing was sent
    return 1


def _run(main: Callable[[], Awaitable[T]], *, status: str | None = None) -> T:
    """Run `main` on an asyncio event loop; a failure becomes one `error:` line and an exit.

    With `status`, a spinner shows it meanwhile (in a terminal).
    """
    spinner = _stdout().status(status) if status else contextlib.nullcontext()
    try:
        with spinner:
            return anyio.run(main, backend="asyncio")
    except (CLIError, BFLError, OSError, ImportError) as exc:
        raise _fail(one_line(exc), _exit_code(exc)) from None
    except sqlite3.Error as exc:  # a batch's journal: a full disk, a file that is no journal
        raise _fail(
            f"the batch journal could not be used ({one_line(exc)}); what it recorded is "
            "kept: fix that and run the same command again to resume",
            1,
        ) from None


def _load_jobs(path: Path, output_dir: Path | None = None, overwrite: bool = False) -> list[Job]:
    try:
        return load_jobs(path, output_dir, overwrite=overwrite)
    except JobFileError as exc:
        for line in exc.lines():
            _print_error(line)
        raise typer.Exit(2) from None


def _make_dir(path: Path) -> None:
    """Create the output directory and check that files can be written there, before paying."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(f"cannot create the output directory {path}: {exc.strerror}", 2) from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".bfl-write-check-"):
            pass
    except OSError as exc:
        raise _fail(f"cannot write to the output directory {path}: {exc.strerror}", 2) from None


# --- commands ------------------------------------------------------------------------------


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="The model, e.g. flux-2-pro (see `bfl models`).")],
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    output_dir: OutputDir = Path("."),
    width: Annotated[int | None, typer.Option(help="Width in pixels.")] = None,
    height: Annotated[int | None, typer.Option(help="Height in pixels.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed, for repeatable images.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="KEY=VALUE",
            help="Any other parameter (repeatable): text as typed, true/false, numbers; "
            "JSON for a parameter the catalog does not know.",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="File name of the image, without suffix (default: task id).")
    ] = None,
    overwrite: Overwrite = False,
    grace: Grace = 30.0,
    fake: Fake = False,
    concurrency: Concurrency = None,
    region: RegionOption = RegionName.GLOBAL,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Generate one image; print its path, task id, seed and cost.

    Ctrl-C (or SIGTERM) before anything is sent stops at once: nothing is paid. Once the
    task is paid, it waits up to --grace seconds for the image; a second Ctrl-C stops
    waiting and prints the `bfl wait` command that fetches the image later. A submit on its
    way is waited for, as its answer says whether the task is paid; a third Ctrl-C abandons
    it (check your dashboard: it may be paid). Exits 130 if interrupted.
    """
    params = _params(prompt, width, height, seed, param or [])
    try:
        estimate = estimate_cost(model, **params)
    except ParameterError as exc:
        raise _fail(describe_parameter_error(exc), 2) from None
    # The command waits for the paid task itself (--grace): the client's close never does.
    connection = dataclasses.replace(
        _connection(api_key, base_url, region, concurrency, fake), close_grace=0.0
    )
    _check(connection)
    _make_dir(output_dir)
    one = OneTask(grace=grace, say=_say, pool=MODELS[model].pool)

    async def make(client: AsyncBFL) -> GeneratedImage:
        return await client.generate(
            model,
            output_dir=output_dir,
            name=name,
            overwrite=overwrite,
            on_submitted=one.accepted,
            **params,
        )

    saved = _run_one(
        one,
        lambda: watch_one(
            one, lambda: open_client(connection), make, output_dir, name=name, overwrite=overwrite
        ),
        status=f"generating with {model}…",
        fetch=_Fetch(output_dir, name, overwrite, region, base_url, fake),
    )
    _print_saved(saved, saved.task.cost if saved.task.cost is not None else estimate)
    if one.signals:
        raise typer.Exit(130)  # interrupted, but the image is saved


def _params(
    prompt: str, width: int | None, height: int | None, seed: int | None, extra: list[str]
) -> dict[str, Any]:
    """The submit parameters of `generate`, from its options and its `-p key=value`s."""
    params: dict[str, Any] = {"prompt": prompt}
    for key, value in (("width", width), ("height", height), ("seed", seed)):
        if value is not None:
            params[key] = value
    for text in extra:
        try:
            key, value = parse_param(text)
        except ValueError as exc:
            raise _fail(f"-p: {exc}", 2) from None
        if key in params:
            raise _fail(f"{key} is given twice", 2)
        params[key] = value
    return params


def _check(connection: Connection) -> None:
    try:
        connection.check()
    except CLIError as exc:
        raise _fail(str(exc), exc.exit_code) from None


@app.command()
def wait(
    handle: Annotated[
        str,
        typer.Argument(
            show_default=False,
            help="A paid task's handle: the JSON `bfl generate` prints when it stops "
            "before saving the image.",
        ),
    ],
    output_dir: OutputDir = Path("."),
    name: Annotated[
        str | None, typer.Option(help="File name of the image, without suffix (default: task id).")
    ] = None,
    overwrite: Overwrite = False,
    timeout: Annotated[
        float,
        typer.Option(
            min=0, help="Give up after S seconds if the task is still running (it keeps running)."
        ),
    ] = 600.0,
    region: RegionOption = RegionName.GLOBAL,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Save the image of a task already paid for; print its path, task id, seed and cost.

    Nothing is submitted, so nothing is paid. BFL keeps a result for about 10 minutes after
    the task ends. Ctrl-C stops at once; the same command picks the task up again.
    """
    task = _parse_handle(handle)
    if not api_key:  # the fake's tasks stop with it: no --fake here
        raise _fail(
            "BFL_API_KEY is not set. Set it (or pass --api-key) to the key of the account "
            "that paid for the task",
            2,
        )
    connection = dataclasses.replace(
        _connection(api_key, base_url, region, None, False), close_grace=0.0
    )
    if name is not None:
        try:
            check_file_name(task.model, name)  # the library's own check, before any wait
        except ParameterError as exc:
            raise _fail(describe_parameter_error(exc), 2) from None
        existing = existing_image(output_dir, name)
        if existing is not None and not overwrite:
            raise _fail(f"{existing} already exists (pass --overwrite to replace it)", 2)
    _make_dir(output_dir)
    one = OneTask(grace=0.0, say=_say, task=task)
    saved = _run_one(
        one,
        lambda: watch_one(
            one,
            lambda: open_client(connection),
            None,
            output_dir,
            name=name,
            overwrite=overwrite,
            timeout=timeout,
        ),
        status=f"waiting for task {task.id}…",
        fetch=_Fetch(output_dir, name, overwrite, region, base_url, fake=False),
    )
    _print_saved(saved, task.cost if task.cost is not None else _flat_price(task.model))
    if one.signals:
        raise typer.Exit(130)


def _parse_handle(text: str) -> Task:
    """The task of a handle's JSON, or exit 2 saying what is wrong with it."""
    try:
        task = Task.model_validate_json(text)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, error['loc']))}: {error['msg']}" if error["loc"] else error["msg"]
            for error in exc.errors(include_url=False)
        )
        raise _fail(
            f"HANDLE is not a task handle (the JSON `bfl generate` prints): {problems}", 2
        ) from None
    url = urlsplit(task.polling_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise _fail(
            f"HANDLE is not a task handle: polling_url {task.polling_url!r} is not an http(s) URL",
            2,
        )
    if not task.id:
        raise _fail("HANDLE is not a task handle: id is empty", 2)
    return task


@dataclasses.dataclass(frozen=True)
class _Fetch:
    """Where a command saves its image: what `bfl wait` needs to fetch it later."""

    output_dir: Path
    name: str | None
    overwrite: bool
    region: RegionName
    base_url: str | None
    fake: bool

    def tell(self, task: Task) -> None:
        """Say how to fetch the image of `task`, paid and not saved."""
        if self.fake:
            _say(
                f"task {task.id} was left running on the fake API, which stops with this "
                "command: nothing was paid, and there is nothing to fetch later"
            )
            return
        command = ["bfl", "wait", task.model_dump_json(), "-o", str(self.output_dir)]
        if self.name is not None:
            command += ["--name", self.name]
        if self.overwrite:
            command.append("--overwrite")
        if self.region is not RegionName.GLOBAL:
            command += ["--region", self.region.value]
        if self.base_url:
            command += ["--base-url", self.base_url]
        _say(
            f"task {task.id} is paid but its image is not saved; fetch it (within about 10 "
            f"minutes of the task's end) with:\n  {shlex.join(command)}"
        )


def _run_one(
    one: OneTask,
    main: Callable[[], Awaitable[Saved | None]],
    *,
    status: str,
    fetch: _Fetch,
) -> Saved:
    """Run a command that watches one task; if its image is not saved, say what became of
    the task and exit (130 if interrupted)."""
    error: Exception | None = None
    given = one.task
    try:
        with handles_told(one), _stdout().status(status) as spinner:
            one.leave = functools.partial(_abandon, spinner, fetch)
            one.saved = anyio.run(main, backend="asyncio")
    except KeyboardInterrupt:  # heard while Python started or closed the loop: stop all the same
        one.signals += 1
    except (CLIError, BFLError, OSError, ImportError) as exc:
        error = exc
        _print_error(_error_line(exc))
    except BaseException:  # a bug: its traceback follows what became of the paid task
        if one.task is not None and one.saved is None:
            fetch.tell(one.task)
        raise
    if one.saved is not None:
        return one.saved
    if one.task is not None and _fetchable(error):
        fetch.tell(one.task)
    elif error is None:
        _say("stopped: no task was created, nothing was paid")
    if one.signals or error is None:
        raise typer.Exit(130)
    # Exit 2 says nothing was submitted: not so once this command's submit was paid.
    raise typer.Exit(1 if one.task is not None and given is None else _exit_code(error))


def _error_line(error: Exception) -> str:
    """The `error:` line of `error`, in the command's words where the library's speak Python."""
    if isinstance(error, WaitTimeoutError):  # wait(e.task)
        return f"task {error.task.id} was not finished in time; it keeps running"
    if isinstance(error, OutputExistsError):  # overwrite=True
        kept = "" if error.kept is None else f"; the image was kept as {error.kept}"
        return f"{error.path} already exists (pass --overwrite to replace it){kept}"
    if isinstance(error, SubmissionUncertainError):  # .model and .params
        return (
            f"the submit to {error.model!r} may or may not have created a paid task "
            f"({error.reason}); it was not retried, to avoid paying twice. Check your "
            "dashboard (https://dashboard.bfl.ai) before generating it again"
        )
    return one_line(error)


def _abandon(spinner: Status, fetch: _Fetch) -> NoReturn:
    """Leave at once, abandoning a submit that still waits for its answer (a third signal):
    the library waits for that answer however long it takes, as it may be a paid task, so
    only leaving the process stops waiting for it."""
    spinner.stop()  # the terminal's cursor back: nothing else is cleaned up
    if fetch.fake:
        _say("abandoned the submit on its way to the fake API: nothing was paid")
    else:
        _say(
            "abandoned the submit on its way: BFL may have created (and charged for) its "
            "task, but its id never reached this command, so `bfl wait` cannot fetch its "
            "image. Check your dashboard (https://dashboard.bfl.ai) before generating it again"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _fetchable(error: Exception | None) -> bool:
    """Whether the image of a paid task may still be fetched after `error`."""
    if isinstance(error, DownloadError | WaitTimeoutError):
        return True  # the image is at its URL, or the task is still running
    if isinstance(error, OutputExistsError):
        return error.kept is None  # kept: the image is saved, under another name
    # Moderated, failed, unknown or expired: no image; a CLIError: the command could not start.
    return not isinstance(error, TaskError | CLIError)


def _print_saved(saved: Saved, cost: float | None) -> None:
    console = _stdout()
    console.print(f"path    {saved.path}", soft_wrap=True)
    console.print(f"task    {saved.task.id}", soft_wrap=True)
    console.print(f"seed    {saved.seed}", soft_wrap=True)
    console.print(f"cost    {'unknown' if cost is None else credits_text(cost)}", soft_wrap=True)


def _flat_price(model: str) -> float | None:
    """A FLUX.1 model's price in credits (its tasks report no cost), from the catalog."""
    spec = MODELS.get(model)
    return None if spec is None else getattr(spec.pricing, "cents", None)


def _say(message: str) -> None:
    """A line for the user on stderr, as it is (no markup), whatever the terminal's width."""
    Console(stderr=True, highlight=False, markup=False, emoji=False).print(message, soft_wrap=True)


@app.command()
def batch(
    jobs_file: JobsFile,
    output_dir: OutputDir = Path("."),
    overwrite: Overwrite = False,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            show_default=False,
            help="Spend at most this much: credits (500) or US dollars ('$12.50'). Jobs that "
            "would pass it are skipped, counting what is spent and in flight.",
        ),
    ] = None,
    resubmit_uncertain: Annotated[
        bool,
        typer.Option(
            "--resubmit-uncertain",
            help="Submit again the jobs whose earlier submit may or may not have reached BFL "
            "(check your dashboard first: they may be paid twice).",
        ),
    ] = False,
    grace: Grace = 30.0,
    fake: Fake = False,
    concurrency: Concurrency = None,
    limiter: LimiterURL = None,
    region: RegionOption = RegionName.GLOBAL,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Generate every job of a JSONL file, with live progress; resumable; write results.jsonl.

    Each line is a JSON object: "model", "prompt", any other parameter, and an optional
    "name" for the image file. Blank lines and lines starting with # are skipped. Every
    line is checked before anything is sent. A journal in the output dir makes the batch
    resumable: run the same command again after a crash or Ctrl-C, and it picks up where
    it stopped without paying twice. Exits 1 if some jobs failed, 130 if interrupted.
    """
    try:
        max_cost = None if budget is None else parse_budget(budget)
    except ValueError as exc:
        raise _fail(f"--budget: {exc}", 2) from None
    resuming = (output_dir / Batch.journal_name).exists()
    # On a rerun, named images already saved are the batch's own: the journal knows them.
    jobs = _load_jobs(jobs_file, None if resuming else output_dir, overwrite)
    connection = dataclasses.replace(
        _connection(api_key, base_url, region, concurrency, fake),
        close_grace=0.0,
        limiter=limiter or None,
    )
    _check(connection)
    _make_dir(output_dir)
    console = _stdout()
    stats = BatchStats(total=len(jobs))
    estimate = sum(job.estimate for job in jobs)
    limit = "" if max_cost is None else f", budget {credits_text(max_cost)}"
    console.print(
        f"batch: {len(jobs)} jobs from {jobs_file} -> {output_dir} "
        f"(estimated {credits_text(estimate)}{limit})"
        f"{' on the fake API' if fake else ''}{'; resuming' if resuming else ''}",
        soft_wrap=True,
    )
    signals: list[int] = []

    def on_signal(signum: int, running: Batch) -> None:
        signals.append(signum)
        if len(signals) == 1:
            _print_error(
                f"stopping: no new submits; watching paid tasks for up to {grace:g} s "
                "(press Ctrl-C again to stop now)"
            )
        elif len(signals) == 2:
            _print_error(
                "stopping now; a submit still on its way is waited for, as its answer says "
                "whether it was paid (press Ctrl-C again to abandon it: its job is then "
                "uncertain)"
            )

    async def run(client: AsyncBFL) -> None:
        options: dict[str, Any] = {
            "overwrite": overwrite,
            "max_cost": max_cost,
            "resubmit_uncertain": resubmit_uncertain,
            "grace": grace,
            "on_signal": on_signal,
        }
        if not console.is_terminal:
            await run_batch(
                client, jobs, output_dir, stats, PlainDisplay(console, stats), **options
            )
            return
        with LiveDisplay(console, stats, client.limiter) as display:
            await run_batch(client, jobs, output_dir, stats, display, **options)

    try:
        _run(lambda: with_client(connection, run, on_submitted=stats.on_submitted))
    except KeyboardInterrupt:
        signals.append(2)
    print_summary(console, stats, output_dir / MANIFEST)
    uncertain = stats.statuses.get("uncertain", 0)
    if uncertain:
        console.print(
            f"{uncertain} job(s) are uncertain: the batch stopped while their submit was on "
            "its way, so BFL may have created (and charged for) their tasks. Check your "
            "dashboard; to submit them again, rerun with --resubmit-uncertain",
            soft_wrap=True,
        )
    if signals:
        raise _fail(
            f"interrupted after {stats.ok} of {stats.total} images; every paid task is "
            f"recorded in {output_dir / Batch.journal_name}. Run the same command again "
            "to resume: nothing is paid twice",
            130,
        )
    raise typer.Exit(1 if stats.failed or stats.pending else 0)


@app.command()
def models() -> None:
    """List the models: path, pool, family, reference images and price."""
    table = Table(title="FLUX models", title_justify="left")
    table.add_column("model", style="bold")
    table.add_column("pool")
    table.add_column("family")
    table.add_column("max refs", justify="right")
    table.add_column("price")
    for spec in MODELS.values():
        family = {"flux2": "FLUX.2", "flux1": "FLUX.1"}.get(spec.family, spec.family)
        table.add_row(spec.name, spec.pool, family, str(spec.max_references), _price(spec))
    console = _stdout()
    console.print(table)
    console.print(
        "1 c = 1 credit = 1 US cent; FLUX.2: first megapixel + each further MP in or out."
    )


def _price(spec: ModelSpec) -> str:
    """`3 c + 1.5 c/MP` (FLUX.2) or `$0.04` (flat, FLUX.1)."""
    # The pricing classes are not exported, so read their fields by name.
    pricing = spec.pricing
    first: float | None = getattr(pricing, "first_mp_cents", None)
    per_mp: float | None = getattr(pricing, "mp_cents", None)
    if first is not None and per_mp is not None:
        return f"{number(first)} c + {number(per_mp)} c/MP"
    flat: float | None = getattr(pricing, "cents", None)
    return "?" if flat is None else f"${number(flat / 100, keep=2)}"


@app.command()
def estimate(
    jobs_file: JobsFile,
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            "-o",
            file_okay=False,
            show_default=False,
            help="A batch's output dir: also show what its runs so far were charged.",
        ),
    ] = None,
) -> None:
    """Estimate what a job file will cost, per model and in total, before running it."""
    jobs = _load_jobs(jobs_file)
    count: defaultdict[str, int] = defaultdict(int)
    credits: defaultdict[str, float] = defaultdict(float)
    for job in jobs:
        count[job.model] += 1
        credits[job.model] += job.estimate
    table = Table(title=f"Estimated cost of {jobs_file}", title_justify="left", show_footer=True)
    table.add_column("model", footer="total", style="bold")
    table.add_column("jobs", footer=str(len(jobs)), justify="right")
    total = sum(credits.values())
    table.add_column("credits", footer=number(total), justify="right")
    table.add_column("US$", footer=usd(total), justify="right")
    for model in sorted(count):
        table.add_row(model, str(count[model]), number(credits[model]), usd(credits[model]))
    console = _stdout()
    console.print(table)
    console.print(f"total: {credits_text(total)}", soft_wrap=True)
    if output_dir is not None:
        console.print(_charged_so_far(output_dir / Batch.manifest_name), soft_wrap=True)
    console.print(
        "1 credit = 1 US cent. FLUX.2 counts each reference image as 1 MP; "
        "BFL bills what each submit reports.",
        soft_wrap=True,
    )


def _charged_so_far(manifest: Path) -> str:
    """`charged so far: …` from a batch's manifest, or why there is nothing to show."""
    try:
        summary = json.loads(manifest.read_text(encoding="utf-8"))["summary"]
        spent = float(summary["spent_credits"])
        done = int(summary["states"].get("downloaded", 0))
    except FileNotFoundError:
        return f"charged so far: nothing ({manifest} does not exist yet)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"charged so far: unknown ({manifest} is not a batch manifest)"
    return f"charged so far: {credits_text(spent)} ({done} images saved; from {manifest})"


@app.command()
def credits(
    fake: Fake = False,
    region: RegionOption = RegionName.GLOBAL,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Show the account's balance."""
    connection = dataclasses.replace(
        _connection(api_key, base_url, region, None, fake), holds_slots=False
    )
    _check(connection)

    async def balance(client: AsyncBFL) -> float:
        return await client.credits()

    value = _run(lambda: with_client(connection, balance))
    _stdout().print(f"balance: {credits_text(value)}", soft_wrap=True)


@app.command("fake-server")
def fake_server(
    port: Annotated[int, typer.Option(min=0, max=65535, help="API port (0: any free port).")] = 0,
    time_scale: Annotated[
        float, typer.Option(min=0, help="Multiplies generation times (0.5-2 s per image).")
    ] = 1.0,
) -> None:
    """Run a fake of BFL's API on this machine until Ctrl-C (key: fake-key)."""

    async def serve() -> None:
        async with FakeBFL(
            api_port=port, generation_time=fake_generation_time, time_scale=time_scale
        ) as fake:
            print(f"FakeBFL listening on {fake.base_url} (API key: {fake.api_key})", flush=True)
            print(
                f"  BFL_BASE_URL={fake.base_url} BFL_API_KEY={fake.api_key} "
                "bfl batch examples/prompts.jsonl -o out",
                flush=True,
            )
            print("Press Ctrl-C to stop.", flush=True)
            await anyio.sleep_forever()

    try:
        _run(serve)
    except KeyboardInterrupt:
        print("stopped", flush=True)


def main() -> None:
    """Entry point of the `bfl` script."""
    app()
