"""Entry points that the MONAI bundle in ``bundles/acdc_unet_prune`` calls through ``_target_`` names.

MONAI's bundle runner wraps every exception of a component in a long traceback; these entry points
turn this project's errors into one line on stderr and exit status 1 (``SystemExit``), the way the
``acdc-prune`` command line does, with advice worded for bundle users (``acdc_prune.render``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.quantize import open_source
from acdc_prune.errors import AcdcPruneError, CheckpointError, ConfigError
from acdc_prune.render import RichReporter, error_text

F = TypeVar("F", bound=Callable[..., Any])


def _one_line_errors(function: F) -> F:
    """Exit with ``error: <message>`` instead of a traceback when ``function`` raises an AcdcPruneError."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except AcdcPruneError as err:
            raise SystemExit(f"error: {error_text(err, 'bundle')}") from None

    return wrapper  # type: ignore[return-value]


def _required_folder(path: str | Path | None, what: str, option: str) -> Path:
    """``path`` as an existing folder, or a ConfigError telling which bundle option to pass."""
    if path is None or not str(path).strip():
        raise ConfigError(f"{what} is not set: pass {option} /path/to/folder")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder} is not a folder: check {option}")
    return folder


def read_metadata(meta_file: str | Path) -> dict[str, Any]:
    """The bundle's ``metadata.json`` as a dict.

    Raises:
        ConfigError: missing, not JSON, or without ``network_data_format`` inputs ``image`` and
            outputs ``pred``.
    """
    path = Path(meta_file)
    try:
        metadata = json.loads(path.read_text())
        image = metadata["network_data_format"]["inputs"]["image"]
        pred = metadata["network_data_format"]["outputs"]["pred"]
        int(image["num_channels"]), int(pred["num_channels"])
    except FileNotFoundError:
        raise ConfigError(f"bundle metadata {path} not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"bundle metadata {path} is not valid JSON ({err})") from None
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"bundle metadata {path} lacks network_data_format inputs.image / outputs.pred num_channels"
        ) from None
    return metadata


def check_against_metadata(
    model: nn.Module, metadata: dict[str, Any], source: str | Path, stride: int
) -> None:
    """Run ``model`` once on a zero input shaped as the metadata says and compare its output channels.

    Args:
        model: 2D network ``(B, C_in, H, W) -> (B, C_out, H, W)``.
        metadata: from :func:`read_metadata`.
        source: the model file, named in the error.
        stride: the network's total stride; the probe is ``(1, C_in, 2 * stride, 2 * stride)``.

    Raises:
        CheckpointError: the model takes another number of input channels or predicts another number
            of classes than ``network_data_format`` declares.
    """
    formats = metadata["network_data_format"]
    in_channels = int(formats["inputs"]["image"]["num_channels"])
    out_channels = int(formats["outputs"]["pred"]["num_channels"])
    probe = torch.zeros(1, in_channels, 2 * stride, 2 * stride)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(probe)
    except RuntimeError:
        raise CheckpointError(
            f"{source} does not take the {in_channels}-channel input the bundle metadata declares"
        ) from None
    finally:
        model.train(was_training)
    if output.shape[1] != out_channels:
        raise CheckpointError(
            f"{source} predicts {output.shape[1]} classes but the bundle metadata declares {out_channels} "
            f"({', '.join(formats['outputs']['pred'].get('channel_def', {}).values())})"
        )


@_one_line_errors
def load_network(model_file: str | Path, meta_file: str | Path) -> nn.Module:
    """The bundle network (baseline or pruned) with its weights, checked against the metadata.

    Args:
        model_file: an acdc-prune checkpoint such as the bundle's ``models/model.pt`` or
            ``models/pruned/model.pt`` (a pruned file carries its plan and rebuilds the smaller network).
        meta_file: the bundle's ``configs/metadata.json``.

    Returns:
        The network in eval mode on the CPU: ``(B, 1, H, W) -> (B, 4, H, W)`` logits, H and W
        multiples of its total stride.
    """
    return _checked_network(Checkpoint.open(Path(model_file)), meta_file).eval()


def _checked_network(source: Any, meta_file: str | Path) -> nn.Module:
    """The network of ``source`` (a ``Checkpoint`` or an ``OnnxSource``), refused unless it agrees with
    the bundle metadata."""
    from acdc_prune.models import total_stride

    model = source.build_model()
    check_against_metadata(model, read_metadata(meta_file), source.path, total_stride(source.config.model))
    return model


@_one_line_errors
def train(
    dataset_dir: str | Path | None,
    recipe_file: str | Path,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
) -> Path:
    """Train the bundle's network with its recipe on a data folder.

    Args:
        dataset_dir: ACDC or nnU-Net raw training folder (``--dataset_dir``).
        recipe_file: the acdc-prune config of the recipe (``configs/recipe.yaml``).
        output_dir: runs folder; the run is ``<output_dir>/<experiment>/<timestamp>``.
        overrides: dotted ``section.key=value`` changes to the recipe, e.g. ``training.epochs=2``.

    Returns:
        The run folder (``best.pt``, ``last.pt``, metrics, curves, TensorBoard events).
    """
    from acdc_prune.config import load_config
    from acdc_prune.engine.trainer import train as train_model

    data = _required_folder(dataset_dir, "dataset_dir", "--dataset_dir")
    config = load_config(recipe_file, [*overrides, f"data.root={data}", f"logging.runs_dir={output_dir}"])
    with RichReporter(bars=config.logging.progress) as reporter:
        result = train_model(config, reporter=reporter)
    print(f"run folder {result.run_dir} (best mean Dice {result.best_dice:.4f} at epoch {result.best_epoch})")
    return result.run_dir


@_one_line_errors
def infer(
    dataset_dir: str | Path | None,
    model_file: str | Path,
    meta_file: str | Path,
    output_dir: str | Path,
    overrides: Sequence[str] = (),
) -> Path:
    """Write a NIfTI label volume in the original geometry for every image of ``dataset_dir``.

    Args:
        dataset_dir: ACDC or nnU-Net raw folder (``--dataset_dir``); labels are not needed.
        model_file: the bundle model to run (checked against ``meta_file``).
        meta_file: the bundle's ``configs/metadata.json``.
        output_dir: parent of the new ``predictions-<timestamp>`` folder that receives the files.
        overrides: dotted changes to the stored config, e.g. ``training.device=cuda``.

    Returns:
        The predictions folder, which appears only when every file in it is written.
    """
    from acdc_prune.experiments.predict import predict_folder
    from acdc_prune.io import unused_path

    data = _required_folder(dataset_dir, "dataset_dir", "--dataset_dir")
    source = open_source(Path(model_file))  # a checkpoint or an int8 model from acdc-prune quantize
    _checked_network(source, meta_file)
    out = unused_path(output_dir, prefix="predictions-")
    with RichReporter() as reporter:
        return predict_folder(source, data, out=out, overrides=list(overrides), reporter=reporter)


@_one_line_errors
def prune(
    dataset_dir: str | Path | None,
    model_file: str | Path,
    ratios_file: str | Path,
    output_dir: str | Path,
    reinit: str = "none",
    retrain_epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Prune a trained bundle model by a ratios file, retrain it on ``dataset_dir`` and evaluate it.

    Args:
        dataset_dir: the labelled training folder (``--dataset_dir``), split as in the recipe.
        model_file: the trained model (the bundle's ``models/model.pt`` or a run's ``best.pt``).
        ratios_file: YAML of block-wise ratios (``default`` plus module-path prefixes).
        output_dir: folder that receives ``pruned/<mode>-<timestamp>`` (plan, masks, weights, metrics).
        reinit: ``none`` or ``random`` (``rewind`` needs the early checkpoints of a training run; use
            ``acdc-prune prune RUN --rewind epochN`` for it).
        retrain_epochs: retraining epochs; ``None`` uses the recipe's ``pruning.retrain_epochs``.
        overrides: dotted changes to the stored config, e.g. ``training.device=cuda``.

    Returns:
        The pruned child folder, which ``acdc-prune evaluate`` and ``load_network`` accept.
    """
    from acdc_prune.experiments.prune import prune_run, read_ratios

    if reinit == "rewind":
        raise ConfigError(
            "rewind needs the early checkpoints of a training run: use acdc-prune prune RUN --rewind epochN"
        )
    data = _required_folder(dataset_dir, "dataset_dir", "--dataset_dir")
    extra = [f"data.root={data}", f"logging.runs_dir={output_dir}"]
    with RichReporter() as reporter:
        result = prune_run(
            Path(output_dir),
            read_ratios(Path(ratios_file)),
            reinit=reinit,
            retrain_epochs=retrain_epochs,
            checkpoint=Path(model_file),
            overrides=[*overrides, *extra],
            reporter=reporter,
        )
    print(f"pruned model in {result.out_dir}")
    return result.out_dir
