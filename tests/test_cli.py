"""The `bfl` command line: every command and exit code, against the embedded fake (`--fake`)
or a FakeBFL the test runs in a background thread (`--base-url`)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from rich.console import Console
from typer.testing import CliRunner, Result

from bfl_async import MODELS, AsyncBFL, Task
from bfl_async.cli import app
from bfl_async.cli._batch import BatchStats, JobResult, parse_budget
from bfl_async.cli._connect import Connection
from bfl_async.cli._display import credits_text, duration, job_line, print_summary, usd
from bfl_async.cli._jobs import Job, parse_param
from bfl_async.cli._one import OneTask
from bfl_async.testing import FakeBFL

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "prompts.jsonl"
KEY = "bfl-cli-test-key-SECRET-7f3a9c"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")
MANIFEST_FIELDS = {"name", "line", "model", "task_id", "status", "path", "seed", "cost", "error"}

StartFake = Callable[..., FakeBFL]


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BFL_API_KEY", "BFL_BASE_URL", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BFL_FAKE_TIME_SCALE", "0.01")


@pytest.fixture
def start_fake() -> Iterator[StartFake]:
    """Start FakeBFLs (key KEY) on an event loop in a background thread, for `--base-url`."""
    with start_blocking_portal(backend="asyncio") as portal, contextlib.ExitStack() as stack:

        def start(**kwargs: Any) -> FakeBFL:
            fake = FakeBFL(api_key=KEY, generation_time=0.01, **kwargs)
            return stack.enter_context(portal.wrap_async_context_manager(fake))

        yield start


def bfl(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """Run `bfl ARGS` in this process."""
    return CliRunner().invoke(app, [str(arg) for arg in args], env=env)


def write_jobs(path: Path, *jobs: dict[str, Any] | str) -> Path:
    """A JSONL job file: dicts become JSON lines, strings are written as they are."""
    lines = [job if isinstance(job, str) else json.dumps(job) for job in jobs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def manifest(directory: Path) -> list[dict[str, Any]]:
    text = (directory / "results.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def is_image(path: Path) -> bool:
    return path.is_file() and path.read_bytes().startswith(IMAGE_MAGIC)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("BFL_") and key not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


CLI = [sys.executable, "-m", "bfl_async.cli"]


# --- generate ------------------------------------------------------------------------------


def test_generate_on_the_fake_prints_path_task_seed_and_cost(tmp_path: Path) -> None:
    result = bfl(
        "generate", "flux-2-pro", "a red fox", "--width", "512", "--height", "512",
        "--seed", "42", "-p", "output_format=png",
        "-o", tmp_path, "--fake",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    path = Path(fields["path"])
    assert path.parent == tmp_path and path.suffix == ".png" and is_image(path)
    assert path.stem == fields["task"]
    assert fields["seed"] == "42"
    assert fields["cost"] == "3 credits ($0.03)"


def test_generate_with_a_name_and_a_flux1_model_shows_the_catalog_price(tmp_path: Path) -> None:
    result = bfl(
        "generate", "flux-kontext-pro", "a poster", "-p", "aspect_ratio=3:4",
        "--name", "poster", "-o", tmp_path, "--fake",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert is_image(tmp_path / "poster.jpg")
    assert "cost    4 credits ($0.04)" in result.stdout  # FLUX.1 submits report no cost


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "500"], "width: 500 is not a multiple of 16"),
        (["-p", "steps=3"], "steps"),
        (["-p", "no-equals-sign"], "-p: expected key=value"),
        (["--seed", "1", "-p", "seed=2"], "seed is given twice"),
    ],
)
def test_generate_rejects_bad_parameters_before_anything_is_sent(
    args: list[str], message: str, tmp_path: Path
) -> None:
    result = bfl("generate", "flux-2-pro", "a fox", *args, "-o", tmp_path, "--fake")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_generate_an_unknown_model_is_a_usage_error() -> None:
    result = bfl("generate", "flux-9-ultra", "a fox", "--fake")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: unknown model 'flux-9-ultra' (`bfl models` lists the 11 known models)\n"
    )


def test_generate_a_moderated_prompt_fails_with_one_clean_line(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(outcome=lambda model, body: "Request Moderated")
    result = bfl(
        "generate", "flux-2-klein-4b", "a forbidden fruit", "-o", tmp_path,
        "--base-url", fake.base_url, "--api-key", KEY,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: task ") and "moderated" in result.stderr
    assert KEY not in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed=42", ("seed", 42)),
        ("guidance=2.5", ("guidance", 2.5)),
        ("raw=true", ("raw", True)),
        ("output_format=png", ("output_format", "png")),
        ('prompt="42"', ("prompt", '"42"')),
        ("aspect_ratio=16:9", ("aspect_ratio", "16:9")),
        ("prompt=a=b", ("prompt", "a=b")),
        ("x=NaN", ("x", "NaN")),
        ("x=", ("x", "")),
    ],
)
def test_param_values_are_json_when_they_parse(text: str, expected: tuple[str, Any]) -> None:
    assert parse_param(text) == expected


# --- batch ---------------------------------------------------------------------------------


def test_batch_on_the_fake_saves_one_image_per_job_and_a_manifest(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        "# a comment, then a blank line",
        "",
        {"model": "flux-2-pro", "prompt": "a fox", "width": 512, "height": 512, "name": "fox"},
        {"model": "flux-2-klein-4b", "prompt": "a boat", "seed": 7, "output_format": "png"},
        {"model": "flux-kontext-pro", "prompt": "a poster", "aspect_ratio": "1:1"},
    )
    out = tmp_path / "out"
    result = bfl("batch", jobs, "-o", out, "--fake")
    assert result.exit_code == 0, result.output
    rows = sorted(manifest(out), key=lambda row: row["line"])
    assert [row["line"] for row in rows] == [3, 4, 5]
    for row in rows:
        assert set(row) == MANIFEST_FIELDS
        assert row["status"] == "ok" and row["error"] is None
        assert is_image(Path(row["path"]))
        assert isinstance(row["task_id"], str) and isinstance(row["seed"], int)
    assert rows[0]["name"] == "fox" and rows[0]["path"] == str(out / "fox.jpg")
    assert rows[1]["name"] is None and rows[1]["path"] == str(out / f"{rows[1]['task_id']}.png")
    assert rows[1]["seed"] == 7
    assert [row["cost"] for row in rows] == [3.0, 1.4, 4.0]
    bookkeeping = {"results.jsonl", "manifest.json", "bfl-batch.sqlite", ".bfl-batch.sqlite.lock"}
    assert sorted(p.name for p in out.iterdir() if p.name not in bookkeeping) == sorted(
        Path(row["path"]).name for row in rows
    )
    assert "summary: 3 jobs, 3 ok, 0 failed; 8.4 credits ($0.084)" in result.stdout
    assert "\x1b[" not in result.output


def test_the_example_jobs_all_succeed_on_the_fake(tmp_path: Path) -> None:
    result = bfl("batch", EXAMPLES, "-o", tmp_path, "--fake")
    assert result.exit_code == 0, result.output
    rows = manifest(tmp_path)
    assert len(rows) == 12 and all(row["status"] == "ok" for row in rows)
    assert all(is_image(Path(row["path"])) for row in rows)
    assert {row["model"] for row in rows} >= {"flux-2-pro", "flux-2-klein-4b", "flux-kontext-pro"}
    assert sum(row["name"] is not None for row in rows) >= 2


@pytest.mark.parametrize("terminal", [False, True], ids=["plain", "terminal"])
def test_batch_with_failed_jobs_exits_1_and_names_each_one(
    terminal: bool, start_fake: StartFake, tmp_path: Path
) -> None:
    def outcome(model: str, body: dict[str, Any]) -> str:
        return "Request Moderated" if "forbidden" in body["prompt"] else "Ready"

    fake = start_fake(outcome=outcome)
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "flux-2-klein-4b", "prompt": "an apple", "width": 512, "height": 512},
        {"model": "flux-2-klein-4b", "prompt": "a forbidden fruit", "name": "snake"},
        {"model": "flux-2-klein-4b", "prompt": "a pear", "name": "pear"},
        {"model": "flux-2-klein-4b", "prompt": "another forbidden thing"},
    )
    out = tmp_path / "out"
    result = bfl(
        "batch", jobs, "-o", out, "--base-url", fake.base_url, "--api-key", KEY,
        "--concurrency", "2",
        env={"FORCE_COLOR": "1", "COLUMNS": "200"} if terminal else None,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert fake.peak_in_flight["standard"] <= 2
    rows = {row["line"]: row for row in manifest(out)}
    assert [rows[n]["status"] for n in (1, 2, 3, 4)] == ["ok", "failed", "ok", "failed"]
    assert rows[2]["name"] == "snake" and rows[2]["path"] is None
    assert "moderated" in rows[2]["error"] and rows[2]["task_id"] in fake.tasks
    assert is_image(out / "pear.jpg") and not list(out.glob("snake.*"))
    assert KEY not in result.output
    if terminal:  # the live panel, then the summary tables
        plain = ANSI.sub("", result.stdout)
        assert "\x1b[" in result.stdout and "in flight" in plain and "Batch summary" in plain
        failed_table = plain[plain.index("Failed jobs") :]
        assert "snake" in failed_table and "line 4" in failed_table
        assert failed_table.count("moderated") == 2
        return
    failed = [line for line in result.stdout.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2
    assert failed[0].startswith("failed: snake (line 2, flux-2-klein-4b): task ")
    assert failed[1].startswith("failed: line 4 (flux-2-klein-4b): task ")
    assert all("moderated" in line for line in failed)
    assert "2 ok, 2 failed" in result.stdout


def test_jobs_refused_at_submit_fail_without_a_task(start_fake: StartFake, tmp_path: Path) -> None:
    fake = start_fake(credits=4.0)
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "flux-2-pro", "prompt": "one", "seed": 1},
        {"model": "flux-2-pro", "prompt": "two", "seed": 2},
    )
    result = bfl("batch", jobs, "-o", tmp_path, "--base-url", fake.base_url, "--api-key", KEY)
    assert result.exit_code == 1
    rows = manifest(tmp_path)
    failed = [row for row in rows if row["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["task_id"] is None and failed[0]["cost"] is None
    assert "402" in failed[0]["error"] or "credits" in failed[0]["error"].lower()
    assert "1 ok, 1 failed; 3 credits ($0.03)" in result.stdout


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "a fox"}', 'missing "model"'),
        ('{"model": 3, "prompt": "a fox"}', '"model" must be a string'),
        ('{"model": "flux-9", "prompt": "a fox"}', "unknown model 'flux-9'"),
        ('{"model": "flux-2-pro"}', "prompt"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "width": 1000}', "not a multiple of 16"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "colour": "red"}', "colour"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "name": "../x"}', "plain file name"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "name": "fox\\tdawn"}', "plain file name"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "name": "' + "x" * 201 + '"}', "at most 200"),
        ('{"model": "flux-2-pro", "prompt": "a fox", "name": 5}', '"name" must be a string'),
        ('{"model": "flux-2-pro", "prompt": "a fox", "name": "ok"}', "already used on line 2"),
    ],
)
def test_a_malformed_line_is_reported_with_its_number_and_nothing_is_sent(
    line: str, message: str, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        "# jobs",
        {"model": "flux-2-pro", "prompt": "a valid job", "name": "ok"},
        line,
        {"model": "flux-2-pro", "prompt": "another valid job"},
    )
    result = bfl(
        "batch", jobs, "-o", tmp_path / "out", "--base-url", fake.base_url, "--api-key", KEY
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {jobs}, line 3: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert fake.submit_attempts == 0
    assert not (tmp_path / "out").exists()


def test_every_malformed_line_is_reported(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", "{", '{"model": "flux-2-pro"}', "3")
    result = bfl("batch", jobs, "--fake")
    assert result.exit_code == 2
    assert [line.split(": ")[1] for line in result.stderr.splitlines()] == [
        f"{jobs}, line 1",
        f"{jobs}, line 2",
        f"{jobs}, line 3",
    ]


def test_an_empty_job_file_is_an_input_error(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", "# nothing here", "")
    result = bfl("batch", jobs, "--fake")
    assert result.exit_code == 2 and "no jobs" in result.stderr


def test_batch_refuses_to_overwrite_a_named_image_unless_asked(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "flux-2-pro", "prompt": "x", "name": "a"})
    (tmp_path / "a.jpg").write_bytes(b"old")
    result = bfl("batch", jobs, "-o", tmp_path, "--fake")
    assert result.exit_code == 2 and "a.jpg already exists (pass --overwrite" in result.stderr
    assert (tmp_path / "a.jpg").read_bytes() == b"old"
    result = bfl("batch", jobs, "-o", tmp_path, "--fake", "--overwrite")
    assert result.exit_code == 0, result.output
    assert is_image(tmp_path / "a.jpg")


def test_an_unreadable_job_file_is_an_input_error(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"\xff\xfe{}")
    result = bfl("batch", jobs, "--fake")
    assert result.exit_code == 2 and "cannot read the file" in result.stderr


def test_an_output_dir_that_cannot_be_made_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = bfl("generate", "flux-2-pro", "a fox", "-o", tmp_path / "file" / "out", "--fake")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot create the output directory")


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_paying(
    command: str, unwritable_dir: Path, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "flux-2-klein-4b", "prompt": "a fox"})
    what = ["generate", "flux-2-klein-4b", "a fox"] if command == "generate" else ["batch", jobs]
    result = bfl(*what, "-o", unwritable_dir, "--base-url", fake.base_url, "--api-key", KEY)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: cannot write to the output directory {unwritable_dir}")
    assert fake.submit_attempts == 0


@pytest.mark.parametrize("terminal", [False, True], ids=["plain", "terminal"])
def test_brackets_and_colons_in_paths_and_names_are_printed_as_they_are(
    terminal: bool, tmp_path: Path
) -> None:
    out = tmp_path / "[/b] [v2] :smile:"
    env = {"FORCE_COLOR": "1", "COLUMNS": "400"} if terminal else None
    result = bfl("generate", "flux-2-pro", "fox", "--name", "[b]fox", "-o", out, "--fake", env=env)
    assert result.exit_code == 0, result.output
    assert f"path    {out / '[b]fox.jpg'}" in ANSI.sub("", result.stdout)
    name = "[bold]fox :smile:"
    jobs = write_jobs(out / "jobs.jsonl", {"model": "flux-2-pro", "prompt": "fox", "name": name})
    result = bfl("batch", jobs, "-o", out, "--fake", "--budget", "1", env=env)
    assert result.exit_code == 1, result.output  # skipped, over budget: named in the summary
    plain = ANSI.sub("", result.stdout)
    assert f"-> {out} (estimated" in plain and str(out / "results.jsonl") in plain
    assert name in plain
    estimate = bfl("estimate", jobs, env=env)  # the table's title names the file
    assert estimate.exit_code == 0 and "[/b] [v2]" in estimate.stdout, estimate.output


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_unicode_line_breaks_inside_a_prompt_keep_the_line_numbers(
    separator: str, tmp_path: Path
) -> None:
    prompt = {"model": "flux-2-klein-4b", "prompt": f"a sign{separator}that says hi"}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps(prompt, ensure_ascii=False) + "\n" + '{"model": "flux-2-pro"}\n',
        encoding="utf-8",
    )
    result = bfl("estimate", jobs)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {jobs}, line 2: invalid parameters")
    assert result.stderr.count("\n") == 1


def test_a_job_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"model": "flux-2-pro", "prompt": "a fox"}\r\n', encoding="utf-8-sig")
    result = bfl("estimate", jobs)
    assert result.exit_code == 0, result.output
    assert "total: 3 credits ($0.03)" in result.stdout


def test_a_name_taken_while_generating_keeps_the_paid_image_and_exits_1(
    start_fake: StartFake, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    def outcome(model: str, body: dict[str, Any]) -> str:
        (out / "fox.jpg").write_bytes(b"old")  # another program takes the name meanwhile
        return "Ready"

    fake = start_fake(outcome=outcome)
    result = bfl("generate", "flux-2-pro", "a fox", "--name", "fox", "-o", out,
                 "--base-url", fake.base_url, "--api-key", KEY)  # fmt: skip
    assert result.exit_code == 1, result.output  # 2 says that nothing was submitted
    first = result.stderr.splitlines()[0]
    assert first.startswith(
        f"error: {out / 'fox.jpg'} already exists (pass --overwrite to replace it); "
        "the image was kept as "
    )
    assert is_image(Path(first.rsplit(" ", 1)[1])) and (out / "fox.jpg").read_bytes() == b"old"
    assert "bfl wait" not in result.stderr  # the paid image is saved: nothing to fetch
    assert fake.submits == 1


def test_a_submit_that_may_be_paid_is_told_in_the_commands_words(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    fake.fail_next("submit", "drop_after")  # the task is made, and its answer lost
    result = bfl("generate", "flux-2-pro", "a fox", "-o", tmp_path,
                 "--base-url", fake.base_url, "--api-key", KEY)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(
        "error: the submit to 'flux-2-pro' may or may not have created a paid task ("
    )
    assert "Check your dashboard" in result.stderr and ".params" not in result.stderr
    assert result.stderr.count("\n") == 1 and KEY not in result.output
    assert fake.submits == 1 and list(tmp_path.iterdir()) == []


def test_generate_refuses_to_overwrite_a_named_image(tmp_path: Path) -> None:
    (tmp_path / "fox.jpg").write_bytes(b"old")
    result = bfl("generate", "flux-2-pro", "a fox", "--name", "fox", "-o", tmp_path, "--fake")
    assert result.exit_code == 2 and "fox.jpg already exists" in result.stderr
    assert "(pass --overwrite to replace it)" in result.stderr  # not Python's overwrite=True
    assert (tmp_path / "fox.jpg").read_bytes() == b"old"


def test_a_bad_fake_time_scale_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BFL_FAKE_TIME_SCALE", "fast")
    result = bfl("credits", "--fake")
    assert result.exit_code == 2 and "BFL_FAKE_TIME_SCALE" in result.stderr


def test_fake_runs_never_use_the_shared_limiter(tmp_path: Path) -> None:
    # The fake is an account of its own: a production BFL_LIMITER_URL is left alone.
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "flux-2-klein-4b", "prompt": "a fox"})
    env = {"BFL_LIMITER_URL": "redis://:pw@127.0.0.1:1/0"}
    result = bfl("batch", jobs, "-o", tmp_path / "out", "--fake", env=env)
    assert result.exit_code == 0, result.output


def test_a_missing_job_file_is_a_usage_error(tmp_path: Path) -> None:
    result = bfl("batch", tmp_path / "missing.jsonl", "--fake")
    assert result.exit_code == 2 and "does not exist" in result.output


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "flux-2-pro", "a fox", "-o", "{out}"],
        ["batch", str(EXAMPLES), "-o", "{out}"],
        ["credits"],
    ],
)
def test_without_a_key_the_command_says_so_and_exits_2(args: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = bfl(*(arg.format(out=out) for arg in args))
    assert result.exit_code == 2
    assert "BFL_API_KEY is not set" in result.stderr
    assert "--fake" in result.stderr and "without a key" in result.stderr
    assert not out.exists()


def test_wait_without_a_key_says_so_and_exits_2(tmp_path: Path) -> None:
    handle = '{"id": "x", "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=x", "model": "m"}'
    result = bfl("wait", handle, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "BFL_API_KEY is not set" in result.stderr and "--fake" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["", "  ", "\n"])
def test_an_empty_key_counts_as_none(key: str) -> None:
    result = bfl("credits", env={"BFL_API_KEY": key})
    assert result.exit_code == 2 and "BFL_API_KEY is not set" in result.stderr


def test_credits_with_the_key_from_the_environment(start_fake: StartFake) -> None:
    fake = start_fake(credits=1234.5)
    result = bfl("credits", env={"BFL_API_KEY": KEY, "BFL_BASE_URL": fake.base_url})
    assert result.exit_code == 0, result.output
    assert result.stdout == "balance: 1,234.5 credits ($12.345)\n"
    assert fake.keys_seen["api"] == [KEY]


def test_credits_need_no_shared_limiter(start_fake: StartFake) -> None:
    # Reading the balance holds no slot: a Redis that is down must not stop it.
    fake = start_fake(credits=7.0)
    env = {"BFL_API_KEY": KEY, "BFL_BASE_URL": fake.base_url}
    result = bfl("credits", env={**env, "BFL_LIMITER_URL": "redis://127.0.0.1:1/0"})
    assert result.exit_code == 0, result.output
    assert result.stdout == "balance: 7 credits ($0.07)\n"


def test_credits_on_the_fake() -> None:
    result = bfl("credits", "--fake")
    assert result.exit_code == 0, result.output
    assert result.stdout == "balance: 1,000 credits ($10.00)\n"


def test_a_wrong_key_is_one_error_line_that_never_shows_the_key(start_fake: StartFake) -> None:
    fake = start_fake()
    wrong = "bfl-wrong-key-SECRET-0000"
    result = bfl("credits", "--base-url", fake.base_url, "--api-key", wrong)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "403" in result.stderr
    assert result.stderr.count("\n") == 1
    assert wrong not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["credits", "--api-key", "bfl key SECRET"], "the API key has a character"),
        (["credits", "--api-key", "bfl-clé-SECRET"], "the API key has a character"),
        (["batch", str(EXAMPLES), "-o", "{out}", "--limiter", "http://:SECRET@x/0"],
         "not a Redis URL"),
    ],
)  # fmt: skip
def test_a_bad_key_or_limiter_url_is_one_error_line_without_the_secret(
    args: list[str], message: str, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    key = ["--api-key", KEY] if "--api-key" not in args else []
    args = [arg.format(out=tmp_path / "out") for arg in args]
    result = bfl(*args, *key, "--base-url", fake.base_url)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert "SECRET" not in result.output and "Traceback" not in result.output
    assert fake.submit_attempts == 0


def test_an_unreachable_api_is_one_error_line() -> None:
    result = bfl("credits", "--base-url", "http://127.0.0.1:9", "--api-key", KEY)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert KEY not in result.output


@pytest.mark.parametrize(
    "command", ["generate", "wait", "batch", "credits", "estimate", "models", ""]
)
def test_help_never_shows_the_key(command: str) -> None:
    result = bfl(*filter(None, [command]), "--help", env={"BFL_API_KEY": KEY})
    assert result.exit_code == 0
    assert KEY not in result.output


def test_concurrency_sets_both_pools() -> None:
    assert Connection(api_key=None).limits is None
    assert Connection(api_key=None, concurrency=3).limits == {"standard": 3, "kontext-max": 3}
    assert Connection(api_key=None, concurrency=50).limits == {"standard": 50, "kontext-max": 6}
    assert KEY not in repr(Connection(api_key=KEY))


def test_concurrency_below_one_is_a_usage_error() -> None:
    result = bfl("credits", "--fake", "--concurrency", "0")
    assert result.exit_code == 2


# --- models and estimate -------------------------------------------------------------------


def test_models_lists_path_pool_family_references_and_price() -> None:
    result = bfl("models")
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if len(cells := [cell.strip() for cell in line.strip("│ ").split("│")]) == 5
    }
    assert rows["flux-2-pro"] == ["standard", "FLUX.2", "8", "3 c + 1.5 c/MP"]
    assert rows["flux-2-klein-4b"] == ["standard", "FLUX.2", "4", "1.4 c + 0.1 c/MP"]
    assert rows["flux-kontext-pro"] == ["standard", "FLUX.1", "4", "$0.04"]
    assert rows["flux-kontext-max"] == ["kontext-max", "FLUX.1", "4", "$0.08"]
    assert rows["flux-pro-1.1-ultra"] == ["standard", "FLUX.1", "0", "$0.06"]
    assert set(rows) == set(MODELS)


def test_estimate_per_model_and_in_total(tmp_path: Path) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"model": "flux-2-pro", "prompt": "a", "width": 1024, "height": 1024},
        {"model": "flux-2-pro", "prompt": "b", "width": 2048, "height": 1024},
        {"model": "flux-kontext-pro", "prompt": "c"},
        {"model": "flux-2-klein-4b", "prompt": "d", "width": 512, "height": 512},
    )
    result = bfl("estimate", jobs)
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if len(cells := [cell.strip() for cell in line.strip("│ ").split("│")]) == 4
    }
    assert rows["flux-2-pro"] == ["2", "7.5", "$0.075"]  # 3 + (3 + 1.5)
    assert rows["flux-kontext-pro"] == ["1", "4", "$0.04"]
    assert rows["flux-2-klein-4b"] == ["1", "1.4", "$0.014"]
    assert rows["total"] == ["4", "12.9", "$0.129"]
    assert "total: 12.9 credits ($0.129)" in result.stdout


def test_estimate_reports_malformed_lines(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "flux-2-pro", "prompt": "a"}, "{")
    result = bfl("estimate", jobs)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {jobs}, line 2: not valid JSON")


@pytest.mark.parametrize(
    ("credits", "text"),
    [
        (3.0, "3 credits ($0.03)"),
        (1.4, "1.4 credits ($0.014)"),
        (1.0, "1 credit ($0.01)"),
        (1000.0, "1,000 credits ($10.00)"),
        (0.0, "0 credits ($0.00)"),
    ],
)
def test_credits_are_shown_with_their_dollar_figure(credits: float, text: str) -> None:
    assert credits_text(credits) == text


def test_small_formatters() -> None:
    assert usd(29) == "$0.29"
    assert duration(3725.4) == "1:02:05"


# --- the progress display ------------------------------------------------------------------


def small_batch(tmp_path: Path, count: int = 6) -> Path:
    return write_jobs(
        tmp_path / "jobs.jsonl",
        *(
            {"model": "flux-2-klein-4b", "prompt": f"job {n}", "width": 256, "height": 256}
            for n in range(count)
        ),
    )


def test_without_a_terminal_progress_is_plain_lines(tmp_path: Path) -> None:
    jobs = small_batch(tmp_path)
    done = subprocess.run(
        [*CLI, "batch", str(jobs), "-o", str(tmp_path / "out"), "--fake"],
        capture_output=True,
        env=subprocess_env(BFL_FAKE_TIME_SCALE="0.01", TERM="xterm-256color"),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert b"\x1b" not in done.stdout + done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0].startswith(f"batch: 6 jobs from {jobs}")
    progress = [line for line in lines if re.match(r"\[[1-6]/6\] ok +line [1-6] -> ", line)]
    assert [line[:5] for line in progress] == [f"[{n}/6]" for n in range(1, 7)]
    assert lines[-3].startswith("summary: 6 jobs, 6 ok, 0 failed; 8.4 credits ($0.084)")
    assert lines[-2] == "spend: estimated 8.4 credits ($0.084), charged 8.4 credits ($0.084)"
    assert lines[-1] == f"manifest: {tmp_path / 'out' / 'results.jsonl'}"


def read_pty(
    command: list[str], env: dict[str, str], timeout: float = 60
) -> list[tuple[float, str]]:
    """Run `command` on a pseudo-terminal; return its output as (time, text) chunks."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append((time.monotonic(), data.decode(errors="replace")))
        assert process.wait(timeout=10) == 0, "".join(text for _, text in chunks)
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return chunks


def test_in_a_terminal_the_live_display_updates_while_jobs_run(tmp_path: Path) -> None:
    jobs = small_batch(tmp_path)
    chunks = read_pty(
        [*CLI, "batch", str(jobs), "-o", str(tmp_path / "out"), "--fake", "--concurrency", "2"],
        env=subprocess_env(BFL_FAKE_TIME_SCALE="0.3", TERM="xterm-256color"),
    )
    raw = "".join(text for _, text in chunks)
    assert "\x1b[" in raw  # colours and cursor moves
    plain, times = without_ansi(chunks)
    # Each frame of the panel: "<spinner> 3/6 ━━━━╸━━━ 50% elapsed …", then the counters.
    frames = [
        (times(match.end()), int(match[1]), int(match[2]))
        for match in re.finditer(r"(\d)/6 .*?\n\s*queued (\d+) +in flight \d/2 standard", plain)
    ]
    finished = [count for _, count, _ in frames]
    assert finished == sorted(finished)  # the counters only go up...
    assert len(set(finished)) >= 4 and finished[-1] == 6  # ...visibly, step by step
    first_seen = {count: at for at, count, _ in reversed(frames)}
    assert first_seen[6] - first_seen[min(first_seen)] > 0.3  # over time, not all at once
    queued = [count for _, _, count in frames]
    assert queued == sorted(queued, reverse=True) and queued[0] >= 2 and queued[-1] == 0
    assert "in flight 2/2 standard" in plain and "in flight 3/2" not in plain
    assert "done 6" in plain and "failed 0" in plain and "images/min" in plain
    assert "ETA" in plain and "Batch summary" in plain
    assert len(manifest(tmp_path / "out")) == 6


def without_ansi(chunks: list[tuple[float, str]]) -> tuple[str, Callable[[int], float]]:
    """The output without escape codes, and when the text at an offset of it arrived."""
    raw = ""
    ends: list[tuple[int, float]] = []
    for at, text in chunks:
        raw += text
        ends.append((len(ANSI.sub("", raw)), at))

    def arrival(offset: int) -> float:
        return next(at for end, at in ends if end >= offset)

    return ANSI.sub("", raw), arrival


# --- fake-server ---------------------------------------------------------------------------


def test_fake_server_serves_until_ctrl_c(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*CLI, "fake-server", "--time-scale", "0.01"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.match(
            r"FakeBFL listening on (http://127\.0\.0\.1:\d+) \(API key: fake-key\)", first
        )
        assert match, first
        answer = httpx.get(f"{match[1]}/v1/credits", headers={"x-key": "fake-key"})
        assert answer.json() == {"credits": 1000.0}
        result = bfl("credits", "--base-url", match[1], "--api-key", "fake-key")
        assert result.stdout == "balance: 1,000 credits ($10.00)\n"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert "Traceback" not in process.stderr.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- resume, budgets and signals -------------------------------------------------------------


@pytest.mark.parametrize("status", ["failed", "skipped", "expired", "pending", "uncertain"])
def test_a_job_line_keeps_its_status_apart_from_the_job(status: Any) -> None:
    job = Job(line=2, model="flux-2-pro", params={}, name="fox", estimate=3.0)
    line = job_line(JobResult(job, status, error="why"), BatchStats(total=12)).plain
    assert f"] {status} fox" in line, line  # piped output is parsed: one space at least


def test_jobs_a_stopped_batch_left_are_pending_not_failed() -> None:
    stats = BatchStats(total=3)
    job = Job(line=1, model="flux-2-pro", params={}, name=None, estimate=3.0)
    stats.record(JobResult(job, "ok", "t1", Path("a.jpg"), 1, 3.0))
    stats.record(JobResult(job, "failed", "t2", error="moderated"))
    stats.record(JobResult(job, "pending", "t3", error="not finished (submitted)"))
    assert (stats.ok, stats.failed, stats.pending, stats.finished) == (1, 1, 1, 2)
    assert [r.task_id for r in stats.failures] == ["t2"]
    console = Console(file=io.StringIO(), width=200)
    print_summary(console, stats, Path("results.jsonl"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "3 jobs, 1 ok, 1 failed;" in text and "; 1 pending" in text
    assert [line for line in text.splitlines() if line.startswith("failed: ")] == [
        "failed: line 1 (flux-2-pro): moderated"
    ]


def test_budget_accepts_credits_or_dollars() -> None:
    assert parse_budget("500") == 500.0
    assert parse_budget(" $12.50 ") == 1250.0
    assert parse_budget("$1,000") == 100000.0
    assert parse_budget("$1,234.50") == 123450.0
    # A decimal comma must not make a budget a hundred times larger.
    for bad in ("", "$", "twelve", "-3", "nan", "inf", "$12,50", "12,5", "1,2,3"):
        with pytest.raises(ValueError, match="not a budget"):
            parse_budget(bad)


def test_batch_with_a_budget_skips_what_would_pass_it_and_resumes(tmp_path: Path) -> None:
    jobs = small_batch(tmp_path, count=6)  # 1.4 credits each
    out = tmp_path / "out"
    result = bfl("batch", jobs, "-o", out, "--fake", "--budget", "$0.05")
    assert result.exit_code == 1, result.output
    assert "budget 5 credits ($0.05)" in result.stdout
    assert [row["status"] for row in manifest(out)].count("skipped") == 3
    assert "3 skipped" in result.stdout
    assert "spend: estimated 8.4 credits ($0.084), charged 4.2 credits ($0.042)" in result.stdout
    result = bfl("batch", jobs, "-o", out, "--fake", "--budget", "9")
    assert result.exit_code == 0, result.output
    assert "; resuming" in result.stdout
    assert all(row["status"] == "ok" for row in manifest(out))
    assert "charged 8.4 credits" in result.stdout
    estimate = bfl("estimate", jobs, "-o", out)
    assert "charged so far: 8.4 credits ($0.084) (6 images saved" in estimate.stdout
    assert "does not exist yet" in bfl("estimate", jobs, "-o", tmp_path).stdout
    (tmp_path / "manifest.json").write_text("[]")
    assert "not a batch manifest" in bfl("estimate", jobs, "-o", tmp_path).stdout


def test_a_journal_that_is_no_journal_is_one_error_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "bfl-batch.sqlite").write_bytes(b"not sqlite at all " * 256)
    result = bfl("batch", small_batch(tmp_path), "-o", out, "--fake")
    assert result.exit_code == 1, result.output
    assert "error: the batch journal could not be used (file is not a database)" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_bad_budget_is_an_input_error(tmp_path: Path) -> None:
    result = bfl("batch", small_batch(tmp_path), "--fake", "--budget", "lots")
    assert result.exit_code == 2 and "--budget:" in result.stderr


def test_a_rerun_finds_named_images_it_saved_itself(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"model": "flux-2-pro", "prompt": "x", "name": "a"})
    assert bfl("batch", jobs, "-o", tmp_path / "out", "--fake").exit_code == 0
    result = bfl("batch", jobs, "-o", tmp_path / "out", "--fake")
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "out")[0]["status"] == "ok"
    assert ", 0 images/min" in result.stdout  # nothing new was made by this run


def batch_with_3_submitted(
    fake: FakeBFL, jobs: Path, out: Path, *options: str
) -> subprocess.Popen[bytes]:
    """`bfl batch` in a process of its own, on `fake`, once 3 submits reached it."""
    process = subprocess.Popen(
        [*CLI, "batch", str(jobs), "-o", str(out), "--base-url", fake.base_url,
         "--concurrency", "3", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=subprocess_env(BFL_API_KEY=KEY),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while fake.submits < 3:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    return process


@pytest.mark.parametrize("signals", [1, 2], ids=["grace", "second-signal"])
def test_sigint_stops_submits_waits_for_paid_tasks_and_says_how_to_resume(
    signals: int, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(limits={"standard": 3})
    fake.generation_time = 0.5 if signals == 1 else 3600.0
    jobs = small_batch(tmp_path, count=8)
    out = tmp_path / "out"
    process = batch_with_3_submitted(fake, jobs, out, "--grace", "30")
    assert process.stderr is not None
    process.send_signal(signal.SIGINT)
    first = process.stderr.readline().decode()  # heard before the next: the two never merge
    if signals == 2:
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)  # the second signal cuts the 30 s grace
    assert process.returncode == 130, stderr
    text = first + stderr.decode()
    assert "stopping: no new submits" in first
    assert "Run the same command again to resume" in text
    # Jobs left for the next run are pending, not failed, and not listed one by one.
    pending = 5 if signals == 1 else 8
    assert f", {8 - pending} ok, 0 failed;" in stdout.decode()
    assert f"; {pending} pending" in stdout.decode()
    assert "failed: " not in stdout.decode() and "] pending" not in stdout.decode()
    # The journal holds them: no Python advice on how to resume each one.
    assert "client.wait" not in text
    assert fake.submits == 3  # no submit after the signal
    rows = manifest(out)
    assert len(rows) == 8
    statuses = sorted(row["status"] for row in rows)
    if signals == 1:  # the 3 paid tasks finished within the grace period and were saved
        assert statuses == ["ok"] * 3 + ["pending"] * 5
    else:
        assert statuses == ["pending"] * 8
        fake.finish_now()
    fake.generation_time = 0.01
    result = bfl("batch", jobs, "-o", out, "--base-url", fake.base_url, "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert fake.submits == 8 and fake.duplicate_submits == 0


def test_a_third_sigint_abandons_a_submit_bfl_holds(start_fake: StartFake, tmp_path: Path) -> None:
    fake = start_fake(limits={"standard": 3})
    fake.generation_time = 3600.0
    fake.slow_seconds = 3600.0
    fake.fail_next("submit", "slow")  # BFL never answers the first submit
    jobs = small_batch(tmp_path, count=5)
    out = tmp_path / "out"
    process = batch_with_3_submitted(fake, jobs, out)
    assert process.stderr is not None
    for said in ("no new submits", "press Ctrl-C again to abandon it"):
        process.send_signal(signal.SIGINT)  # each one heard before the next: none merge
        assert said in process.stderr.readline().decode()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)  # not the 60 s read timeout
    assert process.returncode == 130, stderr
    statuses = sorted(row["status"] for row in manifest(out))
    assert statuses == ["pending"] * 4 + ["uncertain"]
    assert fake.submits == 3


# --- generate through Ctrl-C, and wait -------------------------------------------------------


def generate_process(fake: FakeBFL, out: Path, *options: str) -> subprocess.Popen[str]:
    """`bfl generate` in a process of its own, on `fake`."""
    return subprocess.Popen(
        [*CLI, "generate", "flux-2-pro", "a red fox", "-o", str(out),
         "--base-url", fake.base_url, *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=subprocess_env(BFL_API_KEY=KEY),
    )  # fmt: skip


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)


def read_until(process: subprocess.Popen[str], text: str) -> str:
    """The lines of stderr up to the first one that holds `text`."""
    assert process.stderr is not None
    lines = ""
    while text not in lines:
        line = process.stderr.readline()
        assert line, lines  # stderr closed first
        lines += line
    return lines


@pytest.mark.parametrize(
    ("signum", "answer_delay"),
    [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0), (signal.SIGINT, 2.0)],
    ids=["SIGINT", "SIGTERM", "SIGINT-before-the-answer"],
)
def test_a_signal_after_the_submit_still_saves_the_paid_image_within_the_grace(
    signum: int, answer_delay: float, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(slow_seconds=answer_delay)
    fake.generation_time = 3600.0
    if answer_delay:  # the signal most likely comes while the paid submit's answer is due
        fake.fail_next("submit", "slow")
    out = tmp_path / "out"
    process = generate_process(fake, out, "--grace", "30")
    wait_for(lambda: fake.submits == 1, process)
    process.send_signal(signum)
    said = read_until(process, "is paid; waiting up to 30 s for its image")
    fake.finish_now()
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, said + stderr
    fields = dict(line.split(None, 1) for line in stdout.splitlines())
    assert is_image(Path(fields["path"])) and fields["task"] in fake.tasks
    assert fields["cost"] == "3 credits ($0.03)"
    assert "bfl wait" not in stderr and "Traceback" not in stderr
    assert fake.submits == 1


def test_a_second_signal_stops_at_once_and_bfl_wait_fetches_the_image_later(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    fake.generation_time = 3600.0
    out = tmp_path / "out"
    process = generate_process(fake, out, "--name", "fox")  # the default grace: 30 s
    wait_for(lambda: fake.submits == 1, process)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    said = read_until(process, "is paid; waiting up to 30 s")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
    assert time.monotonic() - started < 10  # neither the grace nor the client's close waited
    assert process.returncode == 130, said + stderr
    assert "Traceback" not in stderr and KEY not in said + stderr
    assert "client.wait(" not in said + stderr  # the library's hint for Python is left out
    command = re.search(r"^  (bfl wait .*)$", stderr, flags=re.M)
    assert command, stderr
    argv = shlex.split(command[1])  # to be pasted into a shell as it is
    assert argv[2:] == [argv[2], "-o", str(out), "--name", "fox", "--base-url", fake.base_url]
    task = Task.model_validate_json(argv[2])
    assert task.id in fake.tasks and task.cost == 3.0
    assert not list(out.iterdir())
    fake.finish_now()
    result = bfl(*argv[1:], "--api-key", KEY)
    assert result.exit_code == 0, result.output
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert fields["path"] == str(out / "fox.jpg") and is_image(out / "fox.jpg")
    assert fields["task"] == task.id
    assert fields["seed"] == str(fake.tasks[task.id].seed)
    assert fields["cost"] == "3 credits ($0.03)"
    assert fake.submits == 1


def test_a_signal_before_any_task_is_paid_stops_at_once(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(limits={"standard": 0})  # every submit is refused (429): none is paid
    out = tmp_path / "out"
    process = generate_process(fake, out)
    wait_for(lambda: fake.rate_limited >= 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "stopped: no task was created, nothing was paid" in stderr
    assert "Traceback" not in stderr and "bfl wait" not in stderr
    assert fake.submits == 0 and not list(out.iterdir())


def test_a_third_signal_abandons_a_submit_bfl_holds_and_says_it_may_be_paid(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(slow_seconds=3600.0)
    fake.generation_time = 3600.0
    fake.fail_next("submit", "slow")  # BFL makes (and bills) the task, and never answers
    out = tmp_path / "out"
    process = generate_process(fake, out)
    wait_for(lambda: fake.submits == 1, process)
    said = ""
    for says in ("waiting for its answer", "press Ctrl-C again to abandon it"):
        process.send_signal(signal.SIGINT)  # each one heard before the next: none merge
        said += read_until(process, says)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)  # not the 60 s read timeout
    assert process.returncode == 130, said + stderr
    assert "may have created (and charged for) its task" in stderr
    assert "Check your dashboard" in stderr and "bfl wait '" not in stderr
    assert "nothing was paid" not in said + stderr and "Traceback" not in stderr
    assert KEY not in said + stderr
    assert stdout == "" and not list(out.iterdir())
    assert fake.submits == 1


@pytest.mark.parametrize("answered", [False, True], ids=["no-answer", "answered-paid"])
def test_a_third_signal_leaves_only_while_no_task_is_known(answered: bool) -> None:
    # Once the submit's answer gave a task, its `bfl wait` line must be printed: never left.
    said: list[str] = []
    left: list[str] = []
    limiter = SimpleNamespace(in_use=lambda pool: 1)  # the submit's slot, then its task's
    task = Task(id="t1", polling_url="https://api.eu2.bfl.ai/v1/get_result?id=t1", model="m")

    async def signals() -> None:
        one = OneTask(grace=30.0, say=said.append, leave=lambda: left.append("left"))
        one.client = cast(AsyncBFL, SimpleNamespace(limiter=limiter))
        one.scope = anyio.CancelScope()
        one.heard()
        one.heard()
        if answered:
            one.accepted(task)
        one.heard()
        assert one.scope.cancel_called

    anyio.run(signals)
    assert "waiting for its answer" in said[0] and "abandon it" in said[1]
    assert len(said) == 2 and left == ([] if answered else ["left"])


@pytest.mark.parametrize(
    ("handle", "says"),
    [
        ("not json", "Invalid JSON"),
        ("", "Invalid JSON"),
        ("[]", "Input should be an object"),
        ('{"id": "x"}', "polling_url: Field required; model: Field required"),
        ('{"id": 7, "polling_url": "https://api.bfl.ai/x", "model": "flux-2-pro"}', "id: "),
        ('{"id": "x", "polling_url": "/v1/get_result", "model": "flux-2-pro"}', "http(s) URL"),
    ],
)
def test_wait_with_a_malformed_handle_is_an_input_error(handle: str, says: str) -> None:
    result = bfl("wait", handle, "--api-key", KEY, "--base-url", "http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: HANDLE is not a task handle") and says in result.stderr
    assert KEY not in result.output


@pytest.mark.parametrize("name", ["../fox", "fox\tdawn", "图" * 100], ids=["path", "tab", "long"])
def test_wait_refuses_a_name_no_file_could_have_before_waiting(name: str) -> None:
    # The library's own check, in bytes: 100 CJK characters are 300, past what a file takes.
    handle = '{"id": "x", "polling_url": "https://api.eu2.bfl.ai/v1/get_result?id=x", '
    handle += '"model": "flux-2-pro"}'
    result = bfl(
        "wait", handle, "--name", name, "--api-key", KEY, "--base-url", "http://127.0.0.1:9"
    )
    assert result.exit_code == 2, result.output
    assert "is not a plain file name" in result.stderr


def submitted(fake: FakeBFL, model: str = "flux-2-pro") -> str:
    """The handle of a task submitted to `fake`, as `bfl generate` prints it."""
    answer = httpx.post(
        f"{fake.base_url}/v1/{model}", json={"prompt": "a fox"}, headers={"x-key": KEY}
    ).json()
    task = Task(
        id=answer["id"],
        polling_url=answer["polling_url"],
        model=model,
        cost=answer["cost"],
        submitted_at=time.time() - 5,  # about when its first poll is due
    )
    return task.model_dump_json()


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("not found", "does not know task"),
        ("moderated", "moderated"),
        ("expired", "expired"),
        ("timeout", "was not finished in time; it keeps running"),
    ],
)
def test_wait_failures_are_one_error_line(
    case: str, says: str, start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake(
        outcome=lambda model, body: "Content Moderated" if case == "moderated" else "Ready",
        result_ttl=-60.0 if case == "expired" else 600.0,  # its URL expired a minute ago
    )
    fake.generation_time = 3600.0 if case == "timeout" else 0.01
    handle = submitted(fake)
    if case == "not found":
        handle = handle.replace(Task.model_validate_json(handle).id, "0" * 36)
    result = bfl(
        "wait", handle, "-o", tmp_path, "--timeout", "0.2" if case == "timeout" else "60",
        "--base-url", fake.base_url, "--api-key", KEY,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: ") and says in lines[0].lower(), lines
    assert ("bfl wait" in result.stderr) == (case == "timeout")  # still running: try again
    assert KEY not in result.output and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_wait_for_a_flux1_task_shows_the_catalog_price(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    handle = submitted(fake, "flux-pro-1.1")
    result = bfl("wait", handle, "-o", tmp_path, "--name", "fox", "--base-url", fake.base_url,
                 "--api-key", KEY)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "cost    4 credits ($0.04)" in result.stdout
    assert is_image(tmp_path / "fox.jpg")
    again = bfl("wait", handle, "-o", tmp_path, "--name", "fox", "--base-url", fake.base_url,
                "--api-key", KEY)  # fmt: skip
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_generate_that_cannot_save_its_paid_image_says_how_to_fetch_it(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = start_fake()
    fake.fail_next("download", "malformed")  # not an image: refused, not retried
    result = bfl("generate", "flux-2-pro", "a fox", "-o", tmp_path, "--base-url",
                 fake.base_url, "--api-key", KEY)  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ")
    command = re.search(r"^  (bfl wait .*)$", result.stderr, flags=re.M)
    assert command, result.stderr
    argv = shlex.split(command[1])
    result = bfl(*argv[1:], "--api-key", KEY)
    assert result.exit_code == 0, result.output
    assert fake.submits == 1
