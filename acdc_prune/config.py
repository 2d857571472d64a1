"""Typed experiment config: YAML with defaults, dotted overrides, and validation with clear errors.

A config has six sections (``data``, ``model``, ``training``, ``pruning``, ``evaluation``,
``logging``). Every field has a type and, where it matters, a range or a set of choices; an unknown
key is refused with the closest valid key as a hint, so a typo never silently falls back to a default.
The module is a little over 450 lines on purpose: the whole schema, with every default and range,
reads in one place, beside the small validator that enforces it.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from acdc_prune.errors import ConfigError
from acdc_prune.names import NETWORK_NAMES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Values of ``training.precision`` and ``evaluation.precision`` (resolved in ``engine.precision``)."""
AUTO_BOOL = ("auto", True, False)
"""Values of a setting that is on, off, or resolved by the program (``auto``): ``*.channels_last``,
``evaluation.largest_component``."""
REINIT_MODES = ("none", "random", "rewind", "lr_rewind")
"""Weights of a pruned network: kept, re-drawn, rewound to an early checkpoint, or kept with the
learning-rate schedule rewound (Renda et al. 2020)."""
DEFAULT_CACHE = Path("runs") / ".cache"
"""The cache folder of the default config (``logging.runs_dir: runs``, ``data.cache_dir: null``)."""


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-4`` and ``1.5e3`` as numbers, as YAML 1.2 does (YAML 1.1,
    which PyYAML follows, wants ``1.0e-4`` and reads the others as strings)."""


class _YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes the strings :class:`_YamlLoader` would read as numbers."""


for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (plain data only: no tags that build Python objects)."""
    return yaml.load(text, Loader=_YamlLoader)


def spec(default: Any = MISSING, *, factory: Any = MISSING, doc: str = "", **limits: Any) -> Any:
    """A dataclass field carrying its help text and validation limits.

    Args:
        default: default value (immutable types).
        factory: default factory (lists, dicts).
        doc: one-line meaning of the field, shown by ``acdc-prune config show``.
        limits: any of ``choices`` (allowed values), ``ge``/``gt``/``le``/``lt`` (numeric bounds,
            applied to every element of a list or value of a dict), ``length`` (exact list length).
    """
    metadata = {"doc": doc, **limits}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the data is and how it is preprocessed and split."""

    root: str | None = spec(None, doc="data set folder (ACDC or nnU-Net raw layout); null = phantom")
    layout: str = spec("auto", choices=("auto", "acdc", "nnunet"), doc="folder layout")
    split: str = spec(
        "stratified",
        choices=("stratified", "benchmark"),
        doc="patient split: seeded and stratified by group, or ACDC's fixed benchmark split",
    )
    val_fraction: float = spec(0.2, gt=0.0, lt=1.0, doc="share of patients used for validation")
    split_seed: int = spec(0, ge=0, doc="seed of the patient split")
    target_spacing: list[float] = spec(
        factory=lambda: [1.25, 1.25], gt=0.0, length=2, doc="in-plane spacing in mm after resampling"
    )
    patch_size: list[int] = spec(factory=lambda: [224, 224], gt=0, length=2, doc="training crop in pixels")
    intensity_percentiles: list[float] = spec(
        factory=lambda: [0.5, 99.5], ge=0.0, le=100.0, length=2, doc="clip percentiles before z-scoring"
    )
    foreground_prob: float = spec(0.67, ge=0.0, le=1.0, doc="chance a training crop is centred on the heart")
    augment: bool = spec(True, doc="random flips, rotations, scaling, intensity and noise in training")
    cache: str = spec("memory", choices=("memory", "disk", "none"), doc="cache of preprocessed volumes")
    cache_dir: str | None = spec(None, doc="folder for the disk cache; null = <runs_dir>/.cache")
    num_workers: int = spec(0, ge=0, doc="data loader worker processes")
    phantom_patients: int = spec(20, ge=2, doc="patients in the phantom data set used when root is null")
    phantom_seed: int = spec(0, ge=0, doc="seed of the phantom data set")


@dataclass
class ModelConfig:
    """Which network to build and with which widths."""

    name: str = spec(
        "unet",
        choices=NETWORK_NAMES,
        doc="the project's U-Net or a MONAI network from the registry",
    )
    in_channels: int = spec(1, ge=1, doc="input channels (1 for cine MRI)")
    out_channels: int = spec(4, ge=2, doc="classes including background (4 for ACDC)")
    features: list[int] = spec(
        factory=lambda: [32, 64, 128, 256, 320], gt=0, doc="width of each encoder level"
    )
    bottleneck: int | None = spec(None, gt=0, doc="bottleneck width; null = twice the last level")
    norm: str = spec("batch", choices=("batch", "instance", "group"), doc="normalisation layer")
    act: str = spec("relu", choices=("relu", "leakyrelu", "prelu"), doc="activation")
    dropout: float = spec(0.0, ge=0.0, lt=1.0, doc="dropout after each conv block")
    residual: bool = spec(False, doc="residual conv blocks")
    upsample: str = spec("deconv", choices=("deconv", "nontrainable"), doc="decoder up-sampling")
    kwargs: dict[str, Any] = spec(factory=dict, doc="extra constructor arguments of a MONAI network")


@dataclass
class TrainingConfig:
    """Optimisation, schedule, checkpoints and devices."""

    epochs: int = spec(50, ge=1, doc="training epochs")
    batch_size: int = spec(16, ge=1, doc="slices per batch")
    iterations_per_epoch: int | None = spec(None, ge=1, doc="batches per epoch; null = one pass over slices")
    optimizer: str = spec("adamw", choices=("adamw", "sgd"), doc="optimiser")
    lr: float = spec(1e-3, gt=0.0, doc="peak learning rate")
    weight_decay: float = spec(1e-4, ge=0.0, doc="weight decay")
    momentum: float = spec(0.99, ge=0.0, lt=1.0, doc="SGD momentum (Nesterov)")
    scheduler: str = spec("cosine", choices=("cosine", "poly", "none"), doc="learning-rate schedule")
    warmup_epochs: int = spec(1, ge=0, doc="linear warm-up epochs")
    grad_clip: float | None = spec(12.0, gt=0.0, doc="gradient norm clip; null = off")
    dice_weight: float = spec(1.0, ge=0.0, doc="weight of the Dice term of DiceCE")
    ce_weight: float = spec(1.0, ge=0.0, doc="weight of the cross-entropy term of DiceCE")
    precision: str = spec(
        "auto", choices=PRECISIONS, doc="forward precision: auto (bf16 where native), fp32, bf16, fp16 (CUDA)"
    )
    channels_last: bool | str = spec(
        "auto", choices=AUTO_BOOL, doc="channels-last memory format: auto (on with bf16/fp16 or CUDA)"
    )
    device: str = spec("auto", doc="auto, cpu, cuda or cuda:N")
    seed: int = spec(0, ge=0, doc="seed of weights, sampling and augmentation")
    val_every: int = spec(1, ge=1, doc="validate every N epochs")
    checkpoint_epochs: list[int] = spec(factory=lambda: [5], ge=1, doc="epochs kept as rewind points")
    num_threads: int | None = spec(None, ge=1, doc="CPU threads for torch; null = torch's default")
    schedule_offset: int = spec(
        0,
        ge=0,
        doc="epochs of the learning-rate schedule already spent (learning-rate rewinding replays the rest)",
    )


@dataclass
class PruningConfig:
    """Block-wise structured pruning and what happens to the surviving weights."""

    ratios: dict[str, float] = spec(
        factory=lambda: {"default": 0.5}, ge=0.0, lt=1.0, doc="share of filters removed per block prefix"
    )
    importance: str = spec(
        "l1", doc="channel criterion: l1, l2, bn_scale, taylor, redundancy or one registered from Python"
    )
    scope: str = spec(
        "block", choices=("block", "global"), doc="rank channels per coupled group or across all"
    )
    target: float | None = spec(
        None,
        gt=0.0,
        le=1.0,
        doc="keep this fraction of the original target_metric (0.1 = 10x fewer); null = ratios",
    )
    target_metric: str = spec("macs", choices=("macs", "params", "latency"), doc="what target counts")
    max_ratio: float | None = spec(
        None, gt=0.0, lt=1.0, doc="global scope: most of any group removed; null = 0.9"
    )
    min_channels: int = spec(1, ge=1, doc="fewest channels a group keeps")
    steps: int = spec(1, ge=1, doc="reach the target in this many geometric steps, retraining between them")
    data_batches: int = spec(8, ge=1, doc="training batches read by taylor and redundancy")
    similarity: str = spec("pearson", choices=("pearson", "cosine"), doc="redundancy: feature-map similarity")
    redundancy_threshold: float | None = spec(
        None, gt=0.0, le=1.0, doc="redundancy: prune every channel this similar to a kept one (ratio caps it)"
    )
    calibration_batches: int = spec(
        16, ge=0, doc="training batches re-estimating BatchNorm statistics after pruning; 0 = off"
    )
    reinit: str = spec(
        "none", choices=REINIT_MODES, doc="weights of the pruned network: none, random, rewind or lr_rewind"
    )
    rewind_to: str = spec("epoch5", doc="checkpoint of the same run that rewind loads")
    retrain_epochs: int = spec(10, ge=0, doc="epochs of retraining after pruning")
    retrain_lr: float | None = spec(None, gt=0.0, doc="peak retraining learning rate; null = training.lr")
    round_to: int = spec(1, ge=1, doc="round kept widths to a multiple of this")


@dataclass
class EvaluationConfig:
    """How models are scored and timed."""

    hd_percentile: float = spec(95.0, gt=0.0, le=100.0, doc="Hausdorff distance percentile")
    batch_size: int = spec(16, ge=1, doc="slices per inference batch")
    save_predictions: bool = spec(False, doc="write predicted labels as NIfTI in original geometry")
    overlays: int = spec(4, ge=0, doc="overlay PNGs written")
    latency_repeats: int = spec(20, ge=1, doc="timed forward passes (median reported)")
    latency_warmup: int = spec(5, ge=0, doc="untimed forward passes before timing")
    latency_size: list[int] = spec(factory=lambda: [224, 224], gt=0, length=2, doc="slice size for latency")
    precision: str = spec("auto", choices=PRECISIONS, doc="inference precision (see training.precision)")
    channels_last: bool | str = spec("auto", choices=AUTO_BOOL, doc="inference memory format")
    largest_component: bool | str = spec(
        "auto",
        choices=AUTO_BOOL,
        doc="keep only the largest 3D connected component of each structure: true, false, or auto (what "
        "the validation patients chose for the checkpoint during training; off if it holds no choice)",
    )
    tta: bool = spec(False, doc="test-time mirroring: mean softmax over the 4 in-plane flips of each slice")


@dataclass
class LoggingConfig:
    """Where results go and which trackers receive them."""

    runs_dir: str = spec("runs", doc="root of all run folders")
    experiment: str = spec("default", doc="experiment name: runs/<experiment>/<run-id>")
    tensorboard: bool = spec(True, doc="write TensorBoard event files")
    wandb: bool = spec(False, doc="log to Weights & Biases if installed")
    wandb_project: str = spec("acdc-prune", doc="W&B project")
    mlflow: bool = spec(False, doc="log params, per-epoch metrics and artifacts to MLflow if installed")
    mlflow_uri: str | None = spec(
        None, doc="MLflow tracking URI (server, database or folder); null = a local store <runs_dir>/mlruns"
    )
    progress: bool = spec(True, doc="rich progress bars")


@dataclass
class Config:
    """The whole experiment config."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON serialisable)."""
        return asdict(self)

    @property
    def cache_dir(self) -> Path:
        """The one cache folder of this config (phantom data, disk cache of preprocessed volumes):
        ``data.cache_dir``, or ``<logging.runs_dir>/.cache`` when that is null."""
        if self.data.cache_dir:
            return Path(self.data.cache_dir).expanduser()
        return Path(self.logging.runs_dir) / ".cache"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    """A hint for an unknown key: the closest valid key, or the list of valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys: {', '.join(prefix + k for k in valid)}"


def _check_limits(path: str, value: Any, meta: dict[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        words = (str(c).lower() if isinstance(c, bool) else str(c) for c in meta["choices"])
        raise ConfigError(f"{path}: '{value}' is not one of {', '.join(words)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{path}: NaN is not a valid value")
        for op, test, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if op in meta and not test(value, meta[op]):
                raise ConfigError(f"{path}: {value} is out of range (must be {word} {meta[op]})")


def _coerce(path: str, value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against type ``tp`` and the field's limits; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{path}: null is not allowed")
        inner = [t for t in options if t is not type(None)]
        # bool | str (true, false or "auto"): a value of one of the union's own types keeps that type
        own = [t for t in inner if type(value) is t]
        return _coerce(path, value, (own or inner)[0], meta)
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list of {_type_name(item_tp)}, got {value!r}")
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{path}: expected {meta['length']} values, got {len(value)}")
        return [_coerce(f"{path}[{i}]", v, item_tp, meta) for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(f"{path}.{k}", v, value_tp, meta) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    _check_limits(path, value, meta)
    return value


def from_mapping(cls: type, raw: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, validating every key and value.

    Args:
        cls: a dataclass whose fields are declared with :func:`_spec` limits (or nested dataclasses).
        raw: the mapping (``None`` = all defaults).
        prefix: dotted path of ``raw`` for error messages, ending with ``.`` when not empty.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{path}': {_suggest(str(key), sorted(known), prefix)}")
        tp = hints[key]
        if is_dataclass(tp):
            values[key] = from_mapping(tp, value, f"{path}.")
        else:
            values[key] = _coerce(path, value, tp, dict(known[key].metadata))
    return cls(**values)


def config_from_dict(raw: dict[str, Any] | None) -> Config:
    """Validate a nested mapping and return a :class:`Config`; missing keys take their defaults.

    Raises:
        ConfigError: naming the key for unknown keys (with the closest valid key), wrong types,
            out-of-range values, and an experiment name that is not a plain folder name.
    """
    from acdc_prune.io import check_name

    config = from_mapping(Config, _upgrade(raw), "")
    config.pruning.ratios = validate_ratios(config.pruning.ratios)
    check_name(config.logging.experiment, "logging.experiment")  # a folder under runs_dir, never outside
    return config


def _upgrade(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """Read configs saved by acdc-prune 0.1 (inside checkpoints such as the bundle's models).

    0.1's ``training.amp`` (float16 on CUDA only) became ``training.precision``: ``amp: false``
    means fp32; ``amp: true`` is what ``auto`` now does on a GPU, so it is simply dropped.
    """
    training = raw.get("training") if isinstance(raw, dict) else None
    if not isinstance(training, dict) or "amp" not in training:
        return raw
    training = dict(training)
    if training.pop("amp") is False:
        training.setdefault("precision", "fp32")
    return {**raw, "training": training}


def validate_ratios(raw: Any, where: str = "pruning.ratios") -> dict[str, float]:
    """Check a ratios mapping (prefix -> share of filters removed, each in [0, 1)); add ``default: 0``.

    Args:
        raw: mapping read from YAML or given in Python.
        where: the name shown in error messages (a file path or a config key).
    """
    meta = dict(PruningConfig.__dataclass_fields__["ratios"].metadata)
    ratios = _coerce(where, raw, dict[str, float], meta)
    return {"default": 0.0, **ratios}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"training.epochs=5"`` into ``(["training", "epochs"], 5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. training.epochs=5")
    key, _, value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"override {text!r} must name a section and a key, e.g. training.epochs=5")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each dotted ``key=value`` override set (validation comes later)."""
    merged = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return merged


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file safely; a missing file or a syntax error is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{path}: YAML syntax error{where} ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 YAML)") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config: defaults, then the YAML file at ``path`` (optional), then ``overrides``.

    Args:
        path: YAML file with any subset of the sections; ``None`` uses the defaults.
        overrides: dotted ``section.key=value`` strings, e.g. ``["training.epochs=5"]``.
    """
    raw = read_yaml(path) if path is not None else {}
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data, model, training, ...)")
    return config_from_dict(apply_overrides(raw or {}, overrides or []))


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run folder keeps)."""
    from acdc_prune.io import atomic_write_text

    atomic_write_text(Path(path), yaml.dump(config.to_dict(), Dumper=_YamlDumper, sort_keys=False))


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """List ``(dotted key, type, default, meaning)`` for every config field, for help output."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            rows.extend(describe_fields(tp, f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default is MISSING else f.default
        rows.append((f"{prefix}{f.name}", _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
