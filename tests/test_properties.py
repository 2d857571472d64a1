"""Property-based tests of config and ratios parsing: valid input round-trips, anything else is a
ConfigError (never another exception). Deterministic: every test draws the same examples each run."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from acdc_prune.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    save_config,
    validate_ratios,
)
from acdc_prune.experiments.prune import read_ratios
from acdc_prune.models import build_model
from acdc_prune.pruning import PruningError, plan_pruning

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None)

# Printable BMP text: JSON escapes it into YAML double-quoted strings that read back unchanged.
TEXT = st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs", "Cc")), max_size=12)
NUMBER_BOUND = 1e6
# logging.experiment names a folder under runs_dir: plain names only.
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,11}", fullmatch=True).filter(lambda n: ".." not in n)
ESCAPING_NAMES = st.sampled_from(["../x", "/abs", "a/b", "..", "", ".hidden", "x/../y"])


def _fields(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    """``(dotted key, type, limits)`` of every leaf field of the config."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            rows.extend(_fields(hints[f.name], f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", hints[f.name], dict(f.metadata)))
    return rows


FIELDS = _fields()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    if _is_union(tp) and type(None) in typing.get_args(tp):
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return inner[0], True
    return tp, False


def _numbers(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy:
    """Numbers of type ``tp`` (int or float) within the field's bounds."""
    low = meta.get("ge", meta.get("gt", -NUMBER_BOUND))
    high = meta.get("le", meta.get("lt", NUMBER_BOUND))
    if tp is int:
        return st.integers(int(low) + ("gt" in meta), int(high) - ("lt" in meta))
    return st.floats(low, high, exclude_min="gt" in meta, exclude_max="lt" in meta, allow_nan=False)


def valid_values(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy:
    """Values that the config accepts for a field of type ``tp`` with limits ``meta``."""
    inner, optional = _optional_inner(tp)
    if optional:
        return st.none() | valid_values(inner, meta)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        size = meta.get("length")
        return st.lists(valid_values(item, meta), min_size=size or 0, max_size=size or 4)
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        values = TEXT if value_tp is Any else valid_values(value_tp, meta)
        return st.dictionaries(TEXT, values, max_size=3)
    if "choices" in meta:
        return st.sampled_from(meta["choices"])
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return _numbers(tp, meta)
    return TEXT | st.sampled_from(["1e4", "-2.5E+3", ".5e-3", "true", "null", "0x10"])  # numbers to YAML


def invalid_values(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy:
    """Values that the config must refuse for a field of type ``tp`` with limits ``meta``."""
    if _is_union(tp) and type(None) not in typing.get_args(tp):  # bool | str with choices (auto, true, false)
        return st.none() | st.integers() | st.floats() | TEXT.filter(lambda v: v not in meta["choices"])
    inner, optional = _optional_inner(tp)
    origin = typing.get_origin(inner)
    scalars = st.booleans() | st.integers() | st.floats() | TEXT
    if origin is list:
        (item,) = typing.get_args(inner)
        wrong = [scalars | st.dictionaries(TEXT, st.integers(), min_size=1)]
        wrong.append(st.lists(invalid_values(item, meta), min_size=1, max_size=3))
        if "length" in meta:
            wrong.append(st.lists(valid_values(item, meta)).filter(lambda v: len(v) != meta["length"]))
        return st.one_of(wrong)
    if origin is dict:
        _, value_tp = typing.get_args(inner)
        wrong = [scalars | st.lists(st.integers(), min_size=1)]
        if value_tp is not Any:
            wrong.append(st.dictionaries(TEXT, invalid_values(value_tp, meta), min_size=1, max_size=2))
        return st.one_of(wrong)
    wrong = [] if optional else [st.none()]
    if inner is bool:
        wrong.append(st.integers() | st.floats() | TEXT)
    elif inner is int:
        wrong.append(st.booleans() | st.floats() | TEXT | st.lists(st.integers(), min_size=1))
    elif inner is float:
        wrong.append(st.booleans() | TEXT | st.just(math.nan) | st.lists(st.floats(), min_size=1))
    else:
        wrong.append(st.booleans() | st.integers() | st.floats() | st.lists(TEXT, min_size=1))
    if "choices" in meta:
        wrong.append(TEXT.filter(lambda v: v not in meta["choices"]))
    for bound, outside in (("ge", "lt"), ("gt", "le"), ("le", "gt"), ("lt", "ge")):
        if bound in meta and inner in (int, float):
            limit = meta[bound]
            below = outside in ("lt", "le")
            edge = {"exclude_max" if below else "exclude_min": outside in ("lt", "gt")}
            if inner is int:
                wrong.append(st.integers(max_value=limit - 1) if below else st.integers(min_value=limit + 1))
            else:
                range_ = {"max_value": limit} if below else {"min_value": limit}
                wrong.append(st.floats(**range_, **edge, allow_nan=False))
    return st.one_of(wrong)


def _nested(assignments: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for key, value in assignments.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    return raw


@st.composite
def valid_assignments(draw) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(FIELDS), unique_by=lambda f: f[0], max_size=8))
    return {
        key: draw(NAMES if key == "logging.experiment" else valid_values(tp, meta))
        for key, tp, meta in chosen
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


@SETTINGS
@given(valid_assignments())
def test_valid_configs_round_trip_through_files_and_overrides(folder, assignments):
    config = config_from_dict(_nested(assignments))
    path = folder / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    overrides = [f"{key}={json.dumps(value)}" for key, value in assignments.items()]
    assert load_config(overrides=overrides) == config


@st.composite
def one_invalid_assignment(draw) -> tuple[str, Any]:
    key, tp, meta = draw(st.sampled_from(FIELDS))
    invalid = invalid_values(tp, meta)
    return key, draw(invalid | ESCAPING_NAMES if key == "logging.experiment" else invalid)


@SETTINGS
@given(valid_assignments(), one_invalid_assignment())
def test_one_invalid_value_is_a_config_error_naming_its_key(assignments, invalid):
    key, value = invalid
    with pytest.raises(ConfigError) as info:
        config_from_dict(_nested({**assignments, key: value}))
    assert key in str(info.value) and "\n" not in str(info.value)


YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=8,
)


SECTIONS = st.sampled_from([f.name for f in fields(Config)]) | TEXT | st.integers()
KEYS = st.sampled_from([key.split(".")[1] for key, _, _ in FIELDS]) | TEXT


@SETTINGS
@given(st.dictionaries(SECTIONS, YAML_VALUES | st.dictionaries(KEYS, YAML_VALUES), max_size=4))
def test_any_mapping_gives_a_config_or_a_config_error(raw):
    try:
        assert isinstance(config_from_dict(raw), Config)
    except ConfigError as err:
        assert "\n" not in str(err)


OVERRIDES = st.text(max_size=30) | st.builds(
    "{}={}".format, st.sampled_from([key for key, _, _ in FIELDS]), st.text(max_size=20)
)


@SETTINGS
@given(st.lists(OVERRIDES, max_size=3))
def test_any_override_text_gives_a_config_or_a_config_error(overrides):
    try:
        assert isinstance(load_config(overrides=overrides), Config)
    except ConfigError as err:
        assert "\n" not in str(err)


@SETTINGS
@given(st.floats(min_value=1e-12, max_value=1e3), st.sampled_from(["{!r}", "{:e}", "{:g}", "{:.3E}"]))
def test_learning_rates_parse_however_they_are_written(lr, style):
    text = style.format(lr)
    assert load_config(overrides=[f"training.lr={text}"]).training.lr == float(text)


RATIO_KEYS = TEXT.filter(bool)
RATIOS = st.floats(0.0, 1.0, exclude_max=True)


@SETTINGS
@given(st.dictionaries(RATIO_KEYS, RATIOS, min_size=1, max_size=5))
def test_ratios_in_the_unit_interval_are_accepted_from_python_and_files(folder, ratios):
    expected = {"default": 0.0, **ratios}
    assert validate_ratios(ratios) == expected
    path = folder / "ratios.yaml"
    path.write_text(yaml.safe_dump(ratios))
    assert read_ratios(path) == expected


BAD_RATIOS = (
    st.floats(allow_nan=True).filter(lambda v: not 0.0 <= v < 1.0)
    | st.sampled_from([math.inf, -math.inf, math.nan])
    | st.booleans()
    | st.none()
    | TEXT
    | st.lists(RATIOS, min_size=1, max_size=2)
)


@SETTINGS
@given(st.dictionaries(RATIO_KEYS, RATIOS, max_size=3), RATIO_KEYS, BAD_RATIOS)
def test_ratios_outside_the_unit_interval_or_not_numbers_are_config_errors(folder, ratios, key, bad):
    ratios = {**ratios, key: bad}
    with pytest.raises(ConfigError, match="pruning.ratios"):
        validate_ratios(ratios)
    path = folder / "bad-ratios.yaml"
    path.write_text(yaml.safe_dump(ratios))
    with pytest.raises(ConfigError, match="bad-ratios.yaml"):
        read_ratios(path)


@pytest.fixture(scope="module")
def tiny_unet() -> torch.nn.Module:
    return build_model(load_config(overrides=["model.features=[4, 8]"]).model).eval()


@settings(max_examples=8, derandomize=True, deadline=None, database=None)
@given(st.text("abcdefghijklmnopqrstuvwxyz.0123456789", min_size=1, max_size=12), RATIOS)
def test_ratio_keys_that_match_no_layer_are_refused(tiny_unet, key, ratio):
    names = [name for name, _ in tiny_unet.named_modules() if name]
    assume(key != "default" and not any(name == key or name.startswith(key + ".") for name in names))
    with pytest.raises(PruningError, match=f"ratio key '{key}' matches no prunable layer"):
        plan_pruning(tiny_unet, torch.randn(1, 1, 16, 16), ratios={"default": 0.25, key: ratio})
