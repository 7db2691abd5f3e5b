"""Reading job files (JSONL) and `-p key=value` parameters, checked before anything is sent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bfl_async import MODELS, ParameterError, UnknownModelError, estimate_cost
from bfl_async._download import check_file_name

__all__ = [
    "Job",
    "JobFileError",
    "describe_parameter_error",
    "existing_image",
    "load_jobs",
    "parse_param",
]

# The suffixes the library gives downloaded images; a named job must not find one taken.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class Job:
    """One valid line of a job file: a model, its parameters and an optional output name."""

    line: int
    model: str
    params: dict[str, Any]
    name: str | None
    estimate: float
    """The expected price in credits, from `estimate_cost`."""

    @property
    def label(self) -> str:
        """How messages name the job: its `name`, else its line number."""
        return self.name if self.name is not None else f"line {self.line}"

    def request(self) -> dict[str, Any]:
        """The request `AsyncBFL.generate_many` takes for this job."""
        request: dict[str, Any] = {"model": self.model, **self.params}
        if self.name is not None:
            request["name"] = self.name
        return request


class JobFileError(Exception):
    """A job file has invalid lines; `problems` holds (line number, message) pairs."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """One message per problem, each naming the file and the line."""
        return [
            f"{self.path}, line {line}: {message}" if line else f"{self.path}: {message}"
            for line, message in self.problems
        ]


def describe_parameter_error(exc: ParameterError) -> str:
    """A ParameterError as one line, with advice that fits a command line."""
    if isinstance(exc, UnknownModelError):
        return f"unknown model {exc.model!r} (`bfl models` lists the {len(exc.known)} known models)"
    problems = "; ".join(str(problem) for problem in exc.problems)
    return f"invalid parameters for {exc.model!r}: {problems}"


def parse_param(text: str) -> tuple[str, Any]:
    """Parse `key=value`, reading the value as the catalog's kind of parameter `key`.

    Text parameters (prompt, webhook_secret, output_format, image paths…) are the text
    exactly as typed, quotes included; booleans are true or false in any case; numbers are
    JSON numbers. A value that does not fit its kind, and any value of a parameter the
    catalog does not know, is JSON when it parses as JSON ("123" is text), else text.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected key=value, got {text!r}")
    kind = _kind(key)
    if kind in _TEXT_KINDS:
        return key, raw
    if kind == "bool" and raw.strip().lower() in ("true", "false"):
        return key, raw.strip().lower() == "true"
    return key, _json_or_text(raw)


_TEXT_KINDS = frozenset({"str", "choice", "image", "aspect_ratio", "url"})


def _kind(name: str) -> str | None:
    """The kind of parameter `name` in the catalog; None if unknown or not alike in all models."""
    kinds = {p.kind for spec in MODELS.values() if (p := spec.all_params().get(name)) is not None}
    return kinds.pop() if len(kinds) == 1 else None


def _json_or_text(raw: str) -> Any:
    def reject(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return json.loads(raw, parse_constant=reject)  # NaN and Infinity stay text
    except ValueError:
        return raw


def load_jobs(path: Path, output_dir: Path | None = None, *, overwrite: bool = False) -> list[Job]:
    """Read and check every job of a JSONL file; raise JobFileError listing each bad line.

    Blank lines and lines starting with `#` are skipped. With `output_dir`, a named job
    whose image already exists there is an error too, unless `overwrite`.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # skips the BOM Notepad writes
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(path, [(0, f"cannot read the file: {exc}")]) from None
    jobs: list[Job] = []
    problems: list[tuple[int, str]] = []
    names: dict[str, int] = {}
    # Lines end at \n alone: JSON strings may hold U+2028, U+0085… that splitlines() breaks at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            job = parse_job(number, line)
            _check_name(job, names, output_dir, overwrite)
        except ValueError as exc:
            problems.append((number, str(exc)))
            continue
        jobs.append(job)
    if problems:
        raise JobFileError(path, problems)
    if not jobs:
        raise JobFileError(path, [(0, "no jobs: every line is blank or a # comment")])
    return jobs


def parse_job(line: int, text: str) -> Job:
    """One line of a job file as a Job; raises ValueError saying what is wrong with it."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    params = dict(data)
    model = params.pop("model", None)
    name = params.pop("name", None)
    if model is not None and not isinstance(model, str):
        raise ValueError('"model" must be a string')
    if not model:
        raise ValueError(f'missing "model" (one of: {", ".join(MODELS)})')
    if name is not None and not isinstance(name, str):
        raise ValueError('"name" must be a string')
    try:
        estimate = estimate_cost(model, **params)
    except ParameterError as exc:
        raise ValueError(describe_parameter_error(exc)) from None
    return Job(line=line, model=model, params=params, name=name, estimate=estimate)


def _check_name(job: Job, seen: dict[str, int], output_dir: Path | None, overwrite: bool) -> None:
    name = job.name
    if name is None:
        return
    try:
        check_file_name(job.model, name)  # the library's own check, before anything is sent
    except ParameterError:
        raise ValueError(
            f'"name" {name!r} must be a plain file name: no / or \\, no control '
            "characters, at most 200 bytes (UTF-8)"
        ) from None
    if name in seen:
        raise ValueError(f'"name" {name!r} is already used on line {seen[name]}')
    seen[name] = job.line
    if output_dir is not None and not overwrite:
        existing = existing_image(output_dir, name)
        if existing is not None:
            raise ValueError(f"{existing} already exists (pass --overwrite to replace it)")


def existing_image(output_dir: Path, name: str) -> Path | None:
    """The image already saved as `name` in `output_dir`, whatever its suffix, if any."""
    for suffix in _IMAGE_SUFFIXES:
        path = output_dir / f"{name}{suffix}"
        if path.exists():
            return path
    return None
