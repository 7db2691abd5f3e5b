"""The model catalog: its entries match the API contract, lookups and cost estimates."""

from __future__ import annotations

import pytest

from bfl_async._catalog import (
    CATALOG,
    AspectRatioRule,
    DimensionRule,
    FlatPrice,
    MegapixelPrice,
    ModelSpec,
    ParamSpec,
    get_model,
    price,
    reference_index,
    reference_name,
)
from bfl_async._errors import ParameterError, UnknownModelError

CONTRACT_MODELS = {
    "flux-2-klein-4b": 4,
    "flux-2-klein-9b": 4,
    "flux-2-pro": 8,
    "flux-2-max": 8,
    "flux-2-flex": 8,
    "flux-kontext-pro": 4,
    "flux-kontext-max": 4,
    "flux-pro-1.1": 0,
    "flux-pro-1.1-ultra": 0,
    "flux-pro-1.0-fill": 0,
    "flux-pro-1.0-expand": 0,
}


def test_catalog_holds_every_model_of_the_contract() -> None:
    assert set(CATALOG) == set(CONTRACT_MODELS)
    for name, spec in CATALOG.items():
        assert spec.name == name
        assert spec.max_references == CONTRACT_MODELS[name]


def test_families_and_pools() -> None:
    assert {n for n, s in CATALOG.items() if s.family == "flux2"} == {
        "flux-2-klein-4b",
        "flux-2-klein-9b",
        "flux-2-pro",
        "flux-2-max",
        "flux-2-flex",
    }
    assert [n for n, s in CATALOG.items() if s.pool == "kontext-max"] == ["flux-kontext-max"]
    for spec in CATALOG.values():
        expected = MegapixelPrice if spec.family == "flux2" else FlatPrice
        assert isinstance(spec.pricing, expected)


def test_catalog_is_read_only() -> None:
    with pytest.raises(TypeError):
        CATALOG["x"] = CATALOG["flux-2-pro"]  # type: ignore[index]
    with pytest.raises(TypeError):
        get_model("flux-2-pro").params["x"] = ParamSpec("str")  # type: ignore[index]


def test_get_model_returns_the_entry() -> None:
    spec = get_model("flux-2-pro")
    assert spec is CATALOG["flux-2-pro"]
    assert spec.family == "flux2"
    assert spec.pool == "standard"


@pytest.mark.parametrize("name", ["flux-kontext", "flux-fill", "FLUX-2-PRO", ""])
def test_get_model_unknown_lists_the_known_names(name: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        get_model(name)
    error = info.value
    assert isinstance(error, ParameterError)
    assert error.known == sorted(CATALOG)
    assert error.fields == ["model"]
    assert "flux-kontext-pro" in str(error)
    assert "flux-pro-1.0-fill" in str(error)


def test_derived_parameters() -> None:
    pro = get_model("flux-2-pro").all_params()
    assert [reference_name(i) in pro for i in range(1, 10)] == [True] * 8 + [False]
    assert {"width", "height"} <= set(pro)
    assert {"guidance", "steps", "prompt_upsampling"} <= set(get_model("flux-2-flex").all_params())
    kontext = get_model("flux-kontext-max").all_params()
    assert "aspect_ratio" in kontext
    assert "width" not in kontext
    assert "input_image_4" in kontext
    assert "input_image_5" not in kontext
    assert "input_image" not in get_model("flux-pro-1.1").all_params()
    assert get_model("flux-pro-1.0-fill").all_params()["image"].required
    assert not get_model("flux-pro-1.0-fill").all_params()["prompt"].required


@pytest.mark.parametrize(
    "model", ["flux-2-klein-4b", "flux-2-klein-9b", "flux-2-pro", "flux-2-max"]
)
def test_prompt_upsampling_is_flex_alone_among_flux2(model: str) -> None:
    assert "prompt_upsampling" not in get_model(model).all_params()


def test_reference_names_round_trip() -> None:
    assert reference_name(1) == "input_image"
    assert reference_name(2) == "input_image_2"
    for index in range(1, 12):
        assert reference_index(reference_name(index)) == index
    for name in ["input_image_1", "input_image_0", "input_image_02", "input_images", "image"]:
        assert reference_index(name) is None


def test_descriptions() -> None:
    assert (
        get_model("flux-2-pro").describe("width")
        == "64\u20134096, multiple of 16, width*height <= 4 MP"
    )
    assert get_model("flux-pro-1.1").describe("height") == "256\u20131440, multiple of 32"
    assert get_model("flux-2-pro").describe("output_format") == "jpeg, png, webp"
    assert get_model("flux-kontext-pro").describe("output_format") == "jpeg, png, webp"
    url = "an http(s) URL of at most 2083 characters"
    assert get_model("flux-pro-1.0-fill").describe("webhook_url") == url
    assert get_model("flux-2-pro").describe("safety_tolerance") == "0\u20135"
    assert get_model("flux-kontext-pro").describe("safety_tolerance") == "0\u20136"
    assert get_model("flux-2-flex").describe("guidance") == "1.5\u201310"
    assert get_model("flux-2-pro").describe("seed") == "an integer >= 0"
    assert get_model("flux-kontext-pro").describe("aspect_ratio") == "'W:H' from 21:9 to 9:21"


@pytest.mark.parametrize(
    ("width", "height", "allowed"),
    [(21, 9, True), (9, 21, True), (1, 1, True), (22, 9, False), (9, 22, False), (7, 3, True)],
)
def test_aspect_ratio_rule(width: int, height: int, allowed: bool) -> None:
    assert AspectRatioRule().allows(width, height) is allowed


# --- price ------------------------------------------------------------------------


def test_flux2_pro_cost_at_one_megapixel() -> None:
    spec = get_model("flux-2-pro")
    assert price(spec, {"width": 1024, "height": 1024}) == 3.0
    assert price(spec, {"prompt": "a cat"}) == 3.0


def test_flux2_pro_cost_at_four_megapixels() -> None:
    cost = price(get_model("flux-2-pro"), {"width": 2048, "height": 2048})
    assert cost == 3 + (4 - 1) * 1.5 == 7.5


def test_flux2_pro_cost_with_two_references() -> None:
    body = {"prompt": "x", "input_image": "aGk=", "input_image_2": "https://e.com/a.png"}
    cost = price(get_model("flux-2-pro"), body)
    assert cost == 3.0 + 2 * 1.5 == 6.0


def test_flux2_cost_never_below_the_first_megapixel() -> None:
    assert price(get_model("flux-2-pro"), {"width": 512, "height": 512}) == 3.0
    assert price(get_model("flux-2-klein-4b"), {"width": 64, "height": 64}) == 1.4


def test_flux2_cost_ignores_none_references_and_other_keys() -> None:
    body = {"input_image": None, "input_image_9x": "a", "image_prompt": "a"}
    assert price(get_model("flux-2-max"), body) == 7.0


@pytest.mark.parametrize(
    ("name", "cents"),
    [
        ("flux-kontext-pro", 4),
        ("flux-kontext-max", 8),
        ("flux-pro-1.1", 4),
        ("flux-pro-1.1-ultra", 6),
        ("flux-pro-1.0-fill", 5),
        ("flux-pro-1.0-expand", 5),
    ],
)
def test_flux1_prices_are_flat(name: str, cents: float) -> None:
    spec = get_model(name)
    cost = price(spec, {"prompt": "x", "width": 1440, "input_image": "aGk="})
    assert cost == cents
    assert isinstance(cost, float)


def test_a_new_model_is_one_entry() -> None:
    spec = ModelSpec(
        name="flux-3-test",
        family="flux2",
        pool="standard",
        max_references=2,
        params={"prompt": ParamSpec("str", required=True)},
        pricing=MegapixelPrice(first_mp_cents=2, mp_cents=1),
        dimensions=DimensionRule(min=64, max=2048, multiple=16, max_pixels=2**21),
    )
    assert sorted(spec.all_params()) == [
        "height",
        "input_image",
        "input_image_2",
        "prompt",
        "width",
    ]
    assert price(spec, {"width": 2048, "height": 1024, "input_image": "a"}) == 4.0
    assert hash(spec) == hash(spec)
