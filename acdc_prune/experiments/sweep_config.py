"""Sweep files: what a sweep varies (criteria, scopes, ratios, budget targets, modes, seeds), validated."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from acdc_prune.config import REINIT_MODES, PruningConfig, from_mapping, read_yaml, spec, validate_ratios
from acdc_prune.errors import ConfigError
from acdc_prune.io import check_name

SCOPES = PruningConfig.__dataclass_fields__["scope"].metadata["choices"]
"""Ranking scopes of a ratios setting (``pruning.scope``)."""
TARGET_METRICS = PruningConfig.__dataclass_fields__["target_metric"].metadata["choices"]
"""What a budget target counts (``pruning.target_metric``)."""
DEFAULT_RATIOS = {"half": {"default": 0.5}}
"""The ratios setting of a sweep file that names none."""


@dataclass
class ArmGrid:
    """Pruning settings crossed with each other: every criterion x scope x ratios setting, and every
    criterion x budget target (a target always ranks channels globally)."""

    ratios: dict[str, dict[str, float]] = spec(
        factory=dict, ge=0.0, lt=1.0, doc="named block ratios settings; {} with no other setting = half"
    )
    uniform: list[float] = spec(factory=list, ge=0.0, lt=1.0, doc="uniform ratios, added as 'uniform-R'")
    targets: dict[str, list[float]] = spec(
        factory=dict, gt=0.0, le=1.0, doc="budgets: metric (macs, params, latency) -> fractions of it to keep"
    )
    criteria: list[str] = spec(
        factory=list, doc="importance criteria; [] = the base config's pruning.importance"
    )
    scopes: list[str] = spec(
        factory=list,
        choices=SCOPES,
        doc="scopes of the ratios settings; [] = the base config's pruning.scope",
    )
    steps: list[int] = spec(
        factory=list,
        ge=1,
        doc="geometric steps to each target, retraining after each; [] = the base config's pruning.steps",
    )


@dataclass
class SweepConfig(ArmGrid):
    """What a sweep runs; read from YAML by :func:`load_sweep`. Its grid keys (``ratios``, ``uniform``,
    ``targets``, ``criteria``, ``scopes``) form the first grid of settings, ``grids`` adds more."""

    name: str = spec("sweep", doc="sweep folder: <runs_dir>/<experiment>/<name>")
    config: str | None = spec(None, doc="base experiment config, relative to the sweep file; null = defaults")
    overrides: list[str] = spec(factory=list, doc="dotted overrides of the base config")
    baseline: str | None = spec(None, doc="an existing trained run folder to prune instead of training one")
    grids: list[dict[str, Any]] = spec(
        factory=list, doc="more grids of ratios/uniform/targets/criteria/scopes"
    )
    modes: list[str] = spec(
        factory=lambda: list(REINIT_MODES), choices=REINIT_MODES, doc="re-initialisations"
    )
    scratch: bool = spec(False, doc="control arm: the pruned widths trained from scratch for the full budget")
    retrain_epochs: int | None = spec(None, ge=0, doc="retraining epochs; null = pruning.retrain_epochs")
    retrain_lr: float | None = spec(None, gt=0.0, doc="retraining peak learning rate; null = config's")
    rewind_to: str | None = spec(None, doc="rewind checkpoint; null = pruning.rewind_to")
    seeds: list[int] = spec(
        factory=list, ge=0, doc="repeat every arm with each training seed; [] = once, with the config's seed"
    )
    seed_baseline: bool = spec(False, doc="with seeds: one baseline per seed (else one baseline for all)")
    threads_per_arm: int = spec(1, ge=1, doc="CPU threads (and Ray CPUs) of each arm on the ray executor")
    gpus_per_arm: float | None = spec(
        None, ge=0.0, doc="GPUs of each arm on the ray executor; null = 1 where the cluster has GPUs"
    )


@dataclass(frozen=True)
class Setting:
    """What an arm prunes: a criterion ranking channels in a scope, removing block ratios or down to a target.

    Attributes:
        name: its part of arm names: the ratios setting's name (``half``, ``uniform-0.5``) for a grid
            that names no criteria or scopes, else ``<criterion>-<scope>-<ratios>`` or, for a target,
            ``<criterion>-global-<metric><target>`` (``taylor-global-macs0.1``), with ``-<n>steps``
            for a target reached in n > 1 steps.
        criterion: the importance criterion's registered name.
        scope: ``block`` or ``global``.
        ratios_name: the ratios setting's own name; ``None`` for a target.
        ratios: share of filters removed per block prefix (with ``default``); ``None`` for a target.
        target_metric: ``macs``, ``params`` or ``latency``; ``None`` for ratios.
        target: fraction of the original ``target_metric`` to keep, in (0, 1]; ``None`` for ratios.
        steps: geometric steps to the target, each retrained (``pruning.steps``); ``None`` for ratios.
    """

    name: str
    criterion: str
    scope: str
    ratios_name: str | None = None
    ratios: dict[str, float] | None = None
    target_metric: str | None = None
    target: float | None = None
    steps: int | None = None

    @property
    def overrides(self) -> list[str]:
        """Dotted ``pruning.*`` overrides that make an arm prune as this setting says."""
        settings = {
            "importance": self.criterion,
            "scope": self.scope,
            "target": self.target,
            **({"target_metric": self.target_metric, "steps": self.steps} if self.target is not None else {}),
        }
        return [f"pruning.{key}={json.dumps(value)}" for key, value in settings.items()]

    def labels(self) -> dict[str, Any]:
        """The report's description of the setting (see ``acdc_prune.experiments.report.PRUNING_COLUMNS``)."""
        return {
            "setting": self.name,
            "criterion": self.criterion,
            "scope": self.scope,
            "ratios": self.ratios_name,
            "target_metric": self.target_metric,
            "target": self.target,
            "steps": self.steps,
        }


def load_sweep(path: str | Path) -> tuple[SweepConfig, Path]:
    """Read and validate a sweep YAML file; returns it and the folder its relative paths start from.

    Raises:
        ConfigError: unknown keys (with the closest valid key), bad values, unknown modes, criteria or
            target metrics, targets outside (0, 1], repeated settings, no arms.
    """
    path = Path(path)
    sweep = from_mapping(SweepConfig, read_yaml(path), "")
    sweep_settings(sweep)
    return sweep, path.parent


def _check_criterion(name: str, where: str) -> None:
    """Refuse a criterion the importance registry does not know, listing those it does."""
    from acdc_prune.pruning.importance import importance_names

    known = importance_names()
    if name not in known:
        raise ConfigError(
            f"{where}: '{name}' is not one of {', '.join(known)} (register new criteria with "
            "acdc_prune.pruning.register_importance)"
        )


def _grids(sweep: SweepConfig) -> list[tuple[str, ArmGrid]]:
    """``(prefix of its keys in messages, grid)`` of the sweep's top-level grid and each of ``grids``."""
    own = ArmGrid(**{f.name: getattr(sweep, f.name) for f in fields(ArmGrid)})
    more = [(f"grids[{i}].", from_mapping(ArmGrid, raw, f"grids[{i}].")) for i, raw in enumerate(sweep.grids)]
    if not more and not (own.ratios or own.uniform or own.targets):
        own.ratios = copy.deepcopy(DEFAULT_RATIOS)  # a sweep file that names no setting prunes half
    used = own.ratios or own.uniform or own.targets or own.criteria or own.scopes
    return [("", own), *more] if used else more


def _ratios_settings(grid: ArmGrid, where: str) -> dict[str, dict[str, float]]:
    """The grid's named and uniform ratios settings, checked."""
    settings = {
        name: validate_ratios(ratios, f"{where}ratios.{name}") for name, ratios in grid.ratios.items()
    }
    for ratio in grid.uniform:
        settings[f"uniform-{ratio:g}"] = {"default": ratio}
    for name in settings:
        check_name(name, "ratios setting name")
    return settings


def grid_settings(grid: ArmGrid, defaults: PruningConfig, where: str = "") -> list[Setting]:
    """Every setting of one grid: criteria x scopes x ratios settings, then criteria x targets x steps.

    Args:
        grid: the grid, its values already type-checked (:func:`~acdc_prune.config.from_mapping`).
        defaults: the pruning settings arms start from; give the criterion and the scope the grid
            leaves out.
        where: the grid's key prefix in error messages (``""`` or ``grids[1].``).

    Raises:
        ConfigError: an unknown criterion or target metric, a grid without ratios, uniform or targets,
            block keys in a global ratios setting, scopes given to a grid of targets only, or steps
            without targets.
    """
    ratios = _ratios_settings(grid, where)
    if not ratios and not grid.targets:
        raise ConfigError(
            f"{where.rstrip('.') or 'the top level of the sweep file'} names no ratios, uniform or targets; "
            "give one"
        )
    if grid.scopes and not ratios:
        raise ConfigError(
            f"{where}scopes: targets always rank channels globally; scopes apply to ratios and uniform"
        )
    if grid.steps and not grid.targets:
        raise ConfigError(f"{where}steps: steps lead to a target; give targets or remove steps")
    for metric in grid.targets:
        if metric not in TARGET_METRICS:
            raise ConfigError(f"{where}targets: '{metric}' is not one of {', '.join(TARGET_METRICS)}")
    for i, criterion in enumerate(grid.criteria):
        _check_criterion(criterion, f"{where}criteria[{i}]")
    if not grid.criteria:
        _check_criterion(defaults.importance, "pruning.importance of the base config")
    named = bool(grid.criteria or grid.scopes)
    settings = []
    for criterion in grid.criteria or [defaults.importance]:
        for scope in grid.scopes or [defaults.scope]:
            for ratios_name, values in ratios.items():
                if scope == "global" and set(values) != {"default"}:
                    raise ConfigError(
                        f"{where}ratios.{ratios_name}: global scope takes one ratio for the whole network "
                        "(default only), not block keys"
                    )
                name = f"{criterion}-{scope}-{ratios_name}" if named else ratios_name
                settings.append(Setting(name, criterion, scope, ratios_name, values))
        for metric, targets in grid.targets.items():
            for target in targets:
                for steps in grid.steps or [defaults.steps]:
                    name = f"{criterion}-global-{metric}{target:g}" + (f"-{steps}steps" if steps > 1 else "")
                    budget = {"target_metric": metric, "target": target, "steps": steps}
                    settings.append(Setting(name, criterion, "global", **budget))
    return settings


def sweep_settings(sweep: SweepConfig, defaults: PruningConfig | None = None) -> list[Setting]:
    """Every setting of ``sweep``'s grids in order, checked (names, values, criteria, seeds, some arm).

    Args:
        sweep: the sweep, its values already type-checked.
        defaults: the pruning settings arms start from (default: the config defaults; the plan passes
            the base config's).

    Raises:
        ConfigError: see :func:`grid_settings`; also a setting named twice, repeated seeds, a sweep
            without modes, and ``seed_baseline`` without seeds or with a baseline run.
    """
    check_name(sweep.name, "sweep name")
    defaults = defaults if defaults is not None else PruningConfig()
    settings = [s for where, grid in _grids(sweep) for s in grid_settings(grid, defaults, where)]
    seen: set[str] = set()
    for setting in settings:
        check_name(setting.name, "setting name")
        if setting.name in seen:
            raise ConfigError(
                f"setting '{setting.name}' comes twice; list each criterion, scope, ratio and target once"
            )
        seen.add(setting.name)
    if not (sweep.modes or sweep.scratch):
        raise ConfigError("the sweep has no arms: give at least one ratios setting and one mode")
    if len(set(sweep.seeds)) != len(sweep.seeds):
        raise ConfigError(f"seeds {sweep.seeds} repeat a seed; list each seed once")
    if sweep.seed_baseline and (sweep.baseline or not sweep.seeds):
        raise ConfigError("seed_baseline trains one baseline per seed: give seeds and no baseline run")
    return settings
