"""Export benchmark: CPU latency of onnxruntime against eager PyTorch, for a baseline and a pruned U-Net.

    python benchmarks/bench_export.py --out benchmarks/results/export.json

The networks are the UNet2D of ``configs/acdc-cpu.yaml`` (widths 16-256, bottleneck 256, batch norm)
with random weights and randomised norm statistics, and its uniform 50% prune planned and rebuilt
with the project's pruning API (``plan_for`` with the config's importance and rounding, then
``apply_plan``). Each is exported to ONNX as ``acdc-prune export`` does (dynamic batch and size) and
run on onnxruntime's CPU provider (idle threads not spinning). Per batch size, PyTorch (eval,
``torch.inference_mode``) and onnxruntime, on the same number of threads, alternate pass by pass
after untimed warm-up passes, so load changes on the machine hit both; the table gives the median
per-slice time of each and their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from acdc_prune.config import load_config
from acdc_prune.engine.cost import count_macs, count_parameters
from acdc_prune.engine.export import INPUT_NAME, OPSET, export_onnx
from acdc_prune.experiments.prune import plan_for
from acdc_prune.models import build_model, total_stride
from acdc_prune.pruning import apply_plan, randomise_norm_statistics


def networks(config_path: Path, ratio: float) -> tuple[dict[str, nn.Module], int]:
    """The config's network (random weights) and its uniform prune at ``ratio``; the total stride."""
    config = load_config(config_path, [])
    torch.manual_seed(0)
    model = randomise_norm_statistics(build_model(config.model)).eval()
    plan, _ = plan_for(model, config, {"default": ratio})
    pruned = apply_plan(model, plan).eval()
    return {"baseline": model, f"pruned {ratio:.0%}": pruned}, total_stride(config.model)


def onnx_session(model: nn.Module, stride: int, threads: int) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of ``model`` exported with dynamic batch, H and W, on ``threads`` threads.

    Its idle threads sleep instead of spinning: spinning threads would take the cores from the
    PyTorch passes that alternate with onnxruntime's.
    """
    example = torch.randn(2, 1, 3 * stride, 4 * stride)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        export_onnx(model, example, stride), options, providers=["CPUExecutionProvider"]
    )


def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds, one pass of each per round, after warm-up."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def latency(
    nets: dict[str, nn.Module],
    stride: int,
    size: int,
    batches: list[int],
    repeats: int,
    warmup: int,
    threads: int,
) -> list[dict]:
    """One row per network and batch size: per-slice medians of PyTorch and onnxruntime and their ratio."""
    rows = []
    for name, net in nets.items():
        session = onnx_session(net, stride, threads)
        for batch in batches:
            x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(batch))
            feed = {INPUT_NAME: x.numpy()}
            with torch.inference_mode():
                times = alternate(
                    {
                        "pytorch": lambda net=net, x=x: net(x),
                        "onnxruntime": lambda s=session, f=feed: s.run(None, f),
                    },
                    repeats,
                    warmup,
                )
                deviation = float(np.abs(session.run(None, feed)[0] - net(x).numpy()).max())
            torch_ms, ort_ms = (
                1000 * statistics.median(times[k]) / batch for k in ("pytorch", "onnxruntime")
            )
            rows.append(
                {
                    "network": name,
                    "params": count_parameters(net),
                    "macs_per_slice": count_macs(net, (1, 1, size, size)),
                    "batch": batch,
                    "pytorch_ms_per_slice": torch_ms,
                    "onnxruntime_ms_per_slice": ort_ms,
                    "speed_up": torch_ms / ort_ms,
                    "max_abs_deviation": deviation,
                }
            )
    return rows


def print_table(console: Console, title: str, rows: list[dict]) -> None:
    table = Table(title=title)
    columns = ("network", "params", "macs_per_slice", "batch", "pytorch_ms_per_slice")
    for column in (*columns, "onnxruntime_ms_per_slice", "speed_up", "max_abs_deviation"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["network"],
            f"{row['params'] / 1e6:.2f}M",
            f"{row['macs_per_slice'] / 1e9:.2f}G",
            str(row["batch"]),
            f"{row['pytorch_ms_per_slice']:.1f}",
            f"{row['onnxruntime_ms_per_slice']:.1f}",
            f"{row['speed_up']:.2f}",
            f"{row['max_abs_deviation']:.1e}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export.json"))
    parser.add_argument("--config", type=Path, default=Path("configs/acdc-cpu.yaml"))
    parser.add_argument("--ratio", type=float, default=0.5, help="uniform pruning ratio")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="threads of both PyTorch and onnxruntime"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    console = Console(width=200)
    load_start = os.getloadavg()
    nets, stride = networks(args.config, args.ratio)
    rows = latency(nets, stride, args.size, args.batches, args.repeats, args.warmup, args.threads)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "settings": vars(args) | {"out": str(args.out), "config": str(args.config)},
        "latency": rows,
    }
    print_table(
        console,
        f"CPU latency per slice at {args.size}x{args.size}, median of {args.repeats} (ms)",
        rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
