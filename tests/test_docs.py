"""The documentation cannot drift silently from the code: every error class has its entry on
the error reference, every public name its place in the API reference, and the links and
commands the README and the docs share still match."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import bfl_async
from bfl_async import _errors

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def error_classes() -> list[str]:
    return [
        name
        for name in _errors.__all__
        if isinstance(getattr(_errors, name), type)
        and issubclass(getattr(_errors, name), BaseException)
    ]


def test_every_error_class_is_exported() -> None:
    assert len(error_classes()) > 20  # the lookup finds them
    assert set(error_classes()) <= set(bfl_async.__all__)


def test_the_error_reference_has_an_entry_for_every_error_class() -> None:
    page = (DOCS / "errors.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^### (\w+)$", page, flags=re.M))
    assert headings == set(error_classes())
    table = set(re.findall(r"^\| `(\w+)`", page, flags=re.M))
    table |= set(re.findall(r"^\| `\w+` / `(\w+)`", page, flags=re.M))
    assert set(error_classes()) - {"BFLError", "TaskError"} <= table
    for name in error_classes():  # each entry says when it happens
        entry = page.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert "**When:**" in entry, name


def test_the_api_reference_covers_the_public_surface() -> None:
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "reference").glob("*.md"))
    documented = set(re.findall(r"^::: bfl_async\.(\w+)$", pages, flags=re.M))
    modules = {"webhooks", "fastapi", "testing"}
    assert modules <= documented  # each submodule's page documents its whole __all__
    for name in bfl_async.__all__:
        if name == "__version__" or name in documented:
            continue
        value = getattr(bfl_async, name)
        via = [
            m
            for m in modules
            if name in importlib.import_module(f"bfl_async.{m}").__all__
            and getattr(importlib.import_module(f"bfl_async.{m}"), name) is value
        ]
        assert via, f"bfl_async.{name} is in no page of docs/reference"


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    in_nav = set(re.findall(r"^\s+- (?:[^:\n]+: )?(\S+\.md)$", config, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == in_nav


def test_readme_links_into_docs_resolve() -> None:
    for source in (ROOT / "README.md", *DOCS.rglob("*.md")):
        text = source.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # an external URL
            assert (source.parent / target).exists(), f"{source.name} links to {target}"


def test_getting_started_runs_the_readme_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    commands = re.findall(r"^(python3 -m venv .+)$", readme, flags=re.M)
    assert len(commands) == 2
    for command in commands:
        assert command in page.splitlines()


def test_the_benchmark_plot_is_the_one_the_benchmark_writes() -> None:
    plot = DOCS / "img" / "polling.png"
    assert plot.resolve() == (ROOT / "benchmarks" / "results" / "polling.png").resolve()
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "](img/polling.png)" in (DOCS / "benchmarks.md").read_text(encoding="utf-8")
