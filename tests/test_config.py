"""Config loading, dotted overrides and the errors a user sees for bad keys, types and values."""

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from acdc_prune.config import (
    Config,
    apply_overrides,
    config_from_dict,
    describe_fields,
    load_config,
    parse_override,
    save_config,
)
from acdc_prune.errors import ConfigError


def test_defaults_are_valid_and_round_trip(tmp_path):
    config = load_config()
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert config.pruning.ratios["default"] == 0.5


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"training": {"epochs": 7, "lr": 0.01}, "model": {"features": [8, 16]}}))
    config = load_config(path, ["training.epochs=3", "pruning.ratios={default: 0.25, encoders.1: 0.5}"])
    assert config.training.epochs == 3
    assert config.training.lr == 0.01
    assert config.model.features == [8, 16]
    assert config.pruning.ratios == {"default": 0.25, "encoders.1": 0.5}


def test_int_is_accepted_for_float_and_normalised():
    config = config_from_dict({"training": {"lr": 1}})
    assert isinstance(config.training.lr, float)


def test_ratios_without_default_get_zero_default():
    config = config_from_dict({"pruning": {"ratios": {"encoders.1": 0.3}}})
    assert config.pruning.ratios == {"default": 0.0, "encoders.1": 0.3}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"training": {"epoch": 5}}, "unknown config key 'training.epoch': did you mean 'training.epochs'?"),
        ({"trainig": {}}, "unknown config key 'trainig': did you mean 'training'?"),
        ({"training": {"epochs": "five"}}, "training.epochs: expected an integer, got 'five'"),
        ({"training": {"epochs": 2.5}}, "training.epochs: expected an integer, got 2.5"),
        ({"training": {"epochs": 0}}, "training.epochs: 0 is out of range (must be >= 1)"),
        (
            {"training": {"channels_last": "yes"}},
            "training.channels_last: 'yes' is not one of auto, true, false",
        ),
        (
            {"evaluation": {"precision": "int4"}},
            "evaluation.precision: 'int4' is not one of auto, fp32, bf16, fp16",
        ),
        (
            {"pruning": {"ratios": {"default": 1.5}}},
            "pruning.ratios.default: 1.5 is out of range (must be < 1.0)",
        ),
        (
            {"pruning": {"ratios": {"default": float("nan")}}},
            "pruning.ratios.default: NaN is not a valid value",
        ),
        (
            {"pruning": {"reinit": "rewnd"}},
            "pruning.reinit: 'rewnd' is not one of none, random, rewind, lr_rewind",
        ),
        ({"data": {"target_spacing": [1.0]}}, "data.target_spacing: expected 2 values, got 1"),
        ({"data": {"target_spacing": 1.0}}, "data.target_spacing: expected a list of float, got 1.0"),
        ({"data": {"root": 3}}, "data.root: expected a string, got 3"),
        ({"training": 5}, "training.: expected a mapping of keys, got 5"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value) == message


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("training.epochs")
    with pytest.raises(ConfigError, match="must name a section and a key"):
        parse_override("epochs=5")
    with pytest.raises(ConfigError, match="'epochs' is not a section"):
        apply_overrides({"training": {"epochs": 5}}, ["training.epochs.x=1"])


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "YAML syntax error at line" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(listing)


def test_yaml_is_loaded_safely(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("training: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(hostile)


def test_describe_fields_covers_every_section():
    keys = [row[0] for row in describe_fields()]
    for section in ("data.", "model.", "training.", "pruning.", "evaluation.", "logging."):
        assert any(key.startswith(section) for key in keys)
    assert "training.epochs" in keys


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_ratio_accepted_iff_in_unit_interval(value):
    raw = {"pruning": {"ratios": {"default": value}}}
    if 0.0 <= value < 1.0:
        assert config_from_dict(raw).pruning.ratios["default"] == value
    else:
        with pytest.raises(ConfigError, match="pruning.ratios.default"):
            config_from_dict(raw)


@given(st.integers(min_value=-5, max_value=10_000))
def test_epochs_override_parses_as_int(value):
    overrides = [f"training.epochs={value}"]
    if value >= 1:
        assert load_config(overrides=overrides).training.epochs == value
    else:
        with pytest.raises(ConfigError, match="training.epochs"):
            load_config(overrides=overrides)


def test_config_dataclass_equality_is_structural():
    assert Config() == config_from_dict({})
