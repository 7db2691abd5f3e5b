"""Local validation of submit parameters, so a bad request fails before it is sent (and paid).

Each catalog entry gets a pydantic model (built once, cached) with strict types,
`extra="forbid"` and the catalog's ranges; pydantic's errors are turned into one
`ParameterError` that lists every problem with the values allowed.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidatorFunctionWrapHandler,
    create_model,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from ._catalog import (
    CATALOG,
    MAX_URL_LENGTH,
    SECRET_PARAMS,
    AspectRatioRule,
    DimensionRule,
    ModelSpec,
    ParamSpec,
    get_model,
    price,
    reference_index,
    reference_name,
)
from ._download import check_file_name, image_suffix
from ._errors import ParameterError, Problem
from ._http import is_http_url

__all__ = [
    "build_job",
    "build_request",
    "encode_image",
    "estimate_cost",
    "request_model",
]

_RATIO = re.compile(r"([0-9]{1,5}):([0-9]{1,5})")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_HEAD = 32
"""Base64 characters decoded to read an image's signature: 24 bytes, whole 4-char groups."""
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "True or False",
    "choice": "a string",
    "image": "an image",
    "aspect_ratio": "a string",
    "url": "a string",
}


def build_request(model: str, params: Mapping[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    """Validate `params` for `model` and return its spec and the JSON body to POST.

    None values are dropped and images are encoded. Raises UnknownModelError for a model
    outside the catalog and ParameterError listing every invalid parameter at once.
    The body is a new dict, independent of `params` and of any later call.
    """
    spec = get_model(model)
    problems: list[Problem] = []
    data: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            problems.append(
                Problem(repr(key), "parameter names must be strings", _parameter_list(spec))
            )
        elif value is not None:
            data[key] = value
    try:
        validated = request_model(spec).model_validate(data)
    except ValidationError as exc:
        problems.extend(_to_problem(spec, error) for error in exc.errors(include_url=False))
        raise ParameterError(spec.name, problems) from None
    if problems:
        raise ParameterError(spec.name, problems)
    return spec, validated.model_dump(exclude_unset=True)


def estimate_cost(model: str, /, **params: Any) -> float:
    """The expected price in credits (1 credit = 1 US cent) of `submit(model, **params)`.

    The parameters are validated exactly as a submit would validate them. FLUX.2 prices
    count each reference image as 1 MP of input, so they are estimates; the submit's answer
    (`Task.cost`) is what BFL charged.

    ```python
    estimate_cost("flux-2-pro", prompt="a fox", width=1024, height=1024)  # 3.0
    ```
    """
    spec, body = build_request(model, params)
    return price(spec, body)


@functools.cache
def request_model(spec: ModelSpec) -> type[BaseModel]:
    """The pydantic model that validates a submit body for `spec` (built once per spec)."""
    fields: dict[str, Any] = {
        name: (_annotation(param, spec), ... if param.required else None)
        for name, param in spec.all_params().items()
    }
    dimensions = spec.dimensions

    def check_across(cls: type[BaseModel], data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Check the rules that span fields even when single fields fail, to report all."""
        extra: list[InitErrorDetails] = []
        if isinstance(data, Mapping):
            extra.extend(_blank_errors(spec, data))
            if dimensions is not None:
                extra.extend(_pixel_errors(dimensions, data))
        try:
            result = handler(data)
        except ValidationError as exc:
            if not extra:
                raise
            raise ValidationError.from_exception_data(
                cls.__name__, [*(_reinit(error) for error in exc.errors()), *extra]
            ) from None
        if extra:
            raise ValidationError.from_exception_data(cls.__name__, extra)
        return result

    validators: dict[str, Any] = {"check_across": model_validator(mode="wrap")(check_across)}
    class_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", spec.name))
    return create_model(
        f"{class_name}Request",
        __config__=ConfigDict(extra="forbid", strict=True, frozen=True),
        __validators__=validators,
        **fields,
    )


def _annotation(param: ParamSpec, spec: ModelSpec) -> Any:
    """The pydantic type of one parameter, constraints included."""
    if param.kind == "int":
        return Annotated[int, Field(ge=param.ge, le=param.le, multiple_of=param.multiple_of)]
    if param.kind == "float":
        return Annotated[float, Field(ge=param.ge, le=param.le, allow_inf_nan=False)]
    if param.kind == "bool":
        return bool
    if param.kind == "choice":
        return Literal.__getitem__(param.choices)
    if param.kind == "image":
        return Annotated[str, PlainValidator(encode_image)]
    if param.kind == "aspect_ratio":
        rule = spec.aspect_ratio or AspectRatioRule()
        return Annotated[str, AfterValidator(functools.partial(_check_ratio, rule))]
    if param.kind == "url":
        return Annotated[str, AfterValidator(_check_url)]
    return str


def _custom(kind: str, message: str) -> PydanticCustomError:
    """A pydantic error whose message is taken verbatim (no template expansion)."""
    return PydanticCustomError(kind, "{message}", {"message": message})


def encode_image(value: Any) -> str:
    """An image parameter as the API takes it: an http(s) URL as is, anything else base64.

    Accepts bytes, an os.PathLike or a file path string (the file is read), an http(s)
    URL, or base64 text of an image. Base64 text must start like an image: many mistyped
    paths and stray words ("ref/fox1", "none") are valid base64 of junk bytes.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if not raw:
            raise _custom("image", "the image is empty (0 bytes)")
        return base64.b64encode(raw).decode("ascii")
    if isinstance(value, os.PathLike):
        return _read_image(value)
    if isinstance(value, str):
        if value[:8].lower().startswith(("http://", "https://")):
            return value
        if os.path.isfile(value):
            return _read_image(value)
        if _is_base64(value) and _is_image(base64.b64decode(value[:_HEAD])):
            return value
        raise _custom(
            "image",
            f"{_show(value)} is not an http(s) URL, an existing file or base64 image data "
            "(PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF or HEIF)",
        )
    raise _custom("image", f"expected an image, got {type(value).__name__}")


def _read_image(path: str | os.PathLike[Any]) -> str:
    """The base64 text of the file at `path`; unreadable or empty files are errors."""
    shown = os.fsdecode(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise _custom("image", f"no such file: {shown}") from None
    except IsADirectoryError:
        raise _custom("image", f"{shown} is a directory, not an image file") from None
    except OSError as exc:
        raise _custom("image", f"cannot read {shown}: {exc.strerror or exc}") from None
    if not raw:
        raise _custom("image", f"{shown} is empty (0 bytes)")
    return base64.b64encode(raw).decode("ascii")


def _is_base64(text: str) -> bool:
    """Whether `text` is non-empty, padded, standard-alphabet base64 (checked, not decoded)."""
    return bool(text) and len(text) % 4 == 0 and _BASE64.fullmatch(text) is not None


def _is_image(head: bytes) -> bool:
    """Whether `head` starts like an image file: PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF, HEIF."""
    return (
        image_suffix(head) is not None
        or head.startswith((b"GIF87a", b"GIF89a", b"II*\0", b"MM\0*"))
        or (head[:2] == b"BM" and head[6:10] == bytes(4))
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1"))
    )


def _check_ratio(rule: AspectRatioRule, value: str) -> str:
    """Accept a "W:H" ratio of positive integers within the rule's range."""
    match = _RATIO.fullmatch(value)
    if match is None or 0 in (width := int(match.group(1)), height := int(match.group(2))):
        raise _custom("aspect_ratio", f"{_show(value)} is not a ratio 'W:H' of positive integers")
    if not rule.allows(width, height):
        raise _custom("aspect_ratio", f"{_show(value)} is outside the allowed range")
    return value


def _check_url(value: str) -> str:
    """Accept an absolute http(s) URL BFL can call. Not shown: its query may hold a token."""
    if len(value) > MAX_URL_LENGTH:
        raise _custom("url", f"is {len(value)} characters long")
    if not is_http_url(value):
        raise _custom("url", "is not an absolute http(s) URL")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _blank_errors(spec: ModelSpec, data: Mapping[str, Any]) -> list[InitErrorDetails]:
    """A required text (the prompt) left blank with no image given: BFL would make, and
    bill, an image from nothing."""
    params = spec.all_params()
    if any(data.get(name) is not None for name, param in params.items() if param.kind == "image"):
        return []
    blank = _custom("blank", "is blank, and no image is given to work from")
    return [
        InitErrorDetails(type=blank, loc=(name,), input=value)
        for name, param in params.items()
        if param.kind == "str" and param.required
        if isinstance(value := data.get(name), str) and not value.strip()
    ]


def _pixel_errors(rule: DimensionRule, data: Mapping[str, Any]) -> list[InitErrorDetails]:
    """The pixel-budget error for width*height, judged on the raw values (defaults filled in).

    A side outside its own bounds is reported by its field; the budget is then left out.
    """
    if rule.max_pixels is None:
        return []
    width, height = data.get("width"), data.get("height")
    if width is None and height is None:
        return []
    field = "width" if width is not None else "height"
    notes = []
    if width is None:
        width = rule.default_width
        notes.append(f"width defaults to {width}")
    if height is None:
        height = rule.default_height
        notes.append(f"height defaults to {height}")
    if not (_is_int(width) and _is_int(height)):
        return []
    in_bounds = rule.min <= width <= rule.max and rule.min <= height <= rule.max
    if not in_bounds or width * height <= rule.max_pixels:
        return []
    note = f" ({', '.join(notes)})" if notes else ""
    message = (
        f"{width}x{height}{note} is {width * height} pixels, "
        f"over the limit of {rule.max_pixels} pixels"
    )
    return [
        InitErrorDetails(type=_custom("megapixels", message), loc=(field,), input=data.get(field))
    ]


def _reinit(error: ErrorDetails) -> InitErrorDetails:
    """An error pydantic reported, in the form `ValidationError.from_exception_data` takes."""
    context = {**error.get("ctx", {}), "message": error["msg"]}
    return InitErrorDetails(
        type=PydanticCustomError(error["type"], "{message}", context),
        loc=error["loc"],
        input=error["input"],
    )


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: base64 payloads can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}…{text[-4:]}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _parameter_list(spec: ModelSpec) -> str:
    return ", ".join(sorted(spec.all_params()))


def _references(spec: ModelSpec) -> str:
    names = [reference_name(i) for i in range(1, spec.max_references + 1)]
    return ", ".join(names) if len(names) <= 2 else f"{names[0]}, {names[1]} … {names[-1]}"


def _unknown(spec: ModelSpec, name: str) -> Problem:
    """The problem for a parameter the model does not take; reference images get a count."""
    index = reference_index(name)
    if index is not None and spec.max_references:
        return Problem(
            name,
            f"{spec.name} takes at most {spec.max_references} reference images",
            _references(spec),
        )
    if index is not None or name.startswith("input_image"):
        if not spec.max_references:
            message = f"unknown parameter: {spec.name} takes no reference images"
        else:
            message = "unknown parameter (reference images are input_image, input_image_2, …)"
        return Problem(name, message, _parameter_list(spec))
    return Problem(name, "unknown parameter", _parameter_list(spec))


def _to_problem(spec: ModelSpec, error: ErrorDetails) -> Problem:
    """One pydantic error as a Problem naming the field, what is wrong and what is allowed."""
    loc = error["loc"]
    name = str(loc[0]) if loc else "parameters"
    kind = error["type"]
    value = error["input"]
    # A secret's value is never shown, even when it is of the wrong type.
    shown = "***" if name in SECRET_PARAMS else _show(value)
    ctx = error.get("ctx") or {}
    param = spec.all_params().get(name)
    if kind == "extra_forbidden" or param is None:
        return _unknown(spec, name)
    allowed = spec.describe(name)
    if kind == "missing":
        return Problem(name, "is required but missing", allowed)
    if kind.endswith("_type"):
        got = f"{type(value).__name__} {shown}"
        return Problem(name, f"expected {_NOUNS[param.kind]}, got {got}", allowed)
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        return Problem(name, f"{shown} is below the minimum {_number(bound)}", allowed)
    if kind in ("less_than_equal", "less_than"):
        bound = ctx.get("le", ctx.get("lt"))
        return Problem(name, f"{shown} is above the maximum {_number(bound)}", allowed)
    if kind == "multiple_of":
        step = _number(ctx.get("multiple_of"))
        return Problem(name, f"{shown} is not a multiple of {step}", allowed)
    if kind == "literal_error":
        return Problem(name, f"{shown} is not allowed", allowed)
    if kind == "finite_number":
        return Problem(name, f"{shown} is not a finite number", allowed)
    return Problem(name, error["msg"], allowed)


def build_job(
    model: Any, name: Any, params: dict[str, Any], names: dict[str, str]
) -> tuple[ModelSpec, dict[str, Any]]:
    """`build_request` for one job of a batch, whose optional `name` (its file name) must
    be a plain string that names no other job's file in `names` (by the key `_file_key`
    gives; it is added there)."""
    if not isinstance(model, str):
        known = ", ".join(sorted(CATALOG))
        if model is None:
            raise ParameterError("(no model)", [Problem("model", "missing", known)])
        message = f"must be a string, got {type(model).__name__} {_show(model)}"
        raise ParameterError("(invalid model)", [Problem("model", message, known)])
    spec, body = build_request(model, params)
    if name is not None:
        if not isinstance(name, str):
            raise ParameterError(
                model, [Problem("name", f"{name!r} is not a string", "a file name")]
            )
        check_file_name(model, name)
        key = _file_key(name)
        other = names.get(key)
        if other == name:
            raise ParameterError(
                model, [Problem("name", f"{name!r} is used twice", "unique names")]
            )
        if other is not None:
            raise ParameterError(
                model,
                [
                    Problem(
                        "name",
                        f"{name!r} and {other!r} name the same file on Windows and macOS",
                        "names that differ in more than letter case or accents",
                    )
                ],
            )
        names[key] = name
    return spec, body


def _file_key(name: str) -> str:
    """What a case-insensitive file system (Windows, macOS) or one blind to how accents are
    encoded (macOS) sees of a file name: two jobs with one key would write one file."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())
