"""Local validation of submit parameters: every problem reported at once, before sending."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bfl_async._catalog import CATALOG, DimensionRule, MegapixelPrice, ModelSpec, ParamSpec
from bfl_async._errors import ParameterError, Problem, UnknownModelError
from bfl_async._requests import build_job, build_request, request_model

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
PNG_B64 = base64.b64encode(PNG).decode()
FLUX2 = ["flux-2-klein-4b", "flux-2-klein-9b", "flux-2-pro", "flux-2-max", "flux-2-flex"]
FLUX1_PROMPTED = ["flux-kontext-pro", "flux-kontext-max", "flux-pro-1.1", "flux-pro-1.1-ultra"]
EDIT = ["flux-pro-1.0-fill", "flux-pro-1.0-expand"]


def minimal(model: str) -> dict[str, Any]:
    """The smallest valid parameters of each model."""
    return {"image": PNG} if model in EDIT else {"prompt": "a red fox"}


def problems(model: str, params: Mapping[str, Any]) -> dict[str, Problem]:
    """The problems build_request reports, by field (fails the test if none are)."""
    with pytest.raises(ParameterError) as info:
        build_request(model, params)
    assert info.value.model == model
    return {p.field: p for p in info.value.problems}


def only_problem(model: str, params: Mapping[str, Any]) -> Problem:
    with pytest.raises(ParameterError) as info:
        build_request(model, params)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


def test_every_catalog_model_is_covered() -> None:
    assert set(CATALOG) == set(FLUX2 + FLUX1_PROMPTED + EDIT)


@pytest.mark.parametrize("model", sorted(CATALOG))
def test_every_model_builds_a_minimal_body(model: str) -> None:
    spec, body = build_request(model, minimal(model))
    assert spec is CATALOG[model]
    expected = {"image": PNG_B64} if model in EDIT else {"prompt": "a red fox"}
    assert body == expected


def test_full_flux2_flex_body() -> None:
    params = {
        "prompt": "a red fox",
        "input_image": "https://example.com/a.png",
        "input_image_8": PNG,
        "seed": 2**40,
        "width": 2048,
        "height": 2048,
        "safety_tolerance": 5,
        "output_format": "webp",
        "webhook_url": "https://hooks.example.com/bfl",
        "webhook_secret": "s3cret",
        "prompt_upsampling": True,
        "guidance": 3,
        "steps": 50,
    }
    _, body = build_request("flux-2-flex", params)
    assert body == {**params, "input_image_8": PNG_B64, "guidance": 3.0}


def test_full_flux1_bodies() -> None:
    _, ultra = build_request(
        "flux-pro-1.1-ultra",
        {
            "prompt": "x",
            "image_prompt": PNG,
            "image_prompt_strength": 0.5,
            "raw": True,
            "aspect_ratio": "21:9",
            "safety_tolerance": 6,
            "output_format": "png",
        },
    )
    assert ultra["image_prompt"] == PNG_B64
    assert ultra["aspect_ratio"] == "21:9"
    _, expand = build_request(
        "flux-pro-1.0-expand",
        {"image": PNG, "top": 2048, "left": 0, "steps": 15, "guidance": 100},
    )
    assert expand == {"image": PNG_B64, "top": 2048, "left": 0, "steps": 15, "guidance": 100.0}
    _, fill = build_request("flux-pro-1.0-fill", {"image": PNG, "mask": PNG, "prompt": "sky"})
    assert fill == {"image": PNG_B64, "mask": PNG_B64, "prompt": "sky"}
    _, pro = build_request("flux-pro-1.1", {"prompt": "x", "width": 1440, "height": 256})
    assert pro == {"prompt": "x", "width": 1440, "height": 256}


def test_none_values_are_dropped() -> None:
    _, body = build_request("flux-2-pro", {"prompt": "x", "seed": None, "input_image": None})
    assert body == {"prompt": "x"}


def test_body_is_fresh_and_params_untouched() -> None:
    params = {"prompt": "x", "input_image": PNG, "seed": 1}
    _, first = build_request("flux-2-pro", params)
    first["seed"] = 99
    first["extra"] = True
    _, second = build_request("flux-2-pro", params)
    assert second == {"prompt": "x", "input_image": PNG_B64, "seed": 1}
    assert params == {"prompt": "x", "input_image": PNG, "seed": 1}
    assert first is not second


# --- models and parameter names ----------------------------------------------------------


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UnknownModelError) as info:
        build_request("flux-kontext", {"prompt": "x"})
    assert info.value.known == sorted(CATALOG)
    assert info.value.fields == ["model"]
    assert "flux-kontext-pro" in str(info.value)


def test_unknown_parameter_lists_the_models_parameters() -> None:
    problem = only_problem("flux-2-klein-4b", {"prompt": "x", "guidance": 3.5})
    assert problem.field == "guidance"
    assert problem.message == "unknown parameter"
    assert problem.allowed == ", ".join(sorted(CATALOG["flux-2-klein-4b"].all_params()))
    assert "prompt_upsampling" not in (problem.allowed or "")


@pytest.mark.parametrize("model", ["flux-2-pro", "flux-2-max"])
def test_prompt_upsampling_is_refused_by_pro_and_max(model: str) -> None:
    problem = only_problem(model, {"prompt": "x", "prompt_upsampling": True})
    assert problem.field == "prompt_upsampling"
    assert problem.message == "unknown parameter"
    _, body = build_request("flux-2-flex", {"prompt": "x", "prompt_upsampling": True})
    assert body["prompt_upsampling"] is True


def test_input_image_9_on_pro_is_too_many_references() -> None:
    problem = only_problem("flux-2-pro", {"prompt": "x", "input_image_9": PNG})
    assert problem.field == "input_image_9"
    assert problem.message == "flux-2-pro takes at most 8 reference images"
    assert problem.allowed is not None
    assert "input_image_8" in problem.allowed


def test_input_image_5_on_klein_is_too_many_references() -> None:
    params = {"prompt": "x", **{f"input_image_{i}": PNG for i in range(2, 6)}, "input_image": PNG}
    problem = only_problem("flux-2-klein-4b", params)
    assert problem.field == "input_image_5"
    assert problem.message == "flux-2-klein-4b takes at most 4 reference images"
    assert "input_image_4" in (problem.allowed or "")


def test_reference_images_on_a_model_without_them() -> None:
    problem = only_problem("flux-pro-1.1", {"prompt": "x", "input_image": PNG})
    assert problem.field == "input_image"
    assert "takes no reference images" in problem.message
    assert "image_prompt" in (problem.allowed or "")


def test_input_image_1_is_not_a_name() -> None:
    problem = only_problem("flux-2-pro", {"prompt": "x", "input_image_1": PNG})
    assert problem.field == "input_image_1"
    assert "unknown parameter" in problem.message
    assert "input_image, input_image_2" in problem.message


def test_non_string_parameter_name() -> None:
    found = problems("flux-2-pro", {"prompt": "x", 3: "y"})  # type: ignore[dict-item]
    assert found["3"].message == "parameter names must be strings"


@pytest.mark.parametrize("model", sorted(CATALOG))
def test_required_parameter_missing(model: str) -> None:
    required = "image" if model in EDIT else "prompt"
    problem = only_problem(model, {})
    assert problem.field == required
    assert "required" in problem.message


# --- width and height ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"width": 1000}, "width", "1000 is not a multiple of 16"),
        ({"height": 1030}, "height", "1030 is not a multiple of 16"),
        ({"width": 32}, "width", "32 is below the minimum 64"),
        ({"height": 4112}, "height", "4112 is above the maximum 4096"),
    ],
)
def test_flux2_dimensions(params: dict[str, Any], field: str, message: str) -> None:
    problem = only_problem("flux-2-pro", {"prompt": "x", **params})
    assert (problem.field, problem.message) == (field, message)
    assert problem.allowed == "64\u20134096, multiple of 16, width*height <= 4 MP"


def test_flux2_over_four_megapixels() -> None:
    problem = only_problem("flux-2-max", {"prompt": "x", "width": 2048, "height": 2064})
    assert problem.field == "width"
    assert "2048x2064" in problem.message
    assert "4194304" in problem.message
    assert "4 MP" in (problem.allowed or "")


def test_flux2_edges_of_the_pixel_budget() -> None:
    build_request("flux-2-pro", {"prompt": "x", "width": 2048, "height": 2048})
    build_request("flux-2-pro", {"prompt": "x", "width": 4096, "height": 1024})
    build_request("flux-2-pro", {"prompt": "x", "width": 4096})
    build_request("flux-2-pro", {"prompt": "x", "width": 64, "height": 64})
    problem = only_problem("flux-2-pro", {"prompt": "x", "width": 4096, "height": 1040})
    assert problem.field == "width"


def test_flux2_pixel_budget_uses_the_default_of_the_missing_side() -> None:
    spec = ModelSpec(
        name="tiny",
        family="flux2",
        pool="standard",
        max_references=0,
        params={},
        pricing=MegapixelPrice(1, 1),
        dimensions=DimensionRule(min=16, max=4096, multiple=16, max_pixels=2**20),
    )
    model = request_model(spec)
    model.model_validate({"height": 1024})
    with pytest.raises(Exception, match="width defaults to 1024"):
        model.model_validate({"height": 1040})


def test_pixel_budget_reported_with_other_problems() -> None:
    found = problems(
        "flux-2-pro", {"prompt": "x", "width": 4096, "height": 4096, "output_format": "gif"}
    )
    assert set(found) == {"width", "output_format"}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 1024 + 16}, "width"),
        ({"height": 1472}, "height"),
        ({"width": 224}, "width"),
    ],
)
def test_flux_pro_1_1_dimensions(params: dict[str, Any], field: str) -> None:
    problem = only_problem("flux-pro-1.1", {"prompt": "x", **params})
    assert problem.field == field
    assert problem.allowed == "256\u20131440, multiple of 32"


def test_dimensions_on_a_model_without_them() -> None:
    problem = only_problem("flux-kontext-pro", {"prompt": "x", "width": 1024})
    assert (problem.field, problem.message) == ("width", "unknown parameter")


# --- ranges and choices -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "field", "value", "allowed"),
    [
        ("flux-2-pro", "safety_tolerance", 6, "0\u20135"),
        ("flux-2-klein-9b", "safety_tolerance", -1, "0\u20135"),
        ("flux-kontext-max", "safety_tolerance", 7, "0\u20136"),
        ("flux-2-flex", "guidance", 1.4, "1.5\u201310"),
        ("flux-2-flex", "guidance", 10.5, "1.5\u201310"),
        ("flux-2-flex", "steps", 0, "1\u201350"),
        ("flux-2-flex", "steps", 51, "1\u201350"),
        ("flux-pro-1.0-fill", "steps", 14, "15\u201350"),
        ("flux-pro-1.0-fill", "guidance", 100.5, "1.5\u2013100"),
        ("flux-pro-1.0-expand", "top", 2049, "0\u20132048"),
        ("flux-pro-1.0-expand", "right", -1, "0\u20132048"),
        ("flux-pro-1.1-ultra", "image_prompt_strength", 1.01, "0\u20131"),
        ("flux-2-pro", "seed", -1, "an integer >= 0"),
    ],
)
def test_out_of_range(model: str, field: str, value: float, allowed: str) -> None:
    problem = only_problem(model, {**minimal(model), field: value})
    assert problem.field == field
    assert str(value) in problem.message
    assert "minimum" in problem.message or "maximum" in problem.message
    assert problem.allowed == allowed
    assert allowed in str(ParameterError(model, [problem]))


def test_nan_is_refused() -> None:
    problem = only_problem("flux-2-flex", {"prompt": "x", "guidance": float("nan")})
    assert problem.field == "guidance"
    assert "finite" in problem.message


@pytest.mark.parametrize(
    ("model", "value", "allowed"),
    [
        ("flux-2-pro", "gif", "jpeg, png, webp"),
        ("flux-2-pro", "JPEG", "jpeg, png, webp"),
        ("flux-kontext-pro", "jpg", "jpeg, png, webp"),
        ("flux-pro-1.0-fill", 1, "jpeg, png, webp"),
    ],
)
def test_bad_output_format(model: str, value: Any, allowed: str) -> None:
    problem = only_problem(model, {**minimal(model), "output_format": value})
    assert problem.field == "output_format"
    assert problem.message == f"{value!r} is not allowed"
    assert problem.allowed == allowed


@pytest.mark.parametrize("model", sorted(CATALOG))
def test_every_model_takes_webp(model: str) -> None:
    # BFL's OpenAPI schema shares one OutputFormat (jpeg, png, webp) among all models.
    _, body = build_request(model, {**minimal(model), "output_format": "webp"})
    assert body["output_format"] == "webp"


@pytest.mark.parametrize("model", ["flux-kontext-pro", "flux-kontext-max", "flux-pro-1.1-ultra"])
@pytest.mark.parametrize("ratio", ["21:9", "9:21", "1:1", "16:9", "3:4", "7:3"])
def test_aspect_ratio_inside_the_range(model: str, ratio: str) -> None:
    _, body = build_request(model, {"prompt": "x", "aspect_ratio": ratio})
    assert body["aspect_ratio"] == ratio


@pytest.mark.parametrize("ratio", ["22:9", "9:22", "32:9", "1:3"])
def test_aspect_ratio_outside_the_range(ratio: str) -> None:
    problem = only_problem("flux-kontext-pro", {"prompt": "x", "aspect_ratio": ratio})
    assert problem.field == "aspect_ratio"
    assert "outside the allowed range" in problem.message
    assert problem.allowed == "'W:H' from 21:9 to 9:21"


@pytest.mark.parametrize("ratio", ["16x9", "16:9:1", "", "a:b", "0:1", "1:0", "16 : 9", "1.5:1"])
def test_aspect_ratio_malformed(ratio: str) -> None:
    problem = only_problem("flux-pro-1.1-ultra", {"prompt": "x", "aspect_ratio": ratio})
    assert problem.field == "aspect_ratio"
    assert "is not a ratio 'W:H'" in problem.message
    assert "21:9" in (problem.allowed or "")


def test_aspect_ratio_must_be_a_string() -> None:
    problem = only_problem("flux-kontext-pro", {"prompt": "x", "aspect_ratio": 1.5})
    assert problem.field == "aspect_ratio"
    assert problem.message.startswith("expected a string")


# --- strict types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("seed", True), ("width", True), ("safety_tolerance", False), ("steps", True)],
)
def test_bool_for_int_is_refused(field: str, value: bool) -> None:
    problem = only_problem("flux-2-flex", {"prompt": "x", field: value})
    assert problem.field == field
    assert problem.message == f"expected an integer, got bool {value!r}"


@pytest.mark.parametrize(
    ("field", "value", "noun"),
    [
        ("seed", "42", "an integer"),
        ("width", "1024", "an integer"),
        ("width", 1024.0, "an integer"),
        ("guidance", "3.5", "a number"),
        ("guidance", True, "a number"),
        ("prompt_upsampling", "true", "True or False"),
        ("prompt_upsampling", 1, "True or False"),
        ("prompt", 5, "a string"),
        ("webhook_url", b"https://x", "a string"),
    ],
)
def test_no_silent_coercion(field: str, value: Any, noun: str) -> None:
    problem = only_problem("flux-2-flex", {"prompt": "x", field: value})
    assert problem.field == field
    assert problem.message.startswith(f"expected {noun}, got {type(value).__name__}")


# --- prompts and webhook URLs -------------------------------------------------------------


@pytest.mark.parametrize("model", FLUX2 + FLUX1_PROMPTED)
@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_a_blank_prompt_without_an_image_is_refused(model: str, prompt: str) -> None:
    problem = only_problem(model, {"prompt": prompt})
    assert problem.field == "prompt"
    assert problem.message == "is blank, and no image is given to work from"
    assert problem.allowed == "a string"


def test_a_blank_prompt_is_reported_with_other_problems() -> None:
    found = problems("flux-2-pro", {"prompt": " ", "width": 1000, "colour": "red"})
    assert set(found) == {"prompt", "width", "colour"}
    assert "blank" in found["prompt"].message


@pytest.mark.parametrize(
    ("model", "image"),
    [
        ("flux-2-pro", "input_image_3"),
        ("flux-kontext-max", "input_image"),
        ("flux-pro-1.1", "image_prompt"),
        ("flux-pro-1.1-ultra", "image_prompt"),
    ],
)
def test_a_blank_prompt_with_an_image_is_sent(model: str, image: str) -> None:
    _, body = build_request(model, {"prompt": "", image: "https://example.com/a.png"})
    assert body == {"prompt": "", image: "https://example.com/a.png"}


@pytest.mark.parametrize("model", EDIT)
def test_a_blank_optional_prompt_is_sent(model: str) -> None:
    _, body = build_request(model, {"image": PNG, "prompt": ""})
    assert body["prompt"] == ""


@pytest.mark.parametrize(
    "url",
    [
        "",
        "hooks.example.com/bfl",
        "ftp://hooks.example.com/bfl",
        "https://",
        "https:///bfl",
        "http://[::1",
        "https://hooks.example.com/" + "x" * 2058,
    ],
)
def test_a_bad_webhook_url_is_refused_without_showing_it(url: str) -> None:
    problem = only_problem("flux-2-pro", {"prompt": "x", "webhook_url": url})
    assert problem.field == "webhook_url"
    assert problem.allowed == "an http(s) URL of at most 2083 characters"
    if url:
        assert url not in problem.message  # its query may carry a token


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/bfl?token=abc",
        "http://127.0.0.1:8000/hook",
        "HTTPS://Hooks.Example.com/bfl",
        "https://hooks.example.com/" + "x" * 2057,
    ],
)
def test_a_webhook_url_is_sent_as_given(url: str) -> None:
    _, body = build_request("flux-kontext-pro", {"prompt": "x", "webhook_url": url})
    assert body["webhook_url"] == url


def test_large_seeds_are_kept() -> None:
    _, body = build_request("flux-2-pro", {"prompt": "x", "seed": 2**40 + 1})
    assert body["seed"] == 2**40 + 1


# --- several problems ---------------------------------------------------------------------


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ParameterError) as info:
        build_request(
            "flux-2-klein-4b",
            {
                "width": 1000,
                "height": True,
                "output_format": "gif",
                "safety_tolerance": 9,
                "input_image": 42,
                "input_image_5": PNG,
                "colour": "red",
            },
        )
    error = info.value
    assert sorted(error.fields) == sorted(
        [
            "prompt",
            "width",
            "height",
            "output_format",
            "safety_tolerance",
            "input_image",
            "input_image_5",
            "colour",
        ]
    )
    text = str(error)
    assert "nothing was sent" in text
    assert "jpeg, png, webp" in text
    assert "0\u20135" in text
    assert "64\u20134096, multiple of 16" in text
    assert "takes at most 4 reference images" in text


def test_no_pydantic_error_escapes() -> None:
    from pydantic import ValidationError

    with pytest.raises(ParameterError) as info:
        build_request("flux-2-pro", {"prompt": object(), "width": [], "input_image": {}})
    assert not isinstance(info.value, ValidationError)
    assert info.value.__cause__ is None
    assert set(info.value.fields) == {"prompt", "width", "input_image"}


# --- images -------------------------------------------------------------------------------


def test_image_bytes_are_base64_encoded() -> None:
    _, body = build_request("flux-2-pro", {"prompt": "x", "input_image": PNG})
    assert body["input_image"] == PNG_B64
    _, body = build_request("flux-2-pro", {"prompt": "x", "input_image": bytearray(PNG)})
    assert body["input_image"] == PNG_B64


def test_image_path_is_read(tmp_path: Path) -> None:
    path = tmp_path / "fox.png"
    path.write_bytes(PNG)
    _, body = build_request("flux-pro-1.0-fill", {"image": path, "mask": str(path)})
    assert body == {"image": PNG_B64, "mask": PNG_B64}


@pytest.mark.parametrize(
    "url", ["https://example.com/fox.png?sig=a%2Fb", "http://example.com/fox.png"]
)
def test_image_url_is_sent_as_is(url: str) -> None:
    _, body = build_request("flux-kontext-pro", {"prompt": "x", "input_image": url})
    assert body["input_image"] == url


def test_image_base64_is_sent_as_is() -> None:
    _, body = build_request("flux-pro-1.1", {"prompt": "x", "image_prompt": PNG_B64})
    assert body["image_prompt"] == PNG_B64


def test_image_missing_file_names_the_field(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    problem = only_problem("flux-2-pro", {"prompt": "x", "input_image_3": missing})
    assert problem.field == "input_image_3"
    assert "no such file" in problem.message
    assert str(missing) in problem.message
    assert "http(s) URL" in (problem.allowed or "")


def test_image_directory_and_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    found = problems("flux-pro-1.0-fill", {"image": tmp_path, "mask": empty})
    assert "is a directory" in found["image"].message
    assert "empty" in found["mask"].message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64!", "is not an http(s) URL, an existing file or base64 image data"),
        ("fox.png", "is not an http(s) URL, an existing file or base64 image data"),
        ("aGk", "is not an http(s) URL, an existing file or base64 image data"),
        ("ftp://example.com/a.png", "is not an http(s) URL"),
        ("", "is not an http(s) URL"),
        (b"", "empty"),
        (42, "expected an image, got int"),
        (["https://example.com/a.png"], "expected an image, got list"),
    ],
)
def test_bad_image_values(value: Any, message: str) -> None:
    problem = only_problem("flux-pro-1.0-expand", {"image": value})
    assert problem.field == "image"
    assert message in problem.message


@pytest.mark.parametrize("value", ["ref/fox1", "refs/cat", "none", "TODO", "aGVsbG8gd29ybGQ="])
def test_base64_that_is_no_image_is_refused(value: str) -> None:
    base64.b64decode(value, validate=True)  # valid base64: a missing path or a stray word
    problem = only_problem("flux-kontext-pro", {"prompt": "x", "input_image_2": value})
    assert problem.field == "input_image_2"
    assert problem.message.startswith(
        f"{value!r} is not an http(s) URL, an existing file or base64 image data"
    )
    assert problem.allowed == "bytes, a file path, an http(s) URL or base64 image data"


@pytest.mark.parametrize(
    "head",
    [
        PNG,
        b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        b"RIFF\x24\x00\x00\x00WEBPVP8 ",
        b"GIF87a\x01\x00\x01\x00",
        b"GIF89a\x01\x00\x01\x00",
        b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00",
        b"II*\x00\x08\x00\x00\x00",
        b"MM\x00*\x00\x00\x00\x08",
        b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00",
    ],
)
def test_base64_images_are_sent_as_is(head: bytes) -> None:
    for size in (0, 1, 2, 1000):  # short ones, and every padding
        text = base64.b64encode(head + bytes(size)).decode()
        _, body = build_request("flux-2-pro", {"prompt": "x", "input_image": text})
        assert body["input_image"] == text


def test_base64_image_check_decodes_only_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    real = base64.b64decode

    def spy(data: Any, *args: Any, **kwargs: Any) -> bytes:
        decoded.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(base64, "b64decode", spy)
    text = base64.b64encode(PNG + bytes(3_000_000)).decode()
    _, body = build_request("flux-2-pro", {"prompt": "x", "input_image": text})
    assert body["input_image"] == text
    assert decoded and max(decoded) <= 64
    with pytest.raises(ParameterError):  # the rest is still checked: no '!' in base64
        build_request("flux-2-pro", {"prompt": "x", "input_image": text[:-8] + "!AAAAAAA"})


def test_long_bad_image_string_is_shortened_in_the_message() -> None:
    problem = only_problem("flux-2-pro", {"prompt": "x", "input_image": "#" * 100_000})
    assert len(problem.message) < 200


def test_request_model_is_cached_and_pydantic() -> None:
    from pydantic import BaseModel

    spec = CATALOG["flux-2-pro"]
    model = request_model(spec)
    assert issubclass(model, BaseModel)
    assert request_model(spec) is model
    assert model.model_config.get("extra") == "forbid"


def test_a_new_catalog_entry_gets_validation() -> None:
    spec = ModelSpec(
        name="flux-3-test",
        family="flux2",
        pool="standard",
        max_references=1,
        params={
            "prompt": ParamSpec("str", required=True),
            "mode": ParamSpec("choice", choices=("a", "b")),
        },
        pricing=MegapixelPrice(1, 1),
    )
    model = request_model(spec)
    assert model.model_validate({"prompt": "x", "mode": "a", "input_image": PNG}).model_dump(
        exclude_unset=True
    ) == {"prompt": "x", "mode": "a", "input_image": PNG_B64}


def test_public_estimate_cost_validates_like_a_submit() -> None:
    from bfl_async import MODELS, estimate_cost

    assert estimate_cost("flux-2-pro", prompt="x", width=2048, height=1024) == 4.5
    assert estimate_cost("flux-kontext-max", prompt="x") == 8.0
    assert MODELS["flux-kontext-max"].pool == "kontext-max"
    with pytest.raises(ParameterError, match="width"):
        estimate_cost("flux-2-pro", prompt="x", width=1000)


@pytest.mark.parametrize("secret", [b"whsec-TOPSECRET-0123456789", 1234567890123])
def test_a_webhook_secret_of_the_wrong_type_is_named_not_shown(secret: Any) -> None:
    with pytest.raises(ParameterError) as info:
        build_request("flux-2-pro", {"prompt": "x", "webhook_secret": secret})
    message = str(info.value)
    assert "webhook_secret" in message and type(secret).__name__ in message
    assert "TOPSECRET" not in message and "1234567890123" not in message
    assert "TOPSECRET" not in repr(info.value.problems)


# --- batch jobs -----------------------------------------------------------------------------


def test_a_job_without_a_model_says_missing_and_lists_the_models() -> None:
    with pytest.raises(ParameterError) as info:
        build_job(None, None, {"prompt": "x"}, {})
    assert "None" not in str(info.value)
    [problem] = info.value.problems
    assert (problem.field, problem.message) == ("model", "missing")
    assert problem.allowed == ", ".join(sorted(CATALOG))


@pytest.mark.parametrize("model", [["flux-2-pro"], 7, True])
def test_a_job_whose_model_is_no_string_says_so(model: Any) -> None:
    with pytest.raises(ParameterError) as info:
        build_job(model, None, {"prompt": "x"}, {})
    [problem] = info.value.problems
    assert problem.field == "model"
    assert problem.message.startswith(f"must be a string, got {type(model).__name__}")
    assert problem.allowed == ", ".join(sorted(CATALOG))


def test_job_names_that_one_file_system_takes_for_one_file_are_refused() -> None:
    # generate_many and batch alike: "Fox" and "fox" (or "café" composed and decomposed)
    # are one file on Windows and macOS, so both jobs would be paid and one image lost.
    names: dict[str, str] = {}
    for name in ("Fox", "caf\u00e9", "wolf"):
        build_job("flux-2-pro", name, {"prompt": "x"}, names)
    for name, other in (("fox", "Fox"), ("cafe\u0301", "caf\u00e9"), ("WOLF", "wolf")):
        with pytest.raises(ParameterError, match="same file on Windows and macOS") as info:
            build_job("flux-2-pro", name, {"prompt": "x"}, names)
        assert repr(other) in str(info.value)
    with pytest.raises(ParameterError, match="'wolf' is used twice"):
        build_job("flux-2-pro", "wolf", {"prompt": "x"}, names)
