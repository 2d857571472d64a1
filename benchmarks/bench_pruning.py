"""Pruning benchmark: coverage of MONAI networks (acdc-prune vs Torch-Pruning), plan time, CPU latency.

    python benchmarks/bench_pruning.py --out benchmarks/results/pruning.json

Coverage: every network of ``acdc_prune.pruning.zoo.ZOO`` (MONAI's segmentation networks, 2D and
3D, at the catalogue's benchmark widths and input sizes) plus the project's own U-Nets is pruned at a
uniform ratio by acdc-prune and, when installed, by Torch-Pruning; a row reports the outcome (exact,
shape-only where a pruned GroupNorm/LayerNorm changes its statistics, refused with the reason, or an
error), the max deviation of the pruned output from the original with the dropped input channels
zeroed (eval mode, randomised norm statistics), the plan and rebuild seconds, and parameters and MACs
before and after. Timing: plan + rebuild of the ~44M-parameter classic design. Latency: the classic
design before and after 50% pruning, beside a dense network built directly at the pruned widths,
and with kept widths rounded to a multiple of 8.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from monai.networks.nets import DynUNet, UNet
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils import _pytree as pytree

from acdc_prune.engine.cost import count_macs, count_parameters
from acdc_prune.models.unet import UNet2D
from acdc_prune.pruning import (
    LayerPlan,
    PruningError,
    PruningPlan,
    apply_plan,
    max_deviation,
    plan_pruning,
    randomise_norm_statistics,
)
from acdc_prune.pruning.verify import changes_channel_statistics, mixes_channel_statistics
from acdc_prune.pruning.zoo import ZOO

#: The project's networks and MONAI variants beside the catalogue, in 2D at ``--size``.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "MONAI UNet (batch norm)": lambda: UNet(
        2, 1, 4, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch"
    ),
    "MONAI DynUNet (plain)": lambda: DynUNet(2, 1, 4, [3] * 5, [1, 2, 2, 2, 2], [2, 2, 2, 2]),
    "UNet2D (project default)": lambda: UNet2D(),
    "UNet2D.classic (basic_UNet, 43.9M)": lambda: UNet2D.classic(),
}
#: Largest deviation from the zeroed reference, relative to outputs larger than 1, counted as exact.
ATOL = 1e-5


@dataclass(frozen=True)
class Case:
    """One coverage row's network: its name, spatial dims, builder and example input shape."""

    name: str
    dims: int
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]


def cases(size: int, only: str | None = None) -> list[Case]:
    """The catalogue at its benchmark sizes, then :data:`MODELS` at ``size``; ``only`` filters names."""
    rows = [
        Case(net.name, dims, lambda net=net, dims=dims: net.build(dims, False), net.input_shape(dims, False))
        for net in ZOO
        if net.available()
        for dims in net.dims
    ]
    rows += [Case(name, 2, build, (1, 1, size, size)) for name, build in MODELS.items()]
    return [case for case in rows if only is None or only.lower() in case.name.lower()]


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"


def _scale(model: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute output of the model (at least 1): the deviation's unit."""
    with torch.no_grad():
        leaves = [t for t in pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]
    return max(1.0, *(t.abs().max().item() for t in leaves))


def _works(model: nn.Module, pruned: nn.Module, plan: PruningPlan, x: torch.Tensor, exact: bool) -> dict:
    """A coverage row for a pruned network: outcome, contract deviation, params and MACs after."""
    deviation = max_deviation(model, pruned, plan, x)
    within = deviation <= ATOL * _scale(model, x)
    status = ("exact" if within else "WRONG") if exact else "shape-only"
    return {
        "status": status,
        "max_deviation": deviation if exact else None,
        "params_after": count_parameters(pruned),
        "macs_after": count_macs(pruned, tuple(x.shape)),
    }


def run_acdc_prune(model: nn.Module, x: torch.Tensor, ratio: float) -> dict:
    """Plan and rebuild, timed; a refusal (``PruningError``) or a crash becomes the row's status."""
    try:
        start = time.perf_counter()
        plan = plan_pruning(model, x, {"default": ratio})
        planned = time.perf_counter()
        pruned = apply_plan(model, plan)
        rebuilt = time.perf_counter()
    except PruningError as error:
        return {"status": "refused", "error": _first_line(error)}
    except Exception as error:
        return {"status": "error", "error": _first_line(error)}
    timing = {"plan_s": planned - start, "rebuild_s": rebuilt - planned, "total_s": rebuilt - start}
    return {**_works(model, pruned, plan, x, not changes_channel_statistics(model, plan)), **timing}


def _torch_pruning():
    """The Torch-Pruning module and its installed version, or ``(None, None)``."""
    try:
        import torch_pruning
    except ImportError:
        return None, None
    return torch_pruning, importlib.metadata.version("torch-pruning")


def run_torch_pruning(tp, model: nn.Module, x: torch.Tensor, ratio: float) -> dict:
    """Torch-Pruning's MetaPruner with L1 magnitude importance; removed inputs recorded per layer."""
    pruned = copy.deepcopy(model)
    outputs = [m for m in pruned.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1:]
    names = {m: n for n, m in pruned.named_modules()}
    removed_in: dict[str, set[int]] = {}
    try:
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            pruned,
            x,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=outputs,
        )
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                handler = getattr(dep.handler, "__name__", "")
                module = dep.target.module
                if handler == "prune_in_channels" and isinstance(
                    module, (nn.modules.conv._ConvNd, nn.Linear)
                ):
                    removed_in.setdefault(names[module], set()).update(int(i) for i in idxs)
            group.prune()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            pruned.eval()(x)
    except Exception as error:
        return {"status": "error", "error": _first_line(error)}
    layers = {}
    for name, removed in removed_in.items():
        module = model.get_submodule(name)
        size = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        layers[name] = LayerPlan(type(module).__name__, None, [i for i in range(size) if i not in removed])
    plan = PruningPlan(type(model).__name__, layers, [], {"default": ratio})
    try:
        row = _works(model, pruned, plan, x, not mixes_channel_statistics(model))
    except Exception as error:
        return {"status": "error", "error": _first_line(error)}
    return {**row, "total_s": seconds}


def coverage(size: int, ratio: float, only: str | None = None, console: Console | None = None) -> list[dict]:
    """One acdc-prune row and one Torch-Pruning row per network of :func:`cases`."""
    tp, tp_version = _torch_pruning()
    rows = []
    for case in cases(size, only):
        torch.manual_seed(0)
        model = randomise_norm_statistics(case.build()).eval()
        x = torch.randn(*case.shape, generator=torch.Generator().manual_seed(0))
        base = {
            "model": case.name,
            "dims": f"{case.dims}D",
            "input": "x".join(map(str, case.shape)),
            "params_before": count_parameters(model),
            "macs_before": count_macs(model, tuple(x.shape)),
        }
        rows.append({**base, "tool": "acdc-prune", **run_acdc_prune(model, x, ratio)})
        if tp is None:
            rows.append({**base, "tool": "Torch-Pruning", "status": "not installed"})
        else:
            rows.append(
                {**base, "tool": f"Torch-Pruning {tp_version}", **run_torch_pruning(tp, model, x, ratio)}
            )
        if console is not None:
            console.print(f"{case.name} {case.dims}D: {rows[-2]['status']} / {rows[-1]['status']}")
    return rows


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def planning_time(sizes: list[int], ratio: float, repeats: int, threads: list[int]) -> list[dict]:
    """Median plan and rebuild seconds of the classic design, per example size and torch thread count."""
    model = randomise_norm_statistics(UNet2D.classic()).eval()
    default_threads = torch.get_num_threads()
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for size in sizes:
            x = torch.randn(1, 1, size, size)
            plan_s = _median_time(lambda x=x: plan_pruning(model, x, {"default": ratio}), repeats)
            plan = plan_pruning(model, x, {"default": ratio})
            rebuild_s = _median_time(lambda plan=plan: apply_plan(model, plan), repeats)
            rows.append(
                {
                    "torch_threads": n_threads,
                    "example_input": f"1x1x{size}x{size}",
                    "plan_s": plan_s,
                    "rebuild_s": rebuild_s,
                    "total_s": plan_s + rebuild_s,
                }
            )
    torch.set_num_threads(default_threads)
    return rows


def _dense_at_pruned_widths(pruned: UNet2D) -> UNet2D:
    """A freshly built UNet2D with the pruned network's widths (when every block stayed uniform)."""
    features = [e.conv1.conv.out_channels for e in pruned.encoders]
    return UNet2D(features=features, bottleneck=pruned.bottleneck.conv1.conv.out_channels).eval()


def latency(batches: list[int], size: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = randomise_norm_statistics(UNet2D.classic()).eval()
    example = torch.randn(1, 1, 64, 64)
    variants: dict[str, nn.Module] = {"original": model}
    pruned = apply_plan(model, plan_pruning(model, example, {"default": 0.5}))
    variants["pruned 50%"] = pruned
    variants["dense at pruned widths"] = _dense_at_pruned_widths(pruned)
    variants["pruned 30%"] = apply_plan(model, plan_pruning(model, example, {"default": 0.3}))
    variants["pruned 30%, round_to=8"] = apply_plan(
        model, plan_pruning(model, example, {"default": 0.3}, round_to=8)
    )
    rows = []
    for batch in batches:
        x = torch.randn(batch, 1, size, size)
        reference = None
        for name, net in variants.items():
            net.eval()
            with torch.inference_mode():
                seconds = _median_time(lambda net=net, x=x: net(x), repeats)
            reference = reference or seconds
            rows.append(
                {
                    "batch": batch,
                    "network": name,
                    "params": count_parameters(net),
                    "macs_per_image": count_macs(net, tuple(x[:1].shape)),
                    "latency_ms": 1000 * seconds,
                    "speed_up": reference / seconds,
                }
            )
    return rows


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float) and not (value.is_integer() and abs(value) >= 10_000):
        return f"{value:.3g}"
    if isinstance(value, (int, float)) and abs(value) >= 10_000:
        return f"{value / 1e6:.2f}M" if abs(value) < 10**9 else f"{value / 1e9:.2f}G"
    return str(value)


def print_table(console: Console, title: str, frame: pd.DataFrame) -> None:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column))
    for row in frame.astype(object).itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pruning.json"))
    parser.add_argument("--ratio", type=float, default=0.5, help="uniform ratio of the coverage table")
    parser.add_argument("--size", type=int, default=128, help="input side of the project's networks")
    parser.add_argument("--only", help="coverage of the networks whose name contains this text only")
    parser.add_argument("--latency-size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    console = Console(width=200)
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "coverage": coverage(args.size, args.ratio, args.only, console),
        "planning_time": planning_time([64, 256], 0.5, args.repeats, sorted({1, torch.get_num_threads()})),
    }
    columns = ["model", "dims", "input", "tool", "status", "max_deviation", "total_s", "params_before"]
    frame = pd.DataFrame(results["coverage"]).reindex(columns=[*columns, "params_after", "error"])
    print_table(console, f"Coverage at ratio {args.ratio}", frame)
    print_table(console, "Plan + rebuild time, UNet2D.classic", pd.DataFrame(results["planning_time"]))
    if not args.skip_latency:
        results["latency"] = latency(args.batches, args.latency_size, args.repeats)
        print_table(
            console,
            f"CPU latency at {args.latency_size}x{args.latency_size}",
            pd.DataFrame(results["latency"]),
        )
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
