"""`bfl generate -p key=value`: each value is read as the catalog's kind of its parameter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bfl_async.cli import app
from bfl_async.cli._jobs import parse_param


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("webhook_secret=20250101", "20250101"),
        ("webhook_secret=true", "true"),
        ("webhook_secret=null", "null"),
        ('webhook_secret="2025"', '"2025"'),  # exactly as typed: quotes are kept
        ('webhook_secret="s3\\n"', '"s3\\n"'),  # and no JSON escapes are read
        ("webhook_secret= x ", " x "),
        ('input_image="ref.png"', '"ref.png"'),
        ("prompt=42", "42"),
        ("prompt=[1, 2]", "[1, 2]"),
        ("output_format=png", "png"),
        ("input_image=1234", "1234"),
        ("aspect_ratio=16:9", "16:9"),
    ],
)
def test_text_parameters_keep_the_text(text: str, expected: str) -> None:
    assert parse_param(text) == (text.partition("=")[0], expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompt_upsampling=True", True),
        ("prompt_upsampling=FALSE", False),
        ("raw=true", True),
        ("raw= False ", False),
        ("raw=1", 1),  # not a boolean: left for validation to refuse, naming the field
    ],
)
def test_booleans_are_true_or_false_in_any_case(text: str, expected: Any) -> None:
    _, value = parse_param(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed=42", 42),
        ("guidance=2.5", 2.5),
        ("steps=50", 50),
        ("seed=abc", "abc"),  # left for validation to refuse, naming the field
        ("extra=5", 5),  # unknown to the catalog: JSON when it parses
        ("extra=true", True),
        ("extra=NaN", "NaN"),
        ("extra=a b", "a b"),
        ('extra="123"', "123"),  # JSON quotes make an unknown parameter's value text
    ],
)
def test_numbers_and_unknown_parameters_are_json_when_they_parse(text: str, expected: Any) -> None:
    _, value = parse_param(text)
    assert value == expected and type(value) is type(expected)


def test_generate_takes_a_numeric_secret_and_a_capitalised_boolean(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["generate", "flux-2-flex", "a fox", "--fake", "-o", str(tmp_path),
         "-p", "webhook_secret=20250101", "-p", "prompt_upsampling=True"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.iterdir())) == 1


def test_generate_refuses_a_boolean_that_is_not_true_or_false(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "flux-2-flex", "a fox", "--fake", "-o", str(tmp_path),
              "-p", "prompt_upsampling=yes"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "prompt_upsampling: expected True or False, got str 'yes'" in result.output
    assert not list(tmp_path.iterdir())
