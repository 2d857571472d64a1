"""Training throughput: the project's step path (TrainStep + run_epoch) against a bare PyTorch loop.

Both sides train copies of the same network (same initial weights) on the same synthetic batch with
the same loss, optimiser, batch and patch size, and on CUDA the same autocast and memory format; they
alternate in rounds so load changes on the machine hit both. The project's side also runs the
per-iteration schedule, gradient clipping, loss accumulation on the device and the rich progress
callback exactly as ``train`` does. Prints a table and writes JSON.

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
from acdc_prune.engine.trainer import build_train_step, make_loss, make_progress, resolve_device, run_epoch
from acdc_prune.models import build_model, total_stride


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


def bare_loop(model, loss_fn, image, label, steps, device, amp, channels_last, lr) -> float:
    """Seconds for ``steps`` plain AdamW steps: zero_grad, forward, loss, backward, step."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    model.train()
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        x = image.to(device, non_blocking=True, memory_format=fmt)
        y = label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
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
    progress = make_progress(Console(file=io.StringIO(), force_terminal=True), enabled=True)
    task = progress.add_task("bench", total=steps, info="")

    def refresh(done: int, loss: float, slices: int) -> None:
        progress.update(task, completed=done, info=f"loss {loss:.4f}")

    batches = ({"image": image, "label": label} for _ in range(steps))
    _sync(device)
    began = time.perf_counter()
    with progress:
        run_epoch(step, batches, refresh)
    _sync(device)
    return time.perf_counter() - began


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

    amp = cfg.amp and device.type == "cuda"
    channels_last = cfg.channels_last and device.type == "cuda"
    bare_model = copy.deepcopy(reference).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    loss_fn = make_loss(cfg)
    total_steps = args.warmup + args.rounds * args.steps
    step = build_train_step(copy.deepcopy(reference), cfg, device, steps_per_epoch=total_steps)

    bare_loop(bare_model, loss_fn, image, label, args.warmup, device, amp, channels_last, cfg.lr)
    project_loop(step, image, label, args.warmup, device)
    bare_rates, project_rates = [], []
    for _ in range(args.rounds):
        seconds = bare_loop(bare_model, loss_fn, image, label, args.steps, device, amp, channels_last, cfg.lr)
        bare_rates.append(args.steps * batch / seconds)
        project_rates.append(args.steps * batch / project_loop(step, image, label, args.steps, device))

    bare, project = statistics.median(bare_rates), statistics.median(project_rates)
    # Each round pairs two neighbouring timings, so the median of per-round ratios cancels most of
    # the drift of a shared machine's load.
    ratio = statistics.median(p / b for p, b in zip(project_rates, bare_rates, strict=True))
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
        "amp": amp,
        "channels_last": channels_last,
        "grad_clip": cfg.grad_clip,
        "scheduler": cfg.scheduler,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "bare_slices_per_s": bare_rates,
        "project_slices_per_s": project_rates,
        "bare_median": bare,
        "project_median": project,
        "ratio": ratio,
    }
    table = Table(title=f"training throughput, {device}, batch {batch}, {height}x{width}")
    table.add_column("path")
    table.add_column("slices/s (median)", justify="right")
    table.add_column("rounds", justify="right")
    table.add_row("bare PyTorch loop", f"{bare:.1f}", ", ".join(f"{r:.1f}" for r in bare_rates))
    table.add_row("acdc_prune TrainStep", f"{project:.1f}", ", ".join(f"{r:.1f}" for r in project_rates))
    ratios = ", ".join(f"{p / b:.3f}" for p, b in zip(project_rates, bare_rates, strict=True))
    table.add_row("ratio (median of rounds)", f"{ratio:.3f}", ratios)
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
