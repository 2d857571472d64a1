"""Precision benchmark: CPU latency per slice in fp32, bf16 + channels-last, onnxruntime fp32 and int8.

    python benchmarks/bench_precision.py --out benchmarks/results/bench_precision.json

The networks are the UNet2D of ``configs/acdc-cpu.yaml`` (widths 16-256, bottleneck 256, batch norm)
with random weights and randomised norm statistics, and its uniform prunes (L1, ``plan_pruning`` +
``apply_plan``) at 50% and 69% of the channels of every block (4.0x and 10.2x fewer MACs);
``--target-macs 0.1 --round-to 1 8`` adds global L1 prunes to 10% of the MACs with any kept widths and
with widths in multiples of 8 (onnxruntime's x86 convolutions run in a blocked layout of 8 or 16
channels).
``--models`` adds trained networks (run folders or checkpoint files, pruned ones included, named by
their folder), timed against the config's unpruned network: give the config they were pruned from.
Each network runs four ways on the same number of threads: PyTorch eager in fp32; PyTorch eager
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with the model and input in channels-last;
onnxruntime's CPU provider on the fp32 ONNX export; and the int8 QDQ model ``acdc-prune quantize``
writes (onnxruntime static quantization, per-channel int8 weights, uint8 activations, output head
in float), calibrated here on random slices since the weights are random. ``--variants`` picks the
ones timed beside fp32 eager, the reference (leave out ``bf16_channels_last`` on a CPU without native
bf16, where autocast is emulated and several times slower than fp32), and can add
``compiled_fp32``: ``torch.compile`` (inductor, weights frozen into the graph as constants), compiled
during the warm-up passes (20-30 s per network and batch size on a 2-core CPU). Per batch size the variants
alternate pass by pass after untimed warm-up passes, so load changes on the machine hit all of
them; the table gives the median time per slice and the speed-up over the unpruned fp32 eager
network at the same batch size, measured in one run.

Idle threads of both runtimes sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE`` for PyTorch,
unless set otherwise, and ``session.intra_op.allow_spinning=0`` for onnxruntime): a spinning
runtime takes the cores from the one that runs next, and on a machine shared with other jobs
PyTorch's spinning OpenMP threads turned load into 7x slower passes (938 ms against 133 ms per
slice of the fp32 baseline at a 1-minute load of 8 on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torch._inductor.config
from rich.console import Console
from rich.table import Table
from torch import nn

from acdc_prune.config import load_config
from acdc_prune.engine.checkpoints import Checkpoint
from acdc_prune.engine.cost import count_macs, count_parameters
from acdc_prune.engine.export import export_onnx
from acdc_prune.engine.quantize import OnnxModel, quantize_onnx
from acdc_prune.models import build_model, total_stride
from acdc_prune.pruning import apply_plan, plan_pruning, plan_to_budget, randomise_norm_statistics

VARIANTS = ("fp32_eager", "bf16_channels_last", "onnxruntime_fp32", "int8", "compiled_fp32")
DEFAULT_VARIANTS = VARIANTS[1:4]


def networks(
    config_path: Path,
    ratios: list[float],
    models: list[Path],
    target_macs: list[float] = (),
    round_to: list[int] = (1,),
) -> tuple[dict[str, nn.Module], int]:
    """The config's network (random weights), its uniform prunes at ``ratios``, its global L1 prunes
    to each fraction of its MACs in ``target_macs`` with kept widths in multiples of each of
    ``round_to``, and the trained ``models`` (run folders or checkpoint files); the total stride."""
    config = load_config(config_path, [])
    torch.manual_seed(0)
    model = randomise_norm_statistics(build_model(config.model)).eval()
    example = torch.randn(1, 1, 64, 64)
    nets = {"baseline": model}
    for ratio in ratios:
        plan = plan_pruning(model, example, ratios={"default": ratio})
        nets[f"pruned {ratio:.1%}"] = apply_plan(model, plan).eval()
    for target in target_macs:
        for multiple in round_to:
            plan = plan_to_budget(model, example, target, "macs", "l1", round_to=multiple).plan
            nets[f"{target:.1%} of MACs, round_to {multiple}"] = apply_plan(model, plan).eval()
    for path in models:
        if path.name in nets:  # rows are keyed by name: a second one would replace the first
            raise SystemExit(f"--models: two networks are named {path.name}; give distinct folder names")
        nets[path.name] = Checkpoint.open(path).build_model().eval()
    return nets, total_stride(config.model)


def runners(
    net: nn.Module, stride: int, x: torch.Tensor, variants: tuple[str, ...]
) -> dict[str, Callable[[], torch.Tensor]]:
    """One function per variant of ``variants`` running ``net`` on ``x`` and returning float32 logits."""
    example = torch.randn(2, 1, 3 * stride, 4 * stride)
    exported = export_onnx(net, example, stride)
    calibration = [
        torch.randn(1, 1, *x.shape[2:], generator=torch.Generator().manual_seed(i)) for i in range(8)
    ]
    int8 = OnnxModel(quantize_onnx(exported, calibration)[0]) if "int8" in variants else None
    fp32_onnx = OnnxModel(exported)
    compiled = torch.compile(net) if "compiled_fp32" in variants else None
    channels_last = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)

    def bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return channels_last(x_last).float()

    runs = {
        "fp32_eager": lambda: net(x),
        "bf16_channels_last": bf16,
        "onnxruntime_fp32": lambda: fp32_onnx(x),
        "int8": lambda: int8(x),
        "compiled_fp32": lambda: compiled(x),
    }
    return {variant: runs[variant] for variant in variants}


def alternate(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds of each function over ``repeats`` rounds, one pass of each
    per round, after warm-up. CPU time adds up the busy time of all threads; with idle threads
    asleep it measures the work of a pass, which other jobs on the machine barely change."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def latency(
    nets: dict[str, nn.Module],
    stride: int,
    size: int,
    batches: list[int],
    repeats: int,
    warmup: int,
    variants: tuple[str, ...] = VARIANTS,
):
    """One row per network and batch: per-slice medians of each variant, deviations from fp32 eager."""
    rows = []
    for name, net in nets.items():
        for batch in batches:
            x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(batch))
            with torch.inference_mode():
                runs = runners(net, stride, x, variants)
                times, cpu = alternate(runs, repeats, warmup)
                reference = net(x)
                outputs = {variant: run() for variant, run in runs.items()}
            row = {
                "network": name,
                "params": count_parameters(net),
                "macs_per_slice": count_macs(net, (1, 1, size, size)),
                "batch": batch,
            }
            for variant in variants:
                row[f"{variant}_ms"] = 1000 * statistics.median(times[variant]) / batch
                row[f"{variant}_cpu_ms"] = 1000 * statistics.median(cpu[variant]) / batch
                row[f"{variant}_max_abs_dev"] = float((outputs[variant] - reference).abs().max())
                agree = (outputs[variant].argmax(1) == reference.argmax(1)).float().mean()
                row[f"{variant}_label_agreement"] = float(agree)
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["network"] == "baseline" and r["batch"] == row["batch"])
        for variant in variants:
            row[f"{variant}_speed_up"] = base["fp32_eager_ms"] / row[f"{variant}_ms"]
            row[f"{variant}_cpu_speed_up"] = base["fp32_eager_cpu_ms"] / row[f"{variant}_cpu_ms"]
    return rows


def print_table(console: Console, title: str, rows: list[dict], variants: tuple[str, ...]) -> None:
    """Wall-clock / CPU ms per slice of each variant, and the best speed-ups over the fp32 baseline."""
    table = Table(title=title)
    for column in ("network", "MACs", "batch", *variants, "best wall", "best CPU"):
        table.add_column(column)
    for row in rows:
        best = {kind: max(variants, key=lambda v, k=kind: row[f"{v}{k}_speed_up"]) for kind in ("", "_cpu")}
        table.add_row(
            row["network"],
            f"{row['macs_per_slice'] / 1e9:.2f}G",
            str(row["batch"]),
            *(f"{row[f'{v}_ms']:.1f} / {row[f'{v}_cpu_ms']:.1f}" for v in variants),
            *(f"{row[f'{best[k]}{k}_speed_up']:.1f}x {best[k]}" for k in ("", "_cpu")),
        )
    console.print(table)


def machine() -> dict:
    """CPU model and the instruction sets that matter for bf16 and int8."""
    flags, model = set(), platform.processor()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    wanted = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni")
    return {"cpu": model, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_precision.json"))
    parser.add_argument("--config", type=Path, default=Path("configs/acdc-cpu.yaml"))
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.69], help="uniform pruning ratios")
    parser.add_argument(
        "--target-macs", type=float, nargs="*", default=[], help="MAC fractions of global L1 prunes"
    )
    parser.add_argument(
        "--round-to", type=int, nargs="+", default=[1], help="width multiples of those prunes"
    )
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="trained run folders or .pt files")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS[1:],
        default=list(DEFAULT_VARIANTS),
        help="variants timed beside fp32 eager, the reference (bf16 is emulated and slow on CPUs without it)",
    )
    args = parser.parse_args()
    variants = ("fp32_eager", *dict.fromkeys(args.variants))
    if "OMP_WAIT_POLICY" not in os.environ:  # OpenMP reads it when torch loads: start again with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # compiled_fp32: weights as constants, folded into the kernels
    console = Console()
    nets, stride = networks(args.config, args.ratios, args.models, args.target_macs, args.round_to)
    load_before = os.getloadavg()[0]
    rows = latency(nets, stride, args.size, args.batches, args.repeats, args.warmup, variants)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "config": str(args.config),
        "size": args.size,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "target_macs": args.target_macs,
        "round_to": args.round_to,
        "variants": list(variants),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "machine": machine(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        "rows": rows,
    }
    title = (
        f"wall / CPU ms per {args.size}x{args.size} slice, {args.threads} threads, median of {args.repeats}"
    )
    print_table(console, title, rows, variants)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
