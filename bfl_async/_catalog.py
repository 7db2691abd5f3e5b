"""The FLUX models the client knows, kept as data: parameters, size rules, pool and price.

Everything model-specific lives in `CATALOG`, so supporting a new model is one new
`ModelSpec` entry; `_requests` derives its validation from these entries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Literal, TypeGuard

from ._errors import UnknownModelError

__all__ = [
    "CATALOG",
    "AspectRatioRule",
    "DimensionRule",
    "Family",
    "FlatPrice",
    "MegapixelPrice",
    "ModelSpec",
    "ParamKind",
    "ParamSpec",
    "Pool",
    "Pricing",
    "get_model",
    "price",
    "reference_index",
    "reference_name",
]

Pool = Literal["standard", "kontext-max"]
Family = Literal["flux2", "flux1"]
ParamKind = Literal["str", "int", "float", "bool", "choice", "image", "aspect_ratio", "url"]

_REFERENCE = re.compile(r"input_image(?:_([1-9][0-9]*))?")


def reference_name(index: int) -> str:
    """The name of the `index`-th reference image (from 1): input_image, input_image_2, …"""
    return "input_image" if index == 1 else f"input_image_{index}"


def reference_index(name: str) -> int | None:
    """The 1-based position of a reference-image parameter name, or None if it is not one."""
    match = _REFERENCE.fullmatch(name)
    if match is None:
        return None
    index = int(match.group(1) or 1)
    return index if reference_name(index) == name else None


_DASH = "\u2013"
MAX_URL_LENGTH = 2083
"""The longest `webhook_url` BFL takes (its schema's limit)."""


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class ParamSpec:
    """One request parameter: its kind, whether it is required, and its allowed values."""

    kind: ParamKind
    required: bool = False
    ge: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """The allowed values, as error messages show them."""
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "image":
            return "bytes, a file path, an http(s) URL or base64 image data"
        if self.kind == "bool":
            return "True or False"
        if self.kind == "str":
            return "a string"
        if self.kind == "url":
            return f"an http(s) URL of at most {MAX_URL_LENGTH} characters"
        noun = "an integer" if self.kind == "int" else "a number"
        if self.ge is not None and self.le is not None:
            text = f"{_number(self.ge)}{_DASH}{_number(self.le)}"
        elif self.ge is not None:
            text = f"{noun} >= {_number(self.ge)}"
        elif self.le is not None:
            text = f"{noun} <= {_number(self.le)}"
        else:
            text = noun
        if self.multiple_of is not None:
            text += f", multiple of {self.multiple_of}"
        return text


@dataclass(frozen=True)
class DimensionRule:
    """The `width`/`height` grid of a model, and its pixel budget (None: no budget)."""

    min: int
    max: int
    multiple: int
    max_pixels: int | None = None
    default_width: int = 1024
    default_height: int = 1024

    @property
    def param(self) -> ParamSpec:
        """The spec each of `width` and `height` gets on its own."""
        return ParamSpec("int", ge=self.min, le=self.max, multiple_of=self.multiple)

    def describe(self) -> str:
        """The allowed sizes, as error messages show them."""
        text = f"{self.min}{_DASH}{self.max}, multiple of {self.multiple}"
        if self.max_pixels is not None:
            text += f", width*height <= {_number(self.max_pixels / 2**20)} MP"
        return text


@dataclass(frozen=True)
class AspectRatioRule:
    """The `aspect_ratio` parameter ("W:H"): from the widest to the tallest ratio allowed."""

    widest: tuple[int, int] = (21, 9)
    tallest: tuple[int, int] = (9, 21)

    def allows(self, width: int, height: int) -> bool:
        """Whether width:height lies between the tallest and the widest ratio, both included."""
        ratio = Fraction(width, height)
        return Fraction(*self.tallest) <= ratio <= Fraction(*self.widest)

    def describe(self) -> str:
        """The allowed ratios, as error messages show them."""
        wide, tall = (f"{w}:{h}" for w, h in (self.widest, self.tallest))
        return f"'W:H' from {wide} to {tall}"


@dataclass(frozen=True)
class MegapixelPrice:
    """FLUX.2 pricing in credits: the first output megapixel, then each further MP in or out."""

    first_mp_cents: float
    mp_cents: float


@dataclass(frozen=True)
class FlatPrice:
    """A flat price per image in credits (FLUX.1 models)."""

    cents: float


Pricing = MegapixelPrice | FlatPrice


@dataclass(frozen=True)
class ModelSpec:
    """One model (path under /v1/) and the parameters its submit accepts.

    `params` holds the model's own parameters; the reference images (from
    `max_references`), `width`/`height` (from `dimensions`) and `aspect_ratio` are
    derived, and `all_params()` returns the whole set.
    """

    name: str
    family: Family
    pool: Pool
    max_references: int
    params: Mapping[str, ParamSpec] = field(hash=False)
    pricing: Pricing
    dimensions: DimensionRule | None = None
    aspect_ratio: AspectRatioRule | None = None
    typical_seconds: float = 6.0
    """A prior for polling before anything is learned: usual seconds from submit to Ready."""
    _all: Mapping[str, ParamSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = dict(self.params)
        for index in range(1, self.max_references + 1):
            params[reference_name(index)] = ParamSpec("image")
        if self.dimensions is not None:
            params["width"] = params["height"] = self.dimensions.param
        if self.aspect_ratio is not None:
            params["aspect_ratio"] = ParamSpec("aspect_ratio")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "_all", MappingProxyType(params))

    def all_params(self) -> Mapping[str, ParamSpec]:
        """Every parameter the model accepts, derived ones included."""
        return self._all

    def describe(self, name: str) -> str:
        """The allowed values of parameter `name`, as error messages show them."""
        if name in ("width", "height") and self.dimensions is not None:
            return self.dimensions.describe()
        if name == "aspect_ratio" and self.aspect_ratio is not None:
            return self.aspect_ratio.describe()
        return self._all[name].describe()


def get_model(name: str) -> ModelSpec:
    """The catalog entry of `name`; raises UnknownModelError (listing the known names) if none."""
    try:
        return CATALOG[name]
    except (KeyError, TypeError):
        raise UnknownModelError(str(name), sorted(CATALOG)) from None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


MEGAPIXEL = 1024 * 1024
"""Pixels in BFL's megapixel: a 1024x1024 image costs exactly the first-MP price."""


def price(spec: ModelSpec, body: Mapping[str, Any]) -> float:
    """The expected price of one submit in credits (1 credit = 1 US cent), to 4 decimals.

    FLUX.2 counts every reference image as 1 MP of input: only the server knows the real
    size, so treat the result as an estimate. Width/height default to the model's default.
    """
    pricing = spec.pricing
    if isinstance(pricing, FlatPrice):
        return round(float(pricing.cents), 4)
    dims = spec.dimensions or DimensionRule(0, 0, 1)
    given_width, given_height = body.get("width"), body.get("height")
    width: int = given_width if _is_int(given_width) else dims.default_width
    height: int = given_height if _is_int(given_height) else dims.default_height
    output_mp = width * height / MEGAPIXEL
    input_mp = sum(
        1
        for key, value in body.items()
        if value is not None and isinstance(key, str) and reference_index(key) is not None
    )
    cost = (
        pricing.first_mp_cents
        + max(output_mp - 1, 0.0) * pricing.mp_cents
        + input_mp * pricing.mp_cents
    )
    return round(cost, 4)


_STRING = ParamSpec("str")
_SEED = ParamSpec("int", ge=0)
_BOOL = ParamSpec("bool")
_IMAGE = ParamSpec("image")
_WEBHOOK = {"webhook_url": ParamSpec("url"), "webhook_secret": _STRING}
# One OutputFormat in BFL's schema, for FLUX.1 and FLUX.2 models alike.
_OUTPUT_FORMAT = ParamSpec("choice", choices=("jpeg", "png", "webp"))
SECRET_PARAMS = frozenset({"webhook_secret"})
"""Parameters never shown: not in errors, logs, reprs, journals or manifests."""

_FLUX2_PARAMS: Mapping[str, ParamSpec] = {
    "prompt": ParamSpec("str", required=True),
    "seed": _SEED,
    "safety_tolerance": ParamSpec("int", ge=0, le=5),
    "output_format": _OUTPUT_FORMAT,
    **_WEBHOOK,
}
_FLUX2_DIMENSIONS = DimensionRule(min=64, max=4096, multiple=16, max_pixels=4 * 2**20)

_FLUX1_COMMON: Mapping[str, ParamSpec] = {
    "seed": _SEED,
    "safety_tolerance": ParamSpec("int", ge=0, le=6),
    "output_format": _OUTPUT_FORMAT,
    "prompt_upsampling": _BOOL,
    **_WEBHOOK,
}
_FLUX1_PROMPTED = {"prompt": ParamSpec("str", required=True), **_FLUX1_COMMON}
_FLUX1_EDIT = {
    "image": ParamSpec("image", required=True),
    "prompt": _STRING,
    "steps": ParamSpec("int", ge=15, le=50),
    "guidance": ParamSpec("float", ge=1.5, le=100),
    **_FLUX1_COMMON,
}
_SIDE = ParamSpec("int", ge=0, le=2048)

_MODELS = (
    ModelSpec(
        name="flux-2-klein-4b",
        typical_seconds=1.5,
        family="flux2",
        pool="standard",
        max_references=4,
        params=_FLUX2_PARAMS,
        pricing=MegapixelPrice(first_mp_cents=1.4, mp_cents=0.1),
        dimensions=_FLUX2_DIMENSIONS,
    ),
    ModelSpec(
        name="flux-2-klein-9b",
        typical_seconds=2.0,
        family="flux2",
        pool="standard",
        max_references=4,
        params=_FLUX2_PARAMS,
        pricing=MegapixelPrice(first_mp_cents=1.5, mp_cents=0.2),
        dimensions=_FLUX2_DIMENSIONS,
    ),
    ModelSpec(
        name="flux-2-pro",
        typical_seconds=5.0,
        family="flux2",
        pool="standard",
        max_references=8,
        params=_FLUX2_PARAMS,
        pricing=MegapixelPrice(first_mp_cents=3, mp_cents=1.5),
        dimensions=_FLUX2_DIMENSIONS,
    ),
    ModelSpec(
        name="flux-2-max",
        typical_seconds=10.0,
        family="flux2",
        pool="standard",
        max_references=8,
        params=_FLUX2_PARAMS,
        pricing=MegapixelPrice(first_mp_cents=7, mp_cents=3),
        dimensions=_FLUX2_DIMENSIONS,
    ),
    ModelSpec(
        name="flux-2-flex",
        typical_seconds=12.0,
        family="flux2",
        pool="standard",
        max_references=8,
        params={
            **_FLUX2_PARAMS,
            "prompt_upsampling": _BOOL,  # of the FLUX.2 models, flex alone takes it
            "guidance": ParamSpec("float", ge=1.5, le=10),
            "steps": ParamSpec("int", ge=1, le=50),
        },
        pricing=MegapixelPrice(first_mp_cents=5, mp_cents=5),
        dimensions=_FLUX2_DIMENSIONS,
    ),
    ModelSpec(
        name="flux-kontext-pro",
        typical_seconds=6.0,
        family="flux1",
        pool="standard",
        max_references=4,
        params=_FLUX1_PROMPTED,
        pricing=FlatPrice(cents=4),
        aspect_ratio=AspectRatioRule(),
    ),
    ModelSpec(
        name="flux-kontext-max",
        typical_seconds=8.0,
        family="flux1",
        pool="kontext-max",
        max_references=4,
        params=_FLUX1_PROMPTED,
        pricing=FlatPrice(cents=8),
        aspect_ratio=AspectRatioRule(),
    ),
    ModelSpec(
        name="flux-pro-1.1",
        typical_seconds=5.0,
        family="flux1",
        pool="standard",
        max_references=0,
        params={**_FLUX1_PROMPTED, "image_prompt": _IMAGE},
        pricing=FlatPrice(cents=4),
        dimensions=DimensionRule(min=256, max=1440, multiple=32, default_height=768),
    ),
    ModelSpec(
        name="flux-pro-1.1-ultra",
        typical_seconds=10.0,
        family="flux1",
        pool="standard",
        max_references=0,
        params={
            **_FLUX1_PROMPTED,
            "image_prompt": _IMAGE,
            "image_prompt_strength": ParamSpec("float", ge=0, le=1),
            "raw": _BOOL,
        },
        pricing=FlatPrice(cents=6),
        aspect_ratio=AspectRatioRule(),
    ),
    ModelSpec(
        name="flux-pro-1.0-fill",
        typical_seconds=8.0,
        family="flux1",
        pool="standard",
        max_references=0,
        params={**_FLUX1_EDIT, "mask": _IMAGE},
        pricing=FlatPrice(cents=5),
    ),
    ModelSpec(
        name="flux-pro-1.0-expand",
        typical_seconds=8.0,
        family="flux1",
        pool="standard",
        max_references=0,
        params={**_FLUX1_EDIT, "top": _SIDE, "bottom": _SIDE, "left": _SIDE, "right": _SIDE},
        pricing=FlatPrice(cents=5),
    ),
)

CATALOG: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _MODELS})
"""Every model the client validates locally, by path under /v1/.

```python
MODELS["flux-kontext-max"].pool  # "kontext-max"
sorted(MODELS)  # the names `generate` and `submit` accept
```
"""
