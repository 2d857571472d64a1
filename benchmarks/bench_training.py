"""Training throughput: the project's step path (TrainStep + run_epoch) against a bare PyTorch loop,
and the configured precision (``training.precision``, default ``auto``) against float32.

Every side trains a copy of the same network (same initial weights) on the same synthetic batch with
the same loss, optimiser, batch and patch size; the bare loop uses the same autocast and memory
format as the project's step. The sides alternate in rounds so load changes on the machine hit all
of them, and ratios are medians of per-round ratios. The project's side also runs the per-iteration
schedule, gradient clipping, loss accumulation on the device and the rich progress callback exactly
as ``train`` does. Prints a table and writes JSON.

    python benchmarks/bench_training.py --config configs/demo.yaml --out benchmarks/results/training.json
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from acdc_prune.config import load_config
from acdc_prune.engine.device import resolve_device
from acdc_prune.engine.precision import FP32, Precision, resolve_precision
from acdc_prune.engine.steps import build_train_step, make_loss, run_epoch
from acdc_prune.models import build_model, total_stride
from acdc_prune.render import RichReporter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.partition(':')[2].strip()} ({os.cpu_count()} cores)"
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def bare_loop(model, loss_fn, image, label, steps, device, precision: Precision, lr) -> float:
    """Seconds for ``steps`` plain AdamW steps: zero_grad, forward, loss, backward, step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scales_gradients)
    dtype = precision.dtype or torch.float32
    model.train()
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        x = image.to(device, non_blocking=True, memory_format=precision.memory_format)
        y = label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=precision.dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    return time.perf_counter() - began


def project_loop(step, image, label, steps, device) -> float:
    """Seconds for ``steps`` steps through ``run_epoch`` with a live (off-screen) progress display."""
    reporter = RichReporter(Console(file=io.StringIO(), force_terminal=True))
    reporter.start("batches", steps)

    def refresh(done: int, loss: float, slices: int) -> None:
        reporter.update("batches", done, f"loss {loss:.4f}")

    batches = ({"image": image, "label": label} for _ in range(steps))
    _sync(device)
    began = time.perf_counter()
    with reporter:
        run_epoch(step, batches, refresh)
    _sync(device)
    return time.perf_counter() - began


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="config giving model, batch and patch")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides, e.g. training.batch_size=32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds; medians are reported")
    parser.add_argument("--out", default="benchmarks/results/training.json", help="JSON result file")
    args = parser.parse_args()

    load_before = list(os.getloadavg())
    config = load_config(args.config, args.set)
    cfg = config.training
    device = resolve_device(cfg.device)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    reference = build_model(config.model)
    stride = total_stride(config.model)
    height, width = (-(-side // stride) * stride for side in config.data.patch_size)
    batch = cfg.batch_size
    image = torch.randn(batch, config.model.in_channels, height, width)
    label = torch.randint(0, config.model.out_channels, (batch, 1, height, width))
    if device.type == "cuda":
        image, label = image.pin_memory(), label.pin_memory()

    precision = resolve_precision(cfg.precision, cfg.channels_last, device)
    bare_model = precision.prepare(copy.deepcopy(reference), device)
    loss_fn = make_loss(cfg)
    total_steps = args.warmup + args.rounds * args.steps
    step = build_train_step(copy.deepcopy(reference), cfg, device, total_steps, precision)
    fp32_step = build_train_step(copy.deepcopy(reference), cfg, device, total_steps, FP32)

    bare_loop(bare_model, loss_fn, image, label, args.warmup, device, precision, cfg.lr)
    for side in (step, fp32_step):
        project_loop(side, image, label, args.warmup, device)
    rates: dict[str, list[float]] = {"bare": [], "project": [], "project_fp32": []}
    for _ in range(args.rounds):
        seconds = bare_loop(bare_model, loss_fn, image, label, args.steps, device, precision, cfg.lr)
        rates["bare"].append(args.steps * batch / seconds)
        rates["project"].append(args.steps * batch / project_loop(step, image, label, args.steps, device))
        seconds = project_loop(fp32_step, image, label, args.steps, device)
        rates["project_fp32"].append(args.steps * batch / seconds)

    medians = {key: statistics.median(values) for key, values in rates.items()}
    # Each round pairs neighbouring timings, so the median of per-round ratios cancels most of
    # the drift of a shared machine's load.
    ratio = _median_ratio(rates["project"], rates["bare"])
    speedup = _median_ratio(rates["project"], rates["project_fp32"])
    result = {
        "config": args.config,
        "overrides": args.set,
        "model": config.model.name,
        "features": config.model.features,
        "parameters": sum(p.numel() for p in reference.parameters()),
        "batch_size": batch,
        "input_size": [height, width],
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "precision": precision.name,
        "channels_last": precision.channels_last,
        "grad_clip": cfg.grad_clip,
        "scheduler": cfg.scheduler,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "slices_per_s": rates,
        "medians": medians,
        "ratio_project_to_bare": ratio,
        "speedup_over_fp32": speedup,
    }
    layout = " + channels-last" if precision.channels_last else ""
    table = Table(title=f"training throughput, {device}, batch {batch}, {height}x{width}")
    table.add_column("path")
    table.add_column("slices/s (median)", justify="right")
    table.add_column("rounds", justify="right")
    for key, label_text in (
        ("bare", f"bare PyTorch loop, {precision.name}{layout}"),
        ("project", f"acdc_prune TrainStep, {precision.name}{layout}"),
        ("project_fp32", "acdc_prune TrainStep, fp32"),
    ):
        table.add_row(label_text, f"{medians[key]:.1f}", ", ".join(f"{r:.1f}" for r in rates[key]))
    table.add_row("TrainStep / bare (median of rounds)", f"{ratio:.3f}", "")
    table.add_row(f"{precision.name}{layout} / fp32 (median of rounds)", f"{speedup:.2f}x", "")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
